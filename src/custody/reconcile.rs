//! Start-up reconciliation of the metadata store with the token.
//!
//! Owns the decisions about objects and rows that disagree. It only looks at objects whose
//! `CKA_LABEL` carries this installation's prefix (`tresor/{installation id}/`); objects of
//! other applications or other Tresor installations on the same token are never touched.
//!
//! The database is not trusted ([`super::evidence`]): no row, and no absence of a row, is
//! reason enough to destroy an object.
//!
//! | token object | row | HSM evidence | meaning | action |
//! | --- | --- | --- | --- | --- |
//! | present | none | creation journal | crash between object creation and row commit | removed (or only reported, with [`OrphanPolicy::Report`]); on PostgreSQL only after [`ORPHAN_GRACE`] |
//! | present | none | no journal | its row was deleted, or the database restored from an older backup | kept, reported as an error |
//! | present | `DESTROYED` | due destruction order, key's rows sealed | crash between the commit and the object's destruction | destroyed |
//! | present | `DESTROYED` | no due order, or the key's rows fail their check | the row was forged | kept, reported as an error |
//! | missing | not `DESTROYED` | | destroyed or lost behind Tresor's back | version marked lost, logged as an error |
//! | present | marked lost | | object restored | lost mark cleared |
//!
//! Leftover evidence is cleared: the journal of a committed version, the order of a destroyed
//! one, and (SQLite) an order whose version is not scheduled for destruction (an approval that
//! crashed between the order and the commit: it must not authorise a later, rolled-back row).
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
    /// Destroy it if its creation journal is still in the token: the object was created and
    /// its row never committed, so it never wrapped anything. Objects without a journal are
    /// never destroyed, whatever this says.
    #[default]
    Remove,
    /// Only report it, journal or not.
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
    /// Labels of objects without a row and without a creation journal: their row existed and
    /// is gone (deleted, or lost to a restored backup). Kept.
    pub orphans_unaccounted: Vec<String>,
    /// Versions whose interrupted destruction was completed.
    pub destructions_completed: Vec<String>,
    /// Versions whose row says `DESTROYED` while their object is present and the HSM holds no
    /// due destruction order for them. Kept.
    pub destroyed_without_order: Vec<String>,
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
        // Versions of keys whose rows fail their integrity check: nothing of theirs is destroyed
        // here, whatever their rows say (officers cannot even cancel on a broken key).
        let broken: std::collections::HashSet<VersionId> = {
            let cache = read(&self.inner.cache);
            cache
                .keys
                .values()
                .filter(|k| k.check_seal().is_err())
                .flat_map(|k| k.versions.iter().map(|v| v.id))
                .collect()
        };

        let mut journals = self.creation_journals().await?;
        let mut orders = self.destruction_orders().await?;
        let postgres = self.inner.store.backend() == crate::store::Backend::Postgres;
        let mut present = std::collections::HashSet::new();
        let integrity_key = super::integrity::key_label(self.inner.store.installation_id());
        for object in objects {
            if object.label == integrity_key {
                continue;
            }
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
            let journaled = journals.remove(&id);
            if !versions.contains_key(&id)
                && let Some((tenant, key)) = self.inner.store.key_of_version(&id).await?
            {
                // Committed (by another node) after this node loaded its rows.
                self.refresh_key(&tenant, &key).await?;
                if journaled {
                    self.clear_journal(&id).await;
                }
                continue;
            }
            match versions.get(&id) {
                None if !journaled => {
                    tracing::error!(label = %object.label, "HSM object has no metadata row and no creation journal: its row was deleted or the database restored from an older backup; kept (restore its row)");
                    report.orphans_unaccounted.push(object.label);
                }
                None if policy == OrphanPolicy::Remove && postgres => {
                    tracing::warn!(label = %object.label, "HSM object has no metadata row but a creation journal; it is removed in 10 minutes if it still has none (another node may be creating it)");
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
                        self.clear_journal(&id).await;
                        tracing::warn!(label = %object.label, "removed an HSM object whose creation never committed (its creation journal was still in the token)");
                        report.orphans_removed.push(object.label);
                    }
                    OrphanPolicy::Report => {
                        tracing::warn!(label = %object.label, "HSM object has no metadata row; kept because orphans = report");
                        report.orphans_kept.push(object.label);
                    }
                },
                Some(v) if v.state == VersionState::Destroyed => {
                    if journaled {
                        self.clear_journal(&id).await;
                    }
                    match orders.remove(&id) {
                        Some(order) if order.destroy_at <= self.now() && !broken.contains(&id) => {
                            self.inner.hsm.destroy_secret_key(ObjectId(id.0)).await?;
                            self.withdraw_order(&id).await?;
                            tracing::warn!(version = %v.full_name, approved_by = %order.approved_by, "completed an interrupted destruction: HSM object destroyed");
                            report.destructions_completed.push(v.full_name.to_string());
                        }
                        _ => {
                            crate::metrics::global().destructions_refused.inc();
                            tracing::error!(version = %v.full_name, "the database says DESTROYED, but the HSM holds no due destruction order for this version; its object is kept (metadata integrity)");
                            report.destroyed_without_order.push(v.full_name.to_string());
                        }
                    }
                }
                Some(v) => {
                    if journaled {
                        self.clear_journal(&id).await;
                    }
                    if v.lost_at.is_some() {
                        self.inner.store.set_lost(&id, None).await?;
                        self.update_version(&id, |v| VersionEntry {
                            lost_at: None,
                            ..v.clone()
                        });
                        tracing::warn!(version = %v.full_name, "HSM object of a version marked lost is present again; lost mark cleared");
                        report.found_again.push(v.full_name.to_string());
                    }
                    if v.state != VersionState::DestroyScheduled
                        && !postgres
                        && orders.remove(&id).is_some()
                    {
                        self.withdraw_order(&id).await?;
                        tracing::warn!(version = %v.full_name, "removed a destruction order of a version that is not scheduled for destruction (an approval interrupted before its commit)");
                    }
                }
            }
        }
        // Evidence whose object is gone: a creation that failed before its object existed,
        // or a destruction that completed before its order was withdrawn.
        if !postgres {
            for id in journals {
                self.clear_journal(&id).await;
            }
        }
        for (id, _) in orders {
            if !present.contains(&id)
                && versions
                    .get(&id)
                    .is_some_and(|v| v.state == VersionState::Destroyed)
            {
                self.withdraw_order(&id).await?;
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

    /// Removes an orphan object found at start-up if it still has no row and still has its
    /// creation journal.
    async fn remove_orphan(&self, id: VersionId) {
        match self.inner.store.key_of_version(&id).await {
            Ok(Some(_)) => {
                tracing::info!(version_id = %id, "an HSM object without a row at start-up has one now; kept");
                self.clear_journal(&id).await;
            }
            Ok(None)
                if !self
                    .creation_journals()
                    .await
                    .is_ok_and(|j| j.contains(&id)) =>
            {
                tracing::info!(version_id = %id, "an HSM object without a row has no creation journal any more; kept");
            }
            Ok(None) => match self.inner.hsm.destroy_secret_key(ObjectId(id.0)).await {
                Ok(_) => {
                    self.clear_journal(&id).await;
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
