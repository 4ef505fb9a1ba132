//! The metadata store: tenants, keys, versions, approvals and the audit log in SQL.
//!
//! Owns every SQL statement, the schema (embedded migrations, version checked at start-up) and
//! the database back-end: SQLite (`sqlite://PATH`, one node) or PostgreSQL (`postgres://…`,
//! several nodes). Holds no key material and makes no policy decisions: callers say which
//! transition they want and the store makes it atomic (compare-and-set in SQL, so no
//! check-then-act race across connections or nodes).
//!
//! Both back-ends run the same statements through sqlx's `Any` driver and the same migrations
//! (`migrations/common`, written in the SQL both accept; the store suite runs on both). What
//! only PostgreSQL needs is here too: a change notification per key change (`LISTEN/NOTIFY`,
//! [`changes`]), the audit chain appended under a transaction-level advisory lock so several
//! nodes extend one chain, and the scheduler's advisory lock.
//!
//! SQLite runs in WAL mode with `synchronous = FULL`: a committed version row must survive a
//! power cut, because blobs wrapped under it are unreadable without it. The file is created
//! with mode 0600 (SQLite gives its `-wal` and `-shm` files the same mode). The WAL is
//! checkpointed by SQLite itself (every 1,000 pages, by the committing connection): a checkpoint
//! from a separate task never caught up with a continuously writing audit log, so the WAL, and
//! the server's memory with its index, grew without bound (`audit_batches_...` in tests/store.rs).
//! PostgreSQL's durability is its own `synchronous_commit` (on by default; keep it on).

mod approvals;
mod audit;
pub use approvals::ApprovalRow;
pub use audit::{AUDIT_CHAIN_LOCK, ChainHead};
pub mod changes;

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyPool, ConnectOptions, Row};

use crate::envelope::VersionId;
use crate::model::{Millis, VersionState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/common");

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

/// Errors of the store. They name tables and states, never secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database URL is not one this build can open.
    #[error(
        "unsupported database url scheme {0:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE"
    )]
    UnsupportedUrl(String),
    /// The database file could not be created or its mode set.
    #[error("cannot prepare database file {path}: {source}")]
    File {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The database was migrated by a newer Tresor.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); run the newer Tresor or restore a matching backup"
    )]
    SchemaTooNew {
        /// Highest migration applied to the database.
        found: i64,
        /// Highest migration this build knows.
        supported: i64,
    },
    /// Applying migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A row with this identity already exists.
    #[error("already exists")]
    AlreadyExists,
    /// The row was not in the state the caller expected: another writer got there first.
    #[error("the record changed concurrently or is not in the expected state")]
    Conflict,
    /// A stored value is not one Tresor writes.
    #[error("corrupt row in {table}: {what}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        what: String,
    },
    /// The database failed or is unreachable.
    #[error("database error: {0}")]
    Db(sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::AlreadyExists,
            _ => Self::Db(e),
        }
    }
}

/// A key's metadata row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// Tenant segment of the name.
    pub tenant: String,
    /// Key segment of the name.
    pub name: String,
    /// Free text set by officers.
    pub description: String,
    /// Labels set by officers.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Number of the primary version.
    pub primary_version: u32,
    /// Creation time.
    pub created_at: Millis,
    /// Last metadata change.
    pub updated_at: Millis,
    /// Automatic rotation period, if any.
    pub rotation_period_ms: Option<i64>,
    /// When the scheduler rotates next.
    pub next_rotation_at: Option<Millis>,
    /// Unwrap is refused for versions below this one.
    pub min_decryption_version: u32,
    /// What the key may be used for.
    pub usage: crate::model::KeyUsage,
    /// Hex HMAC of the key's whole state under the HSM's metadata integrity key (custody
    /// computes and checks it; empty in rows no integrity-checking build has written).
    pub integrity: String,
}

/// A key version's metadata row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    /// Version id (= HSM `CKA_ID`).
    pub id: VersionId,
    /// Tenant segment of the key name.
    pub tenant: String,
    /// Key segment of the key name.
    pub key_name: String,
    /// Version number, from 1.
    pub version: u32,
    /// Lifecycle state.
    pub state: VersionState,
    /// `CKA_LABEL` of the HSM object.
    pub hsm_label: String,
    /// Creation time.
    pub created_at: Millis,
    /// Time of the last state change.
    pub state_changed_at: Millis,
    /// When a scheduled destruction is due.
    pub destroy_at: Option<Millis>,
    /// When the HSM object was destroyed.
    pub destroyed_at: Option<Millis>,
    /// When the HSM object was found missing.
    pub lost_at: Option<Millis>,
    /// Upper bound of blobs wrapped.
    pub wraps_reserved: u64,
}

/// A key's integrity value as read (`before`, compared in SQL) and as it must be after the
/// write (`after`): the compare-and-set that serialises every change of one key across nodes.
#[derive(Debug, Clone, Copy)]
pub struct Reseal<'a> {
    /// The value the write expects to replace.
    pub before: &'a str,
    /// The value over the state after the write.
    pub after: &'a str,
}

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One file, one node.
    Sqlite,
    /// Shared by several nodes.
    Postgres,
}

/// The metadata store.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// SQLite only: a native connection for audit appends, the one statement on the hot path.
    /// Through `Any` every bound string is copied twice more, and the audit writer (one task,
    /// which every request waits for) was measurably slower.
    sqlite_audit: Option<sqlx::SqlitePool>,
    backend: Backend,
    /// The PostgreSQL URL for the change listener's own connection (it may carry a password,
    /// so it is never printed).
    url: SecretString,
    installation_id: String,
    /// Tests only: the change feed drops every notification, as a listener whose connection
    /// went quiet without closing would ([`Store::silence_change_notifications_for_tests`]).
    silenced: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("installation_id", &self.installation_id)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL pool waits this long for a connection before the call fails (`UNAVAILABLE`),
/// so callers learn quickly that the database is away instead of queueing behind it.
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Opens the database at `url` (`sqlite://PATH` or a bare path, created if needed; or
    /// `postgres://…` / `postgresql://…`, which must exist), refuses a schema newer than this
    /// build, and applies pending migrations (on PostgreSQL under sqlx's advisory lock, so
    /// nodes starting together migrate once).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let mut sqlite_audit = None;
        let (backend, options, pool_options) =
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                let options: AnyConnectOptions = url
                    .parse()
                    .map_err(|_| StoreError::UnsupportedUrl("postgres (malformed URL)".into()))?;
                let pool = AnyPoolOptions::new()
                    .max_connections(10)
                    .acquire_timeout(PG_ACQUIRE_TIMEOUT)
                    // After PostgreSQL restarts, pooled connections are dead; a ping before use
                    // finds them instead of failing the first call on each.
                    .test_before_acquire(true);
                (Backend::Postgres, options, pool)
            } else {
                let path = match url.strip_prefix("sqlite://") {
                    Some(p) => Path::new(p),
                    None if !url.contains("://") => Path::new(url),
                    None => {
                        let scheme = url.split("://").next().unwrap_or_default();
                        return Err(StoreError::UnsupportedUrl(scheme.to_owned()));
                    }
                };
                if path.as_os_str().is_empty() {
                    return Err(StoreError::UnsupportedUrl("sqlite (no path)".into()));
                }
                prepare_file(path)?;
                let absolute = std::path::absolute(path).map_err(|source| StoreError::File {
                    path: path.to_owned(),
                    source,
                })?;
                let native = SqliteConnectOptions::new()
                    .filename(&absolute)
                    .create_if_missing(false);
                let options = AnyConnectOptions::from_url(&native.to_url_lossy())?;
                sqlite_audit = Some(
                    sqlx::sqlite::SqlitePoolOptions::new()
                        .max_connections(1)
                        .test_before_acquire(false)
                        .connect_lazy_with(
                            native
                                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                                .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                                .foreign_keys(true)
                                .busy_timeout(Duration::from_secs(10)),
                        ),
                );
                let pool = AnyPoolOptions::new()
                    .max_connections(4)
                    // A ping before every query is one more round trip to sqlx's SQLite worker
                    // thread; a broken connection reports itself on the query anyway.
                    .test_before_acquire(false)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::raw_sql(
                                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                            )
                            .execute(conn)
                            .await?;
                            Ok(())
                        })
                    });
                (Backend::Sqlite, options, pool)
            };
        let pool = pool_options.connect_with(options).await?;
        check_schema_version(&pool, backend).await?;
        MIGRATOR.run(&pool).await?;
        let installation_id = installation_id(&pool).await?;
        Ok(Self {
            pool,
            sqlite_audit,
            backend,
            url: SecretString::from(url.to_owned()),
            installation_id,
            silenced: Default::default(),
        })
    }

    /// The database this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The random id of this installation, stamped into HSM object labels.
    pub fn installation_id(&self) -> &str {
        &self.installation_id
    }

    /// Every key row and every version row, read from one snapshot (on PostgreSQL a
    /// `REPEATABLE READ` transaction): a key's row and its versions always belong together,
    /// which their integrity check relies on while other nodes write.
    pub async fn load_all(&self) -> Result<(Vec<KeyRow>, Vec<VersionRow>), StoreError> {
        let mut tx = self.snapshot().await?;
        let keys = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys"
        )))
        .fetch_all(&mut *tx)
        .await?;
        let versions = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VERSION_COLUMNS} FROM key_versions"
        )))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((
            keys.iter().map(key_row).collect::<Result<_, _>>()?,
            versions.iter().map(version_row).collect::<Result<_, _>>()?,
        ))
    }

    /// A read transaction whose statements all see one snapshot. SQLite's transactions do;
    /// PostgreSQL's default (`READ COMMITTED`) takes a new snapshot per statement.
    async fn snapshot(&self) -> Result<sqlx::Transaction<'_, Any>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Every key row.
    pub async fn load_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_row).collect()
    }

    /// Every version row.
    pub async fn load_versions(&self) -> Result<Vec<VersionRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VERSION_COLUMNS} FROM key_versions"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(version_row).collect()
    }

    /// Inserts a new key with its first (primary) version, creating the tenant if needed.
    /// [`StoreError::AlreadyExists`] if the key exists.
    pub async fn create_key(&self, key: &KeyRow, first: &VersionRow) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&key.tenant)
        .bind(key.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO keys (tenant, name, description, labels, primary_version, created_at, updated_at, usage, integrity) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(&key.description)
        .bind(labels_json(&key.labels)?)
        .bind(i64::from(key.primary_version))
        .bind(key.created_at)
        .bind(key.updated_at)
        .bind(key.usage.as_str())
        .bind(&key.integrity)
        .execute(&mut *tx)
        .await?;
        insert_version(&mut tx, first).await?;
        self.key_changed(&mut tx, &key.tenant, &key.name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Adds `version` and makes it primary, provided the primary is still
    /// `previous_primary` and the key's integrity value still `seal.before`
    /// ([`StoreError::Conflict`] otherwise, e.g. a concurrent rotation or change).
    pub async fn add_primary_version(
        &self,
        version: &VersionRow,
        previous_primary: u32,
        seal: &Reseal<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE keys SET primary_version = $1, updated_at = $2, \
             next_rotation_at = CASE WHEN rotation_period_ms IS NULL THEN NULL ELSE $2 + rotation_period_ms END, \
             integrity = $6 WHERE tenant = $3 AND name = $4 AND primary_version = $5 AND integrity = $7",
        )
        .bind(i64::from(version.version))
        .bind(version.created_at)
        .bind(&version.tenant)
        .bind(&version.key_name)
        .bind(i64::from(previous_primary))
        .bind(seal.after)
        .bind(seal.before)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() != 1 {
            return Err(StoreError::Conflict);
        }
        match insert_version(&mut tx, version).await {
            Err(StoreError::AlreadyExists) => return Err(StoreError::Conflict),
            other => other?,
        }
        self.key_changed(&mut tx, &version.tenant, &version.key_name)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a key's description, labels, rotation schedule and minimum decryption version,
    /// provided the key is still as the caller read it: primary version `key.primary_version`
    /// and last change at `read_at` ([`StoreError::Conflict`] otherwise: another node changed
    /// it meanwhile, and this write would undo that change or check against a stale primary).
    /// `key.integrity` replaces `integrity_before`, which must still be the stored value.
    pub async fn update_key(
        &self,
        key: &KeyRow,
        read_at: Millis,
        integrity_before: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE keys SET description = $1, labels = $2, updated_at = $3, rotation_period_ms = $4, \
             next_rotation_at = $5, min_decryption_version = $6, usage = $11, integrity = $12 \
             WHERE tenant = $7 AND name = $8 AND primary_version = $9 AND updated_at = $10 AND integrity = $13",
        )
        .bind(&key.description)
        .bind(labels_json(&key.labels)?)
        .bind(key.updated_at)
        .bind(key.rotation_period_ms)
        .bind(key.next_rotation_at)
        .bind(i64::from(key.min_decryption_version))
        .bind(&key.tenant)
        .bind(&key.name)
        .bind(i64::from(key.primary_version))
        .bind(read_at)
        .bind(key.usage.as_str())
        .bind(&key.integrity)
        .bind(integrity_before)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict);
        }
        self.key_changed(&mut tx, &key.tenant, &key.name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Moves a version from one of `from` (one or two states) to `to` atomically, and its
    /// key's integrity value from `seal.before` to `seal.after`; with `unless_primary`, only if
    /// it is not its key's primary version. [`StoreError::Conflict`] if a row did not match.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition(
        &self,
        id: &VersionId,
        from: &[VersionState],
        to: VersionState,
        at: Millis,
        destroy_at: Option<Millis>,
        unless_primary: bool,
        seal: &Reseal<'_>,
    ) -> Result<(), StoreError> {
        let (first, second) = match from {
            [one] => (one, one),
            [one, two] => (one, two),
            _ => return Err(StoreError::Conflict),
        };
        let sql = if unless_primary {
            TRANSITION_UNLESS_PRIMARY
        } else {
            TRANSITION
        };
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(sql)
            .bind(to.as_str())
            .bind(at)
            .bind(destroy_at)
            .bind(id.to_hex())
            .bind(first.as_str())
            .bind(second.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = moved else {
            return Err(StoreError::Conflict);
        };
        let (tenant, key): (String, String) = (row.try_get("tenant")?, row.try_get("key_name")?);
        let sealed = sqlx::query(
            "UPDATE keys SET integrity = $1 WHERE tenant = $2 AND name = $3 AND integrity = $4",
        )
        .bind(seal.after)
        .bind(&tenant)
        .bind(&key)
        .bind(seal.before)
        .execute(&mut *tx)
        .await?;
        if sealed.rows_affected() != 1 {
            return Err(StoreError::Conflict);
        }
        self.key_changed(&mut tx, &tenant, &key).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces a key's integrity value if it is still `seal.before` (sealing rows written
    /// before integrity values existed). [`StoreError::Conflict`] otherwise.
    pub async fn reseal_key(
        &self,
        tenant: &str,
        name: &str,
        seal: &Reseal<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE keys SET integrity = $1 WHERE tenant = $2 AND name = $3 AND integrity = $4",
        )
        .bind(seal.after)
        .bind(tenant)
        .bind(name)
        .bind(seal.before)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict);
        }
        self.key_changed(&mut tx, tenant, name).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records that a version's HSM object is missing (`Some(time)`) or present again (`None`).
    pub async fn set_lost(
        &self,
        id: &VersionId,
        lost_at: Option<Millis>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE key_versions SET lost_at = $1 WHERE id = $2 RETURNING tenant, key_name",
        )
        .bind(lost_at)
        .bind(id.to_hex())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            self.key_changed(&mut tx, row.try_get("tenant")?, row.try_get("key_name")?)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Reserves `block` more wraps for a version; returns the new reserved total.
    pub async fn reserve_wraps(&self, id: &VersionId, block: u64) -> Result<u64, StoreError> {
        let block = i64::try_from(block).map_err(|_| StoreError::Conflict)?;
        let row = sqlx::query(
            "UPDATE key_versions SET wraps_reserved = wraps_reserved + $1 WHERE id = $2 RETURNING wraps_reserved",
        )
        .bind(block)
        .bind(id.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(StoreError::Conflict);
        };
        to_u64("key_versions", row.try_get("wraps_reserved")?)
    }

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

    /// Tells the other nodes that a key's rows changed (PostgreSQL `NOTIFY`, delivered when `tx`
    /// commits and only if it does; see [`changes`]). Nothing to tell on SQLite.
    async fn key_changed(
        &self,
        tx: &mut sqlx::Transaction<'_, Any>,
        tenant: &str,
        key: &str,
    ) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            changes::log_change(tx, tenant, key).await?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(changes::CHANNEL)
                .bind(changes::payload(tenant, key))
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// One key's row and its versions, as committed now (for a node that learnt the key
    /// changed elsewhere). `None` if the key does not exist.
    pub async fn load_key(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<(KeyRow, Vec<VersionRow>)>, StoreError> {
        let mut tx = self.snapshot().await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE tenant = $1 AND name = $2"
        )))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let versions = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {VERSION_COLUMNS} FROM key_versions WHERE tenant = $1 AND key_name = $2"
        )))
        .bind(tenant)
        .bind(name)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((
            key_row(&row)?,
            versions.iter().map(version_row).collect::<Result<_, _>>()?,
        )))
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

    /// The key (tenant, name) a version id belongs to, if any.
    pub async fn key_of_version(
        &self,
        id: &VersionId,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT tenant, key_name FROM key_versions WHERE id = $1")
            .bind(id.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("tenant")?, r.try_get("key_name")?)))
            .transpose()
    }

    /// Makes this store's change feeds drop every notification (`true`) or deliver them again.
    /// Exists for tests that show the change bound holds when a listener goes quiet.
    #[doc(hidden)]
    pub fn silence_change_notifications_for_tests(&self, silenced: bool) {
        self.silenced
            .store(silenced, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs raw SQL. Exists for tests that must break the database on purpose (for example a
    /// trigger that makes the next insert fail) to show that nothing is lost when it fails.
    #[doc(hidden)]
    pub async fn execute_raw_for_tests(&self, sql: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Closes every connection (checkpointing the WAL).
    pub async fn close(&self) {
        if let Some(native) = &self.sqlite_audit {
            native.close().await;
        }
        self.pool.close().await;
    }
}

const TRANSITION: &str = "UPDATE key_versions SET state = $1, state_changed_at = $2, destroy_at = $3, \
     destroyed_at = CASE WHEN $1 = 'DESTROYED' THEN $2 ELSE destroyed_at END \
     WHERE id = $4 AND state IN ($5, $6) RETURNING tenant, key_name";

const TRANSITION_UNLESS_PRIMARY: &str = "UPDATE key_versions SET state = $1, state_changed_at = $2, destroy_at = $3, \
     destroyed_at = CASE WHEN $1 = 'DESTROYED' THEN $2 ELSE destroyed_at END \
     WHERE id = $4 AND state IN ($5, $6) AND NOT EXISTS (SELECT 1 FROM keys k \
     WHERE k.tenant = key_versions.tenant AND k.name = key_versions.key_name \
     AND k.primary_version = key_versions.version) RETURNING tenant, key_name";

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, Any>,
    v: &VersionRow,
) -> Result<(), StoreError> {
    let wraps = i64::try_from(v.wraps_reserved).map_err(|_| StoreError::Corrupt {
        table: "key_versions",
        what: "wrap count beyond i64".into(),
    })?;
    sqlx::query(
        "INSERT INTO key_versions (id, tenant, key_name, version, state, hsm_label, created_at, \
         state_changed_at, destroy_at, destroyed_at, lost_at, wraps_reserved) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(v.id.to_hex())
    .bind(&v.tenant)
    .bind(&v.key_name)
    .bind(i64::from(v.version))
    .bind(v.state.as_str())
    .bind(&v.hsm_label)
    .bind(v.created_at)
    .bind(v.state_changed_at)
    .bind(v.destroy_at)
    .bind(v.destroyed_at)
    .bind(v.lost_at)
    .bind(wraps)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

const KEY_COLUMNS: &str = "tenant, name, description, labels, primary_version, created_at, updated_at, \
     rotation_period_ms, next_rotation_at, min_decryption_version, usage, integrity";

const VERSION_COLUMNS: &str = "id, tenant, key_name, version, state, hsm_label, created_at, \
     state_changed_at, destroy_at, destroyed_at, lost_at, wraps_reserved";

fn key_row(r: &AnyRow) -> Result<KeyRow, StoreError> {
    Ok(KeyRow {
        tenant: r.try_get("tenant")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        labels: parse_labels(&r.try_get::<String, _>("labels")?)?,
        primary_version: to_u32("keys", r.try_get("primary_version")?)?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        rotation_period_ms: r.try_get("rotation_period_ms")?,
        next_rotation_at: r.try_get("next_rotation_at")?,
        min_decryption_version: to_u32("keys", r.try_get("min_decryption_version")?)?,
        usage: {
            let usage: String = r.try_get("usage")?;
            crate::model::KeyUsage::parse(&usage).ok_or_else(|| StoreError::Corrupt {
                table: "keys",
                what: format!("usage {usage:?}"),
            })?
        },
        integrity: r.try_get("integrity")?,
    })
}

fn version_row(r: &AnyRow) -> Result<VersionRow, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt {
        table: "key_versions",
        what,
    };
    let id: String = r.try_get("id")?;
    let state: String = r.try_get("state")?;
    Ok(VersionRow {
        id: VersionId::from_hex(&id).ok_or_else(|| corrupt(format!("version id {id:?}")))?,
        tenant: r.try_get("tenant")?,
        key_name: r.try_get("key_name")?,
        version: to_u32("key_versions", r.try_get("version")?)?,
        state: VersionState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        hsm_label: r.try_get("hsm_label")?,
        created_at: r.try_get("created_at")?,
        state_changed_at: r.try_get("state_changed_at")?,
        destroy_at: r.try_get("destroy_at")?,
        destroyed_at: r.try_get("destroyed_at")?,
        lost_at: r.try_get("lost_at")?,
        wraps_reserved: to_u64("key_versions", r.try_get("wraps_reserved")?)?,
    })
}

fn parse_labels(json: &str) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        table: "keys",
        what: format!("labels: {e}"),
    })
}

fn labels_json(labels: &std::collections::BTreeMap<String, String>) -> Result<String, StoreError> {
    serde_json::to_string(labels).map_err(|e| StoreError::Corrupt {
        table: "keys",
        what: format!("labels: {e}"),
    })
}

fn to_u32(table: &'static str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        what: format!("number {v} out of range"),
    })
}

fn to_u64(table: &'static str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        what: format!("number {v} out of range"),
    })
}

/// Creates the database file with mode 0600, or tightens an existing file's mode.
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    let file_err = |source| StoreError::File {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err)?;
    let mode = file.metadata().map_err(file_err)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format_args!("{:o}", mode & 0o777), "database file was readable by others; setting mode 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(file_err)?;
    }
    Ok(())
}

/// The highest migration this build knows.
fn supported_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

async fn check_schema_version(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    let exists = match backend {
        Backend::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
        }
        Backend::Postgres => {
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
        }
    };
    let tables: i64 = sqlx::query_scalar(exists).fetch_one(pool).await?;
    if tables == 0 {
        return Ok(());
    }
    let found: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    let supported = supported_schema_version();
    match found {
        Some(found) if found > supported => Err(StoreError::SchemaTooNew { found, supported }),
        _ => Ok(()),
    }
}

async fn installation_id(pool: &AnyPool) -> Result<String, StoreError> {
    if let Some(id) = sqlx::query_scalar::<_, String>("SELECT id FROM installation")
        .fetch_optional(pool)
        .await?
    {
        return Ok(id);
    }
    let mut raw = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| {
        StoreError::Corrupt {
            table: "installation",
            what: "no system randomness".into(),
        }
    })?;
    let id = crate::model::to_hex(&raw);
    // Two processes opening a fresh database at once: the table holds one row, the loser's
    // insert is ignored and both read back the winner's id.
    sqlx::query("INSERT INTO installation (singleton, id, created_at) VALUES (1, $1, $2) ON CONFLICT (singleton) DO NOTHING")
        .bind(&id)
        .bind(crate::model::now_millis())
        .execute(pool)
        .await?;
    Ok(sqlx::query_scalar("SELECT id FROM installation")
        .fetch_one(pool)
        .await?)
}
