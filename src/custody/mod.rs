//! Custody: the key lifecycle state machine and wrap, unwrap, data keys and rewrap.
//!
//! Owns the rules of DESIGN.md "Key hierarchy and formats": which version wraps, which
//! versions may unwrap, which state changes are allowed, and the crash order between the HSM
//! and the database. Talks to the HSM only through [`crate::hsm::Hsm`] and to the database
//! only through [`crate::store::Store`]; knows nothing of gRPC, TLS or callers' identities.
//!
//! - **Crash order.** A version's HSM object is created first, then its row is committed; if
//!   the commit fails the object is destroyed again. A crash in between leaves an object with
//!   this installation's label and no row, which start-up reconciliation removes
//!   ([`reconcile`]). Destruction commits `DESTROYED` first and then destroys the object;
//!   reconciliation finishes a destruction that a crash interrupted.
//! - **Cancellation.** Metadata writes run in a spawned task holding the admin lock, so a
//!   caller that goes away (a dropped gRPC request) cannot stop a write between the HSM and
//!   the database.
//! - **Cache.** Key metadata is served from memory ([`cache`]); every write updates it after
//!   its commit. The wrap/unwrap path reads the cache, then calls the HSM with no lock held.

mod approvals;
mod cache;
mod clock;
mod evidence;
mod integrity;
mod reconcile;

use std::future::Future;
use std::sync::{Arc, RwLock};

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::auth::{Denied, Grant, Role};
use crate::envelope::{self, EnvelopeError, IV_LEN, MAX_AAD_LEN, MAX_PLAINTEXT_LEN, VersionId};
use crate::hsm::{Hsm, HsmError, ObjectId};
use crate::model::{KeyName, KeyUsage, Millis, NameError, VersionState};
use crate::store::changes::Change;
use crate::store::{KeyRow, Reseal, Store, StoreError, VersionRow};
use crate::sync::{read, write};
pub use approvals::{ApprovalInfo, ApprovalState};
use cache::{Cache, KeyEntry, Take, VersionEntry};
pub use clock::{Clock, ManualClock, SystemClock};
use integrity::{Seal, Sealer};
pub use reconcile::{OrphanPolicy, ReconcileReport};

/// Longest key description accepted, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// At most this many labels per key.
pub const MAX_LABELS: usize = 64;
/// Data keys are 16 to 1,024 bytes; the default is 32 (AES-256).
pub const DATA_KEY_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=1024;

/// Errors of custody operations. Messages name keys and versions, never key material,
/// plaintext or AAD. The API layer maps each variant to one gRPC status; ciphertext problems
/// (`MalformedCiphertext`, `Unauthentic`, `UnknownVersion`) all reach clients as one generic
/// message so that they are no oracle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CustodyError {
    /// A key or tenant name breaks the naming rules.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// The caller's grant does not cover the operation or key.
    #[error("permission denied: {0}")]
    PermissionDenied(#[from] Denied),
    /// A request value is out of range (sizes, lengths).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No key of that name.
    #[error("key {0} not found")]
    KeyNotFound(String),
    /// A key of that name exists already.
    #[error("key {0} already exists")]
    KeyExists(String),
    /// The key has no such version.
    #[error("{0} not found")]
    VersionNotFound(String),
    /// The bytes are not a blob this build can read.
    #[error("malformed ciphertext: {0}")]
    MalformedCiphertext(EnvelopeError),
    /// The HSM's tag check failed: the AAD differs from the one given at wrap time, or the
    /// blob was altered (the two cannot be told apart, by design of GCM).
    #[error("ciphertext failed authentication (wrong AAD or altered ciphertext)")]
    Unauthentic,
    /// The blob names a key version this installation never had.
    #[error("ciphertext names an unknown key version")]
    UnknownVersion,
    /// The blob belongs to another key than the one the caller named.
    #[error("ciphertext belongs to another key than {expected}")]
    WrongKey {
        /// The key the caller expected.
        expected: String,
    },
    /// The version is disabled.
    #[error("{0} is disabled")]
    VersionDisabled(String),
    /// The version is scheduled for destruction.
    #[error("{0} is scheduled for destruction")]
    VersionDestroyScheduled(String),
    /// The version was destroyed; its blobs can never be unwrapped again.
    #[error("{0} is destroyed")]
    VersionDestroyed(String),
    /// The version's HSM object is missing from the token.
    #[error("{0} is lost: its HSM object is missing from the token")]
    VersionLost(String),
    /// The version has wrapped as many blobs as a random-IV GCM key safely can.
    #[error("{0} has reached its wrap limit; rotate the key")]
    VersionExhausted(String),
    /// The version is below the key's minimum decryption version.
    #[error("{0} is below the key's minimum decryption version")]
    VersionBelowMinimum(String),
    /// The key's usage forbids the operation.
    #[error("the usage of {key} is {usage}: it may not {operation}")]
    UsageForbidden {
        /// The key.
        key: String,
        /// Its usage.
        usage: KeyUsage,
        /// `encrypt` or `decrypt`.
        operation: &'static str,
    },
    /// The approval does not exist (in the caller's tenant).
    #[error("approval {0} not found")]
    ApprovalNotFound(String),
    /// The approval was already decided or expired.
    #[error("approval {id} is {state}; it can no longer be decided")]
    ApprovalClosed {
        /// The approval.
        id: String,
        /// Its state.
        state: ApprovalState,
    },
    /// The officer who asked may not approve.
    #[error("{0} asked for this destruction; a different officer of the tenant must approve it")]
    SelfApproval(String),
    /// A destruction of this version already waits for approval.
    #[error("a destruction of {0} already waits for approval")]
    ApprovalPending(String),
    /// The change is not allowed for the primary version.
    #[error("{0} is the primary version; rotate the key first")]
    PrimaryVersion(String),
    /// The state machine does not allow this change.
    #[error("{version} is {from}; it cannot become {to}")]
    InvalidTransition {
        /// Full version name.
        version: String,
        /// Current state.
        from: VersionState,
        /// Requested state.
        to: VersionState,
    },
    /// The key's rows in the database do not match their integrity value: they were changed
    /// outside Tresor. The key refuses every operation until its rows are restored.
    #[error(
        "metadata integrity check failed for {key}: {reason}; the key refuses service until its database rows are restored"
    )]
    MetadataIntegrity {
        /// The key.
        key: String,
        /// What did not match.
        reason: String,
    },
    /// An approval row does not match its integrity value.
    #[error(
        "metadata integrity check failed for approval {0}: it was changed outside Tresor and cannot be decided"
    )]
    ApprovalIntegrity(String),
    /// The HSM holds no integrity key for this installation although the database holds
    /// sealed rows: the database belongs to another token, or its installation id was changed.
    #[error(
        "metadata integrity: the HSM holds no integrity key for installation {0}, but the database has sealed rows; this database does not belong to this token (or its installation id was changed)"
    )]
    IntegrityKeyMissing(String),
    /// This node could not confirm within [`CHANGE_BOUND_MS`] that it has every key change
    /// made on other nodes (its database connection is away): it serves no key until it has.
    #[error(
        "this node cannot confirm it has every recent key change (database unreachable); retry, or use another node"
    )]
    NotCurrent,
    /// Another writer changed the key at the same time; retry.
    #[error("{0} was changed concurrently; retry")]
    Conflict(String),
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A background task failed to complete.
    #[error("internal: {0}")]
    Internal(String),
}

/// Custody settings.
#[derive(Debug, Clone)]
pub struct CustodyOptions {
    /// What start-up reconciliation does with HSM objects that have no row.
    pub orphans: OrphanPolicy,
    /// The time source.
    pub clock: Arc<dyn Clock>,
    /// How long an approved destruction waits before the HSM object is destroyed.
    pub destruction_grace_ms: Millis,
    /// How long a destruction request waits for its second officer.
    pub approval_ttl_ms: Millis,
}

/// A day in milliseconds.
pub const DAY_MS: Millis = 86_400_000;
/// Shortest destruction grace period a server accepts.
pub const MIN_DESTRUCTION_GRACE_MS: Millis = DAY_MS;
/// Shortest rotation period accepted.
pub const MIN_ROTATION_PERIOD_MS: Millis = 3_600_000;
/// A version is rotated away from once it has wrapped this many blobs, whatever its period.
pub const ROTATE_AFTER_WRAPS: u64 = 1 << 31;

impl Default for CustodyOptions {
    fn default() -> Self {
        Self {
            orphans: OrphanPolicy::default(),
            clock: Arc::new(SystemClock),
            destruction_grace_ms: 7 * DAY_MS,
            approval_ttl_ms: DAY_MS,
        }
    }
}

/// Changes an officer asks of a key; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    /// New description.
    pub description: Option<String>,
    /// New labels (replacing all).
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// New rotation period (`Some(None)` turns automatic rotation off).
    pub rotation_period_ms: Option<Option<Millis>>,
    /// New minimum decryption version.
    pub min_decryption_version: Option<u32>,
    /// New usage.
    pub usage: Option<KeyUsage>,
}

/// What one run of the scheduled work did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueReport {
    /// Keys rotated (name and new primary version).
    pub rotated: Vec<String>,
    /// Versions destroyed.
    pub destroyed: Vec<String>,
    /// Approvals that expired.
    pub expired_approvals: u64,
}

/// Metadata of a key, as shown to officers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Full name.
    pub name: KeyName,
    /// Free text.
    pub description: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Millis,
    /// Last metadata change.
    pub updated_at: Millis,
    /// The version that wraps.
    pub primary_version: u32,
    /// Automatic rotation period, if any.
    pub rotation_period_ms: Option<Millis>,
    /// When the next automatic rotation is due.
    pub next_rotation_at: Option<Millis>,
    /// Unwrap is refused for versions below this one.
    pub min_decryption_version: u32,
    /// What the key may be used for.
    pub usage: KeyUsage,
    /// Every version, oldest first.
    pub versions: Vec<VersionInfo>,
}

/// Metadata of one key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Full name, `tenants/t/keys/k/versions/n`.
    pub name: String,
    /// Version number.
    pub number: u32,
    /// Lifecycle state.
    pub state: VersionState,
    /// Whether this is the primary version.
    pub primary: bool,
    /// Creation time.
    pub created_at: Millis,
    /// Last state change.
    pub state_changed_at: Millis,
    /// When a scheduled destruction is due.
    pub destroy_at: Option<Millis>,
    /// When it was destroyed.
    pub destroyed_at: Option<Millis>,
    /// When its HSM object was found missing.
    pub lost_at: Option<Millis>,
    /// Upper bound of the blobs it has wrapped.
    pub wraps_at_most: u64,
}

/// What [`Custody::seal_raw`] returns: the pieces of an AES-GCM encryption, no blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSealed {
    /// The version that encrypted.
    pub version_id: VersionId,
    /// Its full name.
    pub key_version: String,
    /// The random IV.
    pub iv: [u8; IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub sealed: Vec<u8>,
}

/// A wrapped blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The blob (SECURITY.md "Blob format").
    pub ciphertext: Vec<u8>,
    /// Full name of the version that wrapped it.
    pub key_version: String,
}

/// An unwrapped plaintext. `Debug` does not print the plaintext.
pub struct Unwrapped {
    /// The plaintext, zeroized on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Full name of the version that had wrapped it.
    pub key_version: String,
}

impl std::fmt::Debug for Unwrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwrapped")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A new data key: random bytes from the HSM, and the same bytes wrapped. `Debug` does not
/// print the plaintext.
pub struct DataKey {
    /// The data key, zeroized on drop; `None` when the caller asked for the blob only.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
    /// The data key wrapped under the primary version.
    pub ciphertext: Vec<u8>,
    /// Full name of the version that wrapped it.
    pub key_version: String,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field(
                "plaintext",
                &self
                    .plaintext
                    .as_ref()
                    .map(|p| format!("<{} bytes redacted>", p.len())),
            )
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

/// The result of a rewrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    /// The blob under the primary version (the input itself when it already was).
    pub ciphertext: Vec<u8>,
    /// Full name of the version that wraps it now.
    pub key_version: String,
    /// Whether the blob changed.
    pub rewrapped: bool,
}

/// The custody service: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Custody {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Custody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Custody")
            .field("hsm", &self.inner.hsm)
            .finish_non_exhaustive()
    }
}

struct Inner {
    hsm: Hsm,
    store: Store,
    /// MACs key state and approvals under the HSM's metadata integrity key ([`integrity`]).
    sealer: Sealer,
    cache: RwLock<Cache>,
    /// Serialises metadata writes in this process, so each sees the previous one's cache
    /// update. Across processes the store's compare-and-set statements decide.
    admin: Arc<tokio::sync::Mutex<()>>,
    rng: SystemRandom,
    /// `tresor/{installation id}/`: every version object's label starts with it.
    label_prefix: String,
    /// Key changes as this node's change listener receives them (PostgreSQL): a metadata
    /// write waits for its own change to come back before answering ([`Custody::admin_key`]).
    seen: tokio::sync::broadcast::Sender<KeyName>,
    /// PostgreSQL, once [`Custody::follow_changes`] was called: when the last poll of the change log
    /// that found this node up to date *started* (ms since `epoch`, a monotonic clock, so a
    /// test's manual clock or a wall-clock step changes nothing). Keys are served only while
    /// that is at most [`CHANGE_BOUND_MS`] ago; `i64::MIN` while nobody follows changes.
    confirmed_at: std::sync::atomic::AtomicI64,
    /// When the last full load of every key started (same clock): it confirms the node as
    /// current as of then, before the first poll does.
    loaded_at: std::sync::atomic::AtomicI64,
    epoch: std::time::Instant,
    options: CustodyOptions,
}

/// A change committed on any node is obeyed by every other node within this long, or that node
/// refuses to serve keys until it has caught up (PostgreSQL; SECURITY.md "Several nodes").
pub const CHANGE_BOUND_MS: Millis = 2_000;

/// How often a node polls the change log besides listening for notifications.
const CHANGE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

impl Custody {
    /// Loads all metadata, reconciles it with the token, and returns the service with what
    /// reconciliation found (also logged).
    pub async fn open(
        hsm: Hsm,
        store: Store,
        options: CustodyOptions,
    ) -> Result<(Self, ReconcileReport), CustodyError> {
        let label_prefix = format!("tresor/{}/", store.installation_id());
        // One node at a time may find the integrity key missing and create it.
        let startup = store.startup_lock().await?;
        let (sealer, first_seal) = Sealer::open(hsm.clone(), store.installation_id()).await?;
        let custody = Self {
            inner: Arc::new(Inner {
                hsm,
                store,
                sealer,
                cache: RwLock::new(Cache::default()),
                admin: Arc::new(tokio::sync::Mutex::new(())),
                rng: SystemRandom::new(),
                label_prefix,
                seen: tokio::sync::broadcast::channel(64).0,
                confirmed_at: std::sync::atomic::AtomicI64::new(i64::MIN),
                loaded_at: std::sync::atomic::AtomicI64::new(i64::MIN),
                epoch: std::time::Instant::now(),
                options: options.clone(),
            }),
        };
        if first_seal {
            custody.seal_unsealed_rows().await?;
        }
        drop(startup);
        custody.load().await?;
        let report = custody.reconcile(options.orphans).await?;
        Ok((custody, report))
    }

    /// Keys whose database rows failed their integrity check, and why, in name order.
    pub fn integrity_failures(&self) -> Vec<(KeyName, String)> {
        let cache = read(&self.inner.cache);
        let mut failed: Vec<(KeyName, String)> = cache
            .keys
            .values()
            .filter_map(|k| match &k.seal {
                Seal::Broken(why) => Some((k.name.clone(), why.to_string())),
                Seal::Valid(_) => None,
            })
            .collect();
        failed.sort_by_key(|(k, _)| k.to_string());
        failed
    }

    /// The time custody works with.
    pub fn now(&self) -> Millis {
        self.inner.options.clock.now()
    }

    /// The HSM this service uses.
    pub fn hsm(&self) -> &Hsm {
        &self.inner.hsm
    }

    /// Checks that the HSM and the database answer (for the health service).
    pub async fn check_dependencies(&self) -> Result<(), CustodyError> {
        self.inner.hsm.random(1).await?;
        self.inner.store.ping().await?;
        Ok(())
    }

    /// The store this service uses.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    async fn load(&self) -> Result<(), CustodyError> {
        let started = self.monotonic_ms();
        let (keys, versions) = self.inner.store.load_all().await?;
        let mut by_key = rows_by_key(versions);
        let mut entries = Vec::with_capacity(keys.len());
        for key in &keys {
            let rows = by_key
                .remove(&(key.tenant.clone(), key.name.clone()))
                .unwrap_or_default();
            if let Some(entry) = self.checked_entry(key, &rows).await? {
                entries.push(entry);
            }
        }
        // Versions whose key row is gone: their blobs must meet a refusal that names the
        // problem, not look like blobs of a key that never existed.
        for ((tenant, name), rows) in by_key {
            if let Some(entry) = self.keyless_entry(&tenant, &name, &rows) {
                entries.push(entry);
            }
        }
        let mut cache = Cache::default();
        for entry in entries {
            for v in &entry.versions {
                cache.versions.insert(v.id, entry.name.clone());
            }
            cache.keys.insert(entry.name.clone(), Arc::new(entry));
        }
        *write(&self.inner.cache) = cache;
        self.inner
            .loaded_at
            .fetch_max(started, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// A cache entry from committed rows, checked against the key's integrity value: a key
    /// whose rows do not match (or do not form a key: versions not numbered 1 to the primary)
    /// becomes a broken entry that refuses service. A version this process already knows keeps
    /// its wrap budget (the blocks it reserved are its own to use up). `None` only for a row
    /// whose name breaks the naming rules (logged).
    async fn checked_entry(
        &self,
        key: &KeyRow,
        rows: &[VersionRow],
    ) -> Result<Option<KeyEntry>, CustodyError> {
        let Ok(name) = KeyName::new(&key.tenant, &key.name) else {
            tracing::error!(tenant = %key.tenant, key = %key.name, "key row with an invalid name ignored (metadata integrity)");
            return Ok(None);
        };
        let known = read(&self.inner.cache).keys.get(&name).cloned();
        let entries: Vec<VersionEntry> = rows
            .iter()
            .map(|r| {
                let mut e = VersionEntry::from_row(&name, r);
                if let Some(old) = known.as_ref().and_then(|k| k.version(r.version))
                    && old.id == r.id
                {
                    e.wraps = Arc::clone(&old.wraps);
                }
                e
            })
            .collect();
        let mut entry = KeyEntry::from_rows(
            name.clone(),
            key,
            entries,
            Seal::Valid(Arc::from(key.integrity.as_str())),
        );
        let numbered = entry
            .versions
            .iter()
            .enumerate()
            .all(|(i, v)| usize::try_from(v.number).ok() == Some(i + 1))
            && usize::try_from(entry.primary).ok() == Some(entry.versions.len());
        let broken = if key.integrity.is_empty() {
            Some("the key's rows carry no integrity value".to_owned())
        } else if !numbered {
            Some(format!(
                "its versions are not numbered 1 to the primary version {}",
                entry.primary
            ))
        } else {
            let expected = self.inner.sealer.seal_key(&entry).await?;
            (!integrity::same(&expected, &key.integrity))
                .then(|| "its rows do not match their integrity value".to_owned())
        };
        if let Some(reason) = broken {
            integrity_failure(&name, &reason);
            entry.seal = Seal::Broken(Arc::from(reason.as_str()));
        }
        Ok(Some(entry))
    }

    /// A broken entry for version rows whose key row is missing.
    fn keyless_entry(&self, tenant: &str, name: &str, rows: &[VersionRow]) -> Option<KeyEntry> {
        let name = KeyName::new(tenant, name).ok()?;
        let reason = "versions exist but the key's row is missing";
        integrity_failure(&name, reason);
        let row = KeyRow {
            tenant: tenant.to_owned(),
            name: name.key().to_owned(),
            description: String::new(),
            labels: Default::default(),
            primary_version: 0,
            created_at: 0,
            updated_at: 0,
            rotation_period_ms: None,
            next_rotation_at: None,
            min_decryption_version: u32::MAX,
            usage: KeyUsage::None,
            integrity: String::new(),
        };
        let versions = rows
            .iter()
            .map(|r| VersionEntry::from_row(&name, r))
            .collect();
        Some(KeyEntry::from_rows(
            name,
            &row,
            versions,
            Seal::Broken(Arc::from(reason)),
        ))
    }

    /// First start with an integrity key: seals every key and approval as the database holds
    /// them now (rows written by a build before integrity values). Runs only when the key was
    /// created in this start; refuses if any row is sealed already, because then the rows were
    /// sealed under a key this token does not have.
    async fn seal_unsealed_rows(&self) -> Result<(), CustodyError> {
        let store = &self.inner.store;
        let (keys, versions) = store.load_all().await?;
        let mut by_key = rows_by_key(versions);
        let approvals = store.all_approvals().await?;
        if keys.iter().any(|k| !k.integrity.is_empty())
            || approvals.iter().any(|a| !a.integrity.is_empty())
        {
            return Err(CustodyError::IntegrityKeyMissing(
                store.installation_id().to_owned(),
            ));
        }
        for key in &keys {
            let Ok(name) = KeyName::new(&key.tenant, &key.name) else {
                continue;
            };
            let rows: Vec<VersionEntry> = by_key
                .remove(&(key.tenant.clone(), key.name.clone()))
                .unwrap_or_default()
                .iter()
                .map(|v| VersionEntry::from_row(&name, v))
                .collect();
            let entry = KeyEntry::from_rows(name, key, rows, Seal::Valid(Arc::from("")));
            let sealed = self.inner.sealer.seal_key(&entry).await?;
            let seal = Reseal {
                before: "",
                after: &sealed,
            };
            store.reseal_key(&key.tenant, &key.name, &seal).await?;
        }
        for a in &approvals {
            let sealed = self.inner.sealer.seal_approval(a).await?;
            store.reseal_approval(&a.id, "", &sealed).await?;
        }
        if !(keys.is_empty() && approvals.is_empty()) {
            tracing::warn!(
                keys = keys.len(),
                approvals = approvals.len(),
                "metadata integrity: sealed the rows found, as they are (written before integrity values existed)"
            );
        }
        Ok(())
    }

    /// Re-reads one key from the database into the cache: another node changed it, or a
    /// compare-and-set here found the cache behind the database.
    pub async fn refresh_key(&self, tenant: &str, name: &str) -> Result<(), CustodyError> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.admin(move |c| async move { c.refresh_locked(&tenant, &name).await })
            .await
    }

    /// Re-reads `name` first if another node changed it and this node has not read the change
    /// yet, so a call right after a change on another node uses the changed key. Costs a set
    /// lookup when nothing is stale (always, on SQLite).
    pub async fn refresh_if_stale(&self, name: &KeyName) -> Result<(), CustodyError> {
        if !self.is_stale(name) {
            return Ok(());
        }
        let name = name.clone();
        self.admin(move |c| async move {
            // Another call may have re-read it while this one waited for the lock.
            if c.is_stale(&name) {
                c.refresh_locked(name.tenant().as_str(), name.key()).await?;
            }
            Ok(())
        })
        .await
    }

    /// [`CustodyError::NotCurrent`] while this node follows changes (PostgreSQL) and has not
    /// confirmed within [`CHANGE_BOUND_MS`] that it has every change: it may be serving a key
    /// another node has since disabled. One atomic load when nobody follows changes.
    fn check_current(&self) -> Result<(), CustodyError> {
        use std::sync::atomic::Ordering;
        let confirmed = self.inner.confirmed_at.load(Ordering::Acquire);
        if confirmed == i64::MIN || self.monotonic_ms().saturating_sub(confirmed) <= CHANGE_BOUND_MS
        {
            Ok(())
        } else {
            Err(CustodyError::NotCurrent)
        }
    }

    fn monotonic_ms(&self) -> i64 {
        i64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn is_stale(&self, name: &KeyName) -> bool {
        let cache = read(&self.inner.cache);
        !cache.stale.is_empty() && cache.stale.contains(name)
    }

    /// Before a blob's version is looked up: re-reads its key if it is stale, or, on
    /// PostgreSQL, finds the key of a version this node has not heard of yet (created on
    /// another node a moment ago). An id no node created costs one indexed read.
    async fn refresh_for_version(&self, id: &VersionId) -> Result<(), CustodyError> {
        // One read lock and no allocation in the common case (known version, nothing stale):
        // this runs on every Unwrap.
        let lookup = {
            let cache = read(&self.inner.cache);
            match cache.versions.get(id) {
                Some(name) if !cache.stale.is_empty() && cache.stale.contains(name) => {
                    Some(Some(name.clone()))
                }
                Some(_) => None,
                None => Some(None),
            }
        };
        match lookup {
            None => Ok(()),
            Some(Some(name)) => self.refresh_if_stale(&name).await,
            Some(None) if self.inner.store.backend() == crate::store::Backend::Postgres => {
                if let Some((tenant, name)) = self.inner.store.key_of_version(id).await? {
                    self.refresh_key(&tenant, &name).await?;
                }
                Ok(())
            }
            Some(None) => Ok(()),
        }
    }

    /// The key's cache entry, re-read first if another node changed it (one read lock when
    /// nothing is stale: this runs on every Wrap).
    async fn fresh_entry(&self, name: &KeyName) -> Result<Arc<KeyEntry>, CustodyError> {
        self.check_current()?;
        {
            let cache = read(&self.inner.cache);
            if cache.stale.is_empty() || !cache.stale.contains(name) {
                let entry = cache
                    .keys
                    .get(name)
                    .cloned()
                    .ok_or_else(|| CustodyError::KeyNotFound(name.to_string()))?;
                entry.check_seal()?;
                return Ok(entry);
            }
        }
        self.refresh_if_stale(name).await?;
        self.entry(name)
    }

    /// [`Self::refresh_key`] for a caller that holds the admin lock.
    async fn refresh_locked(&self, tenant: &str, name: &str) -> Result<(), CustodyError> {
        let Some((key, versions)) = self.inner.store.load_key(tenant, name).await? else {
            // Tresor never deletes a key row: one that vanished was deleted outside it.
            if let Ok(name) = KeyName::new(tenant, name)
                && let Some(known) = read(&self.inner.cache).keys.get(&name).cloned()
            {
                let reason = "the key's row is missing from the database";
                integrity_failure(&name, reason);
                let mut broken = (*known).clone();
                broken.seal = Seal::Broken(Arc::from(reason));
                self.publish(broken);
            }
            return Ok(());
        };
        if let Some(entry) = self.checked_entry(&key, &versions).await? {
            self.publish(entry);
        }
        Ok(())
    }

    /// Re-reads every key (notifications may have been missed).
    pub async fn reload(&self) -> Result<(), CustodyError> {
        self.admin(|c| async move { c.load().await }).await
    }

    /// Keeps this node's cache in step with the other nodes' changes until the process ends
    /// (PostgreSQL; a task that ends at once on SQLite, where there are no other nodes):
    /// listens for notifications, and polls the change log every half second in case the
    /// listener went quiet. From this call on (not from when the task first runs), the node
    /// serves keys only while its last full load or successful poll started at most
    /// [`CHANGE_BOUND_MS`] ago, also while the database cannot be reached at all.
    pub fn follow_changes(&self) -> tokio::task::JoinHandle<()> {
        if self.inner.store.backend() == crate::store::Backend::Postgres {
            self.inner.confirmed_at.fetch_max(
                self.inner
                    .loaded_at
                    .load(std::sync::atomic::Ordering::Acquire),
                std::sync::atomic::Ordering::AcqRel,
            );
        }
        let custody = self.clone();
        tokio::spawn(async move {
            if custody.inner.store.backend() == crate::store::Backend::Postgres {
                tokio::join!(custody.listen_for_changes(), custody.poll_changes());
            }
        })
    }

    /// The listening half of [`Custody::follow_changes`].
    async fn listen_for_changes(&self) {
        let mut feed = loop {
            match self.inner.store.changes().await {
                Ok(Some(feed)) => break feed,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "key-change listener cannot start; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        };
        // Changes made between start-up's load and the first LISTEN.
        let mut reload = true;
        loop {
            if reload {
                match self.reload().await {
                    Ok(()) => reload = false,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not reload key metadata; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            match feed.next().await {
                Change::Key { tenant, name } => {
                    if let Err(e) = self.changed_elsewhere(&tenant, &name).await {
                        tracing::warn!(error = %e, key = %format_args!("{tenant}/{name}"), "could not re-read a changed key; reloading all");
                        reload = true;
                    }
                }
                Change::Missed => reload = true,
            }
        }
    }

    /// Marks a key changed on some node stale (calls from now on re-read it first), tells
    /// writers waiting for their own change, and re-reads it.
    async fn changed_elsewhere(&self, tenant: &str, name: &str) -> Result<(), CustodyError> {
        if let Ok(key) = KeyName::new(tenant, name) {
            write(&self.inner.cache).stale.insert(key.clone());
            let _ = self.inner.seen.send(key);
        }
        self.refresh_key(tenant, name).await
    }

    /// Polls the change log every [`CHANGE_POLL`]; each poll that applied everything it found
    /// confirms this node as current as of the poll's start.
    async fn poll_changes(&self) {
        use crate::store::changes::Logged;
        use std::sync::atomic::Ordering;
        let mut after = loop {
            let started = self.monotonic_ms();
            match self.inner.store.last_key_change().await {
                // Everything up to here is in the cache: the reload below comes after it.
                Ok(seq) => match self.reload().await {
                    Ok(()) => {
                        self.inner.confirmed_at.fetch_max(started, Ordering::AcqRel);
                        break seq;
                    }
                    Err(e) => tracing::warn!(error = %e, "could not reload key metadata; retrying"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot read the key-change log; retrying"),
            }
            tokio::time::sleep(CHANGE_POLL).await;
        };
        let mut tick = tokio::time::interval(CHANGE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let started = self.monotonic_ms();
            let applied = match self.inner.store.key_changes_after(after).await {
                Ok(Logged::Changes(changes)) => {
                    let mut result = Ok(());
                    for (seq, tenant, name) in changes {
                        if let Err(e) = self.changed_elsewhere(&tenant, &name).await {
                            result = Err(e);
                            break;
                        }
                        after = seq;
                    }
                    result
                }
                Ok(Logged::Gap(last)) => self.reload().await.map(|()| after = last),
                Err(e) => Err(e.into()),
            };
            match applied {
                Ok(()) => {
                    self.inner.confirmed_at.fetch_max(started, Ordering::AcqRel);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not poll or apply the key-change log; keys are refused if this lasts");
                }
            }
        }
    }

    // ---- officer operations -------------------------------------------------------------

    /// Creates a key with version 1 as its primary version.
    pub async fn create_key(
        &self,
        grant: &Grant,
        name: &KeyName,
        description: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        check_description(description)?;
        check_labels(&labels)?;
        let name = name.clone();
        let description = description.to_owned();
        let changed = name.clone();
        self.admin_key(&changed, move |c| async move {
            // A broken entry keeps its name: its versions' blobs must not become another
            // key's.
            let existing = read(&c.inner.cache).keys.get(&name).cloned();
            if let Some(existing) = existing {
                existing.check_seal()?;
                return Err(CustodyError::KeyExists(name.to_string()));
            }
            let now = c.now();
            let version = c.new_version_object(&name, 1, now).await?;
            let mut row = KeyRow {
                tenant: name.tenant().as_str().to_owned(),
                name: name.key().to_owned(),
                description,
                labels,
                primary_version: 1,
                created_at: now,
                updated_at: now,
                rotation_period_ms: None,
                next_rotation_at: None,
                min_decryption_version: 1,
                usage: KeyUsage::default(),
                integrity: String::new(),
            };
            let mut entry = KeyEntry::from_rows(
                name.clone(),
                &row,
                vec![VersionEntry::from_row(&name, &version)],
                Seal::Valid(Arc::from("")),
            );
            let sealed = match c.inner.sealer.seal_key(&entry).await {
                Ok(sealed) => sealed,
                Err(e) => {
                    c.discard_object(&version.id).await;
                    return Err(e.into());
                }
            };
            row.integrity.clone_from(&sealed);
            entry.seal = Seal::Valid(Arc::from(sealed.as_str()));
            if let Err(e) = c.inner.store.create_key(&row, &version).await {
                c.discard_object(&version.id).await;
                return Err(match e {
                    StoreError::AlreadyExists => CustodyError::KeyExists(name.to_string()),
                    e => e.into(),
                });
            }
            c.clear_journal(&version.id).await;
            Ok(c.publish(entry))
        })
        .await
    }

    /// The metadata of one key.
    pub fn get_key(&self, grant: &Grant, name: &KeyName) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        Ok(info(&*self.entry(name)?))
    }

    /// Keys of the caller's tenant that its grant covers, in name order, starting after
    /// `after`, at most `limit`.
    pub fn list_keys(
        &self,
        grant: &Grant,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<KeyInfo>, CustodyError> {
        grant.require(Role::Officer)?;
        let cache = read(&self.inner.cache);
        let mut keys: Vec<&Arc<KeyEntry>> = cache
            .keys
            .values()
            .filter(|k| {
                k.check_seal().is_ok()
                    && grant.allows_key(&k.name)
                    && after.is_none_or(|a| k.name.key() > a)
            })
            .collect();
        keys.sort_by(|a, b| a.name.key().cmp(b.name.key()));
        Ok(keys.into_iter().take(limit).map(|k| info(k)).collect())
    }

    /// Creates a new version and makes it primary. Older versions keep their state, so blobs
    /// they wrapped still unwrap.
    pub async fn rotate_key(&self, grant: &Grant, name: &KeyName) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        self.rotate(name).await
    }

    /// Rotation for an authorized officer or the scheduler.
    async fn rotate(&self, name: &KeyName) -> Result<KeyInfo, CustodyError> {
        let name = name.clone();
        let changed = name.clone();
        self.admin_key(&changed, move |c| async move {
            let entry = c.entry(&name)?;
            let number = u32::try_from(entry.versions.len() + 1)
                .map_err(|_| CustodyError::InvalidArgument("too many versions".into()))?;
            let now = c.now();
            let version = c.new_version_object(&name, number, now).await?;
            let mut next = (*entry).clone();
            next.versions
                .push(Arc::new(VersionEntry::from_row(&name, &version)));
            next.primary = number;
            next.updated_at = now;
            next.next_rotation_at = next.rotation_period_ms.map(|p| now + p);
            let sealed = match c.reseal(&entry, &mut next).await {
                Ok(sealed) => sealed,
                Err(e) => {
                    c.discard_object(&version.id).await;
                    return Err(e);
                }
            };
            if let Err(e) = c
                .inner
                .store
                .add_primary_version(&version, entry.primary, &sealed.as_reseal())
                .await
            {
                c.discard_object(&version.id).await;
                return Err(match e {
                    StoreError::Conflict => {
                        // Another node rotated first: learn its version now, not only when
                        // its notification arrives.
                        c.refresh_after_conflict(&name).await;
                        CustodyError::Conflict(name.to_string())
                    }
                    e => e.into(),
                });
            }
            c.clear_journal(&version.id).await;
            Ok(c.publish(next))
        })
        .await
    }

    /// Changes a key's description, labels, rotation period or minimum decryption version.
    pub async fn update_key(
        &self,
        grant: &Grant,
        name: &KeyName,
        update: KeyUpdate,
    ) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        if let Some(d) = &update.description {
            check_description(d)?;
        }
        if let Some(l) = &update.labels {
            check_labels(l)?;
        }
        if let Some(Some(p)) = update.rotation_period_ms
            && !(MIN_ROTATION_PERIOD_MS..=100 * 365 * DAY_MS).contains(&p)
        {
            return Err(CustodyError::InvalidArgument(
                "rotation period must be 1 hour to 100 years".into(),
            ));
        }
        let name = name.clone();
        let changed = name.clone();
        self.admin_key(&changed, move |c| async move {
            let entry = c.entry(&name)?;
            let mut next = (*entry).clone();
            let read_at = next.updated_at;
            let now = c.now();
            if let Some(d) = update.description {
                next.description = d;
            }
            if let Some(l) = update.labels {
                next.labels = l;
            }
            if let Some(period) = update.rotation_period_ms {
                next.rotation_period_ms = period;
                next.next_rotation_at = period.map(|p| now + p);
            }
            if let Some(min) = update.min_decryption_version {
                if min == 0 || min > next.primary {
                    return Err(CustodyError::InvalidArgument(format!(
                        "minimum decryption version must be 1 to the primary version ({})",
                        next.primary
                    )));
                }
                next.min_decryption_version = min;
            }
            if let Some(usage) = update.usage {
                next.usage = usage;
            }
            // Strictly later than the change it replaces, so `updated_at` tells every change
            // apart (the store's compare-and-set relies on it).
            next.updated_at = now.max(read_at + 1);
            let sealed = c.reseal(&entry, &mut next).await?;
            let row = KeyRow {
                tenant: name.tenant().as_str().to_owned(),
                name: name.key().to_owned(),
                description: next.description.clone(),
                labels: next.labels.clone(),
                primary_version: next.primary,
                created_at: next.created_at,
                updated_at: next.updated_at,
                rotation_period_ms: next.rotation_period_ms,
                next_rotation_at: next.next_rotation_at,
                min_decryption_version: next.min_decryption_version,
                usage: next.usage,
                integrity: sealed.after.clone(),
            };
            match c
                .inner
                .store
                .update_key(&row, read_at, &sealed.before)
                .await
            {
                Ok(()) => Ok(c.publish(next)),
                Err(StoreError::Conflict) => {
                    c.refresh_after_conflict(&name).await;
                    Err(CustodyError::Conflict(name.to_string()))
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Runs the work that is due: rotations (period elapsed, or 2^31 wraps on the primary
    /// version), destructions past their grace period, approval expiry. A due rotation happens
    /// once however long the server was down; the next is due a period after it.
    pub async fn run_due(&self) -> Result<DueReport, CustodyError> {
        let now = self.now();
        let mut report = DueReport::default();
        let due: Vec<KeyName> = read(&self.inner.cache)
            .keys
            .values()
            .filter(|k| {
                if k.check_seal().is_err() {
                    return false;
                }
                let period_due = k.next_rotation_at.is_some_and(|t| t <= now);
                let worn_out = k
                    .primary_version()
                    .is_some_and(|v| v.wraps.reserved() >= ROTATE_AFTER_WRAPS);
                period_due || worn_out
            })
            .map(|k| k.name.clone())
            .collect();
        for name in due {
            match self.rotate(&name).await {
                Ok(info) => {
                    tracing::info!(key = %name, version = info.primary_version, "key rotated on schedule");
                    report.rotated.push(name.version(info.primary_version));
                }
                // Another node rotated it first; its next due time moved on.
                Err(CustodyError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        report.destroyed = self.destroy_due(now).await?;
        report.expired_approvals = self.expire_approvals(now).await?;
        Ok(report)
    }

    /// `DISABLED` → `ENABLED`. Enabling an enabled version changes nothing.
    pub async fn enable_version(
        &self,
        grant: &Grant,
        name: &KeyName,
        number: u32,
    ) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        self.transition(name, number, VersionState::Enabled, None)
            .await
    }

    /// `ENABLED` → `DISABLED`; not for the primary version. Disabling a disabled version
    /// changes nothing.
    pub async fn disable_version(
        &self,
        grant: &Grant,
        name: &KeyName,
        number: u32,
    ) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        self.transition(name, number, VersionState::Disabled, None)
            .await
    }

    /// `DESTROY_SCHEDULED` → `DISABLED`.
    pub async fn cancel_destruction(
        &self,
        grant: &Grant,
        name: &KeyName,
        number: u32,
    ) -> Result<KeyInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        let entry = self.entry(name)?;
        let version = entry
            .version(number)
            .ok_or_else(|| CustodyError::VersionNotFound(name.version(number)))?;
        if version.state != VersionState::DestroyScheduled {
            return Err(CustodyError::InvalidTransition {
                version: name.version(number),
                from: version.state,
                to: VersionState::Disabled,
            });
        }
        // The order first: once it is gone nothing can destroy the object, whatever happens
        // to the row afterwards.
        self.withdraw_order(&version.id).await?;
        self.transition(name, number, VersionState::Disabled, None)
            .await
    }

    async fn transition(
        &self,
        name: &KeyName,
        number: u32,
        to: VersionState,
        destroy_at: Option<Millis>,
    ) -> Result<KeyInfo, CustodyError> {
        use VersionState::*;
        let name = name.clone();
        let changed = name.clone();
        self.admin_key(&changed, move |c| async move {
            let entry = c.entry(&name)?;
            let version = entry
                .version(number)
                .ok_or_else(|| CustodyError::VersionNotFound(name.version(number)))?;
            let from = version.state;
            if from == to && to != DestroyScheduled {
                return Ok(info(&entry));
            }
            let allowed: &[VersionState] = match (from, to) {
                (Disabled, Enabled) => &[Disabled],
                (Enabled, Disabled) | (DestroyScheduled, Disabled) => &[from],
                (Enabled | Disabled, DestroyScheduled) => &[Enabled, Disabled],
                _ => {
                    return Err(CustodyError::InvalidTransition {
                        version: name.version(number),
                        from,
                        to,
                    });
                }
            };
            // The primary version must stay enabled: only rotation moves the primary.
            let unless_primary = to != Enabled;
            if unless_primary && entry.primary == number {
                return Err(CustodyError::PrimaryVersion(name.version(number)));
            }
            let now = c.now();
            let mut next = entry.with_version(number, |v| VersionEntry {
                state: to,
                state_changed_at: now,
                destroy_at,
                ..v.clone()
            });
            let sealed = c.reseal(&entry, &mut next).await?;
            match c
                .inner
                .store
                .transition(
                    &version.id,
                    allowed,
                    to,
                    now,
                    destroy_at,
                    unless_primary,
                    &sealed.as_reseal(),
                )
                .await
            {
                Ok(()) => {}
                Err(StoreError::Conflict) => {
                    c.refresh_after_conflict(&name).await;
                    return Err(CustodyError::Conflict(name.version(number)));
                }
                Err(e) => return Err(e.into()),
            }
            Ok(c.publish(next))
        })
        .await
    }

    /// Destroys every version whose scheduled destruction is due at `now` and for which the
    /// HSM holds a destruction order that is due too ([`evidence`]): commits `DESTROYED`, then
    /// destroys the HSM object, then withdraws the order. A version the database calls due
    /// without such an order is left alone and reported (ERROR log, metric). Returns the
    /// destroyed versions' names.
    pub async fn destroy_due(&self, now: Millis) -> Result<Vec<String>, CustodyError> {
        self.admin(move |c| async move {
            let due: Vec<(KeyName, u32, VersionId)> = read(&c.inner.cache)
                .keys
                .values()
                .filter(|k| k.check_seal().is_ok())
                .flat_map(|k| {
                    k.versions
                        .iter()
                        .filter(|v| v.state == VersionState::DestroyScheduled && v.destroy_at.is_some_and(|t| t <= now))
                        .map(|v| (k.name.clone(), v.number, v.id))
                })
                .collect();
            if due.is_empty() {
                return Ok(Vec::new());
            }
            let orders = c.destruction_orders().await?;
            let mut destroyed = Vec::with_capacity(due.len());
            for (name, number, id) in due {
                let version_name = name.version(number);
                match orders.get(&id) {
                    Some(order) if order.destroy_at <= now => {}
                    Some(order) => {
                        tracing::warn!(version = %version_name, order_due = order.destroy_at,
                            "the database says this destruction is due, the HSM's destruction order says later; waiting for the order");
                        continue;
                    }
                    None => {
                        crate::metrics::global().destructions_refused.inc();
                        tracing::error!(version = %version_name,
                            "version is DESTROY_SCHEDULED in the database, but the HSM holds no destruction order for it; not destroyed (metadata integrity)");
                        continue;
                    }
                }
                let entry = c.entry(&name)?;
                let at = c.now();
                let mut next = entry.with_version(number, |v| VersionEntry {
                    state: VersionState::Destroyed,
                    state_changed_at: at,
                    destroy_at: None,
                    destroyed_at: Some(at),
                    ..v.clone()
                });
                let sealed = c.reseal(&entry, &mut next).await?;
                match c.inner.store.transition(&id, &[VersionState::DestroyScheduled], VersionState::Destroyed, at, None, false, &sealed.as_reseal()).await {
                    Ok(()) => {}
                    // Cancelled or destroyed elsewhere since the cache was read.
                    Err(StoreError::Conflict) => {
                        c.refresh_after_conflict(&name).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                c.publish(next);
                match c.inner.hsm.destroy_secret_key(ObjectId(id.0)).await {
                    Ok(_) => {
                        if let Err(e) = c.withdraw_order(&id).await {
                            tracing::warn!(version = %version_name, error = %e, "version destroyed; its spent destruction order stays until the next start-up");
                        }
                    }
                    Err(e) => {
                        tracing::error!(version = %version_name, error = %e,
                            "version is DESTROYED but its HSM object could not be destroyed; start-up reconciliation will retry");
                    }
                }
                tracing::info!(version = %version_name, "key version destroyed");
                destroyed.push(version_name);
            }
            Ok(destroyed)
        })
        .await
    }

    // ---- service operations (the hot path) ----------------------------------------------

    /// Wraps `plaintext` (1 byte to 64 KiB) under the key's primary version, binding `aad`.
    pub async fn wrap(
        &self,
        grant: &Grant,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad: &[u8],
    ) -> Result<Wrapped, CustodyError> {
        authorize(grant, Role::Service, name)?;
        self.wrap_authorized(name, plaintext, aad).await
    }

    /// Wrap, once the caller's grant was checked for `name`.
    async fn wrap_authorized(
        &self,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad: &[u8],
    ) -> Result<Wrapped, CustodyError> {
        check_plaintext(&plaintext)?;
        check_aad(aad)?;
        let (version, iv, sealed) = self
            .seal_under_primary(name, plaintext, |v| {
                envelope::gcm_aad(&v.id, &v.full_name, aad)
            })
            .await?;
        Ok(Wrapped {
            ciphertext: envelope::encode(&version.id, &iv, &sealed),
            key_version: version.full_name.to_string(),
        })
    }

    /// Unwraps a blob with the AAD given at wrap time. The version comes from the blob; with
    /// `expected_key`, a blob of any other key is refused before the HSM is asked.
    pub async fn unwrap(
        &self,
        grant: &Grant,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<Unwrapped, CustodyError> {
        let (plaintext, version, _) = self.open_blob(grant, ciphertext, aad, expected_key).await?;
        Ok(Unwrapped {
            plaintext,
            key_version: version.full_name.to_string(),
        })
    }

    /// Draws `len` random bytes from the HSM and wraps them under the key's primary version.
    pub async fn generate_data_key(
        &self,
        grant: &Grant,
        name: &KeyName,
        aad: &[u8],
        len: usize,
        with_plaintext: bool,
    ) -> Result<DataKey, CustodyError> {
        if !DATA_KEY_LEN_RANGE.contains(&len) {
            return Err(CustodyError::InvalidArgument(format!(
                "data key length must be {} to {} bytes, not {len}",
                DATA_KEY_LEN_RANGE.start(),
                DATA_KEY_LEN_RANGE.end()
            )));
        }
        authorize(grant, Role::Service, name)?;
        check_aad(aad)?;
        // Fail on an unknown key before spending HSM randomness (a key another node has just
        // created is read first).
        self.fresh_entry(name).await?;
        let key = self.inner.hsm.random(len).await?;
        let wrapped = self
            .wrap_authorized(name, Zeroizing::new(key.to_vec()), aad)
            .await?;
        Ok(DataKey {
            plaintext: with_plaintext.then_some(key),
            ciphertext: wrapped.ciphertext,
            key_version: wrapped.key_version,
        })
    }

    /// Re-wraps a blob under its key's primary version. A blob already under the primary
    /// version is still authenticated, then returned unchanged with `rewrapped = false`.
    pub async fn rewrap(
        &self,
        grant: &Grant,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<Rewrapped, CustodyError> {
        let (plaintext, version, opened) =
            self.open_blob(grant, ciphertext, aad, expected_key).await?;
        // Re-read: the primary may have moved while the HSM decrypted.
        let current = self.entry(&opened.name)?;
        // Rewrap is decrypt-then-encrypt even when the blob needs no new wrap: a key that may
        // not encrypt answers no rewrap at all.
        if !current.usage.encrypts() {
            return Err(CustodyError::UsageForbidden {
                key: opened.name.to_string(),
                usage: current.usage,
                operation: "encrypt",
            });
        }
        let primary = current.primary;
        if version.number == primary {
            return Ok(Rewrapped {
                ciphertext: ciphertext.to_vec(),
                key_version: version.full_name.to_string(),
                rewrapped: false,
            });
        }
        let wrapped = self.wrap_authorized(&opened.name, plaintext, aad).await?;
        Ok(Rewrapped {
            ciphertext: wrapped.ciphertext,
            key_version: wrapped.key_version,
            rewrapped: true,
        })
    }

    /// Encrypts under the primary version of an authorized key (usage, state and wrap budget
    /// checked, a fresh random IV) with the GCM AAD `aad_for` builds for that version.
    async fn seal_under_primary(
        &self,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad_for: impl FnOnce(&VersionEntry) -> Vec<u8>,
    ) -> Result<(Arc<VersionEntry>, [u8; IV_LEN], Vec<u8>), CustodyError> {
        let version = {
            let entry = self.fresh_entry(name).await?;
            if !entry.usage.encrypts() {
                return Err(CustodyError::UsageForbidden {
                    key: name.to_string(),
                    usage: entry.usage,
                    operation: "encrypt",
                });
            }
            let primary = entry.primary_version().cloned();
            primary.ok_or_else(|| CustodyError::VersionNotFound(name.version(entry.primary)))?
        };
        usable(&version)?;
        match version.wraps.take(&self.inner.store, &version.id).await? {
            Take::Granted => {}
            Take::Exhausted => {
                return Err(CustodyError::VersionExhausted(
                    version.full_name.to_string(),
                ));
            }
        }
        let mut iv = [0u8; IV_LEN];
        self.inner
            .rng
            .fill(&mut iv)
            .map_err(|_| CustodyError::Internal("no system randomness".into()))?;
        let full_aad = aad_for(&version);
        let sealed = self
            .inner
            .hsm
            .encrypt_gcm(ObjectId(version.id.0), iv, full_aad, plaintext)
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        Ok((version, iv, sealed))
    }

    /// Parses, resolves, authorizes and decrypts a blob; returns the plaintext, its version and
    /// the snapshot of its key that was checked.
    async fn open_blob(
        &self,
        grant: &Grant,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<(Zeroizing<Vec<u8>>, Arc<VersionEntry>, Arc<KeyEntry>), CustodyError> {
        grant.require(Role::Service)?;
        if let Some(expected) = expected_key {
            grant.check_key(expected)?;
        }
        check_aad(aad)?;
        let blob = envelope::parse(ciphertext).map_err(CustodyError::MalformedCiphertext)?;
        let (version, entry) = self
            .decrypting_version(grant, &blob.version_id, expected_key)
            .await?;
        let full_aad = envelope::gcm_aad(&version.id, &version.full_name, aad);
        let plaintext = self
            .inner
            .hsm
            .decrypt_gcm(
                ObjectId(version.id.0),
                blob.iv,
                full_aad,
                blob.sealed.to_vec(),
            )
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        Ok((plaintext, version, entry))
    }

    /// The version that may decrypt a ciphertext naming `id`: known (re-read if stale or new
    /// on another node), of `expected_key` when given, covered by the grant, of a key whose
    /// usage allows decrypt, at or above the minimum decryption version, and usable.
    async fn decrypting_version(
        &self,
        grant: &Grant,
        id: &VersionId,
        expected_key: Option<&KeyName>,
    ) -> Result<(Arc<VersionEntry>, Arc<KeyEntry>), CustodyError> {
        self.check_current()?;
        self.refresh_for_version(id).await?;
        let (version, entry) = {
            let cache = read(&self.inner.cache);
            let key = cache.versions.get(id).ok_or(CustodyError::UnknownVersion)?;
            if let Some(expected) = expected_key
                && expected != key
            {
                return Err(CustodyError::WrongKey {
                    expected: expected.to_string(),
                });
            }
            grant.check_key(key)?;
            let entry = cache.keys.get(key).ok_or(CustodyError::UnknownVersion)?;
            entry.check_seal()?;
            if !entry.usage.decrypts() {
                return Err(CustodyError::UsageForbidden {
                    key: key.to_string(),
                    usage: entry.usage,
                    operation: "decrypt",
                });
            }
            let version = entry
                .versions
                .iter()
                .find(|v| v.id == *id)
                .cloned()
                .ok_or(CustodyError::UnknownVersion)?;
            if version.number < entry.min_decryption_version {
                return Err(CustodyError::VersionBelowMinimum(
                    version.full_name.to_string(),
                ));
            }
            (version, Arc::clone(entry))
        };
        usable(&version)?;
        Ok((version, entry))
    }

    // ---- raw AES-GCM for the XKS proxy --------------------------------------------------

    /// A key's usage and whether its primary version can encrypt now (enabled, not lost or
    /// worn out), for a service caller (the XKS proxy's GetKeyMetadata).
    pub async fn usage_and_state(
        &self,
        grant: &Grant,
        name: &KeyName,
    ) -> Result<(KeyUsage, bool), CustodyError> {
        authorize(grant, Role::Service, name)?;
        let entry = self.fresh_entry(name).await?;
        let enabled = entry.primary_version().is_some_and(|v| usable(v).is_ok());
        Ok((entry.usage, enabled))
    }

    /// Encrypts `plaintext` under the key's primary version with the GCM AAD `aad_for` builds
    /// from the version id (the XKS proxy binds it; see `crate::xks`). Same rules as
    /// [`Custody::wrap`] (grant, usage, version state, wrap budget); no Tresor blob.
    pub async fn seal_raw(
        &self,
        grant: &Grant,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad_for: impl FnOnce(&VersionId) -> Vec<u8>,
    ) -> Result<RawSealed, CustodyError> {
        authorize(grant, Role::Service, name)?;
        check_plaintext(&plaintext)?;
        let (version, iv, sealed) = self
            .seal_under_primary(name, plaintext, |v| aad_for(&v.id))
            .await?;
        Ok(RawSealed {
            version_id: version.id,
            key_version: version.full_name.to_string(),
            iv,
            sealed,
        })
    }

    /// Decrypts what [`Custody::seal_raw`] produced under version `id` of key `name`. Same
    /// rules as [`Custody::unwrap`]; a version of another key is [`CustodyError::WrongKey`].
    pub async fn open_raw(
        &self,
        grant: &Grant,
        name: &KeyName,
        id: &VersionId,
        iv: [u8; IV_LEN],
        sealed: Vec<u8>,
        full_aad: Vec<u8>,
    ) -> Result<(Zeroizing<Vec<u8>>, String), CustodyError> {
        grant.require(Role::Service)?;
        grant.check_key(name)?;
        let (version, _) = self.decrypting_version(grant, id, Some(name)).await?;
        let plaintext = self
            .inner
            .hsm
            .decrypt_gcm(ObjectId(version.id.0), iv, full_aad, sealed)
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        Ok((plaintext, version.full_name.to_string()))
    }

    /// Maps an HSM failure on a version's key; a missing object marks the version lost.
    fn hsm_failure(&self, version: &VersionEntry, e: HsmError) -> CustodyError {
        match e {
            HsmError::BadCiphertext => CustodyError::Unauthentic,
            HsmError::ObjectNotFound(_) => {
                let custody = self.clone();
                let id = version.id;
                tokio::spawn(async move { custody.mark_lost(id).await });
                CustodyError::VersionLost(version.full_name.to_string())
            }
            e => CustodyError::Hsm(e),
        }
    }

    /// Records that a version's HSM object is gone, in the database and the cache.
    async fn mark_lost(&self, id: VersionId) {
        let result = self
            .admin(move |c| async move {
                let Some(name) = c.inner.cache_key_of(&id) else { return Ok(()) };
                let entry = c.entry(&name)?;
                let Some(v) = entry.versions.iter().find(|v| v.id == id).cloned() else { return Ok(()) };
                if v.lost_at.is_some() || v.state == VersionState::Destroyed {
                    return Ok(());
                }
                let now = c.now();
                c.inner.store.set_lost(&id, Some(now)).await?;
                tracing::error!(version = %v.full_name, "HSM object of key version is missing: version marked LOST; blobs it wrapped cannot be unwrapped until the object is restored");
                c.publish(entry.with_version(v.number, |v| VersionEntry { lost_at: Some(now), ..v.clone() }));
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::error!(version_id = %id, error = %e, "could not record a lost key version");
        }
    }

    // ---- helpers ------------------------------------------------------------------------

    /// Re-reads a key whose compare-and-set failed (caller holds the admin lock). A failure is
    /// only logged: the caller reports the conflict either way.
    async fn refresh_after_conflict(&self, name: &KeyName) {
        if let Err(e) = self
            .refresh_locked(name.tenant().as_str(), name.key())
            .await
        {
            tracing::warn!(key = %name, error = %e, "could not re-read a key after a conflict");
        }
    }

    /// [`Self::admin`] for a write that changes key `name`. On PostgreSQL it answers only once
    /// this node's listener has received the change's notification (at most a second): every
    /// node's listener gets it at the same moment, and marks the key stale as it does, so a
    /// caller who goes on to another node finds the change there.
    async fn admin_key<T, F, Fut>(&self, name: &KeyName, f: F) -> Result<T, CustodyError>
    where
        T: Send + 'static,
        F: FnOnce(Custody) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, CustodyError>> + Send,
    {
        let mut seen = (self.inner.store.backend() == crate::store::Backend::Postgres)
            .then(|| self.inner.seen.subscribe());
        let out = self.admin(f).await?;
        if let Some(seen) = seen.as_mut() {
            let arrived = async {
                loop {
                    match seen.recv().await {
                        Ok(changed) if &changed == name => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            };
            if tokio::time::timeout(std::time::Duration::from_secs(1), arrived)
                .await
                .is_err()
            {
                tracing::warn!(key = %name, "the change notification did not come back within a second; other nodes may see the change late");
            }
        }
        Ok(out)
    }

    /// Runs a metadata write to completion in its own task, under the admin lock.
    async fn admin<T, F, Fut>(&self, f: F) -> Result<T, CustodyError>
    where
        T: Send + 'static,
        F: FnOnce(Custody) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, CustodyError>> + Send,
    {
        let custody = self.clone();
        tokio::spawn(async move {
            let _serialised = Arc::clone(&custody.inner.admin).lock_owned().await;
            f(custody).await
        })
        .await
        .map_err(|e| CustodyError::Internal(format!("metadata write task failed: {e}")))?
    }

    /// The key's cache entry; a broken one is [`CustodyError::MetadataIntegrity`].
    fn entry(&self, name: &KeyName) -> Result<Arc<KeyEntry>, CustodyError> {
        let entry = read(&self.inner.cache)
            .keys
            .get(name)
            .cloned()
            .ok_or_else(|| CustodyError::KeyNotFound(name.to_string()))?;
        entry.check_seal()?;
        Ok(entry)
    }

    /// Seals `next`, the state a write of `entry` is about to commit; returns the
    /// compare-and-set pair for the store.
    async fn reseal(
        &self,
        entry: &KeyEntry,
        next: &mut KeyEntry,
    ) -> Result<SealChange, CustodyError> {
        let before = entry.sealed_value()?.to_owned();
        let after = self.inner.sealer.seal_key(next).await?;
        next.seal = Seal::Valid(Arc::from(after.as_str()));
        Ok(SealChange { before, after })
    }

    /// Replaces a key's cache entry after its change was committed (or read).
    fn publish(&self, entry: KeyEntry) -> KeyInfo {
        let shown = info(&entry);
        let mut cache = write(&self.inner.cache);
        cache.stale.remove(&entry.name);
        for v in &entry.versions {
            cache
                .versions
                .entry(v.id)
                .or_insert_with(|| entry.name.clone());
        }
        cache.keys.insert(entry.name.clone(), Arc::new(entry));
        shown
    }

    /// Creates the HSM object of a new version (step one of the crash order) and returns the
    /// row to commit.
    async fn new_version_object(
        &self,
        name: &KeyName,
        number: u32,
        now: Millis,
    ) -> Result<VersionRow, CustodyError> {
        let mut id = [0u8; envelope::VERSION_ID_LEN];
        self.inner
            .rng
            .fill(&mut id)
            .map_err(|_| CustodyError::Internal("no system randomness".into()))?;
        let id = VersionId(id);
        let hsm_label = format!("{}{}", self.inner.label_prefix, id.to_hex());
        self.journal_creation(&id).await?;
        if let Err(e) = self
            .inner
            .hsm
            .generate_version_key(ObjectId(id.0), hsm_label.clone())
            .await
        {
            self.clear_journal(&id).await;
            return Err(e.into());
        }
        Ok(VersionRow {
            id,
            tenant: name.tenant().as_str().to_owned(),
            key_name: name.key().to_owned(),
            version: number,
            state: VersionState::Enabled,
            hsm_label,
            created_at: now,
            state_changed_at: now,
            destroy_at: None,
            destroyed_at: None,
            lost_at: None,
            wraps_reserved: 0,
        })
    }

    /// Destroys the object of a version whose row could not be committed (its creation
    /// journal is still there, which is what allows this), then the journal.
    async fn discard_object(&self, id: &VersionId) {
        match self.inner.hsm.destroy_secret_key(ObjectId(id.0)).await {
            Ok(_) => self.clear_journal(id).await,
            Err(e) => {
                tracing::error!(version_id = %id, error = %e,
                    "could not destroy the HSM object of an uncommitted version; start-up reconciliation will remove it");
            }
        }
    }
}

impl Inner {
    fn cache_key_of(&self, id: &VersionId) -> Option<KeyName> {
        read(&self.cache).versions.get(id).cloned()
    }
}

/// Version rows grouped by their key (tenant, name).
fn rows_by_key(
    versions: Vec<VersionRow>,
) -> std::collections::HashMap<(String, String), Vec<VersionRow>> {
    let mut by_key: std::collections::HashMap<(String, String), Vec<VersionRow>> =
        std::collections::HashMap::new();
    for v in versions {
        by_key
            .entry((v.tenant.clone(), v.key_name.clone()))
            .or_default()
            .push(v);
    }
    by_key
}

/// The integrity values around one write: the stored one it replaces, the one it writes.
struct SealChange {
    before: String,
    after: String,
}

impl SealChange {
    fn as_reseal(&self) -> Reseal<'_> {
        Reseal {
            before: &self.before,
            after: &self.after,
        }
    }
}

/// Reports a key whose rows failed their integrity check (ERROR log and metric; the calls it
/// refuses are audited by the front-ends, start-up's findings by the composition root).
fn integrity_failure(name: &KeyName, reason: &str) {
    crate::metrics::global().metadata_integrity_failures.inc();
    tracing::error!(key = %name, reason, "metadata integrity check failed: the key refuses service until its database rows are restored");
}

/// Every caller-facing operation starts here: the grant must be for `role` and cover `key`.
pub(crate) fn authorize(grant: &Grant, role: Role, key: &KeyName) -> Result<(), CustodyError> {
    grant.require(role)?;
    grant.check_key(key)?;
    Ok(())
}

fn check_description(description: &str) -> Result<(), CustodyError> {
    if description.len() > MAX_DESCRIPTION_LEN {
        return Err(CustodyError::InvalidArgument(format!(
            "description is longer than {MAX_DESCRIPTION_LEN} bytes"
        )));
    }
    Ok(())
}

/// Label names: 1–63 of `[a-z0-9_-]` starting with a letter; values: 0–63 of `[a-z0-9_-]`.
fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), CustodyError> {
    let charset = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if labels.len() > MAX_LABELS {
        return Err(CustodyError::InvalidArgument(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (k, v) in labels {
        if !((1..=63).contains(&k.len()) && k.as_bytes()[0].is_ascii_lowercase() && charset(k)) {
            return Err(CustodyError::InvalidArgument(format!(
                "label name {k:?}: 1-63 characters of a-z, 0-9, '-', '_', starting with a letter"
            )));
        }
        if v.len() > 63 || !charset(v) {
            return Err(CustodyError::InvalidArgument(format!(
                "label {k:?}: values are 0-63 characters of a-z, 0-9, '-', '_'"
            )));
        }
    }
    Ok(())
}

fn check_plaintext(plaintext: &[u8]) -> Result<(), CustodyError> {
    if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(CustodyError::InvalidArgument(format!(
            "plaintext must be 1 to {MAX_PLAINTEXT_LEN} bytes, not {}",
            plaintext.len()
        )));
    }
    Ok(())
}

fn check_aad(aad: &[u8]) -> Result<(), CustodyError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(CustodyError::InvalidArgument(format!(
            "AAD must be at most {MAX_AAD_LEN} bytes"
        )));
    }
    Ok(())
}

/// Whether a version may wrap or unwrap now.
fn usable(v: &VersionEntry) -> Result<(), CustodyError> {
    let name = || v.full_name.to_string();
    match v.state {
        VersionState::Enabled if v.lost_at.is_some() => Err(CustodyError::VersionLost(name())),
        VersionState::Enabled => Ok(()),
        VersionState::Disabled => Err(CustodyError::VersionDisabled(name())),
        VersionState::DestroyScheduled => Err(CustodyError::VersionDestroyScheduled(name())),
        VersionState::Destroyed => Err(CustodyError::VersionDestroyed(name())),
    }
}

fn info(entry: &KeyEntry) -> KeyInfo {
    KeyInfo {
        name: entry.name.clone(),
        description: entry.description.clone(),
        labels: entry.labels.clone(),
        created_at: entry.created_at,
        updated_at: entry.updated_at,
        primary_version: entry.primary,
        rotation_period_ms: entry.rotation_period_ms,
        next_rotation_at: entry.next_rotation_at,
        min_decryption_version: entry.min_decryption_version,
        usage: entry.usage,
        versions: entry
            .versions
            .iter()
            .map(|v| VersionInfo {
                name: v.full_name.to_string(),
                number: v.number,
                state: v.state,
                primary: v.number == entry.primary,
                created_at: v.created_at,
                state_changed_at: v.state_changed_at,
                destroy_at: v.destroy_at,
                destroyed_at: v.destroyed_at,
                lost_at: v.lost_at,
                wraps_at_most: v.wraps.reserved(),
            })
            .collect(),
    }
}
