//! The service crate's only `unsafe`: `C_Encrypt` and `C_Decrypt` called through the module's
//! function list, into an output buffer of the size Tresor already knows.
//!
//! cryptoki's `Session::encrypt` and `decrypt` ask the module for the output length before
//! every call (a `C_Encrypt` with a null buffer), so each Wrap and Unwrap cost three PKCS#11
//! calls: on a network HSM, three round trips. AES-GCM's output is the input plus the 16-byte
//! tag (encrypt) and at most the input (decrypt), so `C_EncryptInit` (through cryptoki) and one
//! `C_Encrypt` here are enough. A token that wants more space answers `CKR_BUFFER_TOO_SMALL`
//! with the length it wants; the operation stays active (PKCS#11 2.40 §5.2, "Buffer handling
//! convention"), and the call is made again with that length.
//!
//! Where the token offers PKCS#11 3.0 message-based AES-GCM ([`MessageCalls`]), a session keeps
//! one `C_MessageEncryptInit` (or `C_MessageDecryptInit`) context per key and each Wrap is one
//! `C_EncryptMessage` (PKCS#11 3.0 §5.13): one round trip. The IV and the 16-byte tag travel in
//! `CK_GCM_MESSAGE_PARAMS`; the output is the same `ciphertext ‖ tag` as the single-part path.
//!
//! Owns the function pointers and their calls, nothing else: the session handle comes from a
//! cryptoki `Session` the caller holds (so no other call uses the session meanwhile) and the
//! result code goes back through cryptoki's own error type. Everything else in the crate keeps
//! `unsafe_code` denied.

#![allow(unsafe_code)]

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv};
use cryptoki_sys::{
    CK_C_Decrypt, CK_C_DecryptMessage, CK_C_Encrypt, CK_C_EncryptMessage, CK_C_MessageDecryptFinal,
    CK_C_MessageDecryptInit, CK_C_MessageEncryptFinal, CK_C_MessageEncryptInit, CK_FUNCTION_LIST,
    CK_FUNCTION_LIST_3_0, CK_GCM_MESSAGE_PARAMS, CK_INTERFACE, CK_MECHANISM, CK_OBJECT_HANDLE,
    CK_RV, CK_SESSION_HANDLE, CK_ULONG, CK_UTF8CHAR, CK_VERSION, CKG_NO_GENERATE, CKM_AES_GCM,
    CKR_BUFFER_TOO_SMALL, CKR_OK,
};
use zeroize::Zeroizing;

/// `C_Encrypt` and `C_Decrypt` of a loaded module, and its message-based AES-GCM if it has it.
pub(super) struct DirectCalls {
    encrypt: CK_C_Encrypt,
    decrypt: CK_C_Decrypt,
    /// `None` for a PKCS#11 2.40 module (SoftHSM 2.6), or a 3.0 one without these functions.
    pub(super) message: Option<MessageCalls>,
    /// Keeps the module loaded as long as the pointers above are used.
    _library: libloading::Library,
}

impl std::fmt::Debug for DirectCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectCalls").finish_non_exhaustive()
    }
}

impl DirectCalls {
    /// The function pointers of the module at `module`, which the PKCS#11 context has loaded
    /// and initialised already (so this finds the same instance, with its state).
    pub(super) fn load(module: &Path) -> Result<Self, String> {
        // SAFETY: the module is already loaded by the PKCS#11 context, so the loader returns
        // the same instance and runs no initialiser again; a PKCS#11 module's initialisers are
        // its own business in any case (cryptoki loads it the same way).
        let library = unsafe { libloading::Library::new(module) }.map_err(|e| e.to_string())?;
        type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
        // SAFETY: every PKCS#11 module exports `C_GetFunctionList` with this signature
        // (PKCS#11 2.40 §5.2); the symbol is used only while `library` is alive.
        let get: libloading::Symbol<'_, GetFunctionList> =
            unsafe { library.get(b"C_GetFunctionList\0") }.map_err(|e| e.to_string())?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: the argument is a valid pointer to a local the module writes the list to.
        let rv = unsafe { get(&mut list) };
        if rv != CKR_OK || list.is_null() {
            return Err(format!("C_GetFunctionList returned {rv:#x}"));
        }
        // SAFETY: a non-null list the module returned: it stays valid while the module is
        // loaded, which `_library` guarantees; only two function pointers are copied out.
        let (encrypt, decrypt) = unsafe { ((*list).C_Encrypt, (*list).C_Decrypt) };
        if encrypt.is_none() || decrypt.is_none() {
            return Err("the module's function list has no C_Encrypt or C_Decrypt".into());
        }
        let message = MessageCalls::load(&library);
        Ok(Self {
            encrypt,
            decrypt,
            message,
            _library: library,
        })
    }

    /// `C_Encrypt` of `data` for the operation `C_EncryptInit` started on `session`, into
    /// `expected` bytes (more if the token asks for more).
    pub(super) fn encrypt(
        &self,
        session: CK_SESSION_HANDLE,
        data: &[u8],
        expected: usize,
    ) -> Result<Vec<u8>, CkError> {
        let encrypt = self.encrypt.ok_or(CkError::NullFunctionPointer)?;
        let mut out = vec![0u8; expected];
        single_part(
            Function::Encrypt,
            data,
            &mut out,
            |input, len, output, out_len| {
                // SAFETY: `input` points to `len` readable bytes (the module only reads them,
                // although the C signature is not const), `output` to `*out_len` writable bytes,
                // `out_len` to a local; the caller holds the session, so no other thread uses it.
                unsafe { encrypt(session, input, len, output, out_len) }
            },
        )?;
        Ok(out)
    }

    /// `C_Decrypt` of `data` for the operation `C_DecryptInit` started on `session`, into
    /// `expected` bytes (more if the token asks for more).
    pub(super) fn decrypt(
        &self,
        session: CK_SESSION_HANDLE,
        data: &[u8],
        expected: usize,
    ) -> Result<Zeroizing<Vec<u8>>, CkError> {
        let decrypt = self.decrypt.ok_or(CkError::NullFunctionPointer)?;
        let mut out = Zeroizing::new(vec![0u8; expected]);
        single_part(
            Function::Decrypt,
            data,
            &mut out,
            |input, len, output, out_len| {
                // SAFETY: as in `encrypt`.
                unsafe { decrypt(session, input, len, output, out_len) }
            },
        )?;
        Ok(out)
    }
}

/// PKCS#11 3.0's message-based encryption and decryption functions of a module.
pub(super) struct MessageCalls {
    encrypt_init: CK_C_MessageEncryptInit,
    encrypt: CK_C_EncryptMessage,
    encrypt_final: CK_C_MessageEncryptFinal,
    decrypt_init: CK_C_MessageDecryptInit,
    decrypt: CK_C_DecryptMessage,
    decrypt_final: CK_C_MessageDecryptFinal,
}

/// Which direction of a message-based context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Encrypt,
    Decrypt,
}

impl MessageCalls {
    /// The functions of the module's "PKCS 11" 3.0 interface, if it exports `C_GetInterface`
    /// and lists them all.
    fn load(library: &libloading::Library) -> Option<Self> {
        type GetInterface = unsafe extern "C" fn(
            *mut CK_UTF8CHAR,
            *mut CK_VERSION,
            *mut *mut CK_INTERFACE,
            cryptoki_sys::CK_FLAGS,
        ) -> CK_RV;
        // SAFETY: a PKCS#11 3.0 module exports `C_GetInterface` with this signature (PKCS#11
        // 3.0 §5.4); a 2.40 module does not export it and the lookup fails.
        let get: libloading::Symbol<'_, GetInterface> =
            unsafe { library.get(b"C_GetInterface\0") }.ok()?;
        let mut name = *b"PKCS 11\0";
        let mut version = CK_VERSION { major: 3, minor: 0 };
        let mut interface: *mut CK_INTERFACE = std::ptr::null_mut();
        // SAFETY: the name is a NUL-terminated local, the version a local, the output a local
        // pointer the module sets to its static interface.
        let rv = unsafe { get(name.as_mut_ptr(), &mut version, &mut interface, 0) };
        if rv != CKR_OK || interface.is_null() {
            return None;
        }
        // SAFETY: a non-null interface the module returned; it stays valid while the module
        // is loaded, which the `DirectCalls` holding these pointers guarantees.
        let list = unsafe { (*interface).pFunctionList }.cast::<CK_FUNCTION_LIST_3_0>();
        if list.is_null() {
            return None;
        }
        // SAFETY: the "PKCS 11" 3.0 interface's list is a CK_FUNCTION_LIST_3_0 (§5.4); only
        // its version is read before that is checked, and the version is its first field in
        // every list.
        let major = unsafe { (*list).version.major };
        if major < 3 {
            return None;
        }
        // SAFETY: as above, a 3.0 list: six function pointers are copied out.
        let calls = unsafe {
            Self {
                encrypt_init: (*list).C_MessageEncryptInit,
                encrypt: (*list).C_EncryptMessage,
                encrypt_final: (*list).C_MessageEncryptFinal,
                decrypt_init: (*list).C_MessageDecryptInit,
                decrypt: (*list).C_DecryptMessage,
                decrypt_final: (*list).C_MessageDecryptFinal,
            }
        };
        let all = calls.encrypt_init.is_some()
            && calls.encrypt.is_some()
            && calls.encrypt_final.is_some()
            && calls.decrypt_init.is_some()
            && calls.decrypt.is_some()
            && calls.decrypt_final.is_some();
        all.then_some(calls)
    }

    /// `C_MessageEncryptInit` or `C_MessageDecryptInit` with `CKM_AES_GCM` on `key`: each
    /// message brings its own parameters.
    pub(super) fn init(
        &self,
        session: CK_SESSION_HANDLE,
        direction: Direction,
        key: CK_OBJECT_HANDLE,
    ) -> Result<(), CkError> {
        let mut mechanism = CK_MECHANISM {
            mechanism: CKM_AES_GCM,
            pParameter: std::ptr::null_mut(),
            ulParameterLen: 0,
        };
        let (init, function) = match direction {
            Direction::Encrypt => (self.encrypt_init, Function::MessageEncryptInit),
            Direction::Decrypt => (self.decrypt_init, Function::MessageDecryptInit),
        };
        let init = init.ok_or(CkError::NullFunctionPointer)?;
        // SAFETY: the mechanism is a local; the caller holds the session.
        Rv::from(unsafe { init(session, &mut mechanism, key) }).into_result(function)
    }

    /// `C_MessageEncryptFinal` or `C_MessageDecryptFinal`.
    pub(super) fn finish(
        &self,
        session: CK_SESSION_HANDLE,
        direction: Direction,
    ) -> Result<(), CkError> {
        let (end, function) = match direction {
            Direction::Encrypt => (self.encrypt_final, Function::MessageEncryptFinal),
            Direction::Decrypt => (self.decrypt_final, Function::MessageDecryptFinal),
        };
        let end = end.ok_or(CkError::NullFunctionPointer)?;
        // SAFETY: the caller holds the session.
        Rv::from(unsafe { end(session) }).into_result(function)
    }

    /// One `C_EncryptMessage`: `ciphertext ‖ tag`, as the single-part path returns it.
    pub(super) fn encrypt(
        &self,
        session: CK_SESSION_HANDLE,
        iv: [u8; 12],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CkError> {
        let encrypt = self.encrypt.ok_or(CkError::NullFunctionPointer)?;
        let mut tag = [0u8; 16];
        let mut out = vec![0u8; plaintext.len()];
        one_message(
            encrypt,
            Function::EncryptMessage,
            session,
            (iv, &mut tag),
            aad,
            plaintext,
            &mut out,
        )?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// One `C_DecryptMessage` of `ciphertext ‖ tag`.
    pub(super) fn decrypt(
        &self,
        session: CK_SESSION_HANDLE,
        iv: [u8; 12],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CkError> {
        let decrypt = self.decrypt.ok_or(CkError::NullFunctionPointer)?;
        let too_short = || {
            CkError::Pkcs11(
                cryptoki::error::RvError::EncryptedDataLenRange,
                Function::DecryptMessage,
            )
        };
        let split = sealed.len().checked_sub(16).ok_or_else(too_short)?;
        let (body, tag) = sealed.split_at(split);
        let mut tag: [u8; 16] = tag.try_into().map_err(|_| too_short())?;
        let mut out = Zeroizing::new(vec![0u8; body.len()]);
        one_message(
            decrypt,
            Function::DecryptMessage,
            session,
            (iv, &mut tag),
            aad,
            body,
            &mut out,
        )?;
        Ok(out)
    }
}

/// `C_EncryptMessage` and `C_DecryptMessage` have one signature: parameters, AAD, input, output.
type MessageFn = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    *mut std::os::raw::c_void,
    CK_ULONG,
    *mut u8,
    CK_ULONG,
    *mut u8,
    CK_ULONG,
    *mut u8,
    *mut CK_ULONG,
) -> CK_RV;

/// One message into `out`, with its IV and the tag (written by an encryption, read by a
/// decryption) in `CK_GCM_MESSAGE_PARAMS`.
fn one_message(
    call: MessageFn,
    function: Function,
    session: CK_SESSION_HANDLE,
    (iv, tag): ([u8; 12], &mut [u8; 16]),
    aad: &[u8],
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CkError> {
    let mut iv = iv;
    let mut params = gcm_message(&mut iv, tag);
    let params_ptr: *mut std::os::raw::c_void = std::ptr::addr_of_mut!(params).cast();
    let aad_len = CK_ULONG::try_from(aad.len())?;
    single_part(function, input, out, |data, len, output, out_len| {
        // SAFETY: `params` is a local CK_GCM_MESSAGE_PARAMS whose IV (12 bytes) and tag (16
        // bytes) pointers are a local and the caller's array, both alive for the call; `aad`,
        // `data` and `output` are buffers of the stated lengths (the module only reads the
        // inputs); the caller holds the session.
        unsafe {
            call(
                session,
                params_ptr,
                PARAMS_LEN,
                aad.as_ptr().cast_mut(),
                aad_len,
                data,
                len,
                output,
                out_len,
            )
        }
    })
}

const PARAMS_LEN: CK_ULONG = std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG;

/// A message's GCM parameters: the caller's 12-byte IV (never generated by the token: Tresor
/// draws it, and the blob carries it) and a 128-bit tag.
fn gcm_message(iv: &mut [u8; 12], tag: &mut [u8; 16]) -> CK_GCM_MESSAGE_PARAMS {
    CK_GCM_MESSAGE_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvFixedBits: 0,
        ivGenerator: CKG_NO_GENERATE,
        pTag: tag.as_mut_ptr(),
        ulTagBits: 128,
    }
}

/// One single-part call into `out` (resized to what the token wrote), and once more with the
/// length a token asked for if `out` was too small.
fn single_part(
    function: Function,
    data: &[u8],
    out: &mut Vec<u8>,
    call: impl Fn(*mut u8, CK_ULONG, *mut u8, *mut CK_ULONG) -> CK_RV,
) -> Result<(), CkError> {
    let len = CK_ULONG::try_from(data.len())?;
    for _ in 0..2 {
        let mut out_len = CK_ULONG::try_from(out.len())?;
        let rv = call(
            data.as_ptr().cast_mut(),
            len,
            out.as_mut_ptr(),
            &mut out_len,
        );
        let written = usize::try_from(out_len)?;
        if rv == CKR_BUFFER_TOO_SMALL && written > out.len() {
            out.resize(written, 0);
            continue;
        }
        Rv::from(rv).into_result(function)?;
        if written > out.len() {
            // A token that claims to have written more than the buffer holds is broken; do
            // not read past it.
            return Err(CkError::Pkcs11(
                cryptoki::error::RvError::GeneralError,
                function,
            ));
        }
        out.truncate(written);
        return Ok(());
    }
    Err(CkError::Pkcs11(
        cryptoki::error::RvError::BufferTooSmall,
        function,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token that first wants 4 more bytes than offered, then writes them.
    #[test]
    fn a_token_that_wants_a_larger_buffer_gets_one_and_the_result_is_whole() {
        let calls = std::cell::Cell::new(0);
        let mut out = vec![0u8; 4];
        single_part(
            Function::Encrypt,
            b"data",
            &mut out,
            |_, _, output, out_len| {
                calls.set(calls.get() + 1);
                // SAFETY: test double; `out_len` points to the caller's local.
                let offered = unsafe { *out_len };
                if offered < 8 {
                    // SAFETY: as above.
                    unsafe { *out_len = 8 };
                    return CKR_BUFFER_TOO_SMALL;
                }
                for i in 0..8 {
                    // SAFETY: `output` holds `offered` >= 8 bytes.
                    unsafe { *output.add(i) = i as u8 };
                }
                // SAFETY: as above.
                unsafe { *out_len = 8 };
                CKR_OK
            },
        )
        .unwrap();
        assert_eq!(calls.get(), 2);
        assert_eq!(out, [0, 1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_shorter_answer_is_truncated_and_errors_pass_through() {
        let mut out = vec![0u8; 32];
        single_part(Function::Decrypt, b"x", &mut out, |_, _, _, out_len| {
            // SAFETY: test double; `out_len` points to the caller's local.
            unsafe { *out_len = 5 };
            CKR_OK
        })
        .unwrap();
        assert_eq!(out.len(), 5);
        let e = single_part(Function::Decrypt, b"x", &mut out, |_, _, _, _| {
            cryptoki_sys::CKR_ENCRYPTED_DATA_INVALID
        })
        .unwrap_err();
        assert!(matches!(
            e,
            CkError::Pkcs11(
                cryptoki::error::RvError::EncryptedDataInvalid,
                Function::Decrypt
            )
        ));
    }
}
