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
//! Owns the function pointers and their calls, nothing else: the session handle comes from a
//! cryptoki `Session` the caller holds (so no other call uses the session meanwhile) and the
//! result code goes back through cryptoki's own error type. Everything else in the crate keeps
//! `unsafe_code` denied.

#![allow(unsafe_code)]

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv};
use cryptoki_sys::{
    CK_C_Decrypt, CK_C_Encrypt, CK_FUNCTION_LIST, CK_RV, CK_SESSION_HANDLE, CK_ULONG,
    CKR_BUFFER_TOO_SMALL, CKR_OK,
};
use zeroize::Zeroizing;

/// `C_Encrypt` and `C_Decrypt` of a loaded module.
pub(super) struct DirectCalls {
    encrypt: CK_C_Encrypt,
    decrypt: CK_C_Decrypt,
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
        Ok(Self {
            encrypt,
            decrypt,
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
