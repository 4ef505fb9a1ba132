//! Four-eyes destruction: a request by one officer, a decision by another.
//!
//! Owns the approval rules: only officers of the key's tenant see and decide a request; the
//! officer who asked cannot approve; a request expires after `approval_ttl_ms`; approval
//! schedules the destruction `destruction_grace_ms` later, which can still be cancelled until
//! the scheduler destroys the HSM object.

use std::fmt;

use super::{Custody, CustodyError, authorize};
use crate::auth::{Grant, Role};
use crate::model::{KeyName, Millis, VersionState};
use crate::store::{ApprovalRow, StoreError};

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    /// Waiting for a second officer.
    Pending,
    /// Approved: the destruction is scheduled.
    Approved,
    /// Rejected (or withdrawn).
    Rejected,
    /// Nobody decided in time.
    Expired,
}

impl ApprovalState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Approved => "APPROVED",
            Self::Rejected => "REJECTED",
            Self::Expired => "EXPIRED",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => Self::Pending,
            "APPROVED" => Self::Approved,
            "REJECTED" => Self::Rejected,
            "EXPIRED" => Self::Expired,
            _ => return None,
        })
    }
}

impl fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A destruction request as officers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalInfo {
    /// Random id.
    pub id: String,
    /// What it asks for (`DESTROY_KEY_VERSION`).
    pub operation: String,
    /// The key.
    pub key: KeyName,
    /// The version.
    pub version: u32,
    /// Who asked.
    pub requested_by: String,
    /// When.
    pub requested_at: Millis,
    /// Until when it can be decided.
    pub expires_at: Millis,
    /// Where it stands.
    pub state: ApprovalState,
    /// Who decided.
    pub decided_by: String,
    /// When the destruction will happen, once approved.
    pub destroy_at: Option<Millis>,
}

const DESTROY: &str = "DESTROY_KEY_VERSION";

impl Custody {
    pub(crate) fn approval_info(&self, row: ApprovalRow) -> Result<ApprovalInfo, CustodyError> {
        let key = KeyName::new(&row.tenant, &row.key_name)?;
        let destroy_at = self
            .entry(&key)
            .ok()
            .and_then(|e| e.version(row.version).and_then(|v| v.destroy_at));
        Ok(ApprovalInfo {
            id: row.id,
            operation: row.operation,
            version: row.version,
            requested_by: row.requested_by,
            requested_at: row.requested_at,
            expires_at: row.expires_at,
            state: ApprovalState::parse(&row.state).ok_or_else(|| {
                CustodyError::Store(StoreError::Corrupt {
                    table: "approvals",
                    what: format!("state {:?}", row.state),
                })
            })?,
            decided_by: row.decided_by,
            destroy_at,
            key,
        })
    }

    /// Asks for a version's destruction. Nothing happens until another officer approves.
    pub async fn request_destruction(
        &self,
        grant: &Grant,
        name: &KeyName,
        number: u32,
    ) -> Result<ApprovalInfo, CustodyError> {
        authorize(grant, Role::Officer, name)?;
        let entry = self.entry(name)?;
        let version = entry
            .version(number)
            .ok_or_else(|| CustodyError::VersionNotFound(name.version(number)))?;
        if entry.primary == number {
            return Err(CustodyError::PrimaryVersion(name.version(number)));
        }
        if !matches!(
            version.state,
            VersionState::Enabled | VersionState::Disabled
        ) {
            return Err(CustodyError::InvalidTransition {
                version: name.version(number),
                from: version.state,
                to: VersionState::DestroyScheduled,
            });
        }
        let now = self.now();
        let mut raw = [0u8; 12];
        ring::rand::SecureRandom::fill(&self.inner.rng, &mut raw)
            .map_err(|_| CustodyError::Internal("no system randomness".into()))?;
        let row = ApprovalRow {
            id: crate::model::to_hex(&raw),
            tenant: name.tenant().as_str().to_owned(),
            key_name: name.key().to_owned(),
            version: number,
            operation: DESTROY.into(),
            requested_by: grant.identity().to_owned(),
            requested_at: now,
            expires_at: now + self.inner.options.approval_ttl_ms,
            state: ApprovalState::Pending.as_str().into(),
            decided_by: String::new(),
        };
        match self.inner.store.insert_approval(&row, now).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(CustodyError::ApprovalPending(name.version(number)));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(key = %name, version = number, requested_by = %grant.identity(), approval = %row.id, "destruction requested; waiting for a second officer");
        self.approval_info(row)
    }

    /// The approvals of the caller's tenant, newest first.
    pub async fn list_approvals(&self, grant: &Grant) -> Result<Vec<ApprovalInfo>, CustodyError> {
        grant.require(Role::Officer)?;
        let rows = self
            .inner
            .store
            .list_approvals(grant.tenant().as_str())
            .await?;
        rows.into_iter()
            .map(|r| self.approval_info(r))
            .filter(|a| a.as_ref().map_or(true, |a| grant.allows_key(&a.key)))
            .collect()
    }

    /// Loads an approval of the caller's tenant that may still be decided.
    async fn open_approval(&self, grant: &Grant, id: &str) -> Result<ApprovalRow, CustodyError> {
        grant.require(Role::Officer)?;
        let row = self
            .inner
            .store
            .get_approval(id)
            .await?
            // Another tenant's approval does not exist for this caller.
            .filter(|r| r.tenant == grant.tenant().as_str())
            .ok_or_else(|| CustodyError::ApprovalNotFound(id.to_owned()))?;
        grant.check_key(&KeyName::new(&row.tenant, &row.key_name)?)?;
        let state = ApprovalState::parse(&row.state).unwrap_or(ApprovalState::Expired);
        if state != ApprovalState::Pending {
            return Err(CustodyError::ApprovalClosed {
                id: id.to_owned(),
                state,
            });
        }
        if self.now() > row.expires_at {
            self.inner
                .store
                .decide_approval(id, ApprovalState::Expired.as_str(), "", self.now())
                .await?;
            return Err(CustodyError::ApprovalClosed {
                id: id.to_owned(),
                state: ApprovalState::Expired,
            });
        }
        Ok(row)
    }

    /// A second officer approves: the version becomes `DESTROY_SCHEDULED`, destroyed after the
    /// grace period unless cancelled.
    pub async fn approve(&self, grant: &Grant, id: &str) -> Result<ApprovalInfo, CustodyError> {
        let row = self.open_approval(grant, id).await?;
        if row.requested_by == grant.identity() {
            return Err(CustodyError::SelfApproval(row.requested_by));
        }
        let key = KeyName::new(&row.tenant, &row.key_name)?;
        // Decide first, so a concurrent rejection either wins (and nothing is scheduled) or
        // loses; never "REJECTED" on the approval while the version is scheduled anyway.
        self.decide(grant, id, ApprovalState::Approved).await?;
        let destroy_at = self.now() + self.inner.options.destruction_grace_ms;
        if let Err(e) = self
            .transition(
                &key,
                row.version,
                VersionState::DestroyScheduled,
                Some(destroy_at),
            )
            .await
        {
            // Nothing was scheduled: put the request back so the record tells the truth.
            self.inner.store.reopen_approval(id).await?;
            return Err(e);
        }
        tracing::warn!(key = %key, version = row.version, approved_by = %grant.identity(), requested_by = %row.requested_by, destroy_at, "key version destruction approved and scheduled");
        let row = self
            .inner
            .store
            .get_approval(id)
            .await?
            .ok_or_else(|| CustodyError::ApprovalNotFound(id.to_owned()))?;
        self.approval_info(row)
    }

    /// Rejects (or, by the officer who asked, withdraws) a request.
    pub async fn reject(&self, grant: &Grant, id: &str) -> Result<ApprovalInfo, CustodyError> {
        self.open_approval(grant, id).await?;
        self.decide(grant, id, ApprovalState::Rejected).await?;
        let row = self
            .inner
            .store
            .get_approval(id)
            .await?
            .ok_or_else(|| CustodyError::ApprovalNotFound(id.to_owned()))?;
        self.approval_info(row)
    }

    /// Records the decision unless another one got there first; then the error names the state
    /// that won.
    async fn decide(
        &self,
        grant: &Grant,
        id: &str,
        decision: ApprovalState,
    ) -> Result<(), CustodyError> {
        match self
            .inner
            .store
            .decide_approval(id, decision.as_str(), grant.identity(), self.now())
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict) => {
                let state = self
                    .inner
                    .store
                    .get_approval(id)
                    .await?
                    .and_then(|r| ApprovalState::parse(&r.state))
                    .unwrap_or(ApprovalState::Rejected);
                Err(CustodyError::ApprovalClosed {
                    id: id.to_owned(),
                    state,
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}
