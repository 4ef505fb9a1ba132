//! The one mapping from errors to gRPC status (README "API status codes").
//!
//! Chosen by the error's type, never by its text. Client-facing messages carry no internal
//! detail: ciphertext problems share one generic message (no oracle), HSM and database
//! failures say only which dependency failed. Every status carries the request id (in the
//! message and the `x-request-id` metadata) so an operator can find the full error in the log.

use tonic::{Code, Status};

use crate::auth::{AuthError, Denied};
use crate::custody::CustodyError;
use crate::hsm::HsmError;

/// The one message for every malformed, tampered or wrong-AAD ciphertext.
pub const INVALID_CIPHERTEXT: &str =
    "invalid ciphertext, or the AAD differs from the one given at wrap time";

/// Builds a status with the request id attached.
pub(crate) fn status(code: Code, message: &str, request_id: &str) -> Status {
    let mut s = Status::new(code, format!("{message} (request id {request_id})"));
    if let Ok(v) = request_id.parse() {
        s.metadata_mut().insert("x-request-id", v);
    }
    s
}

/// Maps a custody failure.
pub(crate) fn from_custody(e: &CustodyError, request_id: &str) -> Status {
    use CustodyError as E;
    let (code, message): (Code, String) = match e {
        E::InvalidName(_) | E::InvalidArgument(_) => (Code::InvalidArgument, e.to_string()),
        E::PermissionDenied(d) => return denied(d, request_id),
        E::KeyNotFound(_) | E::VersionNotFound(_) => (Code::NotFound, e.to_string()),
        E::KeyExists(_) => (Code::AlreadyExists, e.to_string()),
        E::MalformedCiphertext(_)
        | E::Unauthentic
        | E::UnknownVersion
        | E::ForeignBlob { .. }
        | E::WrongKey { .. } => (Code::InvalidArgument, INVALID_CIPHERTEXT.to_owned()),
        E::VersionDisabled(_)
        | E::VersionDestroyScheduled(_)
        | E::VersionDestroyed(_)
        | E::VersionExhausted(_)
        | E::PrimaryVersion(_)
        | E::InvalidTransition { .. } => (Code::FailedPrecondition, e.to_string()),
        E::VersionLost(_) | E::MetadataIntegrity { .. } | E::ApprovalIntegrity(_) => {
            (Code::DataLoss, e.to_string())
        }
        E::IntegrityKeyMissing(_) | E::NotCurrent => (Code::Unavailable, e.to_string()),
        E::VersionBelowMinimum(_)
        | E::UsageForbidden { .. }
        | E::ApprovalClosed { .. }
        | E::ApprovalPending(_) => (Code::FailedPrecondition, e.to_string()),
        E::ApprovalNotFound(_) => (Code::NotFound, e.to_string()),
        E::SelfApproval(_) | E::AccessRuleDenied(_) | E::AccessWindowRequired(_) => {
            (Code::PermissionDenied, e.to_string())
        }
        E::WindowNotFound(_) => (Code::NotFound, e.to_string()),
        E::WindowClosed { .. } => (Code::FailedPrecondition, e.to_string()),
        E::WindowIntegrity(_) => (Code::DataLoss, e.to_string()),
        E::Conflict(_) => (Code::Aborted, e.to_string()),
        // Managed objects are KMIP's; no gRPC call reaches them today.
        E::ObjectNotFound(_) | E::ForeignObject { .. } | E::ObjectAttributeNotFound { .. } => {
            (Code::NotFound, e.to_string())
        }
        E::ObjectDestroyed(_)
        | E::ObjectState { .. }
        | E::ObjectNotUsable { .. }
        | E::ObjectDataUnauthentic(_) => (Code::FailedPrecondition, e.to_string()),
        E::FailedSetup(_) => (Code::FailedPrecondition, e.to_string()),
        E::Hsm(HsmError::BadCiphertext) => (Code::InvalidArgument, INVALID_CIPHERTEXT.to_owned()),
        E::Hsm(_) => (
            Code::Unavailable,
            "the HSM is unavailable; retry later".to_owned(),
        ),
        E::Store(_) => (
            Code::Unavailable,
            "the key database is unavailable; retry later".to_owned(),
        ),
        E::Internal(_) => (Code::Internal, "internal error".to_owned()),
    };
    status(code, &message, request_id)
}

/// Maps an authentication failure.
pub(crate) fn unauthenticated(e: &AuthError, request_id: &str) -> Status {
    status(Code::Unauthenticated, &e.to_string(), request_id)
}

/// Maps an authorization refusal. The message names the caller and what it lacked, which the
/// caller knows anyway; it never says whether a key of another tenant exists.
pub(crate) fn denied(e: &Denied, request_id: &str) -> Status {
    status(Code::PermissionDenied, &e.to_string(), request_id)
}

/// The gRPC code's canonical name, for metric labels.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::EnvelopeError;
    use crate::store::StoreError;

    #[test]
    fn ciphertext_failures_are_indistinguishable() {
        let id = "r1";
        let messages: Vec<String> = [
            CustodyError::MalformedCiphertext(EnvelopeError::TooShort(3)),
            CustodyError::Unauthentic,
            CustodyError::UnknownVersion,
            CustodyError::WrongKey {
                expected: "tenants/a/keys/b".into(),
            },
        ]
        .iter()
        .map(|e| {
            let s = from_custody(e, id);
            assert_eq!(s.code(), Code::InvalidArgument);
            s.message().to_owned()
        })
        .collect();
        assert!(messages.windows(2).all(|w| w[0] == w[1]), "{messages:?}");
    }

    #[test]
    fn internal_details_stay_inside() {
        let e = CustodyError::Store(StoreError::Corrupt {
            table: "key_versions",
            what: "secret detail".into(),
        });
        let s = from_custody(&e, "req-7");
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("secret detail"));
        assert!(s.message().contains("req-7"));
        assert_eq!(s.metadata().get("x-request-id").unwrap(), "req-7");
        let s = from_custody(
            &CustodyError::Hsm(HsmError::Unavailable("slot 3 gone".into())),
            "r",
        );
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("slot 3"));
    }

    #[test]
    fn lifecycle_failures_map_as_designed() {
        for (e, code) in [
            (CustodyError::KeyNotFound("k".into()), Code::NotFound),
            (
                CustodyError::VersionDisabled("v".into()),
                Code::FailedPrecondition,
            ),
            (
                CustodyError::VersionDestroyed("v".into()),
                Code::FailedPrecondition,
            ),
            (CustodyError::KeyExists("k".into()), Code::AlreadyExists),
            (CustodyError::Conflict("k".into()), Code::Aborted),
            (CustodyError::VersionLost("v".into()), Code::DataLoss),
            (
                CustodyError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
        ] {
            assert_eq!(from_custody(&e, "r").code(), code, "{e:?}");
        }
    }
}
