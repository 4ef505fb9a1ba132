//! The C ABI: `C_GetFunctionList` and the functions it lists.
//!
//! Owns every raw pointer of the module and nothing else: each entry point checks its
//! pointers, copies arguments into Rust values, calls the safe core in `sim`, and writes results
//! back. This is the only place in the whole project with `unsafe`; every block says why it is
//! sound. A panic is caught at the boundary and reported as `CKR_GENERAL_ERROR`, never unwound
//! into C.

#![allow(non_snake_case, clippy::missing_safety_doc)]

mod crypto;
mod message;
mod objects;
mod unsupported;

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, MutexGuard};

use cryptoki_sys::*;

use crate::sim::{CallKind, MECHANISMS, Mechanism, Rv, Sim};
use crypto::{
    C_Decrypt, C_DecryptInit, C_Encrypt, C_EncryptInit, C_GenerateRandom, C_SeedRandom, C_Sign,
    C_SignInit,
};
use objects::{
    C_CreateObject, C_DestroyObject, C_FindObjects, C_FindObjectsFinal, C_FindObjectsInit,
    C_GenerateKey, C_GenerateKeyPair, C_GetAttributeValue,
};

/// The module's state between `C_Initialize` and `C_Finalize`.
static SIM: Mutex<Option<Sim>> = Mutex::new(None);

/// The 2.40 function list and the 3.0 one, from one list of the 2.40 entries: the 3.0 list
/// adds the interface functions and message-based encryption (`message.rs`), and lists every
/// other 3.0 function as unsupported.
macro_rules! function_lists {
    ($($name:ident: $value:expr,)*) => {
        static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
            version: CK_VERSION { major: 2, minor: 40 },
            $($name: Some($value),)*
        };
        pub(super) static FUNCTION_LIST_3_0: CK_FUNCTION_LIST_3_0 = CK_FUNCTION_LIST_3_0 {
            version: CK_VERSION { major: 3, minor: 0 },
            $($name: Some($value),)*
            C_GetInterfaceList: Some(message::C_GetInterfaceList),
            C_GetInterface: Some(message::C_GetInterface),
            C_LoginUser: Some(unsupported::C_LoginUser),
            C_SessionCancel: Some(unsupported::C_SessionCancel),
            C_MessageEncryptInit: Some(message::C_MessageEncryptInit),
            C_EncryptMessage: Some(message::C_EncryptMessage),
            C_EncryptMessageBegin: Some(unsupported::C_EncryptMessageBegin),
            C_EncryptMessageNext: Some(unsupported::C_EncryptMessageNext),
            C_MessageEncryptFinal: Some(message::C_MessageEncryptFinal),
            C_MessageDecryptInit: Some(message::C_MessageDecryptInit),
            C_DecryptMessage: Some(message::C_DecryptMessage),
            C_DecryptMessageBegin: Some(unsupported::C_DecryptMessageBegin),
            C_DecryptMessageNext: Some(unsupported::C_DecryptMessageNext),
            C_MessageDecryptFinal: Some(message::C_MessageDecryptFinal),
            C_MessageSignInit: Some(unsupported::C_MessageSignInit),
            C_SignMessage: Some(unsupported::C_SignMessage),
            C_SignMessageBegin: Some(unsupported::C_SignMessageBegin),
            C_SignMessageNext: Some(unsupported::C_SignMessageNext),
            C_MessageSignFinal: Some(unsupported::C_MessageSignFinal),
            C_MessageVerifyInit: Some(unsupported::C_MessageVerifyInit),
            C_VerifyMessage: Some(unsupported::C_VerifyMessage),
            C_VerifyMessageBegin: Some(unsupported::C_VerifyMessageBegin),
            C_VerifyMessageNext: Some(unsupported::C_VerifyMessageNext),
            C_MessageVerifyFinal: Some(unsupported::C_MessageVerifyFinal),
        };
    };
}

function_lists! {
    C_Initialize: C_Initialize,
    C_Finalize: C_Finalize,
    C_GetInfo: C_GetInfo,
    C_GetFunctionList: C_GetFunctionList,
    C_GetSlotList: C_GetSlotList,
    C_GetSlotInfo: C_GetSlotInfo,
    C_GetTokenInfo: C_GetTokenInfo,
    C_GetMechanismList: C_GetMechanismList,
    C_GetMechanismInfo: C_GetMechanismInfo,
    C_InitToken: unsupported::C_InitToken,
    C_InitPIN: unsupported::C_InitPIN,
    C_SetPIN: unsupported::C_SetPIN,
    C_OpenSession: C_OpenSession,
    C_CloseSession: C_CloseSession,
    C_CloseAllSessions: C_CloseAllSessions,
    C_GetSessionInfo: C_GetSessionInfo,
    C_GetOperationState: unsupported::C_GetOperationState,
    C_SetOperationState: unsupported::C_SetOperationState,
    C_Login: C_Login,
    C_Logout: C_Logout,
    C_CreateObject: C_CreateObject,
    C_CopyObject: unsupported::C_CopyObject,
    C_DestroyObject: C_DestroyObject,
    C_GetObjectSize: unsupported::C_GetObjectSize,
    C_GetAttributeValue: C_GetAttributeValue,
    C_SetAttributeValue: unsupported::C_SetAttributeValue,
    C_FindObjectsInit: C_FindObjectsInit,
    C_FindObjects: C_FindObjects,
    C_FindObjectsFinal: C_FindObjectsFinal,
    C_EncryptInit: C_EncryptInit,
    C_Encrypt: C_Encrypt,
    C_EncryptUpdate: unsupported::C_EncryptUpdate,
    C_EncryptFinal: unsupported::C_EncryptFinal,
    C_DecryptInit: C_DecryptInit,
    C_Decrypt: C_Decrypt,
    C_DecryptUpdate: unsupported::C_DecryptUpdate,
    C_DecryptFinal: unsupported::C_DecryptFinal,
    C_DigestInit: unsupported::C_DigestInit,
    C_Digest: unsupported::C_Digest,
    C_DigestUpdate: unsupported::C_DigestUpdate,
    C_DigestKey: unsupported::C_DigestKey,
    C_DigestFinal: unsupported::C_DigestFinal,
    C_SignInit: C_SignInit,
    C_Sign: C_Sign,
    C_SignUpdate: unsupported::C_SignUpdate,
    C_SignFinal: unsupported::C_SignFinal,
    C_SignRecoverInit: unsupported::C_SignRecoverInit,
    C_SignRecover: unsupported::C_SignRecover,
    C_VerifyInit: unsupported::C_VerifyInit,
    C_Verify: unsupported::C_Verify,
    C_VerifyUpdate: unsupported::C_VerifyUpdate,
    C_VerifyFinal: unsupported::C_VerifyFinal,
    C_VerifyRecoverInit: unsupported::C_VerifyRecoverInit,
    C_VerifyRecover: unsupported::C_VerifyRecover,
    C_DigestEncryptUpdate: unsupported::C_DigestEncryptUpdate,
    C_DecryptDigestUpdate: unsupported::C_DecryptDigestUpdate,
    C_SignEncryptUpdate: unsupported::C_SignEncryptUpdate,
    C_DecryptVerifyUpdate: unsupported::C_DecryptVerifyUpdate,
    C_GenerateKey: C_GenerateKey,
    C_GenerateKeyPair: C_GenerateKeyPair,
    C_WrapKey: unsupported::C_WrapKey,
    C_UnwrapKey: unsupported::C_UnwrapKey,
    C_DeriveKey: unsupported::C_DeriveKey,
    C_SeedRandom: C_SeedRandom,
    C_GenerateRandom: C_GenerateRandom,
    C_GetFunctionStatus: unsupported::C_GetFunctionStatus,
    C_CancelFunction: unsupported::C_CancelFunction,
    C_WaitForSlotEvent: unsupported::C_WaitForSlotEvent,
}

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

/// PKCS#11 3.0's entry point (cryptoki asks it first): the one interface, "PKCS 11" 3.0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetInterface(
    name: *mut CK_UTF8CHAR,
    version: *mut CK_VERSION,
    interface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    // SAFETY: the caller's arguments, passed on unchanged under the same contract.
    unsafe { message::C_GetInterface(name, version, interface, flags) }
}

/// PKCS#11 3.0's list of interfaces.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetInterfaceList(
    list: *mut CK_INTERFACE,
    count: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: as above.
    unsafe { message::C_GetInterfaceList(list, count) }
}

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
