//! Managed-object rows (the keys KMIP clients hold).
//!
//! Owns the `managed_objects` table's statements. Holds only wrapped material (custody seals
//! and opens it); decides nothing about states or who may see a row beyond the tenant every
//! statement filters by. Updates are compare-and-set on `last_change`, so two nodes changing
//! one object cannot both win.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};
use crate::model::Millis;

/// A managed object's row.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectRow {
    /// The KMIP Unique Identifier.
    pub id: String,
    /// The owning tenant.
    pub tenant: String,
    /// The KMIP Name (empty: none).
    pub name: String,
    /// `SYMMETRIC_KEY`.
    pub object_type: String,
    /// `AES`.
    pub algorithm: String,
    /// Key length in bits.
    pub length_bits: u32,
    /// KMIP Cryptographic Usage Mask.
    pub usage_mask: u32,
    /// `PRE_ACTIVE`, `ACTIVE`, `DEACTIVATED`, `COMPROMISED`, `DESTROYED`, `DESTROYED_COMPROMISED`.
    pub state: String,
    /// Creation time (KMIP Initial Date).
    pub created_at: Millis,
    /// Activation Date (0: not set).
    pub activation_date: Millis,
    /// Deactivation Date (0: not set).
    pub deactivation_date: Millis,
    /// Compromise Date (0: not set).
    pub compromise_date: Millis,
    /// Destroy Date (0: not set).
    pub destroy_date: Millis,
    /// The revocation reason, `CODE` or `CODE: message` (empty: not revoked).
    pub revocation_reason: String,
    /// Last Change Date; the compare-and-set token of updates.
    pub last_change: Millis,
    /// Other attributes as JSON.
    pub attributes: String,
    /// Hex of the wrapped material ('' once purged).
    pub material: String,
    /// When a destroyed object's material is purged (0: not scheduled).
    pub purge_after: Millis,
}

impl std::fmt::Debug for ObjectRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectRow")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("state", &self.state)
            .field(
                "material",
                &format_args!("<{} hex chars>", self.material.len()),
            )
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str = "id, tenant, name, object_type, algorithm, length_bits, usage_mask, state, created_at, activation_date, deactivation_date, compromise_date, destroy_date, revocation_reason, last_change, attributes, material, purge_after";

fn object_row(r: &AnyRow) -> Result<ObjectRow, StoreError> {
    let small = |column: &str| -> Result<u32, StoreError> {
        let v: i64 = r.try_get(column)?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt {
            table: "managed_objects",
            what: format!("{column} {v} out of range"),
        })
    };
    Ok(ObjectRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        name: r.try_get("name")?,
        object_type: r.try_get("object_type")?,
        algorithm: r.try_get("algorithm")?,
        length_bits: small("length_bits")?,
        usage_mask: small("usage_mask")?,
        state: r.try_get("state")?,
        created_at: r.try_get("created_at")?,
        activation_date: r.try_get("activation_date")?,
        deactivation_date: r.try_get("deactivation_date")?,
        compromise_date: r.try_get("compromise_date")?,
        destroy_date: r.try_get("destroy_date")?,
        revocation_reason: r.try_get("revocation_reason")?,
        last_change: r.try_get("last_change")?,
        attributes: r.try_get("attributes")?,
        material: r.try_get("material")?,
        purge_after: r.try_get("purge_after")?,
    })
}

impl Store {
    /// Inserts a new object ([`StoreError::AlreadyExists`] for a taken id).
    pub async fn insert_object(&self, o: &ObjectRow) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO managed_objects ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        )))
        .bind(&o.id)
        .bind(&o.tenant)
        .bind(&o.name)
        .bind(&o.object_type)
        .bind(&o.algorithm)
        .bind(i64::from(o.length_bits))
        .bind(i64::from(o.usage_mask))
        .bind(&o.state)
        .bind(o.created_at)
        .bind(o.activation_date)
        .bind(o.deactivation_date)
        .bind(o.compromise_date)
        .bind(o.destroy_date)
        .bind(&o.revocation_reason)
        .bind(o.last_change)
        .bind(&o.attributes)
        .bind(&o.material)
        .bind(o.purge_after)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One object of `tenant`; another tenant's id reads as absent.
    pub async fn object(&self, tenant: &str, id: &str) -> Result<Option<ObjectRow>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM managed_objects WHERE tenant = $1 AND id = $2"
        )))
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(object_row)
        .transpose()
    }

    /// The tenant that owns object `id`, if any (for the audit record of a probe across
    /// tenants; never for an answer).
    pub async fn object_tenant(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT tenant FROM managed_objects WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The objects of `tenant`, oldest first, narrowed by name and state when given.
    pub async fn objects(
        &self,
        tenant: &str,
        name: Option<&str>,
        state: Option<&str>,
    ) -> Result<Vec<ObjectRow>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM managed_objects WHERE tenant = $1 AND ($2 = '' OR name = $2) \
             AND ($3 = '' OR state = $3) ORDER BY created_at, id"
        )))
        .bind(tenant)
        .bind(name.unwrap_or(""))
        .bind(state.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(object_row)
        .collect()
    }

    /// Replaces an object's row if nobody changed it since `expected_last_change`
    /// ([`StoreError::Conflict`] otherwise). The id and tenant never change.
    pub async fn update_object(
        &self,
        o: &ObjectRow,
        expected_last_change: Millis,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE managed_objects SET name = $3, usage_mask = $4, state = $5, activation_date = $6, \
             deactivation_date = $7, compromise_date = $8, destroy_date = $9, revocation_reason = $10, \
             last_change = $11, attributes = $12, material = $13, purge_after = $14 \
             WHERE tenant = $1 AND id = $2 AND last_change = $15",
        )
        .bind(&o.tenant)
        .bind(&o.id)
        .bind(&o.name)
        .bind(i64::from(o.usage_mask))
        .bind(&o.state)
        .bind(o.activation_date)
        .bind(o.deactivation_date)
        .bind(o.compromise_date)
        .bind(o.destroy_date)
        .bind(&o.revocation_reason)
        .bind(o.last_change)
        .bind(&o.attributes)
        .bind(&o.material)
        .bind(o.purge_after)
        .bind(expected_last_change)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    /// Removes the wrapped material of destroyed objects whose grace period ended by `now`;
    /// how many.
    pub async fn purge_destroyed_objects(&self, now: Millis) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE managed_objects SET material = '' WHERE state IN ('DESTROYED', 'DESTROYED_COMPROMISED') \
             AND material <> '' AND purge_after <= $1",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
