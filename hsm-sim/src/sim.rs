//! The simulated HSM, in safe Rust: tokens, sessions, objects, mechanisms, persistence, faults.
//!
//! Owns PKCS#11 semantics (return codes, object visibility, login state, single-part
//! operations). Knows nothing of C pointers: `ffi` converts arguments into the types used here
//! and results back.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use cryptoki_sys::*;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

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
    (CKM_AES_GCM, 16, 32, CKF_HW | CKF_ENCRYPT | CKF_DECRYPT),
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

    // ---- objects ---------------------------------------------------------------------------

    fn session(&self, h: CK_SESSION_HANDLE) -> Result<&Session, Rv> {
        self.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    /// An object the session may see: its token's (private ones only when logged in) or its own.
    fn object(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<&Object, Rv> {
        let s = self.session(h)?;
        let t = &self.tokens[s.slot];
        let obj = t
            .objects
            .get(&o)
            .or_else(|| {
                self.session_objects
                    .get(&o)
                    .filter(|so| so.slot == s.slot)
                    .map(|so| &so.object)
            })
            .ok_or(CKR_OBJECT_HANDLE_INVALID)?;
        if obj.is_private() && !t.user_logged_in {
            return Err(CKR_OBJECT_HANDLE_INVALID);
        }
        Ok(obj)
    }

    /// Checks a template, fills the defaults, and stores the object.
    fn store(&mut self, h: CK_SESSION_HANDLE, obj: Object) -> Result<CK_OBJECT_HANDLE, Rv> {
        let s = self.session(h)?;
        let (slot, rw) = (s.slot, s.rw);
        let logged_in = self.tokens[slot].user_logged_in;
        if obj.is_private() && !logged_in {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        let token_object = obj.flag(CKA_TOKEN);
        if token_object && !rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
        let handle = self.handle();
        if token_object {
            self.tokens[slot].objects.insert(handle, obj);
            if let Err(rv) = self.save() {
                self.tokens[slot].objects.remove(&handle);
                return Err(rv);
            }
        } else {
            self.session_objects.insert(
                handle,
                SessionObject {
                    owner: h,
                    slot,
                    object: obj,
                },
            );
        }
        Ok(handle)
    }

    pub(crate) fn destroy(&mut self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<(), Rv> {
        let obj = self.object(h, o)?;
        if obj
            .attrs
            .get(&CKA_DESTROYABLE)
            .is_some_and(|v| v.first() == Some(&0))
        {
            return Err(CKR_ACTION_PROHIBITED);
        }
        let token_object = obj.flag(CKA_TOKEN);
        let s = self.session(h)?;
        let (slot, rw) = (s.slot, s.rw);
        if token_object {
            if !rw {
                return Err(CKR_SESSION_READ_ONLY);
            }
            let removed = self.tokens[slot].objects.remove(&o);
            if let Err(rv) = self.save() {
                if let Some(obj) = removed {
                    self.tokens[slot].objects.insert(o, obj);
                }
                return Err(rv);
            }
        } else {
            self.session_objects.remove(&o);
        }
        Ok(())
    }

    pub(crate) fn get_attribute(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        t: CK_ATTRIBUTE_TYPE,
    ) -> Result<AttrOut, Rv> {
        let obj = self.object(h, o)?;
        if t == CKA_VALUE {
            let class = obj.ulong(CKA_CLASS);
            let hidden = obj.flag(CKA_SENSITIVE) || !obj.flag(CKA_EXTRACTABLE);
            return Ok(match class {
                Some(CKO_SECRET_KEY) | Some(CKO_PRIVATE_KEY) if hidden => AttrOut::Sensitive,
                Some(CKO_SECRET_KEY) => AttrOut::Value(obj.secret.to_vec()),
                Some(CKO_DATA) => {
                    AttrOut::Value(obj.attrs.get(&CKA_VALUE).cloned().unwrap_or_default())
                }
                _ => AttrOut::Invalid,
            });
        }
        Ok(obj
            .attrs
            .get(&t)
            .map_or(AttrOut::Invalid, |v| AttrOut::Value(v.clone())))
    }

    pub(crate) fn find_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        template: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>,
    ) -> Result<(), Rv> {
        let s = self.session(h)?;
        if s.found.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let t = &self.tokens[s.slot];
        let visible = |o: &Object| !o.is_private() || t.user_logged_in;
        let session_objects = self
            .session_objects
            .iter()
            .filter(|(_, so)| so.slot == s.slot)
            .map(|(h, so)| (h, &so.object));
        let found: Vec<CK_OBJECT_HANDLE> = t
            .objects
            .iter()
            .chain(session_objects)
            .filter(|(_, o)| visible(o) && o.matches(&template))
            .map(|(h, _)| *h)
            .collect();
        if let Some(s) = self.sessions.get_mut(&h) {
            s.found = Some(found);
        }
        Ok(())
    }

    pub(crate) fn find(
        &mut self,
        h: CK_SESSION_HANDLE,
        max: usize,
    ) -> Result<Vec<CK_OBJECT_HANDLE>, Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let found = s.found.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let n = max.min(found.len());
        Ok(found.drain(..n).collect())
    }

    pub(crate) fn find_final(&mut self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        s.found
            .take()
            .map(|_| ())
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    // ---- key generation --------------------------------------------------------------------

    fn key_object(
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        class: CK_OBJECT_CLASS,
        key_type: CK_KEY_TYPE,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<Object, Rv> {
        let mut attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>> = BTreeMap::new();
        for (t, v) in template {
            let bool_attr = matches!(
                *t,
                CKA_TOKEN
                    | CKA_PRIVATE
                    | CKA_SENSITIVE
                    | CKA_EXTRACTABLE
                    | CKA_MODIFIABLE
                    | CKA_COPYABLE
                    | CKA_DESTROYABLE
                    | CKA_ENCRYPT
                    | CKA_DECRYPT
                    | CKA_WRAP
                    | CKA_UNWRAP
                    | CKA_SIGN
                    | CKA_VERIFY
                    | CKA_DERIVE
            );
            let ok = match *t {
                _ if bool_attr => v.len() == 1,
                CKA_CLASS | CKA_KEY_TYPE | CKA_VALUE_LEN => {
                    v.len() == std::mem::size_of::<CK_ULONG>()
                }
                CKA_ID | CKA_LABEL | CKA_EC_PARAMS => true,
                CKA_VALUE => return Err(CKR_ATTRIBUTE_READ_ONLY),
                _ => return Err(CKR_ATTRIBUTE_TYPE_INVALID),
            };
            if !ok {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            attrs.insert(*t, v.clone());
        }
        if attrs
            .get(&CKA_CLASS)
            .is_some_and(|v| *v != ulong_bytes(class))
            || attrs
                .get(&CKA_KEY_TYPE)
                .is_some_and(|v| *v != ulong_bytes(key_type))
        {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        attrs.insert(CKA_CLASS, ulong_bytes(class));
        attrs.insert(CKA_KEY_TYPE, ulong_bytes(key_type));
        let private_default = class != CKO_PUBLIC_KEY;
        for (t, default) in [
            (CKA_TOKEN, false),
            (CKA_PRIVATE, private_default),
            (CKA_MODIFIABLE, true),
            (CKA_COPYABLE, true),
            (CKA_DESTROYABLE, true),
            (CKA_DERIVE, false),
        ] {
            attrs.entry(t).or_insert_with(|| bool_bytes(default));
        }
        if class != CKO_PUBLIC_KEY {
            attrs
                .entry(CKA_SENSITIVE)
                .or_insert_with(|| bool_bytes(true));
            attrs
                .entry(CKA_EXTRACTABLE)
                .or_insert_with(|| bool_bytes(false));
            let always = attrs[&CKA_SENSITIVE] == bool_bytes(true);
            let never = attrs[&CKA_EXTRACTABLE] == bool_bytes(false);
            attrs.insert(CKA_ALWAYS_SENSITIVE, bool_bytes(always));
            attrs.insert(CKA_NEVER_EXTRACTABLE, bool_bytes(never));
        }
        attrs.entry(CKA_ID).or_default();
        attrs.entry(CKA_LABEL).or_default();
        attrs.insert(CKA_LOCAL, bool_bytes(true));
        attrs.insert(CKA_KEY_GEN_MECHANISM, ulong_bytes(mech));
        Ok(Object {
            attrs,
            secret: Zeroizing::new(Vec::new()),
        })
    }

    /// `C_CreateObject`, for data objects (`CKO_DATA`) only: Tresor keeps small records in the
    /// token this way (creation journals, destruction orders, the audit anchor). Keys can only
    /// be generated inside the token, never imported.
    pub(crate) fn create_object(
        &mut self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.session(h)?;
        let mut attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>> = BTreeMap::new();
        for (t, v) in template {
            let ok = match *t {
                CKA_TOKEN | CKA_PRIVATE | CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE => {
                    v.len() == 1
                }
                CKA_CLASS => v.len() == std::mem::size_of::<CK_ULONG>(),
                CKA_LABEL | CKA_APPLICATION | CKA_VALUE | CKA_OBJECT_ID => true,
                _ => return Err(CKR_ATTRIBUTE_TYPE_INVALID),
            };
            if !ok {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            attrs.insert(*t, v.clone());
        }
        match attrs.get(&CKA_CLASS) {
            Some(c) if *c == ulong_bytes(CKO_DATA) => {}
            Some(_) => return Err(CKR_TEMPLATE_INCONSISTENT),
            None => return Err(CKR_TEMPLATE_INCOMPLETE),
        }
        for (t, default) in [
            (CKA_TOKEN, false),
            (CKA_PRIVATE, true),
            (CKA_MODIFIABLE, true),
            (CKA_COPYABLE, true),
            (CKA_DESTROYABLE, true),
        ] {
            attrs.entry(t).or_insert_with(|| bool_bytes(default));
        }
        for t in [CKA_LABEL, CKA_APPLICATION, CKA_VALUE] {
            attrs.entry(t).or_default();
        }
        self.store(
            h,
            Object {
                attrs,
                secret: Zeroizing::new(Vec::new()),
            },
        )
    }

    pub(crate) fn generate_key(
        &mut self,
        h: CK_SESSION_HANDLE,
        mech: Mechanism,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.session(h)?;
        let (key_type, mech_type, sizes) = match mech {
            Mechanism::AesKeyGen => (CKK_AES, CKM_AES_KEY_GEN, &[16usize, 24, 32][..]),
            Mechanism::GenericSecretKeyGen => (
                CKK_GENERIC_SECRET,
                CKM_GENERIC_SECRET_KEY_GEN,
                &[16, 32, 48, 64][..],
            ),
            Mechanism::Other => return Err(CKR_MECHANISM_INVALID),
            _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
        };
        let mut obj = Self::key_object(template, CKO_SECRET_KEY, key_type, mech_type)?;
        let len = obj.ulong(CKA_VALUE_LEN).ok_or(CKR_TEMPLATE_INCOMPLETE)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| sizes.contains(l))
            .ok_or(CKR_KEY_SIZE_RANGE)?;
        for (t, default) in [
            (CKA_ENCRYPT, false),
            (CKA_DECRYPT, false),
            (CKA_SIGN, false),
            (CKA_VERIFY, false),
            (CKA_WRAP, false),
            (CKA_UNWRAP, false),
        ] {
            obj.attrs.entry(t).or_insert_with(|| bool_bytes(default));
        }
        let mut value = Zeroizing::new(vec![0u8; len]);
        self.rng.fill(&mut value).map_err(|_| CKR_DEVICE_ERROR)?;
        obj.secret = value;
        self.store(h, obj)
    }

    pub(crate) fn generate_key_pair(
        &mut self,
        h: CK_SESSION_HANDLE,
        mech: Mechanism,
        public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE), Rv> {
        self.session(h)?;
        match mech {
            Mechanism::EcKeyPairGen => {}
            Mechanism::Other => return Err(CKR_MECHANISM_INVALID),
            _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
        }
        let mut pub_obj = Self::key_object(public, CKO_PUBLIC_KEY, CKK_EC, CKM_EC_KEY_PAIR_GEN)?;
        match pub_obj.attrs.get(&CKA_EC_PARAMS) {
            Some(p) if *p == P256_PARAMS => {}
            Some(_) => return Err(CKR_CURVE_NOT_SUPPORTED),
            None => return Err(CKR_TEMPLATE_INCOMPLETE),
        }
        let mut priv_obj = Self::key_object(private, CKO_PRIVATE_KEY, CKK_EC, CKM_EC_KEY_PAIR_GEN)?;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.rng)
            .map_err(|_| CKR_DEVICE_ERROR)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &self.rng)
                .map_err(|_| CKR_DEVICE_ERROR)?;
        let point = pair.public_key().as_ref().to_vec();
        // CKA_EC_POINT is the DER OCTET STRING of the uncompressed point.
        let mut der = vec![
            0x04,
            u8::try_from(point.len()).map_err(|_| CKR_DEVICE_ERROR)?,
        ];
        der.extend_from_slice(&point);
        pub_obj.attrs.insert(CKA_EC_POINT, der);
        pub_obj
            .attrs
            .entry(CKA_VERIFY)
            .or_insert_with(|| bool_bytes(true));
        priv_obj.attrs.insert(CKA_EC_PARAMS, P256_PARAMS.to_vec());
        priv_obj
            .attrs
            .entry(CKA_SIGN)
            .or_insert_with(|| bool_bytes(true));
        priv_obj.secret = Zeroizing::new(pkcs8.as_ref().to_vec());
        let pub_handle = self.store(h, pub_obj)?;
        match self.store(h, priv_obj) {
            Ok(priv_handle) => Ok((pub_handle, priv_handle)),
            Err(rv) => {
                let _ = self.destroy(h, pub_handle);
                Err(rv)
            }
        }
    }

    // ---- single-part operations ------------------------------------------------------------

    pub(crate) fn op_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        mech: Mechanism,
        key: CK_OBJECT_HANDLE,
    ) -> Result<(), Rv> {
        if self.session(h)?.op.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let obj = self.object(h, key)?;
        let usage = match kind {
            OpKind::Encrypt => CKA_ENCRYPT,
            OpKind::Decrypt => CKA_DECRYPT,
            OpKind::Sign => CKA_SIGN,
        };
        let class = obj.ulong(CKA_CLASS);
        let key_type = obj.ulong(CKA_KEY_TYPE);
        let op = match (kind, mech) {
            (OpKind::Encrypt | OpKind::Decrypt, Mechanism::AesGcm { iv, aad, tag_bits }) => {
                if key_type != Some(CKK_AES) {
                    return Err(CKR_KEY_TYPE_INCONSISTENT);
                }
                let iv: [u8; 12] = iv
                    .as_slice()
                    .try_into()
                    .map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
                if tag_bits != 128 {
                    return Err(CKR_MECHANISM_PARAM_INVALID);
                }
                let key = obj.secret.clone();
                if kind == OpKind::Encrypt {
                    Op::Encrypt { key, iv, aad }
                } else {
                    Op::Decrypt { key, iv, aad }
                }
            }
            (OpKind::Sign, Mechanism::EcdsaSha256) => {
                if class != Some(CKO_PRIVATE_KEY) || key_type != Some(CKK_EC) {
                    return Err(CKR_KEY_TYPE_INCONSISTENT);
                }
                Op::SignEcdsa {
                    pkcs8: obj.secret.clone(),
                }
            }
            (OpKind::Sign, Mechanism::Sha256Hmac) => {
                if key_type != Some(CKK_GENERIC_SECRET) {
                    return Err(CKR_KEY_TYPE_INCONSISTENT);
                }
                Op::SignHmac {
                    key: obj.secret.clone(),
                }
            }
            (_, Mechanism::Other) => return Err(CKR_MECHANISM_INVALID),
            _ => return Err(CKR_KEY_FUNCTION_NOT_PERMITTED),
        };
        if !obj.flag(usage) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        if let Some(s) = self.sessions.get_mut(&h) {
            s.op = Some(op);
        }
        Ok(())
    }

    /// The output length of the active operation for `input_len` bytes, without running it.
    pub(crate) fn op_output_len(
        &self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        input_len: usize,
    ) -> Result<usize, Rv> {
        let op = self
            .session(h)?
            .op
            .as_ref()
            .filter(|o| o.kind() == kind)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        Ok(match op {
            Op::Encrypt { .. } => input_len + 16,
            Op::Decrypt { .. } => input_len
                .checked_sub(16)
                .ok_or(CKR_ENCRYPTED_DATA_LEN_RANGE)?,
            Op::SignEcdsa { .. } => 64,
            Op::SignHmac { .. } => 32,
        })
    }

    /// Runs the active operation and ends it, whatever the outcome.
    pub(crate) fn op_finish(
        &mut self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        input: &[u8],
    ) -> Result<Vec<u8>, Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if s.op.as_ref().is_none_or(|o| o.kind() != kind) {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        }
        let Some(op) = s.op.take() else {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        };
        match op {
            Op::Encrypt { key, iv, aad } => {
                let mut out = input.to_vec();
                gcm_key(&key)?
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(iv),
                        Aad::from(aad),
                        &mut out,
                    )
                    .map_err(|_| CKR_DEVICE_ERROR)?;
                Ok(out)
            }
            Op::Decrypt { key, iv, aad } => {
                if input.len() < 16 {
                    return Err(CKR_ENCRYPTED_DATA_LEN_RANGE);
                }
                let mut buf = input.to_vec();
                let n = gcm_key(&key)?
                    .open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(aad), &mut buf)
                    .map_err(|_| CKR_ENCRYPTED_DATA_INVALID)?
                    .len();
                buf.truncate(n);
                Ok(buf)
            }
            Op::SignEcdsa { pkcs8 } => {
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &self.rng)
                        .map_err(|_| CKR_DEVICE_ERROR)?;
                Ok(pair
                    .sign(&self.rng, input)
                    .map_err(|_| CKR_DEVICE_ERROR)?
                    .as_ref()
                    .to_vec())
            }
            Op::SignHmac { key } => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
                Ok(ring::hmac::sign(&k, input).as_ref().to_vec())
            }
        }
    }

    /// Ends the active operation of this kind (after a failed output-length query).
    pub(crate) fn op_abort(&mut self, h: CK_SESSION_HANDLE) {
        if let Some(s) = self.sessions.get_mut(&h) {
            s.op = None;
        }
    }

    pub(crate) fn random(&self, h: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<(), Rv> {
        self.session(h)?;
        self.rng.fill(out).map_err(|_| CKR_DEVICE_ERROR)
    }
}

fn gcm_key(key: &[u8]) -> Result<LessSafeKey, Rv> {
    let alg = match key.len() {
        16 => &AES_128_GCM,
        32 => &AES_256_GCM,
        _ => return Err(CKR_KEY_SIZE_RANGE),
    };
    Ok(LessSafeKey::new(
        UnboundKey::new(alg, key).map_err(|_| CKR_KEY_SIZE_RANGE)?,
    ))
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
