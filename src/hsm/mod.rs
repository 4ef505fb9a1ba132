//! The PKCS#11 back-end: module loading, login, the session pool, recovery, mechanisms.
//!
//! Owns every `cryptoki` call in Tresor. It knows nothing of keys' names, states, blobs, the
//! database or gRPC; it creates, uses and destroys token objects named by their `CKA_ID`.
//!
//! Design, and the facts about SoftHSM 2.6.1 (Debian's) it is built around:
//!
//! - **One context per process.** The module is loaded and `C_Initialize`d once, with OS
//!   locking; a second [`Hsm`] in the same process is refused ([`HsmError::AlreadyOpen`]).
//! - **Login.** Closing an application's last session logs it out, so one long-lived session
//!   stays open and logged in for the life of the context. `CKR_USER_ALREADY_LOGGED_IN` is
//!   success (login is per token, not per session). A refused PIN is never retried: retries
//!   would lock the token.
//! - **Token choice.** Slot ids change between runs, so the token is found by its label (and
//!   serial, if configured) among slots with an initialised token. A token initialised by
//!   another process after `C_Initialize` is invisible until the module is re-initialised.
//! - **Blocking calls.** PKCS#11 calls block. Each holds one permit of a semaphore sized to
//!   the session pool, so at most `sessions` calls are in the module at once and callers
//!   beyond that wait (back-pressure, not unbounded threads). Key management runs on tokio's
//!   blocking pool; the hot calls (encrypt, decrypt, random) run on the async worker
//!   while the module answers in microseconds and on the blocking pool while it does not
//!   ([`dispatch`], `hsm.dispatch`).
//! - **Recovery.** [`ckr::classify`] decides what a failure means: a lost session is closed
//!   and replaced; a device, library or login failure re-initialises the module (after
//!   waiting for every in-flight call, by taking all permits); a stale object handle is looked
//!   up again. Idempotent calls (everything but key generation) are retried once.
//! - **Token-object creation and destruction are serialised** behind one lock: SoftHSM before
//!   2.7.0 corrupts the token when several threads of one process create or destroy token
//!   objects at once (upstream issue 573). Crypto on existing keys from several threads is
//!   safe and is not serialised.
//! - **GCM.** The caller generates the IV; the AAD is never empty (Tresor's AAD always carries
//!   a domain label; empty AAD crashes some SoftHSM builds). A failed tag check comes back from
//!   SoftHSM as `CKR_GENERAL_ERROR` and is reported as [`HsmError::BadCiphertext`].
//! - **Pool size.** SoftHSM serialises internally: one thread reached about 81,000 GCM
//!   encryptions/s on a token key, two threads together only about 52,000/s. The pool size is
//!   configuration; its default ([`DEFAULT_SESSIONS`]) was chosen by measurement.

mod ckr;
mod data;
mod dispatch;
mod pin;
mod raw;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::sync::{lock, read, write};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use ckr::{Call, Recovery, classify, login_succeeded};
pub use data::DataObject;
pub use dispatch::{Dispatch, FAST_CALL};
pub use pin::{Pin, PinError, PinSource};
pub use raw::{RawReport, raw_gcm_encrypt};

/// Default number of PKCS#11 sessions (and so of concurrent calls into the module).
///
/// Measured with `examples/hsm_pool_size.rs` on SoftHSM 2.6.1, 2 cores, 32-byte plaintexts:
/// 2, 4 and 8 sessions gave 2.0–2.3x, 2.9–3.2x and 2.9–3.3x the encryptions/s of one session.
/// That was with every call on blocking threads, where the hand-off dominated; 4 is the knee.
/// With a fast module under `hsm.dispatch = "auto"`, hot calls run one at a time on the async
/// worker instead, and the pool bounds key management and the slow-module (threads) path.
pub const DEFAULT_SESSIONS: usize = 4;

/// Default deadline of one HSM call, including the wait for a session.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Recoveries (new session, re-initialisation) one idempotent call may go through: a lost
/// session can reveal a lost login, which needs a second step.
const MAX_RECOVERIES: usize = 2;

/// DER encoding of the OID of NIST P-256 (prime256v1), for `CKA_EC_PARAMS`.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// How long a module that failed to come back is left alone before the next attempt, so a
/// dead HSM is not hammered by every request.
const BRING_UP_BACKOFF: Duration = Duration::from_secs(1);

/// Only one PKCS#11 context may live in a process.
static CONTEXT_OPEN: AtomicBool = AtomicBool::new(false);

/// Which module and token to use, and how to log in.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (`.so`).
    pub module: PathBuf,
    /// Label of the token.
    pub token_label: String,
    /// Serial number of the token, when several tokens share a label.
    pub token_serial: Option<String>,
    /// Where the user PIN is read from.
    pub pin: PinSource,
    /// Size of the session pool: the most PKCS#11 calls in flight at once.
    pub sessions: usize,
    /// Deadline of one call, including the wait for a free session. A call past it fails with
    /// [`HsmError::Unavailable`]; the PKCS#11 call itself cannot be interrupted and keeps its
    /// session until the module returns, so a hung HSM never gets more than `sessions` threads.
    pub call_timeout: Duration,
    /// Where hot calls run (see [`Dispatch`]).
    pub dispatch: Dispatch,
}

/// The `CKA_ID` of a token object Tresor created.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(pub [u8; 16]);

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Errors of the HSM back-end. None of them carries key material, data or the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The PKCS#11 module could not be loaded.
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// The configured module path.
        path: PathBuf,
        /// Why loading failed.
        reason: String,
    },
    /// No initialised token carries the configured label (and serial).
    #[error("no initialised token labelled {label:?}{} in {module}; check the token label (softhsm2-util --show-slots)",
        serial.as_deref().map(|s| format!(" with serial {s:?}")).unwrap_or_default())]
    TokenNotFound {
        /// The configured label.
        label: String,
        /// The configured serial, if any.
        serial: Option<String>,
        /// The module searched.
        module: PathBuf,
    },
    /// Several tokens carry the configured label.
    #[error("{count} tokens are labelled {label:?}; configure the token serial to choose one")]
    AmbiguousToken {
        /// The configured label.
        label: String,
        /// How many tokens matched.
        count: usize,
    },
    /// The PIN could not be read.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// The token refused the PIN. Tresor does not try again until restarted, so that it never
    /// locks the token.
    #[error(
        "the token refused the PIN ({0:?}); fix the PIN and restart (no retry, to avoid locking the token)"
    )]
    PinRefused(RvError),
    /// A second context was opened in this process.
    #[error("a PKCS#11 context is already open in this process")]
    AlreadyOpen,
    /// No object with this `CKA_ID` (and class) is in the token.
    #[error("no object with CKA_ID {0} in the token")]
    ObjectNotFound(ObjectId),
    /// AES-GCM decryption refused the ciphertext (wrong key, AAD, or tampered data).
    #[error("the HSM rejected the ciphertext")]
    BadCiphertext,
    /// The module, device or session is gone and did not come back within one retry.
    #[error("HSM unavailable: {0}")]
    Unavailable(String),
    /// The call did not finish (or get a session) before its deadline (`hsm.call_timeout_ms`).
    #[error("HSM unavailable: {0} before the call's deadline")]
    Deadline(&'static str),
    /// Any other PKCS#11 failure.
    #[error("PKCS#11 call failed: {0}")]
    Pkcs11(CkError),
}

/// A token's identity as it reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDescription {
    /// `manufacturerID`.
    pub manufacturer: String,
    /// `model`.
    pub model: String,
    /// `serialNumber`.
    pub serial: String,
    /// Firmware version, `major.minor`.
    pub firmware: String,
}

/// A token object found while listing, for reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenObject {
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// `CKA_LABEL`, lossily decoded as UTF-8.
    pub label: String,
}

/// Attributes of a secret key as the token reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAttributes {
    /// `CKA_TOKEN`.
    pub token: bool,
    /// `CKA_PRIVATE`.
    pub private: bool,
    /// `CKA_SENSITIVE`.
    pub sensitive: bool,
    /// `CKA_EXTRACTABLE`.
    pub extractable: bool,
    /// `CKA_MODIFIABLE`.
    pub modifiable: bool,
    /// `CKA_COPYABLE`.
    pub copyable: bool,
    /// `CKA_ALWAYS_SENSITIVE`.
    pub always_sensitive: bool,
    /// `CKA_NEVER_EXTRACTABLE`.
    pub never_extractable: bool,
    /// `CKA_KEY_TYPE` is `CKK_AES`.
    pub aes: bool,
    /// `CKA_VALUE_LEN`.
    pub value_len: u64,
    /// Whether the token would hand out `CKA_VALUE` (it must not).
    pub value_readable: bool,
}

/// A handle on the token: cheap to clone, shared by every task.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

impl fmt::Debug for Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hsm")
            .field("module", &self.inner.module)
            .field("token_label", &self.inner.token_label)
            .field("token_serial", &self.inner.token_serial)
            .field("sessions", &self.inner.pool_size)
            .field("dispatch", &self.inner.pace)
            .finish_non_exhaustive()
    }
}

/// The kinds of object Tresor looks up by `CKA_ID`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Secret,
    Private,
    Public,
}

impl Kind {
    fn class(self) -> ObjectClass {
        match self {
            Self::Secret => ObjectClass::SECRET_KEY,
            Self::Private => ObjectClass::PRIVATE_KEY,
            Self::Public => ObjectClass::PUBLIC_KEY,
        }
    }
}

struct Inner {
    pkcs11: Pkcs11,
    module: PathBuf,
    token_label: String,
    token_serial: Option<String>,
    pin: Pin,
    /// Set once the token refused the PIN; every later call fails without trying again.
    pin_refused: AtomicBool,
    /// The initialised module and its logged-in session; `None` while it is down.
    /// Written only by `reinitialise`, which holds every permit, so no call is in flight then.
    live: RwLock<Option<Arc<Live>>>,
    next_generation: AtomicU64,
    last_bring_up: Mutex<Option<Instant>>,
    /// Idle sessions, each tagged with the generation of the module that opened it.
    idle: Mutex<Vec<Pooled>>,
    /// One permit per pooled session: bounds the calls in flight; `reinitialise` takes all.
    permits: Arc<Semaphore>,
    pool_size: u32,
    /// One permit for calls run on the async worker, so at most one worker is ever inside the
    /// module that way (SoftHSM serialises internally; more only contend) and the others stay
    /// free for TLS, health checks and deadlines.
    inline_slot: Semaphore,
    pace: dispatch::Pace,
    call_timeout: Duration,
    /// Serialises token-object creation and destruction (SoftHSM issue 573).
    object_lock: Mutex<()>,
    /// `CKA_ID` → handle, so the hot path skips `C_FindObjects`. Cleared on re-initialisation
    /// and whenever the token reports a stale handle.
    handles: RwLock<HashMap<(ObjectId, Kind), ObjectHandle>>,
}

struct Live {
    generation: u64,
    slot: Slot,
    /// The token offers hash-and-sign `CKM_ECDSA_SHA256` (hsm-sim); otherwise Tresor hashes and
    /// uses raw `CKM_ECDSA` (SoftHSM 2.6.1 offers only that). Both give ECDSA over SHA-256.
    ecdsa_sha256: bool,
    /// Kept open so the application stays logged in; probed when sessions are lost.
    login: Mutex<Session>,
}

struct Pooled {
    session: Session,
    generation: u64,
}

/// What an operation closure can fail with.
enum OpError {
    Pkcs11(CkError),
    NotFound(ObjectId),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        Self::Pkcs11(e)
    }
}

/// What a failed attempt asks the caller to do.
enum Failure {
    /// The module is down (no live context).
    Down,
    NotFound(ObjectId),
    Pkcs11 {
        err: CkError,
        recovery: Recovery,
        generation: u64,
    },
}

/// Whether a call is on the request path (crypto with existing keys) and may run inline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hot {
    Yes,
    No,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Safe to run twice: retried once after recovery.
    Once,
    /// Could leave a second object behind: never retried.
    Never,
}

/// What an operation closure sees: a session of the live module, and object lookup.
struct OpCtx<'a> {
    session: &'a Session,
    inner: &'a Inner,
    live: &'a Live,
}

impl OpCtx<'_> {
    fn object(&self, id: ObjectId, kind: Kind) -> Result<ObjectHandle, OpError> {
        if let Some(h) = read(&self.inner.handles).get(&(id, kind)) {
            return Ok(*h);
        }
        let found = self.session.find_objects(&[
            Attribute::Class(kind.class()),
            Attribute::Token(true),
            Attribute::Id(id.0.to_vec()),
        ])?;
        let Some(&handle) = found.first() else {
            // Private objects are invisible to a session that is not logged in: a lost login
            // must not look like a lost key.
            if !logged_in(self.session) {
                return Err(OpError::Pkcs11(CkError::Pkcs11(
                    RvError::UserNotLoggedIn,
                    cryptoki::context::Function::FindObjects,
                )));
            }
            return Err(OpError::NotFound(id));
        };
        if found.len() > 1 {
            tracing::error!(id = %id, count = found.len(), "several token objects share one CKA_ID; using the first");
        }
        self.remember(id, kind, handle);
        Ok(handle)
    }

    fn remember(&self, id: ObjectId, kind: Kind, handle: ObjectHandle) {
        write(&self.inner.handles).insert((id, kind), handle);
    }

    fn forget(&self, id: ObjectId, kind: Kind) {
        write(&self.inner.handles).remove(&(id, kind));
    }

    /// Held while creating or destroying token objects.
    fn object_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.object_lock)
    }
}

fn logged_in(session: &Session) -> bool {
    use cryptoki::session::SessionState;
    session.get_session_info().is_ok_and(|i| {
        matches!(
            i.session_state(),
            SessionState::RoUser | SessionState::RwUser
        )
    })
}

fn unavailable(e: impl fmt::Display) -> HsmError {
    HsmError::Unavailable(e.to_string())
}

impl Hsm {
    /// Loads the module, initialises it, finds the token and logs in.
    ///
    /// Blocks: call it at start-up (or from `spawn_blocking`).
    pub fn open(config: &HsmConfig) -> Result<Self, HsmError> {
        let pin = config.pin.read()?;
        Self::open_with_pin(config, pin)
    }

    /// Like [`Hsm::open`] with a PIN the caller already holds.
    pub fn open_with_pin(config: &HsmConfig, pin: Pin) -> Result<Self, HsmError> {
        if CONTEXT_OPEN.swap(true, Ordering::SeqCst) {
            return Err(HsmError::AlreadyOpen);
        }
        let opened = Self::open_inner(config, pin);
        if opened.is_err() {
            CONTEXT_OPEN.store(false, Ordering::SeqCst);
        }
        opened
    }

    fn open_inner(config: &HsmConfig, pin: Pin) -> Result<Self, HsmError> {
        let pkcs11 = Pkcs11::new(&config.module).map_err(|e| HsmError::ModuleLoad {
            path: config.module.clone(),
            reason: e.to_string(),
        })?;
        initialise(&pkcs11).map_err(|e| HsmError::ModuleLoad {
            path: config.module.clone(),
            reason: e.to_string(),
        })?;
        let pool_size = u32::try_from(config.sessions.clamp(1, 1024)).unwrap_or(1);
        let inner = Inner {
            pkcs11,
            module: config.module.clone(),
            token_label: config.token_label.clone(),
            token_serial: config.token_serial.clone(),
            pin,
            pin_refused: AtomicBool::new(false),
            live: RwLock::new(None),
            next_generation: AtomicU64::new(1),
            last_bring_up: Mutex::new(None),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(pool_size as usize)),
            pool_size,
            inline_slot: Semaphore::new(1),
            pace: dispatch::Pace::new(config.dispatch),
            call_timeout: config.call_timeout,
            object_lock: Mutex::new(()),
            handles: RwLock::new(HashMap::new()),
        };
        // On failure `inner` drops here, which finalises the module and frees the slot.
        let live = inner.bring_up()?;
        *write(&inner.live) = Some(Arc::new(live));
        tracing::info!(module = %config.module.display(), token = %config.token_label, sessions = pool_size, dispatch = ?config.dispatch, "HSM token opened");
        let inner = Arc::new(inner);
        let gauge = Arc::downgrade(&inner);
        crate::metrics::global().hsm_sessions_from(move || {
            gauge.upgrade().map_or((0, 0), |i| {
                let pool = u64::from(i.pool_size);
                let free = u64::try_from(i.permits.available_permits()).unwrap_or(pool);
                (pool.saturating_sub(free), pool)
            })
        });
        Ok(Self { inner })
    }

    /// What the token says about itself (manufacturer, model, serial, firmware).
    pub async fn token_description(&self) -> Result<TokenDescription, HsmError> {
        self.run(Call::Other, Retry::Once, |cx| {
            let slot = cx.session.get_session_info()?.slot_id();
            let info = cx.inner.pkcs11.get_token_info(slot)?;
            let firmware = info.firmware_version();
            Ok(TokenDescription {
                manufacturer: info.manufacturer_id().trim().to_owned(),
                model: info.model().trim().to_owned(),
                serial: info.serial_number().trim().to_owned(),
                firmware: format!("{}.{}", firmware.major(), firmware.minor()),
            })
        })
        .await
    }

    /// Whether hot calls currently run on the async worker ([`Dispatch`]).
    pub fn hot_calls_inline(&self) -> bool {
        self.inner.pace.inline()
    }

    /// Creates a version key: a token AES-256 key, sensitive, never extractable, not
    /// modifiable or copyable, usable only to encrypt and decrypt. Not retried.
    pub async fn generate_version_key(&self, id: ObjectId, label: String) -> Result<(), HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let _serialised = cx.object_lock();
            let handle = cx.session.generate_key(&Mechanism::AesKeyGen, &template)?;
            cx.remember(id, Kind::Secret, handle);
            Ok(())
        })
        .await
    }

    /// AES-256-GCM encryption with a 128-bit tag inside the HSM. Returns `ciphertext ‖ tag`.
    pub async fn encrypt_gcm(
        &self,
        key: ObjectId,
        iv: [u8; 12],
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<Vec<u8>, HsmError> {
        self.run_hot(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(key, Kind::Secret)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, 128u64.into())?;
            Ok(cx
                .session
                .encrypt(&Mechanism::AesGcm(params), handle, &plaintext)?)
        })
        .await
    }

    /// AES-256-GCM decryption of `ciphertext ‖ tag` inside the HSM. A failed tag check is
    /// [`HsmError::BadCiphertext`].
    pub async fn decrypt_gcm(
        &self,
        key: ObjectId,
        iv: [u8; 12],
        aad: Vec<u8>,
        sealed: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        self.run_hot(Call::GcmDecrypt, Retry::Once, move |cx| {
            let handle = cx.object(key, Kind::Secret)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, 128u64.into())?;
            let plaintext = cx
                .session
                .decrypt(&Mechanism::AesGcm(params), handle, &sealed)?;
            Ok(Zeroizing::new(plaintext))
        })
        .await
    }

    /// `len` random bytes from the token's generator.
    pub async fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let len = u32::try_from(len).map_err(|_| unavailable("random length too large"))?;
        self.run_hot(Call::Other, Retry::Once, move |cx| {
            Ok(Zeroizing::new(cx.session.generate_random_vec(len)?))
        })
        .await
    }

    /// Whether a secret key with this `CKA_ID` is in the token.
    pub async fn secret_key_exists(&self, id: ObjectId) -> Result<bool, HsmError> {
        match self
            .run(Call::Other, Retry::Once, move |cx| {
                cx.object(id, Kind::Secret)
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(HsmError::ObjectNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Destroys the secret key with this `CKA_ID`. Returns whether it existed.
    pub async fn destroy_secret_key(&self, id: ObjectId) -> Result<bool, HsmError> {
        self.destroy(id, &[Kind::Secret]).await
    }

    /// Destroys both halves of a signing key pair. Returns whether any existed.
    pub async fn destroy_signing_key(&self, id: ObjectId) -> Result<bool, HsmError> {
        self.destroy(id, &[Kind::Private, Kind::Public]).await
    }

    async fn destroy(&self, id: ObjectId, kinds: &'static [Kind]) -> Result<bool, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let _serialised = cx.object_lock();
            let mut existed = false;
            for &kind in kinds {
                let handle = match cx.object(id, kind) {
                    Ok(h) => h,
                    Err(OpError::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                cx.forget(id, kind);
                cx.session.destroy_object(handle)?;
                existed = true;
            }
            Ok(existed)
        })
        .await
    }

    /// Every secret-key token object, with its `CKA_ID` and `CKA_LABEL`.
    pub async fn list_secret_keys(&self) -> Result<Vec<TokenObject>, HsmError> {
        self.run(Call::Other, Retry::Once, |cx| {
            let handles = cx.session.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
            ])?;
            let mut objects = Vec::with_capacity(handles.len());
            for handle in handles {
                let mut object = TokenObject {
                    id: Vec::new(),
                    label: String::new(),
                };
                for attr in cx
                    .session
                    .get_attributes(handle, &[AttributeType::Id, AttributeType::Label])?
                {
                    match attr {
                        Attribute::Id(id) => object.id = id,
                        Attribute::Label(l) => {
                            object.label = String::from_utf8_lossy(&l).into_owned()
                        }
                        _ => {}
                    }
                }
                objects.push(object);
            }
            Ok(objects)
        })
        .await
    }

    /// Reads a secret key's protection attributes back from the token, and whether the token
    /// would reveal `CKA_VALUE`.
    pub async fn inspect_secret_key(&self, id: ObjectId) -> Result<KeyAttributes, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Secret)?;
            let mut a = KeyAttributes {
                token: false,
                private: false,
                sensitive: false,
                extractable: true,
                modifiable: true,
                copyable: true,
                always_sensitive: false,
                never_extractable: false,
                aes: false,
                value_len: 0,
                value_readable: true,
            };
            let types = [
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Modifiable,
                AttributeType::Copyable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::KeyType,
                AttributeType::ValueLen,
            ];
            for attr in cx.session.get_attributes(handle, &types)? {
                match attr {
                    Attribute::Token(v) => a.token = v,
                    Attribute::Private(v) => a.private = v,
                    Attribute::Sensitive(v) => a.sensitive = v,
                    Attribute::Extractable(v) => a.extractable = v,
                    Attribute::Modifiable(v) => a.modifiable = v,
                    Attribute::Copyable(v) => a.copyable = v,
                    Attribute::AlwaysSensitive(v) => a.always_sensitive = v,
                    Attribute::NeverExtractable(v) => a.never_extractable = v,
                    Attribute::KeyType(t) => a.aes = t == KeyType::AES,
                    Attribute::ValueLen(n) => a.value_len = u64::from(n),
                    _ => {}
                }
            }
            let value = cx
                .session
                .get_attribute_info(handle, &[AttributeType::Value])?;
            a.value_readable = matches!(value.first(), Some(AttributeInfo::Available(_)));
            Ok(a)
        })
        .await
    }

    /// Creates an ECDSA P-256 key pair in the token (the private half sensitive and never
    /// extractable, usable only to sign). Returns the public point, uncompressed (65 bytes).
    /// Not retried.
    pub async fn generate_signing_key(
        &self,
        id: ObjectId,
        label: String,
    ) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::Modifiable(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let _serialised = cx.object_lock();
            let (pub_handle, priv_handle) =
                cx.session
                    .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
            cx.remember(id, Kind::Public, pub_handle);
            cx.remember(id, Kind::Private, priv_handle);
            public_point(cx.session, pub_handle)
        })
        .await
    }

    /// Creates a 256-bit HMAC key (generic secret): sensitive, never extractable, sign only.
    /// Not retried.
    pub async fn generate_hmac_key(&self, id: ObjectId, label: String) -> Result<(), HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Sign(true),
                Attribute::Verify(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Derive(false),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let _serialised = cx.object_lock();
            let handle = cx
                .session
                .generate_key(&Mechanism::GenericSecretKeyGen, &template)?;
            cx.remember(id, Kind::Secret, handle);
            Ok(())
        })
        .await
    }

    /// HMAC-SHA256 of `data` under the HMAC key with this `CKA_ID`.
    pub async fn hmac_sha256(&self, id: ObjectId, data: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Secret)?;
            Ok(cx.session.sign(&Mechanism::Sha256Hmac, handle, &data)?)
        })
        .await
    }

    /// The public point (uncompressed, 65 bytes) of the signing key pair with this `CKA_ID`.
    pub async fn signing_public_key(&self, id: ObjectId) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Public)?;
            public_point(cx.session, handle)
        })
        .await
    }

    /// Signs `message` with ECDSA P-256 over SHA-256: `CKM_ECDSA_SHA256` where the token offers
    /// it, else SHA-256 here and raw `CKM_ECDSA`. Returns `r ‖ s` (64 bytes).
    pub async fn sign_p256(&self, id: ObjectId, message: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Private)?;
            if cx.live.ecdsa_sha256 {
                Ok(cx.session.sign(&Mechanism::EcdsaSha256, handle, &message)?)
            } else {
                let digest = ring::digest::digest(&ring::digest::SHA256, &message);
                Ok(cx
                    .session
                    .sign(&Mechanism::Ecdsa, handle, digest.as_ref())?)
            }
        })
        .await
    }

    /// Runs a key-management `op` on a pooled session off the async runtime, recovering as
    /// [`ckr::classify`] says and retrying once when `retry` allows.
    async fn run<T, F>(&self, call: Call, retry: Retry, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync + 'static,
    {
        self.run_in(Hot::No, call, retry, op).await
    }

    /// Like [`Hsm::run`] for a call on the request path, which runs where [`dispatch`] says.
    async fn run_hot<T, F>(&self, call: Call, retry: Retry, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync + 'static,
    {
        self.run_in(Hot::Yes, call, retry, op).await
    }

    async fn run_in<T, F>(&self, hot: Hot, call: Call, retry: Retry, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync + 'static,
    {
        let permits = &self.inner.permits;
        let op = Arc::new(op);
        let deadline = tokio::time::Instant::now() + self.inner.call_timeout;
        let mut recoveries = 0;
        loop {
            if self.inner.pin_refused.load(Ordering::Relaxed) {
                return Err(HsmError::PinRefused(RvError::PinIncorrect));
            }
            let outcome = 'dispatched: {
                if hot == Hot::Yes && self.inner.pace.inline() {
                    // The slot before the session permit: a re-initialisation takes every
                    // session permit and never the slot, so neither waits for the other.
                    let _slot = tokio::time::timeout_at(deadline, self.inner.inline_slot.acquire())
                        .await
                        .map_err(|_| HsmError::Deadline("the HSM did not answer"))?
                        .map_err(|_| unavailable("session pool closed"))?;
                    // Asked again: calls queued for the slot while the module turned slow
                    // must not each take their turn on the worker.
                    if self.inner.pace.inline() {
                        let _permit = acquire(permits, deadline).await?;
                        break 'dispatched self.inner.with_session(call, hot, &*op);
                    }
                }
                let permit = acquire(permits, deadline).await?;
                let inner = Arc::clone(&self.inner);
                let attempt_op = Arc::clone(&op);
                let worker = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    inner.with_session(call, hot, &*attempt_op)
                });
                tokio::time::timeout_at(deadline, worker)
                    .await
                    .map_err(|_| HsmError::Deadline("the HSM did not answer"))?
                    .map_err(|e| unavailable(format_args!("PKCS#11 worker failed: {e}")))?
            };

            let may_retry = recoveries < MAX_RECOVERIES && retry == Retry::Once;
            recoveries += 1;
            let why = match outcome {
                Ok(value) => return Ok(value),
                Err(Failure::NotFound(id)) => return Err(HsmError::ObjectNotFound(id)),
                Err(Failure::Down) => {
                    self.recover(None, deadline).await?;
                    "module was down".to_owned()
                }
                Err(Failure::Pkcs11 {
                    err,
                    recovery,
                    generation,
                }) => match recovery {
                    Recovery::BadCiphertext => return Err(HsmError::BadCiphertext),
                    Recovery::PinRefused => return Err(pin_refused(&err)),
                    Recovery::Fail => return Err(HsmError::Pkcs11(err)),
                    Recovery::DropSession | Recovery::ForgetHandle => err.to_string(),
                    Recovery::Reinitialise => {
                        tracing::warn!(error = %err, "PKCS#11 device or login lost; re-initialising the module");
                        self.recover(Some(generation), deadline).await?;
                        err.to_string()
                    }
                },
            };
            if !may_retry {
                return Err(HsmError::Unavailable(why));
            }
        }
    }

    /// Re-initialises the module once every in-flight call has finished.
    async fn recover(
        &self,
        observed: Option<u64>,
        deadline: tokio::time::Instant,
    ) -> Result<(), HsmError> {
        let all = Arc::clone(&self.inner.permits).acquire_many_owned(self.inner.pool_size);
        let all = tokio::time::timeout_at(deadline, all)
            .await
            .map_err(|_| {
                unavailable(
                    "HSM calls still in flight at the call's deadline; not re-initialising yet",
                )
            })?
            .map_err(|_| unavailable("session pool closed"))?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let _all = all;
            inner.reinitialise(observed)
        })
        .await
        .map_err(|e| unavailable(format_args!("PKCS#11 worker failed: {e}")))?
    }
}

async fn acquire(
    permits: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, HsmError> {
    tokio::time::timeout_at(deadline, Arc::clone(permits).acquire_owned())
        .await
        .map_err(|_| HsmError::Deadline("no HSM session became free"))?
        .map_err(|_| unavailable("session pool closed"))
}

fn initialise(pkcs11: &Pkcs11) -> Result<(), CkError> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The one slot whose token has this label (and serial, when given); none or several is an
/// error, so Tresor never guesses which token holds the keys.
fn find_token(
    pkcs11: &Pkcs11,
    module: &std::path::Path,
    label: &str,
    serial: Option<&str>,
) -> Result<Slot, HsmError> {
    let mut matching = Vec::new();
    for slot in pkcs11
        .get_slots_with_initialized_token()
        .map_err(unavailable)?
    {
        let info = pkcs11.get_token_info(slot).map_err(unavailable)?;
        if info.label() == label && serial.is_none_or(|s| info.serial_number() == s) {
            matching.push(slot);
        }
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(HsmError::TokenNotFound {
            label: label.to_owned(),
            serial: serial.map(str::to_owned),
            module: module.to_path_buf(),
        }),
        many => Err(HsmError::AmbiguousToken {
            label: label.to_owned(),
            count: many.len(),
        }),
    }
}

fn pin_refused(err: &CkError) -> HsmError {
    match err {
        CkError::Pkcs11(rv, _) => HsmError::PinRefused(*rv),
        _ => HsmError::PinRefused(RvError::PinIncorrect),
    }
}

/// Reads `CKA_EC_POINT` and strips its DER OCTET STRING wrapper where the module adds one.
fn public_point(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, OpError> {
    for attr in session.get_attributes(handle, &[AttributeType::EcPoint])? {
        if let Attribute::EcPoint(der) = attr {
            return Ok(match der.as_slice() {
                [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
                _ => der,
            });
        }
    }
    Err(OpError::Pkcs11(CkError::Pkcs11(
        RvError::AttributeTypeInvalid,
        cryptoki::context::Function::GetAttributeValue,
    )))
}

impl Inner {
    /// Finds the token and logs in on a session kept for the life of this generation.
    fn bring_up(&self) -> Result<Live, HsmError> {
        *lock(&self.last_bring_up) = Some(Instant::now());
        let slot = find_token(
            &self.pkcs11,
            &self.module,
            &self.token_label,
            self.token_serial.as_deref(),
        )?;
        let session = self
            .pkcs11
            .open_rw_session_no_drop(slot)
            .map_err(unavailable)?;
        let login = session.login(UserType::User, Some(self.pin.auth()));
        if !login_succeeded(&login) {
            let _ = session.close();
            let err = match login {
                Err(e) => e,
                Ok(()) => return Err(unavailable("login failed")),
            };
            if classify(&err, Call::Other) == Recovery::PinRefused {
                self.pin_refused.store(true, Ordering::SeqCst);
                tracing::error!(error = %err, "the token refused the PIN; not retrying");
                return Err(pin_refused(&err));
            }
            return Err(unavailable(err));
        }
        let generation = self.next_generation.fetch_add(1, Ordering::SeqCst);
        let ecdsa_sha256 = self
            .pkcs11
            .get_mechanism_list(slot)
            .is_ok_and(|m| m.contains(&cryptoki::mechanism::MechanismType::ECDSA_SHA256));
        Ok(Live {
            generation,
            slot,
            ecdsa_sha256,
            login: Mutex::new(session),
        })
    }

    /// Replaces the live module, unless someone else already replaced the one that failed.
    /// The caller holds every permit, so no other call is in the module.
    fn reinitialise(&self, observed: Option<u64>) -> Result<(), HsmError> {
        let mut live = write(&self.live);
        let current = live.as_ref().map(|l| l.generation);
        if current.is_some() && current != observed {
            return Ok(());
        }
        if current.is_none()
            && lock(&self.last_bring_up).is_some_and(|t| t.elapsed() < BRING_UP_BACKOFF)
        {
            return Err(unavailable(
                "the HSM is down; the next reconnection attempt is at most a second away",
            ));
        }
        // Sessions of the failed generation are dropped without C_CloseSession: after
        // C_Finalize their handle numbers may name the new generation's sessions.
        *live = None;
        lock(&self.idle).clear();
        write(&self.handles).clear();
        if current.is_some()
            && let Err(e) = self.pkcs11.clone().finalize()
        {
            tracing::warn!(error = %e, "C_Finalize failed while recovering; initialising anyway");
        }
        *lock(&self.last_bring_up) = Some(Instant::now());
        initialise(&self.pkcs11).map_err(unavailable)?;
        let fresh = self.bring_up()?;
        tracing::warn!(
            generation = fresh.generation,
            "PKCS#11 module re-initialised and logged in"
        );
        *live = Some(Arc::new(fresh));
        Ok(())
    }

    /// Runs one attempt of `op` on a session of the live module (blocking).
    fn with_session<T>(
        &self,
        call: Call,
        hot: Hot,
        op: &(dyn Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync),
    ) -> Result<T, Failure> {
        let Some(live) = read(&self.live).clone() else {
            return Err(Failure::Down);
        };
        let session = match self.take_session(&live) {
            Ok(s) => s,
            Err(err) => {
                let recovery = match classify(&err, Call::Other) {
                    Recovery::DropSession | Recovery::Reinitialise => Recovery::Reinitialise,
                    other => other,
                };
                return Err(Failure::Pkcs11 {
                    err,
                    recovery,
                    generation: live.generation,
                });
            }
        };
        let started = Instant::now();
        let result = op(&OpCtx {
            session: &session,
            inner: self,
            live: &live,
        });
        let took = started.elapsed();
        if hot == Hot::Yes {
            self.pace.record(took);
        }
        crate::metrics::global().hsm_calls.observe_duration(took);
        let err = match result {
            Ok(value) => {
                self.give_back(session, live.generation);
                return Ok(value);
            }
            Err(OpError::NotFound(id)) => {
                self.give_back(session, live.generation);
                return Err(Failure::NotFound(id));
            }
            Err(OpError::Pkcs11(err)) => err,
        };
        let mut recovery = classify(&err, call);
        crate::metrics::global().hsm_error(recovery.label());
        match recovery {
            Recovery::DropSession => {
                if let Err(e) = session.close() {
                    tracing::debug!(error = %e, "closing a lost session failed");
                }
                // A lost session rarely comes alone (a network HSM drops the connection): forget
                // the idle ones too, and if the login went with them, re-initialise.
                for pooled in lock(&self.idle).drain(..) {
                    if pooled.generation == live.generation {
                        let _ = pooled.session.close();
                    }
                }
                if !logged_in(&lock(&live.login)) {
                    recovery = Recovery::Reinitialise;
                }
            }
            // Dropped without closing: the module is about to be finalised.
            Recovery::Reinitialise => drop(session),
            Recovery::ForgetHandle => {
                write(&self.handles).clear();
                self.give_back(session, live.generation);
            }
            Recovery::BadCiphertext | Recovery::PinRefused | Recovery::Fail => {
                self.give_back(session, live.generation);
            }
        }
        Err(Failure::Pkcs11 {
            err,
            recovery,
            generation: live.generation,
        })
    }

    fn take_session(&self, live: &Live) -> Result<Session, CkError> {
        {
            let mut idle = lock(&self.idle);
            while let Some(pooled) = idle.pop() {
                if pooled.generation == live.generation {
                    return Ok(pooled.session);
                }
            }
        }
        self.pkcs11.open_rw_session_no_drop(live.slot)
    }

    fn give_back(&self, session: Session, generation: u64) {
        lock(&self.idle).push(Pooled {
            session,
            generation,
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let current = read(&self.live).as_ref().map(|l| l.generation);
        for pooled in lock(&self.idle).drain(..) {
            if Some(pooled.generation) == current {
                let _ = pooled.session.close();
            }
        }
        write(&self.live).take();
        if let Err(e) = self.pkcs11.clone().finalize() {
            tracing::debug!(error = %e, "C_Finalize at shutdown failed");
        }
        CONTEXT_OPEN.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_errors_never_print_the_pin() {
        let config = HsmConfig {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "t".into(),
            token_serial: None,
            pin: PinSource::Env("TRESOR_PIN".into()),
            sessions: 2,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            dispatch: Dispatch::Auto,
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("TRESOR_PIN"), "{shown}");
        let err = HsmError::PinRefused(RvError::PinIncorrect);
        assert!(!err.to_string().is_empty());
    }

    #[test]
    fn object_ids_print_as_hex() {
        let id = ObjectId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(format!("{id:?}"), format!("ObjectId({})", "ab".repeat(16)));
    }
}
