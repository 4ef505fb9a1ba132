//! The one place that decides what a `CKR_*` return code means for Tresor.
//!
//! Owns the mapping from PKCS#11 errors to recovery actions. It must not perform the actions:
//! the session pool in `hsm/mod.rs` does that.

use cryptoki::error::{Error, RvError};

/// What the back-end does after a PKCS#11 call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// This session is unusable: close and forget it, open another, retry an idempotent call
    /// once.
    DropSession,
    /// The library, device or login is gone: re-initialise the module (`C_Finalize`,
    /// `C_Initialize`, find the token, log in), then retry an idempotent call once.
    Reinitialise,
    /// The cached object handle no longer names an object: forget it, look it up again by
    /// `CKA_ID`, retry once.
    ForgetHandle,
    /// AES-GCM decryption refused the input: a wrong key, AAD or a tampered ciphertext. The
    /// session is fine; nothing is retried.
    BadCiphertext,
    /// The token refused the PIN. Never retried: retries would lock the token.
    PinRefused,
    /// Any other failure: reported as is; the session is kept.
    Fail,
}

impl Recovery {
    /// The failure class, for the `tresor_hsm_errors_total` metric.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::DropSession => "session_lost",
            Self::Reinitialise => "device_or_login_lost",
            Self::ForgetHandle => "stale_object_handle",
            Self::BadCiphertext => "bad_ciphertext",
            Self::PinRefused => "pin_refused",
            Self::Fail => "other",
        }
    }
}

/// Whether the failed call was an AES-GCM decryption, where some modules report a failed tag
/// check with a generic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// `C_DecryptInit`/`C_Decrypt` with `CKM_AES_GCM`.
    GcmDecrypt,
    /// Everything else.
    Other,
}

/// Classifies a failed call.
///
/// SoftHSM 2.6.1 returns `CKR_GENERAL_ERROR` when the GCM tag does not verify; during a GCM
/// decryption that code therefore means a bad ciphertext, not a device failure. A module that
/// really fails mid-decrypt this way fails the next call too, which is then classified
/// normally.
pub(crate) fn classify(err: &Error, call: Call) -> Recovery {
    let Error::Pkcs11(rv, _) = err else {
        return Recovery::Fail;
    };
    match rv {
        RvError::SessionHandleInvalid | RvError::SessionClosed => Recovery::DropSession,
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized
        | RvError::UserNotLoggedIn
        | RvError::SlotIdInvalid => Recovery::Reinitialise,
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Recovery::ForgetHandle,
        RvError::PinIncorrect
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::PinExpired
        | RvError::PinLocked => Recovery::PinRefused,
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange
            if call == Call::GcmDecrypt =>
        {
            Recovery::BadCiphertext
        }
        RvError::GeneralError | RvError::FunctionFailed if call == Call::GcmDecrypt => {
            Recovery::BadCiphertext
        }
        _ => Recovery::Fail,
    }
}

/// `CKR_USER_ALREADY_LOGGED_IN` is success: login is per token, not per session.
pub(crate) fn login_succeeded(result: &Result<(), Error>) -> bool {
    matches!(
        result,
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    fn err(rv: RvError) -> Error {
        Error::Pkcs11(rv, Function::Decrypt)
    }

    #[test]
    fn general_error_is_a_bad_ciphertext_only_during_gcm_decrypt() {
        assert_eq!(
            classify(&err(RvError::GeneralError), Call::GcmDecrypt),
            Recovery::BadCiphertext
        );
        assert_eq!(
            classify(&err(RvError::GeneralError), Call::Other),
            Recovery::Fail
        );
        assert_eq!(
            classify(&err(RvError::EncryptedDataInvalid), Call::GcmDecrypt),
            Recovery::BadCiphertext
        );
    }

    #[test]
    fn lost_sessions_and_devices_are_told_apart() {
        assert_eq!(
            classify(&err(RvError::SessionHandleInvalid), Call::Other),
            Recovery::DropSession
        );
        assert_eq!(
            classify(&err(RvError::SessionClosed), Call::GcmDecrypt),
            Recovery::DropSession
        );
        for rv in [
            RvError::DeviceError,
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::CryptokiNotInitialized,
            RvError::UserNotLoggedIn,
        ] {
            assert_eq!(
                classify(&err(rv), Call::GcmDecrypt),
                Recovery::Reinitialise,
                "{rv:?}"
            );
        }
        assert_eq!(
            classify(&err(RvError::KeyHandleInvalid), Call::Other),
            Recovery::ForgetHandle
        );
        assert_eq!(
            classify(&err(RvError::PinLocked), Call::Other),
            Recovery::PinRefused
        );
        assert_eq!(
            classify(&err(RvError::MechanismInvalid), Call::Other),
            Recovery::Fail
        );
        assert_eq!(classify(&Error::NotSupported, Call::Other), Recovery::Fail);
    }

    #[test]
    fn already_logged_in_counts_as_logged_in() {
        assert!(login_succeeded(&Ok(())));
        assert!(login_succeeded(&Err(Error::Pkcs11(
            RvError::UserAlreadyLoggedIn,
            Function::Login
        ))));
        assert!(!login_succeeded(&Err(Error::Pkcs11(
            RvError::PinIncorrect,
            Function::Login
        ))));
    }
}
