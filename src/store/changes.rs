//! Key-change notifications between nodes that share one PostgreSQL database.
//!
//! Owns the channel name, the payload format and the listener connection. Every store write
//! that changes a key's rows sends `NOTIFY tresor_keys, 'tenant/key'` inside its transaction,
//! so PostgreSQL delivers it to every listening node when, and only if, the change commits.
//! What a node does with a change (re-reading the key into its cache) is custody's business.
//!
//! A notification is lost if the listener's connection is: then [`ChangeFeed::next`]
//! connects a new listener, starts listening, and only then answers [`Change::Missed`], so a
//! full reload that the caller does afterwards sees every change the gap could have hidden.
//! A connection can also go quiet without closing (a failover, a NAT or load balancer that
//! drops idle flows): nothing arrives and nothing fails. So every change is also logged, in
//! commit order, in `key_changes` (under [`CHANGES_LOCK`], in the changing transaction), and
//! nodes poll it ([`Store::key_changes_after`]) on connections of the pool, which are checked
//! before use: a change reaches every node that can reach the database by the next poll.

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::Any;
use sqlx::postgres::PgListener;

use super::{Backend, Store, StoreError};

/// The `LISTEN/NOTIFY` channel for key changes.
pub const CHANNEL: &str = "tresor_keys";

/// The advisory lock (PostgreSQL) under which a change is numbered, so `key_changes` numbers
/// commit in order and a poll never skips a change that commits later with a lower number.
pub const CHANGES_LOCK: i64 = 0x7472_6573_6f72_0003;

/// Changes kept in `key_changes`; a node that fell further behind reloads everything.
const KEPT_CHANGES: i64 = 10_000;

/// Numbers and logs a change of key `tenant/key` in the changing transaction.
pub(super) async fn log_change(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant: &str,
    key: &str,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(CHANGES_LOCK)
        .execute(&mut **tx)
        .await?;
    let seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM key_changes")
        .fetch_one(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO key_changes (seq, tenant, key_name, at) VALUES ($1, $2, $3, $4)")
        .bind(seq)
        .bind(tenant)
        .bind(key)
        .bind(crate::model::now_millis())
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM key_changes WHERE seq <= $1")
        .bind(seq - KEPT_CHANGES)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What a poll of `key_changes` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    /// The changes after the one asked for, in order (sequence number, tenant, key).
    Changes(Vec<(u64, String, String)>),
    /// Changes after the one asked for were pruned: re-read everything, then continue after
    /// this sequence number.
    Gap(u64),
}

impl Store {
    /// The number of the last logged change (0 if none), to start polling after.
    pub async fn last_key_change(&self) -> Result<u64, StoreError> {
        let seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM key_changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(seq).unwrap_or(0))
    }

    /// Key changes logged after `after` (at most 1,000).
    pub async fn key_changes_after(&self, after: u64) -> Result<Logged, StoreError> {
        use sqlx::Row;
        let after_i64 = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT seq, tenant, key_name FROM key_changes WHERE seq > $1 ORDER BY seq LIMIT 1000",
        )
        .bind(after_i64)
        .fetch_all(&self.pool)
        .await?;
        let mut changes = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get("seq")?;
            changes.push((
                u64::try_from(seq).unwrap_or(0),
                r.try_get("tenant")?,
                r.try_get("key_name")?,
            ));
        }
        if let Some((first, _, _)) = changes.first()
            && *first > after + 1
        {
            let last = self.last_key_change().await?;
            return Ok(Logged::Gap(last));
        }
        Ok(Logged::Changes(changes))
    }
}

/// The payload for a change of key `tenant/key` (key names never contain `/`).
pub fn payload(tenant: &str, key: &str) -> String {
    format!("{tenant}/{key}")
}

/// What the feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This key's rows changed (on any node, this one included).
    Key {
        /// Tenant segment.
        tenant: String,
        /// Key segment.
        name: String,
    },
    /// Notifications may have been lost (the connection broke and was re-established): re-read
    /// everything.
    Missed,
}

/// The listening side of [`CHANNEL`].
#[derive(Debug)]
pub struct ChangeFeed {
    store: Store,
    listener: Option<PgListener>,
}

impl Store {
    /// A feed of key changes made by any node, listening from now on; `None` on SQLite, where
    /// this process is the only writer.
    pub async fn changes(&self) -> Result<Option<ChangeFeed>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let listener = listen(self).await?;
        Ok(Some(ChangeFeed {
            store: self.clone(),
            listener: Some(listener),
        }))
    }
}

async fn listen(store: &Store) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect(store.url.expose_secret()).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

impl ChangeFeed {
    /// The next change. Waits for one; when the connection is lost, reconnects (retrying every
    /// second while the database is away) and answers [`Change::Missed`].
    pub async fn next(&mut self) -> Change {
        if let Some(listener) = self.listener.as_mut() {
            loop {
                match listener.try_recv().await {
                    Ok(Some(_))
                        if self
                            .store
                            .silenced
                            .load(std::sync::atomic::Ordering::Relaxed) => {}
                    Ok(Some(n)) => {
                        if let Some((tenant, name)) = n.payload().split_once('/') {
                            return Change::Key {
                                tenant: tenant.to_owned(),
                                name: name.to_owned(),
                            };
                        }
                        tracing::warn!(
                            payload = n.payload(),
                            "ignoring a malformed key-change notification"
                        );
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "key-change listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
        // A fresh listener is listening before the caller re-reads, so nothing falls between.
        self.listener = None;
        loop {
            match listen(&self.store).await {
                Ok(listener) => {
                    self.listener = Some(listener);
                    tracing::info!("key-change listener connected; reloading all key metadata");
                    return Change::Missed;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "key-change listener cannot connect; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

impl Store {
    /// Tells the other nodes that a key's rows changed (PostgreSQL `NOTIFY`, delivered when `tx`
    /// commits and only if it does; see this module). Nothing to tell on SQLite.
    pub(super) async fn key_changed(
        &self,
        tx: &mut sqlx::Transaction<'_, Any>,
        tenant: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            log_change(tx, tenant, key).await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload(tenant, key))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}
