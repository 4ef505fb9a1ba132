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
//!   while the module answers in microseconds and on call threads of their own, at most one
//!   per session, while it does not ([`dispatch`], `hsm.dispatch`; [`threads`]).
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
mod direct;
mod dispatch;
mod objects;
mod pin;
mod raw;
mod session;
mod threads;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ckr::Call;
use cryptoki::context::Pkcs11;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectClass;
use session::Inner;
use session::Retry;
use session::initialise;
use tokio::sync::Semaphore;

use crate::sync::write;
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
    /// Use PKCS#11 3.0 message-based AES-GCM (one call per Wrap and per Unwrap) where the
    /// token offers it; otherwise, and with `false`, two calls each (`C_EncryptInit`,
    /// `C_Encrypt`). Blobs are the same either way.
    pub message_aead: bool,
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

#[cfg(feature = "test-support")]
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
        let direct = match direct::DirectCalls::load(&config.module) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(module = %config.module.display(), error = %e, "the module's function list is not readable: Wrap and Unwrap cost three PKCS#11 calls instead of two");
                None
            }
        };
        let inner = Inner {
            pkcs11,
            direct,
            message_aead: config.message_aead,
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
            call_threads: Arc::new(threads::CallThreads::default()),
        };
        // On failure `inner` drops here, which finalises the module and frees the slot.
        let live = inner.bring_up()?;
        let calls_per_wrap = match (live.message_gcm, inner.direct.is_some()) {
            (true, _) => 1,
            (false, true) => 2,
            (false, false) => 3,
        };
        *write(&inner.live) = Some(Arc::new(live));
        tracing::info!(module = %config.module.display(), token = %config.token_label, sessions = pool_size, dispatch = ?config.dispatch, calls_per_wrap, "HSM token opened");
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
            message_aead: true,
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
