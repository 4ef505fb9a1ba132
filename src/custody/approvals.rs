//! Four-eyes decisions: a request by one officer, a decision by another. They destroy key
//! versions and managed objects, and open break-glass access windows ([`super::access`]).
//!
//! Owns the approval rules: only officers of the key's tenant see and decide a request; the
//! officer who asked cannot approve; a request expires after `approval_ttl_ms`; approval
//! schedules the destruction `destruction_grace_ms` later, which can still be cancelled until
//! the scheduler destroys the HSM object.
//!
//! Every approval row is sealed ([`super::integrity`]): a request that no officer made, or a
//! decision that no officer took, fails its check and cannot be decided. Approval is the only
//! place that puts a destruction order into the HSM ([`super::evidence`]).

use std::fmt;

use super::evidence::DestructionOrder;
use super::{Custody, CustodyError, authorize, integrity};
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
/// An officer's destruction of a managed object (`key_name` is the object's id, version 0).
pub(super) const DESTROY_OBJECT: &str = "DESTROY_MANAGED_OBJECT";

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
        let info = self
            .request_approval(
                grant,
                name.tenant().as_str(),
                name.key(),
                number,
                DESTROY,
                None,
            )
            .await
            .map_err(|e| match e {
                CustodyError::ApprovalPending(_) => {
                    CustodyError::ApprovalPending(name.version(number))
                }
                other => other,
            })?;
        tracing::info!(key = %name, version = number, requested_by = %grant.identity(), approval = %info.id, "destruction requested; waiting for a second officer");
        Ok(info)
    }

    /// A fresh random id for an approval or window.
    pub(super) fn new_id(&self) -> Result<String, CustodyError> {
        let mut raw = [0u8; 12];
        ring::rand::SecureRandom::fill(&self.inner.rng, &mut raw)
            .map_err(|_| CustodyError::Internal("no system randomness".into()))?;
        Ok(crate::model::to_hex(&raw))
    }

    /// Records a pending request for `operation` on (`key_name`, `version`) of `tenant`,
    /// sealed, under `id` or a fresh one; [`CustodyError::ApprovalPending`] if one is already
    /// waiting.
    pub(super) async fn request_approval(
        &self,
        grant: &Grant,
        tenant: &str,
        key_name: &str,
        version: u32,
        operation: &str,
        id: Option<String>,
    ) -> Result<ApprovalInfo, CustodyError> {
        let now = self.now();
        let id = match id {
            Some(id) => id,
            None => self.new_id()?,
        };
        let mut row = ApprovalRow {
            id,
            tenant: tenant.to_owned(),
            key_name: key_name.to_owned(),
            version,
            operation: operation.into(),
            requested_by: grant.identity().to_owned(),
            requested_at: now,
            expires_at: now + self.inner.options.approval_ttl_ms,
            state: ApprovalState::Pending.as_str().into(),
            decided_by: String::new(),
            integrity: String::new(),
        };
        row.integrity = self.inner.sealer.seal_approval(&row).await?;
        match self.inner.store.insert_approval(&row, now).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => {
                return Err(CustodyError::ApprovalPending(format!(
                    "{tenant}/{key_name}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
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
        let mut shown = Vec::with_capacity(rows.len());
        for row in rows {
            if !self.approval_sealed(&row).await? {
                continue;
            }
            let window = row.operation == super::access::OPEN_WINDOW;
            let info = self.approval_info(row)?;
            if window || grant.allows_key(&info.key) {
                shown.push(info);
            }
        }
        Ok(shown)
    }

    /// Whether an approval row matches its integrity value; a mismatch is logged and counted.
    async fn approval_sealed(&self, row: &ApprovalRow) -> Result<bool, CustodyError> {
        let expected = self.inner.sealer.seal_approval(row).await?;
        let sealed = !row.integrity.is_empty() && integrity::same(&expected, &row.integrity);
        if !sealed {
            crate::metrics::global().metadata_integrity_failures.inc();
            tracing::error!(approval = %row.id, tenant = %row.tenant, key = %row.key_name, version = row.version,
                "approval row fails its integrity check (changed or inserted outside Tresor); ignored");
        }
        Ok(sealed)
    }

    /// Expires pending approvals past their time; returns how many.
    pub(super) async fn expire_approvals(&self, now: Millis) -> Result<u64, CustodyError> {
        let mut expired = 0;
        for row in self.inner.store.expired_approvals(now).await? {
            if !self.approval_sealed(&row).await? {
                continue;
            }
            match self.decide_row(&row, ApprovalState::Expired, "", now).await {
                Ok(()) => expired += 1,
                Err(CustodyError::ApprovalClosed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(expired)
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
        // A window's approval names the window, not a key; its key pattern is checked
        // against the officer's when the window opens.
        if row.operation != super::access::OPEN_WINDOW {
            grant.check_key(&KeyName::new(&row.tenant, &row.key_name)?)?;
        }
        if !self.approval_sealed(&row).await? {
            return Err(CustodyError::ApprovalIntegrity(id.to_owned()));
        }
        let state = ApprovalState::parse(&row.state).unwrap_or(ApprovalState::Expired);
        if state != ApprovalState::Pending {
            return Err(CustodyError::ApprovalClosed {
                id: id.to_owned(),
                state,
            });
        }
        if self.now() > row.expires_at {
            self.decide_row(&row, ApprovalState::Expired, "", self.now())
                .await?;
            return Err(CustodyError::ApprovalClosed {
                id: id.to_owned(),
                state: ApprovalState::Expired,
            });
        }
        Ok(row)
    }

    /// A second officer approves: the HSM receives a destruction order for exactly that
    /// version, and the version becomes `DESTROY_SCHEDULED`, destroyed after the grace period
    /// unless cancelled.
    pub async fn approve(&self, grant: &Grant, id: &str) -> Result<ApprovalInfo, CustodyError> {
        let row = self.open_approval(grant, id).await?;
        if row.requested_by == grant.identity() {
            return Err(CustodyError::SelfApproval(row.requested_by));
        }
        if row.operation == DESTROY_OBJECT {
            // Decided first, as for a version; if the destruction then fails, the request is
            // put back so the record tells the truth.
            self.decide_row(&row, ApprovalState::Approved, grant.identity(), self.now())
                .await?;
            if let Err(e) = self.destroy_object(grant, &row.key_name).await {
                self.inner.store.reopen_approval(id, &row.integrity).await?;
                return Err(e);
            }
            tracing::warn!(object = %row.key_name, tenant = %row.tenant, approved_by = %grant.identity(), requested_by = %row.requested_by, "managed object destruction approved and done");
            return self.decided(id).await;
        }
        if row.operation == super::access::OPEN_WINDOW {
            self.decide_row(&row, ApprovalState::Approved, grant.identity(), self.now())
                .await?;
            if let Err(e) = self.open_window(grant, &row.key_name).await {
                self.inner.store.reopen_approval(id, &row.integrity).await?;
                return Err(e);
            }
            return self.decided(id).await;
        }
        if row.operation != DESTROY {
            return Err(CustodyError::InvalidArgument(format!(
                "approval {id} asks for {}, which this build cannot carry out",
                row.operation
            )));
        }
        let key = KeyName::new(&row.tenant, &row.key_name)?;
        let version = self
            .entry(&key)?
            .version(row.version)
            .cloned()
            .ok_or_else(|| CustodyError::VersionNotFound(key.version(row.version)))?;
        // Decide first, so a concurrent rejection either wins (and nothing is scheduled) or
        // loses; never "REJECTED" on the approval while the version is scheduled anyway.
        let now = self.now();
        self.decide_row(&row, ApprovalState::Approved, grant.identity(), now)
            .await?;
        let destroy_at = now + self.inner.options.destruction_grace_ms;
        let order = DestructionOrder {
            id: version.id,
            destroy_at,
            version: key.version(row.version),
            approval: row.id.clone(),
            requested_by: row.requested_by.clone(),
            approved_by: grant.identity().to_owned(),
        };
        let scheduled = match self.place_order(&order).await {
            Ok(()) => {
                let scheduled = self
                    .transition(
                        &key,
                        row.version,
                        VersionState::DestroyScheduled,
                        Some(destroy_at),
                    )
                    .await;
                if scheduled.is_err()
                    && let Err(e) = self.withdraw_order(&version.id).await
                {
                    tracing::error!(version = %order.version, error = %e, "a destruction order whose scheduling failed could not be withdrawn; it stays harmless while the version is not DESTROY_SCHEDULED, and start-up removes it");
                }
                scheduled.map(|_| ())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = scheduled {
            // Nothing was scheduled: put the request back so the record tells the truth.
            self.inner.store.reopen_approval(id, &row.integrity).await?;
            return Err(e);
        }
        tracing::warn!(key = %key, version = row.version, approved_by = %grant.identity(), requested_by = %row.requested_by, destroy_at, "key version destruction approved and scheduled");
        self.decided(id).await
    }

    /// An approval as it stands after a decision.
    async fn decided(&self, id: &str) -> Result<ApprovalInfo, CustodyError> {
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
        let row = self.open_approval(grant, id).await?;
        self.decide_row(&row, ApprovalState::Rejected, grant.identity(), self.now())
            .await?;
        self.decided(id).await
    }

    /// Records the decision, sealed, unless another one got there first; then the error names
    /// the state that won.
    async fn decide_row(
        &self,
        row: &ApprovalRow,
        decision: ApprovalState,
        decided_by: &str,
        at: Millis,
    ) -> Result<(), CustodyError> {
        let mut decided = row.clone();
        decided.state = decision.as_str().to_owned();
        decided.decided_by = decided_by.to_owned();
        let sealed = self.inner.sealer.seal_approval(&decided).await?;
        match self
            .inner
            .store
            .decide_approval(&row.id, decision.as_str(), decided_by, at, &sealed)
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::Conflict) => {
                let state = self
                    .inner
                    .store
                    .get_approval(&row.id)
                    .await?
                    .and_then(|r| ApprovalState::parse(&r.state))
                    .unwrap_or(ApprovalState::Rejected);
                Err(CustodyError::ApprovalClosed {
                    id: row.id.clone(),
                    state,
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}
