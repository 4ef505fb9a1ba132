//! Access rules at custody's door, and four-eyes break-glass windows.
//!
//! Owns where the rules are asked (every service use of a key and every KMIP release or use of
//! a managed object, once the key is known and before the HSM is), what a `require-approval`
//! rule needs (an open window for the caller and key), and the windows' lifecycle: an officer
//! requests one, a second officer approves it through the approvals of [`super::approvals`],
//! it closes by itself when its time is up or early when an officer closes it. Every window row
//! is sealed ([`super::integrity`]): a window the database invented, or one whose times were
//! stretched, fails its check and opens nothing. The rules themselves are `crate::auth`'s.

use std::fmt;

use super::approvals::ApprovalState;
use super::{Custody, CustodyError};
use crate::auth::{AccessNote, Grant, KeyPattern, Role, Verdict};
use crate::model::Millis;
use crate::store::{StoreError, WindowRow};

/// The approvals' operation that opens a window (`key_name` is the window's id).
pub(super) const OPEN_WINDOW: &str = "OPEN_ACCESS_WINDOW";

/// Shortest window that can be requested.
const MIN_WINDOW_MS: Millis = 60_000;
/// Longest identity a window can name.
const MAX_IDENTITY_LEN: usize = 1024;

/// Where a window stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Waiting for a second officer.
    Pending,
    /// Approved and not yet over: matching calls go through.
    Open,
    /// Its time is up (or nobody approved it in time).
    Expired,
    /// Closed early by an officer (or withdrawn before approval).
    Closed,
    /// The second officer rejected it.
    Rejected,
}

impl WindowState {
    /// The spelling officers see.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Open => "OPEN",
            Self::Expired => "EXPIRED",
            Self::Closed => "CLOSED",
            Self::Rejected => "REJECTED",
        }
    }
}

impl fmt::Display for WindowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an officer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRequest {
    /// The caller identity the window is for.
    pub identity: String,
    /// A key name or a prefix ending in `*` (for KMIP, a managed object's Name).
    pub key_pattern: String,
    /// Why: a justification code ...
    pub reason: String,
    /// ... and its reference.
    pub reference: String,
    /// How long it stays open once approved.
    pub duration_ms: Millis,
}

/// A window as officers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowInfo {
    /// Its id, also its approval's id.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The caller identity it is for.
    pub identity: String,
    /// The keys it covers.
    pub key_pattern: String,
    /// Justification code.
    pub reason: String,
    /// Justification reference.
    pub reference: String,
    /// How long it stays open once approved.
    pub duration_ms: Millis,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Millis,
    /// Where it stands now.
    pub state: WindowState,
    /// Who approved.
    pub approved_by: String,
    /// When it opened.
    pub opened_at: Option<Millis>,
    /// When it closes (or closed) by itself.
    pub expires_at: Option<Millis>,
    /// Who closed it early.
    pub closed_by: String,
    /// When.
    pub closed_at: Option<Millis>,
}

fn set(ms: Millis) -> Option<Millis> {
    (ms > 0).then_some(ms)
}

impl Custody {
    /// Asks the access rules about this call on `key` (a key segment, or a managed object's
    /// Name) and notes their decision on the grant for the audit record. A
    /// `require-approval` rule lets the call through only while a sealed, approved window is
    /// open for the caller and a pattern covering `key`.
    pub(super) async fn check_access(&self, grant: &Grant, key: &str) -> Result<(), CustodyError> {
        let note = |rule, refused| AccessNote {
            rule,
            window: String::new(),
            window_reason: None,
            refused,
        };
        let rule = match grant.access_verdict(key) {
            Verdict::Unruled => return Ok(()),
            Verdict::Allow(rule) => {
                grant.note_access(note(rule, false));
                return Ok(());
            }
            Verdict::Deny(rule) => {
                let e = CustodyError::AccessRuleDenied(rule.to_string());
                grant.note_access(note(rule, true));
                return Err(e);
            }
            Verdict::NeedsWindow(rule) => rule,
        };
        let now = self.now();
        let rows = self
            .inner
            .store
            .open_windows(grant.tenant().as_str(), grant.identity(), now)
            .await?;
        for row in rows {
            let covers = KeyPattern::parse(&row.key_pattern).is_ok_and(|p| p.matches(key));
            if covers && self.window_sealed(&row).await? {
                grant.note_access(AccessNote {
                    rule,
                    window: row.id,
                    window_reason: Some((row.reason, row.reference)),
                    refused: false,
                });
                return Ok(());
            }
        }
        let e = CustodyError::AccessWindowRequired(rule.to_string());
        grant.note_access(note(rule, true));
        Err(e)
    }

    /// An officer asks for a window; it opens only when another officer approves it
    /// ([`Custody::approve`] with the window's id).
    pub async fn request_window(
        &self,
        grant: &Grant,
        request: WindowRequest,
    ) -> Result<WindowInfo, CustodyError> {
        grant.require(Role::Officer)?;
        let invalid = |m: String| CustodyError::InvalidArgument(m);
        if request.identity.is_empty()
            || request.identity.len() > MAX_IDENTITY_LEN
            || request.identity.chars().any(char::is_control)
        {
            return Err(invalid(format!(
                "identity must be 1 to {MAX_IDENTITY_LEN} bytes of printable text"
            )));
        }
        let pattern = KeyPattern::parse(&request.key_pattern).map_err(invalid)?;
        if !grant.covers_pattern(&pattern) {
            return Err(crate::auth::Denied::Key {
                identity: grant.identity().to_owned(),
                key: format!("{}/{pattern}", grant.tenant()),
            }
            .into());
        }
        let reason = grant
            .rules()
            .justification(&request.reason, &request.reference)
            .map_err(|e| invalid(e.to_string()))?
            .ok_or_else(|| invalid("a window needs a reason: a justification code".into()))?;
        let max = self.inner.options.max_access_window_ms;
        if !(MIN_WINDOW_MS..=max).contains(&request.duration_ms) {
            return Err(invalid(format!(
                "a window lasts 1 minute to {} hours (custody.max_access_window_hours)",
                max / 3_600_000
            )));
        }
        let id = self.new_id()?;
        let mut row = WindowRow {
            id: id.clone(),
            tenant: grant.tenant().as_str().to_owned(),
            identity: request.identity,
            key_pattern: pattern.to_string(),
            reason: reason.code().to_owned(),
            reference: reason.reference().to_owned(),
            duration_ms: request.duration_ms,
            requested_by: grant.identity().to_owned(),
            requested_at: self.now(),
            state: "PENDING".into(),
            approved_by: String::new(),
            opened_at: 0,
            expires_at: 0,
            closed_by: String::new(),
            closed_at: 0,
            integrity: String::new(),
        };
        row.integrity = self.inner.sealer.seal_window(&row).await?;
        self.inner.store.insert_window(&row).await?;
        if let Err(e) = self
            .request_approval(grant, &row.tenant, &id, 0, OPEN_WINDOW, Some(id.clone()))
            .await
        {
            // Without its approval the window could never open; do not leave it listed.
            if let Err(d) = self.inner.store.delete_pending_window(&id).await {
                tracing::error!(window = %id, error = %d, "a window whose approval failed could not be removed; it stays PENDING and can never open");
            }
            return Err(e);
        }
        tracing::warn!(window = %id, tenant = %row.tenant, identity = %row.identity, keys = %row.key_pattern, reason = %row.reason, requested_by = %row.requested_by, "break-glass access window requested; waiting for a second officer");
        self.window_info(row).await
    }

    /// Opens a window whose approval `approver` has just recorded.
    pub(super) async fn open_window(&self, approver: &Grant, id: &str) -> Result<(), CustodyError> {
        let row = self.sealed_window(approver, id).await?;
        let pattern = KeyPattern::parse(&row.key_pattern).map_err(CustodyError::InvalidArgument)?;
        if !approver.covers_pattern(&pattern) {
            return Err(crate::auth::Denied::Key {
                identity: approver.identity().to_owned(),
                key: format!("{}/{pattern}", row.tenant),
            }
            .into());
        }
        if row.state != "PENDING" {
            return Err(CustodyError::WindowClosed {
                id: id.to_owned(),
                state: self.window_state(&row).await?,
                action: "opened",
            });
        }
        let now = self.now();
        let mut open = row.clone();
        open.state = "OPEN".into();
        open.approved_by = approver.identity().to_owned();
        open.opened_at = now;
        open.expires_at = now.saturating_add(row.duration_ms);
        self.write_window(open, "PENDING", "opened").await?;
        tracing::warn!(window = %id, tenant = %row.tenant, identity = %row.identity, keys = %row.key_pattern, approved_by = %approver.identity(), requested_by = %row.requested_by, "break-glass access window opened");
        Ok(())
    }

    /// Closes an open window before its time, or withdraws a pending one (its approval is
    /// rejected). Any officer of the tenant may.
    pub async fn close_window(&self, grant: &Grant, id: &str) -> Result<WindowInfo, CustodyError> {
        grant.require(Role::Officer)?;
        let row = self.sealed_window(grant, id).await?;
        let state = self.window_state(&row).await?;
        match state {
            WindowState::Open | WindowState::Pending => {}
            _ => {
                return Err(CustodyError::WindowClosed {
                    id: id.to_owned(),
                    state,
                    action: "closed",
                });
            }
        }
        if state == WindowState::Pending {
            match self.reject(grant, id).await {
                Ok(_) | Err(CustodyError::ApprovalClosed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut closed = row.clone();
        closed.state = "CLOSED".into();
        closed.closed_by = grant.identity().to_owned();
        closed.closed_at = self.now();
        let from = row.state.clone();
        let closed = self.write_window(closed, &from, "closed").await?;
        tracing::warn!(window = %id, tenant = %row.tenant, closed_by = %grant.identity(), "break-glass access window closed");
        self.window_info(closed).await
    }

    /// The windows of the caller's tenant, newest first; rows that fail their integrity check
    /// are left out (and logged).
    pub async fn list_windows(&self, grant: &Grant) -> Result<Vec<WindowInfo>, CustodyError> {
        grant.require(Role::Officer)?;
        let rows = self.inner.store.windows(grant.tenant().as_str()).await?;
        let mut shown = Vec::with_capacity(rows.len());
        for row in rows {
            if self.window_sealed(&row).await? {
                shown.push(self.window_info(row).await?);
            }
        }
        Ok(shown)
    }

    /// A window of the caller's tenant whose row passes its integrity check.
    async fn sealed_window(&self, grant: &Grant, id: &str) -> Result<WindowRow, CustodyError> {
        let row = self
            .inner
            .store
            .window(id)
            .await?
            .filter(|r| r.tenant == grant.tenant().as_str())
            .ok_or_else(|| CustodyError::WindowNotFound(id.to_owned()))?;
        if !self.window_sealed(&row).await? {
            return Err(CustodyError::WindowIntegrity(id.to_owned()));
        }
        Ok(row)
    }

    /// Seals and writes a window's new state (compare-and-set on the old one).
    async fn write_window(
        &self,
        mut row: WindowRow,
        from: &str,
        action: &'static str,
    ) -> Result<WindowRow, CustodyError> {
        row.integrity = self.inner.sealer.seal_window(&row).await?;
        match self.inner.store.update_window(&row, from).await {
            Ok(()) => Ok(row),
            Err(StoreError::Conflict) => {
                let now = self.inner.store.window(&row.id).await?;
                let state = match &now {
                    Some(r) => self.window_state(r).await?,
                    None => WindowState::Closed,
                };
                Err(CustodyError::WindowClosed {
                    id: row.id,
                    state,
                    action,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a window row matches its integrity value; a mismatch is logged and counted.
    async fn window_sealed(&self, row: &WindowRow) -> Result<bool, CustodyError> {
        let expected = self.inner.sealer.seal_window(row).await?;
        let sealed = !row.integrity.is_empty() && super::integrity::same(&expected, &row.integrity);
        if !sealed {
            crate::metrics::global().metadata_integrity_failures.inc();
            tracing::error!(window = %row.id, tenant = %row.tenant, identity = %row.identity,
                "access window row fails its integrity check (changed or inserted outside Tresor); it opens nothing");
        }
        Ok(sealed)
    }

    /// Where a window stands now: by its row, its time, and, while pending, its approval.
    async fn window_state(&self, row: &WindowRow) -> Result<WindowState, CustodyError> {
        let now = self.now();
        Ok(match row.state.as_str() {
            "OPEN" if now < row.expires_at => WindowState::Open,
            "OPEN" => WindowState::Expired,
            "CLOSED" => WindowState::Closed,
            _ => {
                let approval = self.inner.store.get_approval(&row.id).await?;
                match approval
                    .as_ref()
                    .and_then(|a| ApprovalState::parse(&a.state).map(|s| (s, a.expires_at)))
                {
                    Some((ApprovalState::Pending, expires)) if now <= expires => {
                        WindowState::Pending
                    }
                    // Approved but not (yet) opened: the opening failed and was put back.
                    Some((ApprovalState::Approved, _)) => WindowState::Pending,
                    Some((ApprovalState::Rejected, _)) => WindowState::Rejected,
                    _ => WindowState::Expired,
                }
            }
        })
    }

    async fn window_info(&self, row: WindowRow) -> Result<WindowInfo, CustodyError> {
        let state = self.window_state(&row).await?;
        Ok(WindowInfo {
            state,
            opened_at: set(row.opened_at),
            expires_at: set(row.expires_at),
            closed_at: set(row.closed_at),
            id: row.id,
            tenant: row.tenant,
            identity: row.identity,
            key_pattern: row.key_pattern,
            reason: row.reason,
            reference: row.reference,
            duration_ms: row.duration_ms,
            requested_by: row.requested_by,
            requested_at: row.requested_at,
            approved_by: row.approved_by,
            closed_by: row.closed_by,
        })
    }
}
