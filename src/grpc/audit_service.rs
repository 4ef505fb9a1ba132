//! `tresor.v1.AuditService` (role `auditor`): export, checkpoint, public key, AAD HMAC.

use tonic::{Code, Request, Response, Status};

use super::convert::{checkpoint_message, export_message, millis};
use super::{Api, done, optional_key_name, status};
use crate::audit::ExportFilter;
use crate::auth::Role;
use crate::proto;
use crate::proto::audit_service_server::AuditService;

/// The outcomes a record can have, for the export's filter.
const OUTCOMES: [&str; 5] = ["OK", "DENIED", "RULE_DENIED", "UNAUTHENTICATED", "FAILED"];

#[tonic::async_trait]
impl AuditService for Api {
    type ExportAuditLogStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::AuditRecord, Status>>;

    async fn export_audit_log(
        &self,
        request: Request<proto::ExportAuditLogRequest>,
    ) -> Result<Response<Self::ExportAuditLogStream>, Status> {
        let call = self
            .begin(&request, Role::Auditor, "ExportAuditLog")
            .await?;
        let r = request.into_inner();
        let filter = (|| {
            let key = match object_of(&r.key) {
                // A KMIP managed object: tenants/{tenant}/objects/{id}.
                Some((tenant, _)) => {
                    let tenant = crate::model::Tenant::new(tenant)
                        .map_err(|e| super::invalid(&call, &format!("key: {e}")))?;
                    call.grant
                        .check_tenant(&tenant)
                        .map_err(|e| status::denied(&e, &call.request_id))?;
                    Some(r.key.clone())
                }
                None => match optional_key_name(&call, "key", &r.key)? {
                    Some(k) => {
                        call.grant
                            .check_key(&k)
                            .map_err(|e| status::denied(&e, &call.request_id))?;
                        Some(k.to_string())
                    }
                    None => None,
                },
            };
            let outcome = r.outcome.to_ascii_uppercase();
            if !outcome.is_empty() && !OUTCOMES.contains(&outcome.as_str()) {
                return Err(super::invalid(
                    &call,
                    &format!("outcome must be one of {}", OUTCOMES.join(", ")),
                ));
            }
            Ok(ExportFilter {
                tenant: call.grant.tenant().as_str().to_owned(),
                from_ms: r.from.as_ref().map_or(0, millis),
                to_ms: r.to.as_ref().map_or_else(crate::model::now_millis, millis),
                key,
                caller: (!r.caller.is_empty()).then(|| r.caller.clone()),
                justification: (!r.justification.is_empty()).then(|| r.justification.clone()),
                outcome: (!outcome.is_empty()).then_some(outcome),
            })
        })();
        let request_id = call.request_id.clone();
        let filter = match filter {
            Ok(f) => f,
            Err(s) => return self.finish(call, Err(s), &r.key, &[]).await,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let response = self
            .finish(
                call,
                Ok(done(tokio_stream::wrappers::ReceiverStream::new(rx), "")),
                &r.key,
                &[],
            )
            .await?;
        let audit = self.audit.clone();
        tokio::spawn(async move {
            let (items_tx, mut items_rx) = tokio::sync::mpsc::channel(256);
            let producer = tokio::spawn(async move { audit.export(&filter, &items_tx).await });
            while let Some(item) = items_rx.recv().await {
                if tx.send(Ok(export_message(item))).await.is_err() {
                    return;
                }
            }
            match producer.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(request_id = %request_id, error = %e, "audit export failed");
                    let _ = tx
                        .send(Err(status::status(
                            Code::Unavailable,
                            "the audit export failed; retry",
                            &request_id,
                        )))
                        .await;
                }
                Err(e) => {
                    tracing::error!(request_id = %request_id, error = %e, "audit export task failed");
                    let _ = tx
                        .send(Err(status::status(
                            Code::Internal,
                            "internal error",
                            &request_id,
                        )))
                        .await;
                }
            }
        });
        Ok(response)
    }

    async fn get_audit_checkpoint(
        &self,
        request: Request<proto::GetAuditCheckpointRequest>,
    ) -> Result<Response<proto::AuditCheckpoint>, Status> {
        let call = self
            .begin(&request, Role::Auditor, "GetAuditCheckpoint")
            .await?;
        let result = match self.audit.checkpoint_now().await {
            Ok(Some(c)) => Ok(done(checkpoint_message(&c), "")),
            Ok(None) => Err(status::status(
                Code::NotFound,
                "the audit log is empty",
                &call.request_id,
            )),
            Err(e) => {
                tracing::error!(request_id = %call.request_id, error = %e, "audit checkpoint failed");
                Err(status::status(
                    Code::Unavailable,
                    "the audit log is unavailable; retry later",
                    &call.request_id,
                ))
            }
        };
        self.finish(call, result, "", &[]).await
    }

    async fn get_audit_public_key(
        &self,
        request: Request<proto::GetAuditPublicKeyRequest>,
    ) -> Result<Response<proto::AuditPublicKey>, Status> {
        let call = self
            .begin(&request, Role::Auditor, "GetAuditPublicKey")
            .await?;
        let pem = self.audit.public_key_pem();
        self.finish(call, Ok(done(proto::AuditPublicKey { pem }, "")), "", &[])
            .await
    }

    async fn compute_aad_hmac(
        &self,
        request: Request<proto::ComputeAadHmacRequest>,
    ) -> Result<Response<proto::ComputeAadHmacResponse>, Status> {
        let call = self
            .begin(&request, Role::Auditor, "ComputeAadHmac")
            .await?;
        let aad_hmac = self.audit.hmac_aad(&request.into_inner().aad);
        let answer = proto::ComputeAadHmacResponse {
            aad_hmac: aad_hmac.clone(),
        };
        self.record(call, Ok(done(answer, "")), "", aad_hmac).await
    }
}

/// The tenant and id of `tenants/{tenant}/objects/{id}` (a KMIP managed object's audit key).
fn object_of(key: &str) -> Option<(&str, &str)> {
    let (tenant, id) = key.strip_prefix("tenants/")?.split_once("/objects/")?;
    let id_ok = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit());
    id_ok.then_some((tenant, id))
}
