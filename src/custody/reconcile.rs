//! Start-up reconciliation of the metadata store with the token.
//!
//! Owns the decisions about objects and rows that disagree. It only looks at objects whose
//! `CKA_LABEL` carries this installation's prefix (`tresor/{installation id}/`); objects of
//! other applications or other Tresor installations on the same token are never touched.
//!
//! | token object | row | meaning | action |
//! | --- | --- | --- | --- |
//! | present | none | crash between object creation and row commit | removed (or only reported, with [`OrphanPolicy::Report`]); on PostgreSQL only after [`ORPHAN_GRACE`] |
//! | present | `DESTROYED` | crash between the commit and the object's destruction | destroyed |
//! | missing | not `DESTROYED` | destroyed or lost behind Tresor's back | version marked lost, logged as an error |
//! | present | marked lost | object restored | lost mark cleared |
//!
//! With several nodes (PostgreSQL) another node may be between creating a version's object and
//! committing its row while this node reconciles, or may commit or destroy a version after this
//! node loaded its rows. So an apparent orphan is first looked up in the database again (a row
//! committed since is no orphan), and one still without a row is removed only if it still has
//! none [`ORPHAN_GRACE`] later; an apparently missing object's row is re-read before the
//! version is marked lost (it may have been destroyed meanwhile).

use std::collections::HashMap;

use super::{Custody, CustodyError};
use crate::custody::cache::VersionEntry;
use crate::envelope::VersionId;
use crate::hsm::ObjectId;
use crate::model::VersionState;
use crate::sync::read;

/// How long an orphan object must stay without a row before reconciliation on PostgreSQL
/// removes it. A node commits a new version's row milliseconds after creating its object (or
/// destroys the object itself if the commit fails); an orphan is harmless meanwhile, as it has
/// never wrapped anything.
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// What reconciliation does with an HSM object that carries this installation's label but has
/// no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrphanPolicy {
    /// Destroy it. Safe when the database is the live one: such an object never wrapped
    /// anything, because wrapping needs the committed row.
    #[default]
    Remove,
    /// Only report it. Use this after restoring the database from a backup: objects created
    /// after the backup have wrapped blobs whose rows the restore lost.
    Report,
}

/// What start-up reconciliation found and did. Every entry is also logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Labels of orphan objects destroyed.
    pub orphans_removed: Vec<String>,
    /// Labels of orphan objects left in place ([`OrphanPolicy::Report`]).
    pub orphans_kept: Vec<String>,
    /// Labels of orphan objects to be removed after [`ORPHAN_GRACE`] if still without a row
    /// (PostgreSQL).
    pub orphans_deferred: Vec<String>,
    /// Versions whose interrupted destruction was completed.
    pub destructions_completed: Vec<String>,
    /// Versions newly found without their HSM object.
    pub lost: Vec<String>,
    /// Versions whose HSM object is back.
    pub found_again: Vec<String>,
    /// Secret-key objects on the token that belong to something else (left alone).
    pub foreign_objects: usize,
}

impl Custody {
    pub(super) async fn reconcile(
        &self,
        policy: super::OrphanPolicy,
    ) -> Result<ReconcileReport, CustodyError> {
        let mut report = ReconcileReport::default();
        let objects = self.inner.hsm.list_secret_keys().await?;
        let versions: HashMap<VersionId, VersionEntry> = {
            let cache = read(&self.inner.cache);
            cache
                .keys
                .values()
                .flat_map(|k| k.versions.iter().map(|v| (v.id, (**v).clone())))
                .collect()
        };

        let mut present = std::collections::HashSet::new();
        for object in objects {
            let Some(id_hex) = object.label.strip_prefix(&self.inner.label_prefix) else {
                report.foreign_objects += 1;
                continue;
            };
            let id = match <[u8; 16]>::try_from(object.id.as_slice()) {
                Ok(id) if VersionId(id).to_hex() == id_hex => VersionId(id),
                // Our prefix but not our shape: never destroy what we cannot account for.
                _ => {
                    tracing::warn!(label = %object.label, "token object has Tresor's label prefix but an unexpected CKA_ID; left alone");
                    report.foreign_objects += 1;
                    continue;
                }
            };
            present.insert(id);
            if !versions.contains_key(&id)
                && let Some((tenant, key)) = self.inner.store.key_of_version(&id).await?
            {
                // Committed (by another node) after this node loaded its rows.
                self.refresh_key(&tenant, &key).await?;
                continue;
            }
            match versions.get(&id) {
                None if policy == OrphanPolicy::Remove
                    && self.inner.store.backend() == crate::store::Backend::Postgres =>
                {
                    tracing::warn!(label = %object.label, "HSM object has no metadata row; it is removed in 10 minutes if it still has none (another node may be creating it)");
                    let custody = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(ORPHAN_GRACE).await;
                        custody.remove_orphan(id).await;
                    });
                    report.orphans_deferred.push(object.label);
                }
                None => match policy {
                    OrphanPolicy::Remove => {
                        self.inner.hsm.destroy_secret_key(ObjectId(id.0)).await?;
                        tracing::warn!(label = %object.label, "removed an HSM object with no metadata row (left by an interrupted key creation or rotation)");
                        report.orphans_removed.push(object.label);
                    }
                    OrphanPolicy::Report => {
                        tracing::warn!(label = %object.label, "HSM object has no metadata row; kept because orphans = report");
                        report.orphans_kept.push(object.label);
                    }
                },
                Some(v) if v.state == VersionState::Destroyed => {
                    self.inner.hsm.destroy_secret_key(ObjectId(id.0)).await?;
                    tracing::warn!(version = %v.full_name, "completed an interrupted destruction: HSM object destroyed");
                    report.destructions_completed.push(v.full_name.to_string());
                }
                Some(v) if v.lost_at.is_some() => {
                    self.inner.store.set_lost(&id, None).await?;
                    self.update_version(&id, |v| VersionEntry {
                        lost_at: None,
                        ..v.clone()
                    });
                    tracing::warn!(version = %v.full_name, "HSM object of a version marked lost is present again; lost mark cleared");
                    report.found_again.push(v.full_name.to_string());
                }
                Some(_) => {}
            }
        }

        for v in versions.values() {
            if v.state == VersionState::Destroyed || present.contains(&v.id) || v.lost_at.is_some()
            {
                continue;
            }
            if self.destroyed_meanwhile(v).await? {
                continue;
            }
            let now = self.now();
            self.inner.store.set_lost(&v.id, Some(now)).await?;
            self.update_version(&v.id, |e| VersionEntry {
                lost_at: Some(now),
                ..e.clone()
            });
            tracing::error!(version = %v.full_name, "HSM object of key version is missing from the token: version marked LOST; blobs it wrapped cannot be unwrapped until the object is restored");
            report.lost.push(v.full_name.to_string());
        }
        report.lost.sort();
        Ok(report)
    }

    /// Whether the version's row says DESTROYED now (another node destroyed it after this node
    /// loaded its rows); the cache is refreshed if so.
    async fn destroyed_meanwhile(&self, v: &VersionEntry) -> Result<bool, CustodyError> {
        let Some((tenant, key)) = self.inner.store.key_of_version(&v.id).await? else {
            return Ok(false);
        };
        let Some((_, rows)) = self.inner.store.load_key(&tenant, &key).await? else {
            return Ok(false);
        };
        let destroyed = rows
            .iter()
            .any(|r| r.id == v.id && r.state == VersionState::Destroyed);
        if destroyed {
            self.refresh_key(&tenant, &key).await?;
        }
        Ok(destroyed)
    }

    /// Removes an orphan object found at start-up if it still has no row.
    async fn remove_orphan(&self, id: VersionId) {
        match self.inner.store.key_of_version(&id).await {
            Ok(Some(_)) => {
                tracing::info!(version_id = %id, "an HSM object without a row at start-up has one now; kept");
            }
            Ok(None) => match self.inner.hsm.destroy_secret_key(ObjectId(id.0)).await {
                Ok(_) => {
                    tracing::warn!(version_id = %id, "removed an HSM object that stayed without a metadata row")
                }
                Err(e) => {
                    tracing::error!(version_id = %id, error = %e, "could not remove an orphan HSM object; the next start-up tries again")
                }
            },
            Err(e) => {
                tracing::error!(version_id = %id, error = %e, "could not check an orphan HSM object; the next start-up tries again");
            }
        }
    }

    fn update_version(&self, id: &VersionId, f: impl FnOnce(&VersionEntry) -> VersionEntry) {
        let Some(name) = self.inner.cache_key_of(id) else {
            return;
        };
        let Ok(entry) = self.entry(&name) else { return };
        let Some(number) = entry
            .versions
            .iter()
            .find(|v| v.id == *id)
            .map(|v| v.number)
        else {
            return;
        };
        self.publish(entry.with_version(number, f));
    }
}
