//! The simulated HSM, in safe Rust: tokens, sessions, objects, mechanisms, persistence, faults.
//!
//! Owns PKCS#11 semantics (return codes, object visibility, login state, single-part
//! operations). Knows nothing of C pointers: `ffi` converts arguments into the types used here
//! and results back.

mod message;
mod objects;
mod operations;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use cryptoki_sys::*;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub(crate) use message::GcmMessage;

use crate::config::SimConfig;
use crate::control::Faults;

/// A PKCS#11 return code other than `CKR_OK`.
pub(crate) type Rv = CK_RV;

/// DER of the P-256 OID, the only curve offered.
pub(crate) const P256_PARAMS: [u8; 10] =
    [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Mechanisms offered, with (min key size, max key size, flags) for `C_GetMechanismInfo`.
pub(crate) const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = &[
    (CKM_AES_KEY_GEN, 16, 32, CKF_HW | CKF_GENERATE),
    (
        CKM_AES_GCM,
        16,
        32,
        CKF_HW | CKF_ENCRYPT | CKF_DECRYPT | CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT,
    ),
    (CKM_GENERIC_SECRET_KEY_GEN, 16, 64, CKF_HW | CKF_GENERATE),
    (CKM_SHA256_HMAC, 16, 64, CKF_HW | CKF_SIGN),
    (
        CKM_EC_KEY_PAIR_GEN,
        256,
        256,
        CKF_HW | CKF_GENERATE_KEY_PAIR,
    ),
    (CKM_ECDSA_SHA256, 256, 256, CKF_HW | CKF_SIGN),
];

/// PBKDF2 rounds for stored PINs: a simulator, not a vault, but no PIN is stored in the clear.
const PIN_ROUNDS: u32 = 10_000;

/// A mechanism with its parsed parameters.
pub(crate) enum Mechanism {
    AesKeyGen,
    GenericSecretKeyGen,
    EcKeyPairGen,
    AesGcm {
        iv: Vec<u8>,
        aad: Vec<u8>,
        tag_bits: u64,
    },
    EcdsaSha256,
    Sha256Hmac,
    /// Known to PKCS#11, not to hsm-sim.
    Other,
}

/// What `C_GetAttributeValue` finds for one requested attribute.
pub(crate) enum AttrOut {
    Value(Vec<u8>),
    Sensitive,
    Invalid,
}

/// The kind of a single-part operation in progress.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Encrypt,
    Decrypt,
    Sign,
}

enum Op {
    Encrypt {
        key: Zeroizing<Vec<u8>>,
        iv: [u8; 12],
        aad: Vec<u8>,
    },
    Decrypt {
        key: Zeroizing<Vec<u8>>,
        iv: [u8; 12],
        aad: Vec<u8>,
    },
    SignEcdsa {
        pkcs8: Zeroizing<Vec<u8>>,
    },
    SignHmac {
        key: Zeroizing<Vec<u8>>,
    },
}

impl Op {
    fn kind(&self) -> OpKind {
        match self {
            Op::Encrypt { .. } => OpKind::Encrypt,
            Op::Decrypt { .. } => OpKind::Decrypt,
            Op::SignEcdsa { .. } | Op::SignHmac { .. } => OpKind::Sign,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Object {
    /// Attribute type → value, encoded as PKCS#11 encodes it (CK_BBOOL one byte, CK_ULONG
    /// eight bytes native-endian, byte strings as is).
    #[serde(with = "attr_map")]
    attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>,
    /// Key material (CKA_VALUE of a secret key, PKCS#8 of an EC private key). Never returned
    /// while the object is sensitive or not extractable.
    #[serde(with = "b64")]
    secret: Zeroizing<Vec<u8>>,
}

impl Object {
    fn flag(&self, t: CK_ATTRIBUTE_TYPE) -> bool {
        self.attrs
            .get(&t)
            .is_some_and(|v| v.first().copied().unwrap_or(0) != 0)
    }

    fn ulong(&self, t: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
        let v = self.attrs.get(&t)?;
        Some(CK_ULONG::from_ne_bytes(v.as_slice().try_into().ok()?))
    }

    fn is_private(&self) -> bool {
        self.flag(CKA_PRIVATE)
    }

    fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        template.iter().all(|(t, v)| self.attrs.get(t) == Some(v))
    }
}

#[derive(Serialize, Deserialize)]
struct PinHash {
    #[serde(with = "b64")]
    salt: Zeroizing<Vec<u8>>,
    #[serde(with = "b64")]
    hash: Zeroizing<Vec<u8>>,
}

impl PinHash {
    fn new(pin: &[u8], rng: &SystemRandom) -> Result<Self, Rv> {
        let mut salt = vec![0u8; 16];
        rng.fill(&mut salt).map_err(|_| CKR_GENERAL_ERROR)?;
        let mut hash = vec![0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            rounds(),
            &salt,
            pin,
            &mut hash,
        );
        Ok(Self {
            salt: Zeroizing::new(salt),
            hash: Zeroizing::new(hash),
        })
    }

    fn verify(&self, pin: &[u8]) -> bool {
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            rounds(),
            &self.salt,
            pin,
            &self.hash,
        )
        .is_ok()
    }
}

fn rounds() -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(PIN_ROUNDS).unwrap_or(std::num::NonZeroU32::MIN)
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    label: String,
    serial: String,
    so_pin: PinHash,
    user_pin: PinHash,
    objects: Vec<Object>,
}

#[derive(Serialize, Deserialize)]
struct StoredState {
    version: u32,
    tokens: Vec<StoredToken>,
}

struct Token {
    label: String,
    serial: String,
    so_pin: PinHash,
    user_pin: PinHash,
    user_logged_in: bool,
    objects: BTreeMap<CK_OBJECT_HANDLE, Object>,
}

struct Session {
    slot: usize,
    rw: bool,
    op: Option<Op>,
    found: Option<Vec<CK_OBJECT_HANDLE>>,
    /// The key of the session's message-based encryption context (`C_MessageEncryptInit`).
    message_encrypt: Option<CK_OBJECT_HANDLE>,
    /// ... and of its message-based decryption context.
    message_decrypt: Option<CK_OBJECT_HANDLE>,
}

/// A session object: visible to every session of the application on its slot, destroyed when
/// the session that created it closes (PKCS#11 §4.4).
struct SessionObject {
    owner: CK_SESSION_HANDLE,
    slot: usize,
    object: Object,
}

/// Fault state read from the control file.
struct Control {
    path: Option<PathBuf>,
    checked: Instant,
    stamp: Option<(SystemTime, u64)>,
    faults: Faults,
    /// PKCS#11 calls made through this module instance.
    calls: u64,
    /// When `calls` was last written to `faults.count_calls_to`.
    calls_written: Option<Instant>,
    /// Message-based closes still to fail (`Faults::stick_message_finals`).
    sticky_finals: u64,
}

/// What the entry point must do before running a call.
pub(crate) struct Preflight {
    /// Sleep this long, outside the module lock.
    pub(crate) delay: Duration,
    /// Fail with this code instead of running the call.
    pub(crate) fail: Option<Rv>,
}

/// How a call is affected by an unplugged token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// C_GetInfo, C_GetSlotList, C_GetSlotInfo: answer normally (the slot is still there).
    Library,
    /// C_GetTokenInfo, C_OpenSession, mechanism queries: `CKR_TOKEN_NOT_PRESENT`.
    Token,
    /// Everything on a session: `CKR_DEVICE_REMOVED`.
    Session,
}

/// The whole simulated HSM: one per `C_Initialize`.
pub(crate) struct Sim {
    state_file: PathBuf,
    tokens: Vec<Token>,
    sessions: HashMap<CK_SESSION_HANDLE, Session>,
    session_objects: BTreeMap<CK_OBJECT_HANDLE, SessionObject>,
    next_handle: u64,
    control: Control,
    rng: SystemRandom,
}

fn bool_bytes(b: bool) -> Vec<u8> {
    vec![u8::from(b)]
}

fn ulong_bytes(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

impl Sim {
    /// Reads the configuration, loads or creates the state, and creates declared tokens.
    pub(crate) fn start(conf: &Path) -> Result<Self, String> {
        let config = SimConfig::load(conf)?;
        let rng = SystemRandom::new();
        let mut sim = Self {
            state_file: config.state_file.clone(),
            tokens: Vec::new(),
            sessions: HashMap::new(),
            session_objects: BTreeMap::new(),
            next_handle: 1,
            control: Control {
                path: config.control_file.clone(),
                checked: Instant::now(),
                stamp: None,
                faults: Faults::default(),
                calls: 0,
                calls_written: None,
                sticky_finals: 0,
            },
            rng,
        };
        if sim.state_file.exists() {
            let text = std::fs::read_to_string(&sim.state_file)
                .map_err(|e| format!("{}: {e}", sim.state_file.display()))?;
            let stored: StoredState = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", sim.state_file.display()))?;
            for t in stored.tokens {
                let mut objects = BTreeMap::new();
                for o in t.objects {
                    objects.insert(sim.handle(), o);
                }
                sim.tokens.push(Token {
                    label: t.label,
                    serial: t.serial,
                    so_pin: t.so_pin,
                    user_pin: t.user_pin,
                    user_logged_in: false,
                    objects,
                });
            }
        }
        let mut created = false;
        for decl in &config.tokens {
            if sim.tokens.iter().any(|t| t.label == decl.label) {
                continue;
            }
            let read_pin = |p: &Path| -> Result<Zeroizing<Vec<u8>>, String> {
                let mut pin =
                    Zeroizing::new(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?);
                while pin.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    pin.pop();
                }
                Ok(pin)
            };
            let so = read_pin(&decl.so_pin_file)?;
            let user = read_pin(&decl.user_pin_file)?;
            let mut serial = [0u8; 8];
            sim.rng
                .fill(&mut serial)
                .map_err(|_| "no system randomness".to_owned())?;
            sim.tokens.push(Token {
                label: decl.label.clone(),
                serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
                so_pin: PinHash::new(&so, &sim.rng)
                    .map_err(|_| "no system randomness".to_owned())?,
                user_pin: PinHash::new(&user, &sim.rng)
                    .map_err(|_| "no system randomness".to_owned())?,
                user_logged_in: false,
                objects: BTreeMap::new(),
            });
            created = true;
        }
        if created {
            sim.save()
                .map_err(|rv| format!("cannot write {}: CKR {rv:#x}", sim.state_file.display()))?;
        }
        Ok(sim)
    }

    fn handle(&mut self) -> u64 {
        let h = self.next_handle;
        self.next_handle += 1;
        h
    }

    /// Writes every token object atomically (temporary file, fsync, rename), mode 0600.
    fn save(&self) -> Result<(), Rv> {
        let stored = StoredState {
            version: 1,
            tokens: self
                .tokens
                .iter()
                .map(|t| StoredToken {
                    label: t.label.clone(),
                    serial: t.serial.clone(),
                    so_pin: PinHash {
                        salt: t.so_pin.salt.clone(),
                        hash: t.so_pin.hash.clone(),
                    },
                    user_pin: PinHash {
                        salt: t.user_pin.salt.clone(),
                        hash: t.user_pin.hash.clone(),
                    },
                    objects: t.objects.values().cloned().collect(),
                })
                .collect(),
        };
        let text = Zeroizing::new(serde_json::to_vec(&stored).map_err(|_| CKR_DEVICE_ERROR)?);
        let tmp = self.state_file.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.state_file)?;
            if let Some(dir) = self.state_file.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|_| CKR_DEVICE_MEMORY)
    }

    // ---- faults ---------------------------------------------------------------------------

    /// Applies the control file to this call: latency to sleep, or a failure to return.
    pub(crate) fn preflight(&mut self, kind: CallKind) -> Preflight {
        self.refresh_control();
        self.count_call();
        let f = &self.control.faults;
        let mut delay = Duration::from_millis(f.latency_ms);
        if f.latency_jitter_ms > 0 {
            let mut r = [0u8; 8];
            if self.rng.fill(&mut r).is_ok() {
                delay += Duration::from_millis(u64::from_ne_bytes(r) % (f.latency_jitter_ms + 1));
            }
        }
        let fail = if f.unplugged {
            match kind {
                CallKind::Library => None,
                CallKind::Token => Some(CKR_TOKEN_NOT_PRESENT),
                CallKind::Session => Some(CKR_DEVICE_REMOVED),
            }
        } else if f.device_error_rate > 0.0 && self.chance(f.device_error_rate) {
            Some(CKR_DEVICE_ERROR)
        } else {
            None
        };
        Preflight { delay, fail }
    }

    /// Counts this call, and writes the count where the control file asks, at most every
    /// 100 ms (write, then rename, so a reader never sees half a number).
    fn count_call(&mut self) {
        self.control.calls += 1;
        let Some(path) = &self.control.faults.count_calls_to else {
            return;
        };
        if self
            .control
            .calls_written
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.control.calls_written = Some(Instant::now());
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, self.control.calls.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    fn chance(&self, p: f64) -> bool {
        let mut r = [0u8; 4];
        if self.rng.fill(&mut r).is_err() {
            return false;
        }
        f64::from(u32::from_ne_bytes(r)) / f64::from(u32::MAX) < p
    }

    fn refresh_control(&mut self) {
        let Some(path) = self.control.path.clone() else {
            return;
        };
        if self.control.stamp.is_some()
            && self.control.checked.elapsed() < Duration::from_millis(20)
        {
            return;
        }
        self.control.checked = Instant::now();
        let stamp = std::fs::metadata(&path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp == self.control.stamp {
            return;
        }
        self.control.stamp = stamp;
        // A missing or unreadable file means no faults; a broken one keeps the last good state.
        let next = if stamp.is_none() {
            Faults::default()
        } else {
            Faults::read(&path).unwrap_or_else(|_| self.control.faults.clone())
        };
        let lose = next.lose_sessions != self.control.faults.lose_sessions;
        self.control.sticky_finals += next
            .stick_message_finals
            .saturating_sub(self.control.faults.stick_message_finals);
        let unplug = next.unplugged && !self.control.faults.unplugged;
        self.control.faults = next;
        if lose || unplug {
            self.drop_all_sessions();
        }
    }

    /// What a lost device does: every session gone, every user logged out.
    fn drop_all_sessions(&mut self) {
        self.sessions.clear();
        self.session_objects.clear();
        for t in &mut self.tokens {
            t.user_logged_in = false;
        }
    }

    // ---- slots, tokens, sessions ----------------------------------------------------------

    pub(crate) fn slot_count(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn token_present(&self) -> bool {
        !self.control.faults.unplugged
    }

    pub(crate) fn token(&self, slot: CK_SLOT_ID) -> Result<(&str, &str, usize), Rv> {
        let t = usize::try_from(slot)
            .ok()
            .and_then(|i| self.tokens.get(i))
            .ok_or(CKR_SLOT_ID_INVALID)?;
        let open = self
            .sessions
            .values()
            .filter(|s| usize::try_from(slot).ok() == Some(s.slot))
            .count();
        Ok((&t.label, &t.serial, open))
    }

    pub(crate) fn open_session(
        &mut self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
    ) -> Result<CK_SESSION_HANDLE, Rv> {
        let slot = usize::try_from(slot)
            .ok()
            .filter(|i| *i < self.tokens.len())
            .ok_or(CKR_SLOT_ID_INVALID)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let h = self.handle();
        self.sessions.insert(
            h,
            Session {
                slot,
                rw: flags & CKF_RW_SESSION != 0,
                op: None,
                message_encrypt: None,
                message_decrypt: None,
                found: None,
            },
        );
        Ok(h)
    }

    pub(crate) fn close_session(&mut self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        let s = self.sessions.remove(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        self.session_objects.retain(|_, o| o.owner != h);
        // Closing an application's last session with a token logs it out (PKCS#11 §5.6).
        if !self.sessions.values().any(|o| o.slot == s.slot)
            && let Some(t) = self.tokens.get_mut(s.slot)
        {
            t.user_logged_in = false;
        }
        Ok(())
    }

    pub(crate) fn close_all_sessions(&mut self, slot: CK_SLOT_ID) -> Result<(), Rv> {
        let slot = usize::try_from(slot)
            .ok()
            .filter(|i| *i < self.tokens.len())
            .ok_or(CKR_SLOT_ID_INVALID)?;
        self.sessions.retain(|_, s| s.slot != slot);
        self.session_objects.retain(|_, o| o.slot != slot);
        self.tokens[slot].user_logged_in = false;
        Ok(())
    }

    /// (slot, state, flags) of a session.
    pub(crate) fn session_info(
        &self,
        h: CK_SESSION_HANDLE,
    ) -> Result<(CK_SLOT_ID, CK_STATE, CK_FLAGS), Rv> {
        let s = self.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let user = self.tokens[s.slot].user_logged_in;
        let state = match (s.rw, user) {
            (true, true) => CKS_RW_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (false, false) => CKS_RO_PUBLIC_SESSION,
        };
        let flags = CKF_SERIAL_SESSION | if s.rw { CKF_RW_SESSION } else { 0 };
        Ok((s.slot as CK_SLOT_ID, state, flags))
    }

    pub(crate) fn login(
        &mut self,
        h: CK_SESSION_HANDLE,
        user_type: CK_USER_TYPE,
        pin: &[u8],
    ) -> Result<(), Rv> {
        let slot = self
            .sessions
            .get(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?
            .slot;
        if user_type != CKU_USER {
            return Err(CKR_USER_TYPE_INVALID);
        }
        let t = &mut self.tokens[slot];
        if t.user_logged_in {
            return Err(CKR_USER_ALREADY_LOGGED_IN);
        }
        if !t.user_pin.verify(pin) {
            return Err(CKR_PIN_INCORRECT);
        }
        t.user_logged_in = true;
        Ok(())
    }

    pub(crate) fn logout(&mut self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        let slot = self
            .sessions
            .get(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?
            .slot;
        let t = &mut self.tokens[slot];
        if !t.user_logged_in {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        t.user_logged_in = false;
        Ok(())
    }
}

mod b64 {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        v: &Zeroizing<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v.as_slice()))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Zeroizing<Vec<u8>>, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Zeroizing::new)
            .map_err(serde::de::Error::custom)
    }
}

mod attr_map {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        m: &BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let text: BTreeMap<String, String> = m
            .iter()
            .map(|(k, v)| {
                (
                    format!("{k:#x}"),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect();
        text.serialize(s)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>, D::Error> {
        let text = BTreeMap::<String, String>::deserialize(d)?;
        text.into_iter()
            .map(|(k, v)| {
                let key = CK_ATTRIBUTE_TYPE::from_str_radix(k.trim_start_matches("0x"), 16)
                    .map_err(serde::de::Error::custom)?;
                let value = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(serde::de::Error::custom)?;
                Ok((key, value))
            })
            .collect()
    }
}
