//! Custody: the key lifecycle state machine and wrap, unwrap, data keys and rewrap.
//!
//! Owns the rules of SECURITY.md "Key hierarchy": which version wraps, which
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

mod access;
mod approvals;
mod cache;
mod changes;
mod checks;
mod clock;
mod error;
mod evidence;
mod info;
mod integrity;
mod lifecycle;
mod load;
mod object_attributes;
mod object_crypto;
mod objects;
mod probe;
mod reconcile;
mod schedule;
mod wrap;

use std::future::Future;
use std::sync::{Arc, RwLock};

use ring::rand::{SecureRandom, SystemRandom};

use crate::envelope::{self, VersionId};
use crate::hsm::{Hsm, ObjectId};
use crate::model::{KeyName, Millis, VersionState};
use crate::store::{Reseal, Store, VersionRow};
use crate::sync::{read, write};
pub use access::{WindowInfo, WindowRequest, WindowState};
pub use approvals::{ApprovalInfo, ApprovalState};
use cache::{Cache, KeyEntry};
use checks::*;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::CustodyError;
use info::info;
pub use info::*;
use integrity::{Seal, Sealer};
pub use object_attributes::{AttributeChange, AttributeValue, ObjectAttribute};
pub use objects::{
    MAX_OBJECT_TEXT, ManagedObject, NewObject, OBJECT_KEY_BITS, ObjectDestruction, ObjectState,
    RevocationCode,
};
pub use probe::ProbeKey;
pub use reconcile::{OrphanPolicy, ReconcileReport};

/// Longest key description accepted, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// At most this many labels per key.
pub const MAX_LABELS: usize = 64;
/// Data keys are 16 to 1,024 bytes; the default is 32 (AES-256).
pub const DATA_KEY_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=1024;

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
    /// How long a destroyed managed object's material is kept, by default ...
    pub object_destroy_grace_ms: Millis,
    /// ... and per tenant, where the configuration sets it (zero: removed at once).
    pub tenant_object_destroy_grace_ms: std::collections::BTreeMap<String, Millis>,
    /// Whether an officer's destruction of a managed object needs a second officer.
    pub object_destroy_approval: bool,
    /// The longest break-glass access window an officer may request.
    pub max_access_window_ms: Millis,
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
            object_destroy_grace_ms: 7 * DAY_MS,
            tenant_object_destroy_grace_ms: std::collections::BTreeMap::new(),
            object_destroy_approval: true,
            max_access_window_ms: 8 * 3_600_000,
        }
    }
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

    /// Checks that the HSM and the database answer (for the health service).
    pub async fn check_dependencies(&self) -> Result<(), CustodyError> {
        self.inner.hsm.random(1).await?;
        self.inner.store.ping().await?;
        Ok(())
    }
}

impl Custody {
    // ---- helpers ------------------------------------------------------------------------

    /// Re-reads a key whose compare-and-set failed (caller holds the admin lock). A failure is
    /// only logged: the caller reports the conflict either way.
    pub(super) async fn refresh_after_conflict(&self, name: &KeyName) {
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
    pub(super) async fn admin_key<T, F, Fut>(&self, name: &KeyName, f: F) -> Result<T, CustodyError>
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
    pub(super) async fn admin<T, F, Fut>(&self, f: F) -> Result<T, CustodyError>
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
    pub(super) fn entry(&self, name: &KeyName) -> Result<Arc<KeyEntry>, CustodyError> {
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
    pub(super) async fn reseal(
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
    pub(super) fn publish(&self, entry: KeyEntry) -> KeyInfo {
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
    pub(super) async fn new_version_object(
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
    pub(super) async fn discard_object(&self, id: &VersionId) {
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
    pub(super) fn cache_key_of(&self, id: &VersionId) -> Option<KeyName> {
        read(&self.cache).versions.get(id).cloned()
    }
}

/// The integrity values around one write: the stored one it replaces, the one it writes.
pub(super) struct SealChange {
    before: String,
    after: String,
}

impl SealChange {
    pub(super) fn as_reseal(&self) -> Reseal<'_> {
        Reseal {
            before: &self.before,
            after: &self.after,
        }
    }
}

/// Reports a key whose rows failed their integrity check (ERROR log and metric; the calls it
/// refuses are audited by the front-ends, start-up's findings by the composition root).
pub(super) fn integrity_failure(name: &KeyName, reason: &str) {
    crate::metrics::global().metadata_integrity_failures.inc();
    tracing::error!(key = %name, reason, "metadata integrity check failed: the key refuses service until its database rows are restored");
}
