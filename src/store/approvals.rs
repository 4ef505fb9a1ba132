//! Four-eyes approval rows.
//!
//! Owns the `approvals` table's statements. Decisions (who may approve, expiry) and the rows'
//! integrity values are custody's; every write here is a compare-and-set on the row's state.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::keys::to_u32;
use super::{Store, StoreError};
use crate::model::Millis;

/// A four-eyes approval row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    /// Random id.
    pub id: String,
    /// Tenant segment.
    pub tenant: String,
    /// Key segment.
    pub key_name: String,
    /// Version number.
    pub version: u32,
    /// What is asked for.
    pub operation: String,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Millis,
    /// Until when it can be decided.
    pub expires_at: Millis,
    /// `PENDING`, `APPROVED`, `REJECTED` or `EXPIRED`.
    pub state: String,
    /// Who decided.
    pub decided_by: String,
    /// Hex HMAC of the row under the HSM's metadata integrity key (custody computes and checks
    /// it; empty in rows no integrity-checking build has written).
    pub integrity: String,
}

fn approval_row(r: &AnyRow) -> Result<ApprovalRow, StoreError> {
    Ok(ApprovalRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        key_name: r.try_get("key_name")?,
        version: to_u32("approvals", r.try_get("version")?)?,
        operation: r.try_get("operation")?,
        requested_by: r.try_get("requested_by")?,
        requested_at: r.try_get("requested_at")?,
        expires_at: r.try_get("expires_at")?,
        state: r.try_get("state")?,
        decided_by: r.try_get("decided_by")?,
        integrity: r.try_get("integrity")?,
    })
}

const APPROVAL_COLUMNS: &str = "id, tenant, key_name, version, operation, requested_by, requested_at, expires_at, state, decided_by, integrity";

impl Store {
    /// Inserts a pending approval, unless one for the same version is already pending and
    /// unexpired at `now` ([`StoreError::Conflict`]).
    pub async fn insert_approval(&self, a: &ApprovalRow, now: Millis) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let pending: Option<String> = sqlx::query_scalar(
            "SELECT id FROM approvals WHERE tenant = $1 AND key_name = $2 AND version = $3 AND state = 'PENDING' AND expires_at >= $4",
        )
        .bind(&a.tenant)
        .bind(&a.key_name)
        .bind(i64::from(a.version))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if pending.is_some() {
            return Err(StoreError::Conflict);
        }
        sqlx::query(
            "INSERT INTO approvals (id, tenant, key_name, version, operation, requested_by, requested_at, expires_at, state, integrity) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'PENDING', $9)",
        )
        .bind(&a.id)
        .bind(&a.tenant)
        .bind(&a.key_name)
        .bind(i64::from(a.version))
        .bind(&a.operation)
        .bind(&a.requested_by)
        .bind(a.requested_at)
        .bind(a.expires_at)
        .bind(&a.integrity)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One approval.
    pub async fn get_approval(&self, id: &str) -> Result<Option<ApprovalRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(approval_row).transpose()
    }

    /// A tenant's approvals, newest first (at most 1,000).
    pub async fn list_approvals(&self, tenant: &str) -> Result<Vec<ApprovalRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE tenant = $1 ORDER BY requested_at DESC LIMIT 1000"
        )))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(approval_row).collect()
    }

    /// Moves a pending approval to `state`, sealed with `integrity` ([`StoreError::Conflict`]
    /// if it was not pending).
    pub async fn decide_approval(
        &self,
        id: &str,
        state: &str,
        decided_by: &str,
        at: Millis,
        integrity: &str,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE approvals SET state = $1, decided_by = $2, decided_at = $3, integrity = $5 WHERE id = $4 AND state = 'PENDING'")
            .bind(state)
            .bind(decided_by)
            .bind(at)
            .bind(id)
            .bind(integrity)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    /// Puts an approval that was just approved back to pending with its pending row's
    /// integrity value (its action failed).
    pub async fn reopen_approval(&self, id: &str, integrity: &str) -> Result<(), StoreError> {
        sqlx::query("UPDATE approvals SET state = 'PENDING', decided_by = '', decided_at = NULL, integrity = $2 WHERE id = $1 AND state = 'APPROVED'")
            .bind(id)
            .bind(integrity)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Pending approvals past their expiry at `now` (at most 1,000), for the scheduler to
    /// expire one by one.
    pub async fn expired_approvals(&self, now: Millis) -> Result<Vec<ApprovalRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE state = 'PENDING' AND expires_at < $1 LIMIT 1000"
        )))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(approval_row).collect()
    }

    /// Every approval (at most 100,000), for sealing rows written before integrity values.
    pub async fn all_approvals(&self) -> Result<Vec<ApprovalRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals LIMIT 100000"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(approval_row).collect()
    }

    /// Sets an approval's integrity value if it is still `before`.
    pub async fn reseal_approval(
        &self,
        id: &str,
        before: &str,
        after: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE approvals SET integrity = $1 WHERE id = $2 AND integrity = $3")
            .bind(after)
            .bind(id)
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
