//! Several nodes: the scheduler and start-up advisory locks, and which nodes are alive.

use super::{Backend, PG_ACQUIRE_TIMEOUT, Store, StoreError};
use crate::model::Millis;

/// The advisory lock (PostgreSQL) whose holder runs the scheduled jobs.
pub const SCHEDULER_LOCK: i64 = 0x7472_6573_6f72_0002;

/// The advisory lock (PostgreSQL) a starting node holds while it creates installation-wide HSM
/// objects ([`Store::startup_lock`]).
pub const STARTUP_LOCK: i64 = 0x7472_6573_6f72_0004;

/// The right to run scheduled jobs (rotation, destruction, approval expiry): on PostgreSQL a
/// session advisory lock held on a connection of its own, so one node at a time runs them
/// and, if that node dies, its connection closes, the lock is free and another node's next
/// attempt takes it. On SQLite (one node) always held.
#[derive(Debug)]
pub struct SchedulerLock {
    connection: Option<sqlx::AnyConnection>,
}

impl SchedulerLock {
    /// Whether the lock is still held: on PostgreSQL, whether its connection still answers.
    /// A lock whose connection broke is gone (the server released it).
    pub async fn still_held(&mut self) -> bool {
        use sqlx::Connection;
        match self.connection.as_mut() {
            None => true,
            Some(c) => match tokio::time::timeout(PG_ACQUIRE_TIMEOUT, c.ping()).await {
                Ok(Ok(())) => true,
                _ => {
                    self.connection = None;
                    false
                }
            },
        }
    }
}

impl Store {
    /// Waits for the start-up lock (PostgreSQL; at once on SQLite): held while a node creates
    /// installation-wide HSM objects and seals rows, so nodes starting together after an
    /// upgrade do not each create an integrity key. Released when the guard drops.
    pub async fn startup_lock(&self) -> Result<SchedulerLock, StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(SchedulerLock { connection: None });
        }
        use secrecy::ExposeSecret;
        use sqlx::Connection;
        let connect = sqlx::AnyConnection::connect(self.url.expose_secret());
        let mut connection = tokio::time::timeout(PG_ACQUIRE_TIMEOUT, connect)
            .await
            .map_err(|_| StoreError::Db(sqlx::Error::PoolTimedOut))??;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(STARTUP_LOCK)
            .execute(&mut connection)
            .await?;
        Ok(SchedulerLock {
            connection: Some(connection),
        })
    }

    /// Takes the scheduler lock if no other node holds it ([`SchedulerLock`]).
    pub async fn try_scheduler_lock(&self) -> Result<Option<SchedulerLock>, StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(SchedulerLock { connection: None }));
        }
        use secrecy::ExposeSecret;
        use sqlx::Connection;
        let connect = sqlx::AnyConnection::connect(self.url.expose_secret());
        let mut connection = tokio::time::timeout(PG_ACQUIRE_TIMEOUT, connect)
            .await
            .map_err(|_| StoreError::Db(sqlx::Error::PoolTimedOut))??;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(SCHEDULER_LOCK)
            .fetch_one(&mut connection)
            .await?;
        if taken {
            Ok(Some(SchedulerLock {
                connection: Some(connection),
            }))
        } else {
            // Closing the connection is all there is to do; nothing was taken.
            let _ = connection.close().await;
            Ok(None)
        }
    }

    /// Records that node `node` is alive at `now` (for the XKS health answer's fleet size).
    pub async fn heartbeat(&self, node: &str, now: Millis) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO nodes (node_id, last_seen) VALUES ($1, $2) \
             ON CONFLICT (node_id) DO UPDATE SET last_seen = excluded.last_seen",
        )
        .bind(node)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many nodes were alive at or after `since`.
    pub async fn live_nodes(&self, since: Millis) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE last_seen >= $1")
            .bind(since)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
