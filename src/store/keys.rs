//! Key and version rows: loading (from one snapshot), creating, versioning, updating and
//! transitions, each write a compare-and-set on the key's integrity value, and the wrap budget.

use sqlx::any::AnyRow;
use sqlx::{Any, Row};

use super::{Backend, Reseal, Store, StoreError};
use super::{KeyRow, VersionRow};
use crate::envelope::VersionId;
use crate::model::{Millis, VersionState};

impl Store {
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
    pub(super) async fn snapshot(&self) -> Result<sqlx::Transaction<'_, Any>, StoreError> {
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
}

pub(super) const TRANSITION: &str = "UPDATE key_versions SET state = $1, state_changed_at = $2, destroy_at = $3, \
     destroyed_at = CASE WHEN $1 = 'DESTROYED' THEN $2 ELSE destroyed_at END \
     WHERE id = $4 AND state IN ($5, $6) RETURNING tenant, key_name";

pub(super) const TRANSITION_UNLESS_PRIMARY: &str = "UPDATE key_versions SET state = $1, state_changed_at = $2, destroy_at = $3, \
     destroyed_at = CASE WHEN $1 = 'DESTROYED' THEN $2 ELSE destroyed_at END \
     WHERE id = $4 AND state IN ($5, $6) AND NOT EXISTS (SELECT 1 FROM keys k \
     WHERE k.tenant = key_versions.tenant AND k.name = key_versions.key_name \
     AND k.primary_version = key_versions.version) RETURNING tenant, key_name";

pub(super) async fn insert_version(
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

pub(super) const KEY_COLUMNS: &str = "tenant, name, description, labels, primary_version, created_at, updated_at, \
     rotation_period_ms, next_rotation_at, min_decryption_version, usage, integrity";

pub(super) const VERSION_COLUMNS: &str = "id, tenant, key_name, version, state, hsm_label, created_at, \
     state_changed_at, destroy_at, destroyed_at, lost_at, wraps_reserved";

pub(super) fn key_row(r: &AnyRow) -> Result<KeyRow, StoreError> {
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

pub(super) fn version_row(r: &AnyRow) -> Result<VersionRow, StoreError> {
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

pub(super) fn parse_labels(
    json: &str,
) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        table: "keys",
        what: format!("labels: {e}"),
    })
}

pub(super) fn labels_json(
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<String, StoreError> {
    serde_json::to_string(labels).map_err(|e| StoreError::Corrupt {
        table: "keys",
        what: format!("labels: {e}"),
    })
}

pub(super) fn to_u32(table: &'static str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        what: format!("number {v} out of range"),
    })
}

pub(super) fn to_u64(table: &'static str, v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        table,
        what: format!("number {v} out of range"),
    })
}
