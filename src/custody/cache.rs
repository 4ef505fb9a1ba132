//! The in-memory copy of key metadata that the wrap/unwrap path reads.
//!
//! Owns the cache's shape and the per-version wrap budget. Entries are immutable snapshots
//! (`Arc`) replaced whole by every metadata write after its commit, so a reader never sees a
//! half-applied change and never holds a lock across an HSM call. Writes to the database are
//! the caller's job; this module never touches the store except to refill a wrap budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::CustodyError;
use super::integrity::Seal;
use crate::envelope::VersionId;
use crate::model::{KeyName, Millis, VersionState};
use crate::store::{KeyRow, Store, StoreError, VersionRow};
use crate::sync::lock;

/// Wraps reserved in the database per refill: one write per this many wraps.
pub(crate) const WRAP_RESERVATION_BLOCK: u64 = 4096;

/// No version ever wraps more blobs than this: the NIST SP 800-38D bound for random 96-bit
/// IVs under one key. (Automatic rotation, at 2^31, is meant to come long before.)
pub(crate) const WRAP_HARD_LIMIT: u64 = 1 << 32;

#[derive(Debug, Default)]
pub(crate) struct Cache {
    pub(crate) keys: HashMap<KeyName, Arc<KeyEntry>>,
    /// Version id → key, for unwrap, which finds the version from the blob.
    pub(crate) versions: HashMap<VersionId, KeyName>,
    /// Keys another node changed whose new rows are not read yet: a call that uses one
    /// re-reads it first. Empty on SQLite.
    pub(crate) stale: std::collections::HashSet<KeyName>,
}

#[derive(Debug, Clone)]
pub(crate) struct KeyEntry {
    pub(crate) name: KeyName,
    pub(crate) description: String,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) created_at: Millis,
    pub(crate) updated_at: Millis,
    pub(crate) primary: u32,
    pub(crate) rotation_period_ms: Option<i64>,
    pub(crate) next_rotation_at: Option<Millis>,
    pub(crate) min_decryption_version: u32,
    pub(crate) usage: crate::model::KeyUsage,
    /// Index `n - 1` holds version `n`; versions are never deleted.
    pub(crate) versions: Vec<Arc<VersionEntry>>,
    /// Whether the state above matched its integrity value.
    pub(crate) seal: Seal,
}

impl KeyEntry {
    /// [`CustodyError::MetadataIntegrity`] for a broken entry.
    pub(crate) fn check_seal(&self) -> Result<(), CustodyError> {
        self.sealed_value().map(|_| ())
    }

    /// The stored integrity value this state matched; [`CustodyError::MetadataIntegrity`] for
    /// a broken entry.
    pub(crate) fn sealed_value(&self) -> Result<&str, CustodyError> {
        match &self.seal {
            Seal::Valid(value) => Ok(value),
            Seal::Broken(reason) => Err(CustodyError::MetadataIntegrity {
                key: self.name.to_string(),
                reason: reason.to_string(),
            }),
        }
    }

    pub(crate) fn version(&self, number: u32) -> Option<&Arc<VersionEntry>> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.versions.get(index)
    }

    pub(crate) fn primary_version(&self) -> Option<&Arc<VersionEntry>> {
        self.version(self.primary)
    }

    /// A copy with version `number` replaced by `f(old)`.
    pub(crate) fn with_version(
        &self,
        number: u32,
        f: impl FnOnce(&VersionEntry) -> VersionEntry,
    ) -> Self {
        let mut next = self.clone();
        if let Some(index) = number.checked_sub(1).and_then(|i| usize::try_from(i).ok())
            && let Some(slot) = next.versions.get_mut(index)
        {
            *slot = Arc::new(f(slot));
        }
        next
    }
}

#[derive(Debug, Clone)]
pub(crate) struct VersionEntry {
    pub(crate) id: VersionId,
    pub(crate) number: u32,
    /// `tenants/t/keys/k/versions/n`, shared so the hot path does not format it.
    pub(crate) full_name: Arc<str>,
    pub(crate) state: VersionState,
    pub(crate) created_at: Millis,
    pub(crate) state_changed_at: Millis,
    pub(crate) destroy_at: Option<Millis>,
    pub(crate) destroyed_at: Option<Millis>,
    pub(crate) lost_at: Option<Millis>,
    /// Shared by every snapshot of this version.
    pub(crate) wraps: Arc<WrapBudget>,
}

impl VersionEntry {
    pub(crate) fn from_row(key: &KeyName, row: &VersionRow) -> Self {
        Self {
            id: row.id,
            number: row.version,
            full_name: Arc::from(key.version(row.version)),
            state: row.state,
            created_at: row.created_at,
            state_changed_at: row.state_changed_at,
            destroy_at: row.destroy_at,
            destroyed_at: row.destroyed_at,
            lost_at: row.lost_at,
            wraps: Arc::new(WrapBudget::new(row.wraps_reserved)),
        }
    }
}

impl KeyEntry {
    pub(crate) fn from_rows(
        name: KeyName,
        key: &KeyRow,
        mut versions: Vec<VersionEntry>,
        seal: Seal,
    ) -> Self {
        versions.sort_by_key(|v| v.number);
        Self {
            name,
            description: key.description.clone(),
            labels: key.labels.clone(),
            created_at: key.created_at,
            updated_at: key.updated_at,
            primary: key.primary_version,
            rotation_period_ms: key.rotation_period_ms,
            next_rotation_at: key.next_rotation_at,
            min_decryption_version: key.min_decryption_version,
            usage: key.usage,
            versions: versions.into_iter().map(Arc::new).collect(),
            seal,
        }
    }
}

/// How many wraps a version may still do before the next database reservation.
///
/// The database holds a reserved total that is always at least the number of blobs really
/// wrapped: a block is reserved (and committed) before it is used. A crash loses at most the
/// unused rest of a block, which only over-counts.
#[derive(Debug)]
pub(crate) struct WrapBudget {
    /// (used, reserved): wraps counted against this version, and the reserved total that this
    /// process may count up to.
    counts: Mutex<(u64, u64)>,
    /// One refill at a time; other wrappers of this version wait for it.
    refill: tokio::sync::Mutex<()>,
}

pub(crate) enum Take {
    Granted,
    Exhausted,
}

impl WrapBudget {
    pub(crate) fn new(reserved: u64) -> Self {
        // Whatever was reserved before this process started counts as used.
        Self {
            counts: Mutex::new((reserved, reserved)),
            refill: tokio::sync::Mutex::new(()),
        }
    }

    /// The upper bound of blobs this version has wrapped, as the database records it.
    pub(crate) fn reserved(&self) -> u64 {
        lock(&self.counts).1
    }

    fn try_take(&self) -> Option<Take> {
        let mut c = lock(&self.counts);
        if c.0 >= WRAP_HARD_LIMIT {
            return Some(Take::Exhausted);
        }
        if c.0 < c.1 {
            c.0 += 1;
            return Some(Take::Granted);
        }
        None
    }

    /// Counts one wrap, reserving another block in the database when this one is used up.
    pub(crate) async fn take(&self, store: &Store, id: &VersionId) -> Result<Take, StoreError> {
        loop {
            if let Some(t) = self.try_take() {
                return Ok(t);
            }
            let _refilling = self.refill.lock().await;
            if let Some(t) = self.try_take() {
                return Ok(t);
            }
            let reserved = store.reserve_wraps(id, WRAP_RESERVATION_BLOCK).await?;
            let mut c = lock(&self.counts);
            // Another process may have reserved blocks too; ours is the last one.
            c.0 = c.0.max(reserved.saturating_sub(WRAP_RESERVATION_BLOCK));
            c.1 = reserved;
        }
    }
}
