//! Break-glass access window rows.
//!
//! Owns the `access_windows` table's statements. Who may open, use or close a window, and the
//! rows' integrity values, are custody's; every state change here is a compare-and-set on the
//! row's state.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};
use crate::model::Millis;

/// An access window row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRow {
    /// Random id, also the id of the approval that opens it.
    pub id: String,
    /// Tenant segment.
    pub tenant: String,
    /// The caller identity the window is for.
    pub identity: String,
    /// A key name or a prefix ending in `*`.
    pub key_pattern: String,
    /// Justification code.
    pub reason: String,
    /// Justification reference.
    pub reference: String,
    /// How long the window stays open once approved.
    pub duration_ms: Millis,
    /// The officer who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Millis,
    /// `PENDING`, `OPEN` or `CLOSED`.
    pub state: String,
    /// The officer who approved.
    pub approved_by: String,
    /// When it opened (0: not yet).
    pub opened_at: Millis,
    /// When it closes by itself (0: not yet open).
    pub expires_at: Millis,
    /// The officer who closed it early.
    pub closed_by: String,
    /// When (0: not closed).
    pub closed_at: Millis,
    /// Hex HMAC of the row under the HSM's metadata integrity key.
    pub integrity: String,
}

fn window_row(r: &AnyRow) -> Result<WindowRow, StoreError> {
    Ok(WindowRow {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        identity: r.try_get("identity")?,
        key_pattern: r.try_get("key_pattern")?,
        reason: r.try_get("reason")?,
        reference: r.try_get("reference")?,
        duration_ms: r.try_get("duration_ms")?,
        requested_by: r.try_get("requested_by")?,
        requested_at: r.try_get("requested_at")?,
        state: r.try_get("state")?,
        approved_by: r.try_get("approved_by")?,
        opened_at: r.try_get("opened_at")?,
        expires_at: r.try_get("expires_at")?,
        closed_by: r.try_get("closed_by")?,
        closed_at: r.try_get("closed_at")?,
        integrity: r.try_get("integrity")?,
    })
}

const WINDOW_COLUMNS: &str = "id, tenant, identity, key_pattern, reason, reference, duration_ms, requested_by, requested_at, state, approved_by, opened_at, expires_at, closed_by, closed_at, integrity";

impl Store {
    /// Inserts a window as it is requested.
    pub async fn insert_window(&self, w: &WindowRow) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO access_windows ({WINDOW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        )))
        .bind(&w.id)
        .bind(&w.tenant)
        .bind(&w.identity)
        .bind(&w.key_pattern)
        .bind(&w.reason)
        .bind(&w.reference)
        .bind(w.duration_ms)
        .bind(&w.requested_by)
        .bind(w.requested_at)
        .bind(&w.state)
        .bind(&w.approved_by)
        .bind(w.opened_at)
        .bind(w.expires_at)
        .bind(&w.closed_by)
        .bind(w.closed_at)
        .bind(&w.integrity)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a window that was never opened (its approval could not be recorded).
    pub async fn delete_pending_window(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM access_windows WHERE id = $1 AND state = 'PENDING'")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// One window.
    pub async fn window(&self, id: &str) -> Result<Option<WindowRow>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WINDOW_COLUMNS} FROM access_windows WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(window_row).transpose()
    }

    /// A tenant's windows, newest first (at most 1,000).
    pub async fn windows(&self, tenant: &str) -> Result<Vec<WindowRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WINDOW_COLUMNS} FROM access_windows WHERE tenant = $1 ORDER BY requested_at DESC LIMIT 1000"
        )))
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(window_row).collect()
    }

    /// The windows of one identity that say they are open at `now` (at most 100).
    pub async fn open_windows(
        &self,
        tenant: &str,
        identity: &str,
        now: Millis,
    ) -> Result<Vec<WindowRow>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {WINDOW_COLUMNS} FROM access_windows WHERE tenant = $1 AND identity = $2 AND state = 'OPEN' AND opened_at <= $3 AND expires_at > $3 ORDER BY opened_at LIMIT 100"
        )))
        .bind(tenant)
        .bind(identity)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(window_row).collect()
    }

    /// Replaces a window's changing fields if it is still in state `from`
    /// ([`StoreError::Conflict`] otherwise).
    pub async fn update_window(&self, w: &WindowRow, from: &str) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE access_windows SET state = $1, approved_by = $2, opened_at = $3, expires_at = $4, closed_by = $5, closed_at = $6, integrity = $7 WHERE id = $8 AND state = $9",
        )
        .bind(&w.state)
        .bind(&w.approved_by)
        .bind(w.opened_at)
        .bind(w.expires_at)
        .bind(&w.closed_by)
        .bind(w.closed_at)
        .bind(&w.integrity)
        .bind(&w.id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }
}
