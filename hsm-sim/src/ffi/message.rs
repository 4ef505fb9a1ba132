//! The C ABI of PKCS#11 3.0: the interface functions (`C_GetInterfaceList`, `C_GetInterface`)
//! and message-based AES-GCM encryption and decryption (`C_MessageEncryptInit`,
//! `C_EncryptMessage`, `C_MessageEncryptFinal` and their decrypt twins), one message per call.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use cryptoki_sys::*;

use super::{guard, read_bytes, read_ulong, size, with_sim, write, write_output};
use crate::sim::{CallKind, GcmMessage, OpKind};

/// The one interface: "PKCS 11", version 3.0, the 3.0 function list.
struct Interface(CK_INTERFACE);

// SAFETY: the interface only points to statics (its name and the function list), which are
// never written; sharing it between threads is sharing read-only data.
unsafe impl Sync for Interface {}

static NAME: &[u8] = b"PKCS 11\0";

static INTERFACE: Interface = Interface(CK_INTERFACE {
    pInterfaceName: NAME.as_ptr().cast_mut(),
    pFunctionList: std::ptr::addr_of!(super::FUNCTION_LIST_3_0)
        .cast_mut()
        .cast(),
    flags: 0,
});

pub(super) unsafe extern "C" fn C_GetInterfaceList(
    list: *mut CK_INTERFACE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        if list.is_null() {
            // SAFETY: `count` is the caller's output argument for one CK_ULONG.
            return unsafe { write(count, 1) };
        }
        // SAFETY: as above, read before it is written.
        let capacity = unsafe { read_ulong(count) }?;
        // SAFETY: as above.
        unsafe { write(count, 1) }?;
        if capacity < 1 {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: `list` holds `capacity` >= 1 CK_INTERFACE entries, per the caller.
        unsafe { write(list, INTERFACE.0) }
    })
}

pub(super) unsafe extern "C" fn C_GetInterface(
    name: *mut CK_UTF8CHAR,
    version: *mut CK_VERSION,
    interface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard(|| {
        if !name.is_null() {
            // SAFETY: a non-null name is a NUL-terminated string, per PKCS#11 3.0 §5.4.
            let asked = unsafe { std::ffi::CStr::from_ptr(name.cast()) };
            if asked.to_bytes_with_nul() != NAME {
                return Err(CKR_ARGUMENTS_BAD);
            }
        }
        if !version.is_null() {
            // SAFETY: a non-null version points to a CK_VERSION, per the caller.
            let v = unsafe { version.read() };
            if (v.major, v.minor) != (3, 0) {
                return Err(CKR_ARGUMENTS_BAD);
            }
        }
        if flags != 0 {
            // The only flag is CKF_INTERFACE_FORK_SAFE, and this module is not fork-safe.
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: `interface` is the caller's output argument for one pointer; the interface
        // is a static the caller only reads.
        unsafe { write(interface, std::ptr::addr_of!(INTERFACE.0).cast_mut()) }
    })
}

/// `C_MessageEncryptInit` and `C_MessageDecryptInit`: the mechanism's parameter is not used
/// (each message brings its own).
///
/// # Safety
/// `mechanism` must be null or point to a `CK_MECHANISM`.
unsafe fn message_init(
    session: CK_SESSION_HANDLE,
    kind: OpKind,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        if mechanism.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: non-null and a CK_MECHANISM, per this function's contract.
        let m = unsafe { mechanism.read() };
        with_sim(CallKind::Session, |s| {
            s.message_init(session, kind, m.mechanism, key)
        })
    })
}

/// The `CK_GCM_MESSAGE_PARAMS` of one message, copied: (IV, tag pointer, the rest).
///
/// # Safety
/// `params`/`len` must describe a readable `CK_GCM_MESSAGE_PARAMS` whose IV pointer and length
/// describe a readable buffer.
unsafe fn read_params(
    params: *mut std::os::raw::c_void,
    len: CK_ULONG,
) -> Result<(Vec<u8>, *mut CK_BYTE, CK_GCM_MESSAGE_PARAMS), CK_RV> {
    if params.is_null() || size(len)? != std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    // SAFETY: non-null and exactly the size of CK_GCM_MESSAGE_PARAMS, per the contract.
    let p = unsafe { (params as *const CK_GCM_MESSAGE_PARAMS).read_unaligned() };
    // SAFETY: the IV pointer and length come from the caller's parameters.
    let iv = unsafe { read_bytes(p.pIv, p.ulIvLen) }?;
    Ok((iv, p.pTag, p))
}

pub(super) unsafe extern "C" fn C_MessageEncryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as message_init requires.
    unsafe { message_init(session, OpKind::Encrypt, mechanism, key) }
}

pub(super) unsafe extern "C" fn C_EncryptMessage(
    session: CK_SESSION_HANDLE,
    params: *mut std::os::raw::c_void,
    params_len: CK_ULONG,
    aad: *mut CK_BYTE,
    aad_len: CK_ULONG,
    plaintext: *mut CK_BYTE,
    plaintext_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's parameter block, as read_params requires.
        let (iv, tag_out, p) = unsafe { read_params(params, params_len) }?;
        // SAFETY: the caller's (pointer, length) pairs.
        let aad = unsafe { read_bytes(aad, aad_len) }?;
        // SAFETY: as above.
        let data = zeroize::Zeroizing::new(unsafe { read_bytes(plaintext, plaintext_len) }?);
        // SAFETY: the caller's in/out length.
        let capacity = unsafe { read_ulong(out_len) }?;
        if out.is_null() || size(capacity)? < data.len() {
            // SAFETY: as above.
            unsafe { write(out_len, plaintext_len) }?;
            return if out.is_null() {
                Ok(())
            } else {
                Err(CKR_BUFFER_TOO_SMALL)
            };
        }
        if tag_out.is_null() {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        let message = GcmMessage {
            iv: &iv,
            iv_fixed_bits: p.ulIvFixedBits,
            iv_generator: p.ivGenerator,
            tag_bits: p.ulTagBits,
        };
        let (sealed, tag) = with_sim(CallKind::Session, |s| {
            s.encrypt_message(session, &message, &aad, &data)
        })?;
        // SAFETY: `pTag` holds ulTagBits / 8 = 16 bytes, per the caller's parameters.
        unsafe { std::ptr::copy_nonoverlapping(tag.as_ptr(), tag_out, tag.len()) };
        // SAFETY: `out` holds `capacity` >= the ciphertext's length bytes.
        unsafe { write_output(out, out_len, &sealed) }
    })
}

pub(super) unsafe extern "C" fn C_MessageEncryptFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        with_sim(CallKind::Session, |s| {
            s.message_final(session, OpKind::Encrypt)
        })
    })
}

pub(super) unsafe extern "C" fn C_MessageDecryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as message_init requires.
    unsafe { message_init(session, OpKind::Decrypt, mechanism, key) }
}

pub(super) unsafe extern "C" fn C_DecryptMessage(
    session: CK_SESSION_HANDLE,
    params: *mut std::os::raw::c_void,
    params_len: CK_ULONG,
    aad: *mut CK_BYTE,
    aad_len: CK_ULONG,
    ciphertext: *mut CK_BYTE,
    ciphertext_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's parameter block, as read_params requires.
        let (iv, tag_in, p) = unsafe { read_params(params, params_len) }?;
        // SAFETY: the tag is an input of ulTagBits / 8 bytes for decryption.
        let tag = unsafe { read_bytes(tag_in, p.ulTagBits / 8) }?;
        // SAFETY: the caller's (pointer, length) pairs.
        let aad = unsafe { read_bytes(aad, aad_len) }?;
        // SAFETY: as above.
        let data = unsafe { read_bytes(ciphertext, ciphertext_len) }?;
        // SAFETY: the caller's in/out length.
        let capacity = unsafe { read_ulong(out_len) }?;
        if out.is_null() || size(capacity)? < data.len() {
            // SAFETY: as above.
            unsafe { write(out_len, ciphertext_len) }?;
            return if out.is_null() {
                Ok(())
            } else {
                Err(CKR_BUFFER_TOO_SMALL)
            };
        }
        let message = GcmMessage {
            iv: &iv,
            iv_fixed_bits: p.ulIvFixedBits,
            iv_generator: p.ivGenerator,
            tag_bits: p.ulTagBits,
        };
        let plain = zeroize::Zeroizing::new(with_sim(CallKind::Session, |s| {
            s.decrypt_message(session, &message, &tag, &aad, &data)
        })?);
        // SAFETY: `out` holds `capacity` >= the plaintext's length bytes.
        unsafe { write_output(out, out_len, &plain) }
    })
}

pub(super) unsafe extern "C" fn C_MessageDecryptFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| {
        with_sim(CallKind::Session, |s| {
            s.message_final(session, OpKind::Decrypt)
        })
    })
}
