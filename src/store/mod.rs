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
mod keys;
mod nodes;
mod objects;
mod windows;
pub use approvals::ApprovalRow;
pub use audit::{AUDIT_CHAIN_LOCK, ChainHead, RECORD_COLUMN_COUNT};
pub use nodes::{SCHEDULER_LOCK, STARTUP_LOCK, SchedulerLock};
pub use objects::ObjectRow;
pub use windows::WindowRow;
pub mod changes;

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyPool, ConnectOptions};

use crate::envelope::VersionId;
use crate::model::{Millis, VersionState};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/common");

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
    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
    /// Makes this store's change feeds drop every notification (`true`) or deliver them again.
    /// Exists for tests that show the change bound holds when a listener goes quiet.
    #[cfg(feature = "test-support")]
    pub fn silence_change_notifications_for_tests(&self, silenced: bool) {
        self.silenced
            .store(silenced, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs raw SQL. Exists for tests that must break the database on purpose (for example a
    /// trigger that makes the next insert fail) to show that nothing is lost when it fails.
    #[cfg(feature = "test-support")]
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
