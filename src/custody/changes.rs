//! Several nodes: keeping this node's cache in step with key changes made on other nodes
//! (PostgreSQL notifications and the change log), and refusing to serve keys while this node cannot
//! confirm it is current ([`CHANGE_BOUND_MS`]).

use std::sync::Arc;

use super::cache::KeyEntry;
use super::integrity::Seal;
use super::{CHANGE_BOUND_MS, CHANGE_POLL, Custody, CustodyError, integrity_failure};
use crate::envelope::VersionId;
use crate::model::KeyName;
use crate::store::changes::Change;
use crate::sync::{read, write};

impl Custody {
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
    pub(super) fn check_current(&self) -> Result<(), CustodyError> {
        use std::sync::atomic::Ordering;
        let confirmed = self.inner.confirmed_at.load(Ordering::Acquire);
        if confirmed == i64::MIN || self.monotonic_ms().saturating_sub(confirmed) <= CHANGE_BOUND_MS
        {
            Ok(())
        } else {
            Err(CustodyError::NotCurrent)
        }
    }

    pub(super) fn monotonic_ms(&self) -> i64 {
        i64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    pub(super) fn is_stale(&self, name: &KeyName) -> bool {
        let cache = read(&self.inner.cache);
        !cache.stale.is_empty() && cache.stale.contains(name)
    }

    /// Before a blob's version is looked up: re-reads its key if it is stale, or, on
    /// PostgreSQL, finds the key of a version this node has not heard of yet (created on
    /// another node a moment ago). An id no node created costs one indexed read.
    pub(super) async fn refresh_for_version(&self, id: &VersionId) -> Result<(), CustodyError> {
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
    pub(super) async fn fresh_entry(&self, name: &KeyName) -> Result<Arc<KeyEntry>, CustodyError> {
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
    pub(super) async fn refresh_locked(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<(), CustodyError> {
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
    pub(super) async fn listen_for_changes(&self) {
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
    pub(super) async fn changed_elsewhere(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<(), CustodyError> {
        if let Ok(key) = KeyName::new(tenant, name) {
            write(&self.inner.cache).stale.insert(key.clone());
            let _ = self.inner.seen.send(key);
        }
        self.refresh_key(tenant, name).await
    }

    /// Polls the change log every [`CHANGE_POLL`]; each poll that applied everything it found
    /// confirms this node as current as of the poll's start.
    pub(super) async fn poll_changes(&self) {
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
}
