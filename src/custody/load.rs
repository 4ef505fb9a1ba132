//! Loading key metadata from the database into the cache, each key checked against its integrity
//! value, and the first sealing of rows written before integrity values existed.

use std::sync::Arc;

use super::cache::{Cache, KeyEntry, VersionEntry};
use super::integrity::Seal;
use super::{Custody, CustodyError, integrity, integrity_failure};
use crate::model::{KeyName, KeyUsage};
use crate::store::{KeyRow, Reseal, VersionRow};
use crate::sync::{read, write};

impl Custody {
    pub(super) async fn load(&self) -> Result<(), CustodyError> {
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
    pub(super) async fn checked_entry(
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
    pub(super) fn keyless_entry(
        &self,
        tenant: &str,
        name: &str,
        rows: &[VersionRow],
    ) -> Option<KeyEntry> {
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
    pub(super) async fn seal_unsealed_rows(&self) -> Result<(), CustodyError> {
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
}

/// Version rows grouped by their key (tenant, name).
pub(super) fn rows_by_key(
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
