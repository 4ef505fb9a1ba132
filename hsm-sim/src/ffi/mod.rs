//! The C ABI: `C_GetFunctionList` and the functions it lists.
//!
//! Owns every raw pointer of the module and nothing else: each entry point checks its
//! pointers, copies arguments into Rust values, calls the safe core in `sim`, and writes results
//! back. This is the only place in the whole project with `unsafe`; every block says why it is
//! sound. A panic is caught at the boundary and reported as `CKR_GENERAL_ERROR`, never unwound
//! into C.

#![allow(non_snake_case, clippy::missing_safety_doc)]

mod unsupported;

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};

use cryptoki_sys::*;

use crate::sim::{AttrOut, CallKind, MECHANISMS, Mechanism, OpKind, Rv, Sim};

/// The module's state between `C_Initialize` and `C_Finalize`.
static SIM: Mutex<Option<Sim>> = Mutex::new(None);

static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(unsupported::C_InitToken),
    C_InitPIN: Some(unsupported::C_InitPIN),
    C_SetPIN: Some(unsupported::C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(unsupported::C_GetOperationState),
    C_SetOperationState: Some(unsupported::C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(unsupported::C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(unsupported::C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(unsupported::C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(unsupported::C_EncryptUpdate),
    C_EncryptFinal: Some(unsupported::C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(unsupported::C_DecryptUpdate),
    C_DecryptFinal: Some(unsupported::C_DecryptFinal),
    C_DigestInit: Some(unsupported::C_DigestInit),
    C_Digest: Some(unsupported::C_Digest),
    C_DigestUpdate: Some(unsupported::C_DigestUpdate),
    C_DigestKey: Some(unsupported::C_DigestKey),
    C_DigestFinal: Some(unsupported::C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(unsupported::C_SignUpdate),
    C_SignFinal: Some(unsupported::C_SignFinal),
    C_SignRecoverInit: Some(unsupported::C_SignRecoverInit),
    C_SignRecover: Some(unsupported::C_SignRecover),
    C_VerifyInit: Some(unsupported::C_VerifyInit),
    C_Verify: Some(unsupported::C_Verify),
    C_VerifyUpdate: Some(unsupported::C_VerifyUpdate),
    C_VerifyFinal: Some(unsupported::C_VerifyFinal),
    C_VerifyRecoverInit: Some(unsupported::C_VerifyRecoverInit),
    C_VerifyRecover: Some(unsupported::C_VerifyRecover),
    C_DigestEncryptUpdate: Some(unsupported::C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(unsupported::C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(unsupported::C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(unsupported::C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(unsupported::C_WrapKey),
    C_UnwrapKey: Some(unsupported::C_UnwrapKey),
    C_DeriveKey: Some(unsupported::C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(unsupported::C_GetFunctionStatus),
    C_CancelFunction: Some(unsupported::C_CancelFunction),
    C_WaitForSlotEvent: Some(unsupported::C_WaitForSlotEvent),
};

fn lock() -> MutexGuard<'static, Option<Sim>> {
    SIM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on the initialised module after applying injected faults; latency is slept without
/// holding the module lock, so a slow simulated HSM still serves calls in parallel.
fn with_sim<T>(kind: CallKind, f: impl FnOnce(&mut Sim) -> Result<T, Rv>) -> Result<T, Rv> {
    let pre = lock()
        .as_mut()
        .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?
        .preflight(kind);
    if !pre.delay.is_zero() {
        std::thread::sleep(pre.delay);
    }
    if let Some(rv) = pre.fail {
        return Err(rv);
    }
    f(lock().as_mut().ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?)
}

fn guard(f: impl FnOnce() -> Result<(), Rv>) -> CK_RV {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

fn ulong(n: usize) -> Result<CK_ULONG, Rv> {
    CK_ULONG::try_from(n).map_err(|_| CKR_GENERAL_ERROR)
}

fn size(n: CK_ULONG) -> Result<usize, Rv> {
    usize::try_from(n).map_err(|_| CKR_ARGUMENTS_BAD)
}

/// Copies `len` bytes from `ptr`; a null pointer is allowed only with length 0.
///
/// # Safety
/// Unless null, `ptr` must be valid for reads of `len` bytes.
unsafe fn read_bytes(ptr: *const u8, len: CK_ULONG) -> Result<Vec<u8>, Rv> {
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and the caller guarantees `len` readable bytes (the PKCS#11 contract
    // for every (pointer, length) argument pair).
    Ok(unsafe { std::slice::from_raw_parts(ptr, size(len)?) }.to_vec())
}

/// Stores `value` through `ptr`.
///
/// # Safety
/// Unless null, `ptr` must be valid for writes of one `T`.
unsafe fn write<T>(ptr: *mut T, value: T) -> Result<(), Rv> {
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and PKCS#11 output arguments point to caller-owned storage for one T.
    unsafe { ptr.write(value) };
    Ok(())
}

/// Reads a caller's length-in/length-out argument.
///
/// # Safety
/// Unless null, `ptr` must be valid for reads of one `CK_ULONG`.
unsafe fn read_ulong(ptr: *const CK_ULONG) -> Result<CK_ULONG, Rv> {
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and PKCS#11 length arguments point to an initialised CK_ULONG.
    Ok(unsafe { ptr.read() })
}

/// Copies a template's types and values.
///
/// # Safety
/// Unless null, `ptr` must point to `count` attributes whose values are readable.
unsafe fn read_template(
    ptr: *const CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>, Rv> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and the caller guarantees `count` attributes at `ptr`.
    let attrs = unsafe { std::slice::from_raw_parts(ptr, size(count)?) };
    let mut template = Vec::with_capacity(attrs.len());
    for a in attrs {
        // SAFETY: each attribute's value pointer and length describe a readable buffer.
        let value = unsafe { read_bytes(a.pValue as *const u8, a.ulValueLen) }?;
        template.push((a.type_, value));
    }
    Ok(template)
}

/// Parses a mechanism and its parameters.
///
/// # Safety
/// Unless null, `ptr` must point to a `CK_MECHANISM` whose parameter pointer and length are
/// valid for its mechanism type.
unsafe fn read_mechanism(ptr: *const CK_MECHANISM) -> Result<Mechanism, Rv> {
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null and points to a CK_MECHANISM per the caller's contract.
    let m = unsafe { ptr.read() };
    Ok(match m.mechanism {
        CKM_AES_KEY_GEN => Mechanism::AesKeyGen,
        CKM_GENERIC_SECRET_KEY_GEN => Mechanism::GenericSecretKeyGen,
        CKM_EC_KEY_PAIR_GEN => Mechanism::EcKeyPairGen,
        CKM_ECDSA_SHA256 => Mechanism::EcdsaSha256,
        CKM_SHA256_HMAC => Mechanism::Sha256Hmac,
        CKM_AES_GCM => {
            if m.pParameter.is_null()
                || size(m.ulParameterLen)? != std::mem::size_of::<CK_GCM_PARAMS>()
            {
                return Err(CKR_MECHANISM_PARAM_INVALID);
            }
            // SAFETY: non-null and exactly the size of CK_GCM_PARAMS, as CKM_AES_GCM requires.
            let p = unsafe { (m.pParameter as *const CK_GCM_PARAMS).read_unaligned() };
            Mechanism::AesGcm {
                // SAFETY: the IV and AAD pointers with their lengths come from the caller's
                // CK_GCM_PARAMS and describe readable buffers.
                iv: unsafe { read_bytes(p.pIv, p.ulIvLen) }?,
                // SAFETY: as above.
                aad: unsafe { read_bytes(p.pAAD, p.ulAADLen) }?,
                tag_bits: p.ulTagBits,
            }
        }
        _ => Mechanism::Other,
    })
}

/// The PKCS#11 output convention (§5.2): a null buffer asks for the length; a short buffer gets
/// `CKR_BUFFER_TOO_SMALL` and the length; otherwise the data is written.
///
/// # Safety
/// `out_len` must be valid for reads and writes of one `CK_ULONG`; unless null, `out` must be
/// valid for writes of `*out_len` bytes.
unsafe fn write_output(out: *mut u8, out_len: *mut CK_ULONG, data: &[u8]) -> Result<(), Rv> {
    // SAFETY: forwarded from this function's contract.
    let capacity = unsafe { read_ulong(out_len) }?;
    // SAFETY: as above.
    unsafe { write(out_len, ulong(data.len())?) }?;
    if out.is_null() {
        return Ok(());
    }
    if size(capacity)? < data.len() {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `out` has room for `capacity` >= data.len() bytes and cannot overlap `data`,
    // which this module owns.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    Ok(())
}

fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let bytes = s.as_bytes();
    let n = bytes.len().min(N);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

const VERSION: CK_VERSION = CK_VERSION { major: 0, minor: 1 };

#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    // SAFETY: `list` is the caller's output argument for one pointer. The list is a static that
    // callers only read; PKCS#11's signature is `*mut` for historical reasons.
    guard(|| unsafe { write(list, std::ptr::addr_of!(FUNCTION_LIST).cast_mut()) })
}

unsafe extern "C" fn C_Initialize(args: *mut std::os::raw::c_void) -> CK_RV {
    guard(|| {
        if !args.is_null() {
            // SAFETY: a non-null argument to C_Initialize is a CK_C_INITIALIZE_ARGS.
            let a = unsafe { (args as *const CK_C_INITIALIZE_ARGS).read() };
            if !a.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            if a.CreateMutex.is_some() && a.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(CKR_CANT_LOCK);
            }
        }
        let mut sim = lock();
        if sim.is_some() {
            return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        }
        let Some(conf) = std::env::var_os(crate::config::CONF_ENV) else {
            eprintln!(
                "hsm-sim: {} is not set; it must name hsm-sim's configuration file",
                crate::config::CONF_ENV
            );
            return Err(CKR_GENERAL_ERROR);
        };
        match Sim::start(std::path::Path::new(&conf)) {
            Ok(s) => {
                *sim = Some(s);
                Ok(())
            }
            Err(e) => {
                eprintln!("hsm-sim: {e}");
                Err(CKR_GENERAL_ERROR)
            }
        }
    })
}

unsafe extern "C" fn C_Finalize(reserved: *mut std::os::raw::c_void) -> CK_RV {
    guard(|| {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        lock()
            .take()
            .map(|_| ())
            .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
    })
}

unsafe extern "C" fn C_GetInfo(info: *mut CK_INFO) -> CK_RV {
    guard(|| {
        with_sim(CallKind::Library, |_| Ok(()))?;
        let value = CK_INFO {
            cryptokiVersion: CK_VERSION {
                major: 2,
                minor: 40,
            },
            manufacturerID: padded("Tresor"),
            flags: 0,
            libraryDescription: padded("hsm-sim PKCS#11 simulator"),
            libraryVersion: VERSION,
        };
        // SAFETY: `info` is the caller's output argument for one CK_INFO.
        unsafe { write(info, value) }
    })
}

unsafe extern "C" fn C_GetSlotList(
    token_present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let slots: Vec<CK_SLOT_ID> = with_sim(CallKind::Library, |s| {
            let n = if token_present != 0 && !s.token_present() {
                0
            } else {
                s.slot_count()
            };
            Ok((0..n).map(|i| i as CK_SLOT_ID).collect())
        })?;
        // SAFETY: `count` is the caller's in/out length argument.
        let capacity = unsafe { read_ulong(count) }?;
        // SAFETY: as above.
        unsafe { write(count, ulong(slots.len())?) }?;
        if list.is_null() {
            return Ok(());
        }
        if size(capacity)? < slots.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: `list` has room for `capacity` >= slots.len() slot ids.
        unsafe { std::ptr::copy_nonoverlapping(slots.as_ptr(), list, slots.len()) };
        Ok(())
    })
}

unsafe extern "C" fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard(|| {
        let present = with_sim(CallKind::Library, |s| {
            s.token(slot)?;
            Ok(s.token_present())
        })?;
        let value = CK_SLOT_INFO {
            slotDescription: padded("hsm-sim slot"),
            manufacturerID: padded("Tresor"),
            flags: CKF_HW_SLOT | CKF_REMOVABLE_DEVICE | if present { CKF_TOKEN_PRESENT } else { 0 },
            hardwareVersion: VERSION,
            firmwareVersion: VERSION,
        };
        // SAFETY: `info` is the caller's output argument for one CK_SLOT_INFO.
        unsafe { write(info, value) }
    })
}

unsafe extern "C" fn C_GetTokenInfo(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard(|| {
        let value = with_sim(CallKind::Token, |s| {
            let (label, serial, sessions) = s.token(slot)?;
            Ok(CK_TOKEN_INFO {
                label: padded(label),
                manufacturerID: padded("Tresor"),
                model: padded("hsm-sim"),
                serialNumber: padded(serial),
                flags: CKF_RNG
                    | CKF_LOGIN_REQUIRED
                    | CKF_USER_PIN_INITIALIZED
                    | CKF_TOKEN_INITIALIZED,
                ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
                ulSessionCount: ulong(sessions)?,
                ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
                ulRwSessionCount: ulong(sessions)?,
                ulMaxPinLen: 255,
                ulMinPinLen: 4,
                ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
                ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
                ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
                ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
                hardwareVersion: VERSION,
                firmwareVersion: VERSION,
                utcTime: padded(""),
            })
        })?;
        // SAFETY: `info` is the caller's output argument for one CK_TOKEN_INFO.
        unsafe { write(info, value) }
    })
}

unsafe extern "C" fn C_GetMechanismList(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        with_sim(CallKind::Token, |s| s.token(slot).map(|_| ()))?;
        let types: Vec<CK_MECHANISM_TYPE> = MECHANISMS.iter().map(|m| m.0).collect();
        // SAFETY: `count` is the caller's in/out length argument.
        let capacity = unsafe { read_ulong(count) }?;
        // SAFETY: as above.
        unsafe { write(count, ulong(types.len())?) }?;
        if list.is_null() {
            return Ok(());
        }
        if size(capacity)? < types.len() {
            return Err(CKR_BUFFER_TOO_SMALL);
        }
        // SAFETY: `list` has room for `capacity` >= types.len() entries.
        unsafe { std::ptr::copy_nonoverlapping(types.as_ptr(), list, types.len()) };
        Ok(())
    })
}

unsafe extern "C" fn C_GetMechanismInfo(
    slot: CK_SLOT_ID,
    kind: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard(|| {
        with_sim(CallKind::Token, |s| s.token(slot).map(|_| ()))?;
        let (_, min, max, flags) = MECHANISMS
            .iter()
            .find(|m| m.0 == kind)
            .ok_or(CKR_MECHANISM_INVALID)?;
        // SAFETY: `info` is the caller's output argument for one CK_MECHANISM_INFO.
        unsafe {
            write(
                info,
                CK_MECHANISM_INFO {
                    ulMinKeySize: *min,
                    ulMaxKeySize: *max,
                    flags: *flags,
                },
            )
        }
    })
}

unsafe extern "C" fn C_OpenSession(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut std::os::raw::c_void,
    _notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard(|| {
        let h = with_sim(CallKind::Token, |s| s.open_session(slot, flags))?;
        // SAFETY: `session` is the caller's output argument for one handle.
        unsafe { write(session, h) }
    })
}

unsafe extern "C" fn C_CloseSession(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| with_sim(CallKind::Session, |s| s.close_session(session)))
}

unsafe extern "C" fn C_CloseAllSessions(slot: CK_SLOT_ID) -> CK_RV {
    guard(|| with_sim(CallKind::Token, |s| s.close_all_sessions(slot)))
}

unsafe extern "C" fn C_GetSessionInfo(
    session: CK_SESSION_HANDLE,
    info: *mut CK_SESSION_INFO,
) -> CK_RV {
    guard(|| {
        let (slotID, state, flags) = with_sim(CallKind::Session, |s| s.session_info(session))?;
        // SAFETY: `info` is the caller's output argument for one CK_SESSION_INFO.
        unsafe {
            write(
                info,
                CK_SESSION_INFO {
                    slotID,
                    state,
                    flags,
                    ulDeviceError: 0,
                },
            )
        }
    })
}

unsafe extern "C" fn C_Login(
    session: CK_SESSION_HANDLE,
    user: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: `pin`/`pin_len` describe the caller's PIN buffer.
        let pin = zeroize::Zeroizing::new(unsafe { read_bytes(pin, pin_len) }?);
        with_sim(CallKind::Session, |s| s.login(session, user, &pin))
    })
}

unsafe extern "C" fn C_Logout(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| with_sim(CallKind::Session, |s| s.logout(session)))
}

unsafe extern "C" fn C_GenerateKey(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the mechanism and template are the caller's input arguments.
        let (mech, template) =
            unsafe { (read_mechanism(mechanism)?, read_template(template, count)?) };
        let h = with_sim(CallKind::Session, |s| {
            s.generate_key(session, mech, &template)
        })?;
        // SAFETY: `key` is the caller's output argument for one handle.
        unsafe { write(key, h) }
    })
}

unsafe extern "C" fn C_GenerateKeyPair(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    public_template: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private_template: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_key: *mut CK_OBJECT_HANDLE,
    private_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the mechanism and both templates are the caller's input arguments.
        let (mech, public, private) = unsafe {
            (
                read_mechanism(mechanism)?,
                read_template(public_template, public_count)?,
                read_template(private_template, private_count)?,
            )
        };
        let (pub_h, priv_h) = with_sim(CallKind::Session, |s| {
            s.generate_key_pair(session, mech, &public, &private)
        })?;
        // SAFETY: the two handles are the caller's output arguments.
        unsafe {
            write(public_key, pub_h)?;
            write(private_key, priv_h)
        }
    })
}

unsafe extern "C" fn C_CreateObject(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the template is the caller's input argument of `count` attributes.
        let template = unsafe { read_template(template, count)? };
        let h = with_sim(CallKind::Session, |s| s.create_object(session, &template))?;
        // SAFETY: `object` is the caller's output argument for one handle.
        unsafe { write(object, h) }
    })
}

unsafe extern "C" fn C_DestroyObject(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| with_sim(CallKind::Session, |s| s.destroy(session, object)))
}

unsafe extern "C" fn C_GetAttributeValue(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        if count > 0 && template.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let attrs: &mut [CK_ATTRIBUTE] = if count == 0 {
            &mut []
        } else {
            // SAFETY: non-null, and the caller passes `count` attributes that it owns and lets
            // us update (C_GetAttributeValue's contract).
            unsafe { std::slice::from_raw_parts_mut(template, size(count)?) }
        };
        let types: Vec<CK_ATTRIBUTE_TYPE> = attrs.iter().map(|a| a.type_).collect();
        let found = with_sim(CallKind::Session, |s| {
            types
                .iter()
                .map(|t| s.get_attribute(session, object, *t))
                .collect::<Result<Vec<_>, _>>()
        })?;
        // PKCS#11 §5.7: report every attribute; the return code names the last problem.
        let mut rv = Ok(());
        for (a, out) in attrs.iter_mut().zip(found) {
            match out {
                AttrOut::Sensitive => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = Err(CKR_ATTRIBUTE_SENSITIVE);
                }
                AttrOut::Invalid => {
                    a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                    rv = Err(CKR_ATTRIBUTE_TYPE_INVALID);
                }
                AttrOut::Value(v) => {
                    if a.pValue.is_null() {
                        a.ulValueLen = ulong(v.len())?;
                    } else if size(a.ulValueLen)? >= v.len() {
                        // SAFETY: the caller's buffer holds ulValueLen >= v.len() bytes.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                v.as_ptr(),
                                a.pValue.cast::<u8>(),
                                v.len(),
                            )
                        };
                        a.ulValueLen = ulong(v.len())?;
                    } else {
                        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
                        rv = Err(CKR_BUFFER_TOO_SMALL);
                    }
                }
            }
        }
        rv
    })
}

unsafe extern "C" fn C_FindObjectsInit(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: the template is the caller's input argument.
        let template = unsafe { read_template(template, count) }?;
        with_sim(CallKind::Session, |s| s.find_init(session, template))
    })
}

unsafe extern "C" fn C_FindObjects(
    session: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        if objects.is_null() && max > 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = with_sim(CallKind::Session, |s| s.find(session, size(max)?))?;
        if !found.is_empty() {
            // SAFETY: `objects` has room for `max` >= found.len() handles.
            unsafe { std::ptr::copy_nonoverlapping(found.as_ptr(), objects, found.len()) };
        }
        // SAFETY: `count` is the caller's output argument.
        unsafe { write(count, ulong(found.len())?) }
    })
}

unsafe extern "C" fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| with_sim(CallKind::Session, |s| s.find_final(session)))
}

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

unsafe extern "C" fn C_EncryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as op_init requires.
    unsafe { op_init(session, OpKind::Encrypt, mechanism, key) }
}

unsafe extern "C" fn C_Encrypt(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as op_run requires.
    unsafe { op_run(session, OpKind::Encrypt, data, len, out, out_len) }
}

unsafe extern "C" fn C_DecryptInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as op_init requires.
    unsafe { op_init(session, OpKind::Decrypt, mechanism, key) }
}

unsafe extern "C" fn C_Decrypt(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as op_run requires.
    unsafe { op_run(session, OpKind::Decrypt, data, len, out, out_len) }
}

unsafe extern "C" fn C_SignInit(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's mechanism argument, as op_init requires.
    unsafe { op_init(session, OpKind::Sign, mechanism, key) }
}

unsafe extern "C" fn C_Sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as op_run requires.
    unsafe { op_run(session, OpKind::Sign, data, len, out, out_len) }
}

unsafe extern "C" fn C_SeedRandom(
    _session: CK_SESSION_HANDLE,
    _seed: *mut CK_BYTE,
    _len: CK_ULONG,
) -> CK_RV {
    CKR_RANDOM_SEED_NOT_SUPPORTED
}

unsafe extern "C" fn C_GenerateRandom(
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
