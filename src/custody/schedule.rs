//! Work that falls due: automatic rotations, destructions past their grace period (each only with
//! the HSM's destruction order), approval expiry.

use super::cache::VersionEntry;
use super::{Custody, CustodyError, DueReport, ROTATE_AFTER_WRAPS};
use crate::envelope::VersionId;
use crate::hsm::ObjectId;
use crate::model::{KeyName, Millis, VersionState};
use crate::store::StoreError;
use crate::store::{Backend, SchedulerLock};
use crate::sync::read;

impl Custody {
    /// Runs the work that is due: rotations (period elapsed, or 2^31 wraps on the primary
    /// version), destructions past their grace period, approval expiry. A due rotation happens
    /// once however long the server was down; the next is due a period after it.
    pub async fn run_due(&self) -> Result<DueReport, CustodyError> {
        let now = self.now();
        let mut report = DueReport::default();
        let due: Vec<KeyName> = read(&self.inner.cache)
            .keys
            .values()
            .filter(|k| {
                if k.check_seal().is_err() {
                    return false;
                }
                let period_due = k.next_rotation_at.is_some_and(|t| t <= now);
                let worn_out = k
                    .primary_version()
                    .is_some_and(|v| v.wraps.reserved() >= ROTATE_AFTER_WRAPS);
                period_due || worn_out
            })
            .map(|k| k.name.clone())
            .collect();
        for name in due {
            match self.rotate(&name).await {
                Ok(info) => {
                    tracing::info!(key = %name, version = info.primary_version, "key rotated on schedule");
                    report.rotated.push(name.version(info.primary_version));
                }
                // Another node rotated it first; its next due time moved on.
                Err(CustodyError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        report.destroyed = self.destroy_due(now).await?;
        report.expired_approvals = self.expire_approvals(now).await?;
        Ok(report)
    }
}

impl Custody {
    /// Destroys every version whose scheduled destruction is due at `now` and for which the
    /// HSM holds a destruction order that is due too ([`evidence`]): commits `DESTROYED`, then
    /// destroys the HSM object, then withdraws the order. A version the database calls due
    /// without such an order is left alone and reported (ERROR log, metric). Returns the
    /// destroyed versions' names.
    pub async fn destroy_due(&self, now: Millis) -> Result<Vec<String>, CustodyError> {
        self.admin(move |c| async move {
            let due: Vec<(KeyName, u32, VersionId)> = read(&c.inner.cache)
                .keys
                .values()
                .filter(|k| k.check_seal().is_ok())
                .flat_map(|k| {
                    k.versions
                        .iter()
                        .filter(|v| v.state == VersionState::DestroyScheduled && v.destroy_at.is_some_and(|t| t <= now))
                        .map(|v| (k.name.clone(), v.number, v.id))
                })
                .collect();
            if due.is_empty() {
                return Ok(Vec::new());
            }
            let orders = c.destruction_orders().await?;
            let mut destroyed = Vec::with_capacity(due.len());
            for (name, number, id) in due {
                let version_name = name.version(number);
                match orders.get(&id) {
                    Some(order) if order.destroy_at <= now => {}
                    Some(order) => {
                        tracing::warn!(version = %version_name, order_due = order.destroy_at,
                            "the database says this destruction is due, the HSM's destruction order says later; waiting for the order");
                        continue;
                    }
                    None => {
                        crate::metrics::global().destructions_refused.inc();
                        tracing::error!(version = %version_name,
                            "version is DESTROY_SCHEDULED in the database, but the HSM holds no destruction order for it; not destroyed (metadata integrity)");
                        continue;
                    }
                }
                let entry = c.entry(&name)?;
                let at = c.now();
                let mut next = entry.with_version(number, |v| VersionEntry {
                    state: VersionState::Destroyed,
                    state_changed_at: at,
                    destroy_at: None,
                    destroyed_at: Some(at),
                    ..v.clone()
                });
                let sealed = c.reseal(&entry, &mut next).await?;
                match c.inner.store.transition(&id, &[VersionState::DestroyScheduled], VersionState::Destroyed, at, None, false, &sealed.as_reseal()).await {
                    Ok(()) => {}
                    // Cancelled or destroyed elsewhere since the cache was read.
                    Err(StoreError::Conflict) => {
                        c.refresh_after_conflict(&name).await;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
                c.publish(next);
                match c.inner.hsm.destroy_secret_key(ObjectId(id.0)).await {
                    Ok(_) => {
                        if let Err(e) = c.withdraw_order(&id).await {
                            tracing::warn!(version = %version_name, error = %e, "version destroyed; its spent destruction order stays until the next start-up");
                        }
                    }
                    Err(e) => {
                        tracing::error!(version = %version_name, error = %e,
                            "version is DESTROYED but its HSM object could not be destroyed; start-up reconciliation will retry");
                    }
                }
                tracing::info!(version = %version_name, "key version destroyed");
                destroyed.push(version_name);
            }
            Ok(destroyed)
        })
        .await
    }
}

impl Custody {
    /// Runs due rotations, destructions and approval expiries. Due times live in the database, so
    /// work missed while the server was down happens at the first run after start — once. With
    /// several nodes only the holder of the scheduler lock runs them; the others try to take the
    /// lock at every run, so one of them takes over within a run interval when the holder dies.
    pub async fn run_scheduler(self, every: std::time::Duration) {
        let mut lock: Option<SchedulerLock> = None;
        loop {
            if let Some(held) = lock.as_mut()
                && !held.still_held().await
            {
                tracing::warn!("lost the scheduler lock (database connection broke)");
                lock = None;
            }
            if lock.is_none() {
                match self.inner.store.try_scheduler_lock().await {
                    Ok(Some(taken)) => {
                        if self.inner.store.backend() == Backend::Postgres {
                            tracing::info!(
                                "took the scheduler lock: this node runs scheduled work"
                            );
                        }
                        lock = Some(taken);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "could not try the scheduler lock"),
                }
            }
            let outcome = if lock.is_none() {
                "standby"
            } else {
                match self.run_due().await {
                    Ok(r) if r != Default::default() => {
                        tracing::info!(rotated = ?r.rotated, destroyed = ?r.destroyed, expired_approvals = r.expired_approvals, "scheduled work done");
                        "work_done"
                    }
                    Ok(_) => "nothing_due",
                    Err(e) => {
                        tracing::error!(error = %e, "scheduled work failed; retrying at the next run");
                        "failed"
                    }
                }
            };
            crate::metrics::global().scheduler_run(outcome);
            tokio::time::sleep(every).await;
        }
    }
}
