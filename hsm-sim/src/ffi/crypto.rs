//! The C ABI of cryptographic operations: encrypt, decrypt, sign (init and single part),
//! random bytes.

#![allow(non_snake_case, clippy::missing_safety_doc)]

use cryptoki_sys::*;

use super::{
    guard, read_bytes, read_mechanism, read_ulong, size, ulong, with_sim, write, write_output,
};
use crate::sim::{CallKind, OpKind};

/// `C_EncryptInit`, `C_DecryptInit`, `C_SignInit`.
///
/// # Safety
/// `mechanism` as for [`read_mechanism`].
unsafe fn op_init(
    session: CK_SESSION_HANDLE,
    kind: OpKind,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let mech = unsafe { read_mechanism(mechanism) }?;
        with_sim(CallKind::Session, |s| s.op_init(session, kind, mech, key))
    })
}

/// `C_Encrypt`, `C_Decrypt`, `C_Sign`: single-part operations with the output convention.
///
/// # Safety
/// `input`/`input_len` must describe a readable buffer; `out`/`out_len` as for
/// [`write_output`].
unsafe fn op_run(
    session: CK_SESSION_HANDLE,
    kind: OpKind,
    input: *const u8,
    input_len: CK_ULONG,
    out: *mut u8,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let data = zeroize::Zeroizing::new(unsafe { read_bytes(input, input_len) }?);
        // SAFETY: as above.
        let capacity = unsafe { read_ulong(out_len) }?;
        with_sim(CallKind::Session, |s| {
            let needed = match s.op_output_len(session, kind, data.len()) {
                Ok(n) => n,
                Err(rv) => {
                    s.op_abort(session);
                    return Err(rv);
                }
            };
            if out.is_null() || size(capacity)? < needed {
                // SAFETY: `out_len` is the caller's in/out length argument.
                unsafe { write(out_len, ulong(needed)?) }?;
                // A length query, or a short buffer: the operation stays active (§5.2).
                return if out.is_null() {
                    Ok(())
                } else {
                    Err(CKR_BUFFER_TOO_SMALL)
                };
            }
            let result = zeroize::Zeroizing::new(s.op_finish(session, kind, &data)?);
            // SAFETY: forwarded from this function's contract; `out` holds `capacity` bytes.
            unsafe { write_output(out, out_len, &result) }
        })
    })
}

pub(super) unsafe extern "C" fn C_EncryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as op_init requires.
    unsafe { op_init(session, OpKind::Encrypt, mechanism, key) }
}

pub(super) unsafe extern "C" fn C_Encrypt(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as op_run requires.
    unsafe { op_run(session, OpKind::Encrypt, data, len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_DecryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as op_init requires.
    unsafe { op_init(session, OpKind::Decrypt, mechanism, key) }
}

pub(super) unsafe extern "C" fn C_Decrypt(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as op_run requires.
    unsafe { op_run(session, OpKind::Decrypt, data, len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_SignInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as op_init requires.
    unsafe { op_init(session, OpKind::Sign, mechanism, key) }
}

pub(super) unsafe extern "C" fn C_Sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as op_run requires.
    unsafe { op_run(session, OpKind::Sign, data, len, out, out_len) }
}

pub(super) unsafe extern "C" fn C_SeedRandom(
    _session: CK_SESSION_HANDLE,
    _seed: *mut CK_BYTE,
    _len: CK_ULONG,
) -> CK_RV {
    CKR_RANDOM_SEED_NOT_SUPPORTED
}

pub(super) unsafe extern "C" fn C_GenerateRandom(
    session: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let mut bytes = zeroize::Zeroizing::new(vec![0u8; size(len)?]);
        with_sim(CallKind::Session, |s| s.random(session, &mut bytes))?;
        if len > 0 {
            if out.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // SAFETY: `out` is the caller's buffer of `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
        }
        Ok(())
    })
}
