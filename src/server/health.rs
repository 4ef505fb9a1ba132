//! The health watcher every front-end reports from, and start-up's audit records of keys that
//! failed their integrity check.

use std::time::Duration;

use crate::audit::{AuditError, AuditLog};
use crate::custody::Custody;

/// Publishes whether Tresor can serve: false while the HSM or the database fails, or while the
/// audit log refuses to go on (its chain does not extend the HSM anchor). Logs each change.
pub(super) async fn watch(
    custody: Custody,
    audit: AuditLog,
    healthy: tokio::sync::watch::Sender<bool>,
    every: Duration,
) {
    let mut known = None;
    loop {
        let failure: Option<Box<dyn std::error::Error + Send>> =
            match custody.check_dependencies().await {
                Err(e) => Some(Box::new(e)),
                Ok(()) => audit.check_chain().err().map(|e| Box::new(e) as _),
            };
        let now = match failure {
            None => true,
            Some(e) => {
                if known != Some(false) {
                    tracing::error!(error = %e, "dependency check failed: health is NOT_SERVING");
                }
                false
            }
        };
        if known != Some(now) {
            if now && known.is_some() {
                tracing::info!("dependencies reachable again: health is SERVING");
            }
            healthy.send_replace(now);
            known = Some(now);
        }
        tokio::time::sleep(every).await;
    }
}

/// One audit record per key that start-up found with rows failing their integrity check, in
/// the key's tenant, so its auditors see it (SECURITY.md "Metadata integrity").
pub(super) async fn record_integrity_failures(
    custody: &Custody,
    audit: &AuditLog,
    node: &str,
) -> Result<(), AuditError> {
    for (key, reason) in custody.integrity_failures() {
        tracing::error!(key = %key, reason = %reason, "start-up: key refuses service (metadata integrity)");
        audit
            .append(
                key.tenant().as_str(),
                crate::audit_record::RecordBody {
                    request_id: crate::audit::new_request_id(),
                    caller: format!("tresor/{node}"),
                    role: "system".into(),
                    operation: "MetadataIntegrityCheck".into(),
                    key: key.to_string(),
                    outcome: "FAILED".into(),
                    status_code: tonic::Code::DataLoss as i32,
                    ..Default::default()
                },
            )
            .await?;
    }
    Ok(())
}
