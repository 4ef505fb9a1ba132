//! The officer's operations on keys and versions: create, read, list, rotate, update, enable,
//! disable, cancel a destruction, and the state machine's transitions.

use std::sync::Arc;

use super::cache::{KeyEntry, VersionEntry};
use super::integrity::Seal;
use super::{
    Custody, CustodyError, DAY_MS, KeyInfo, KeyUpdate, MIN_ROTATION_PERIOD_MS, authorize,
    check_description, check_labels, info,
};
use crate::auth::{Grant, Role};
use crate::model::{KeyName, KeyUsage, Millis, VersionState};
use crate::store::{KeyRow, StoreError};
use crate::sync::read;

impl Custody {
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
    pub(super) async fn rotate(&self, name: &KeyName) -> Result<KeyInfo, CustodyError> {
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
}

impl Custody {
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

    pub(super) async fn transition(
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
}
