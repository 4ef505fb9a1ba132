//! `tresor.v1.KeyAdminService` (role `officer`): keys, versions, destruction requests and their
//! approvals.

use tonic::{Request, Response, Status};

use super::convert::{approval_message, key_message, labels};
use super::{Api, DEFAULT_PAGE_SIZE, Done, MAX_PAGE_SIZE, custody, done, invalid, status};
use crate::auth::Role;
use crate::custody::{KeyInfo, KeyUpdate};
use crate::model::{KeyUsage, Tenant};
use crate::proto;
use crate::proto::key_admin_service_server::KeyAdminService;

/// A key as answered, recorded under its primary version.
pub(super) fn key_done(k: KeyInfo) -> Done<proto::Key> {
    let primary = k.name.version(k.primary_version);
    done(key_message(k), primary)
}

#[tonic::async_trait]
impl KeyAdminService for Api {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "CreateKey").await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            let out = self
                .custody
                .create_key(&call.grant, key, &r.description, labels(r.labels))
                .await;
            custody(call, out, key_done)
        })
        .await
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "GetKey").await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            let out = match self.custody.refresh_if_stale(key).await {
                Ok(()) => self.custody.get_key(&call.grant, key),
                Err(e) => Err(e),
            };
            custody(call, out, key_done)
        })
        .await
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let call = self.begin(&request, Role::Officer, "ListKeys").await?;
        let r = request.into_inner();
        let result = (|| {
            if !r.tenant.is_empty() {
                let tenant =
                    Tenant::new(&r.tenant).map_err(|e| invalid(&call, &format!("tenant: {e}")))?;
                call.grant
                    .check_tenant(&tenant)
                    .map_err(|e| status::denied(&e, &call.request_id))?;
            }
            let page_size = match r.page_size as usize {
                0 => DEFAULT_PAGE_SIZE,
                n if n <= MAX_PAGE_SIZE => n,
                _ => {
                    return Err(invalid(
                        &call,
                        &format!("page_size: at most {MAX_PAGE_SIZE}"),
                    ));
                }
            };
            let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
            let mut keys = self
                .custody
                .list_keys(&call.grant, after, page_size + 1)
                .map_err(|e| call.fail(&e))?;
            let next_page_token = if keys.len() > page_size {
                keys.truncate(page_size);
                keys.last()
                    .map(|k| k.name.key().to_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok(done(
                proto::ListKeysResponse {
                    keys: keys.into_iter().map(key_message).collect(),
                    next_page_token,
                },
                "",
            ))
        })();
        self.finish(call, result, "", &[]).await
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "RotateKey").await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            custody(
                call,
                self.custody.rotate_key(&call.grant, key).await,
                key_done,
            )
        })
        .await
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "UpdateKey").await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            if r.rotation_period
                .as_ref()
                .is_some_and(|d| d.seconds <= 0 || d.nanos != 0)
            {
                return Err(invalid(
                    call,
                    "rotation_period: a whole number of seconds, at least one hour",
                ));
            }
            let usage = match proto::KeyUsage::try_from(r.usage) {
                Ok(proto::KeyUsage::Unspecified) => None,
                Ok(proto::KeyUsage::EncryptDecrypt) => Some(KeyUsage::EncryptDecrypt),
                Ok(proto::KeyUsage::EncryptOnly) => Some(KeyUsage::EncryptOnly),
                Ok(proto::KeyUsage::DecryptOnly) => Some(KeyUsage::DecryptOnly),
                Ok(proto::KeyUsage::NoUse) => Some(KeyUsage::None),
                Err(_) => return Err(invalid(call, "usage: not a known KeyUsage value")),
            };
            let update = KeyUpdate {
                description: r.description,
                labels: r.update_labels.then(|| labels(r.labels)),
                rotation_period_ms: if r.clear_rotation_period {
                    Some(None)
                } else {
                    r.rotation_period
                        .map(|d| Some(d.seconds.saturating_mul(1000)))
                },
                min_decryption_version: (r.min_decryption_version > 0)
                    .then_some(r.min_decryption_version),
                usage,
            };
            let out = self.custody.update_key(&call.grant, key, update).await;
            custody(call, out, key_done)
        })
        .await
    }

    async fn enable_key_version(
        &self,
        request: Request<proto::KeyVersionRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self
            .begin(&request, Role::Officer, "EnableKeyVersion")
            .await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            let out = self
                .custody
                .enable_version(&call.grant, key, r.version)
                .await;
            custody(call, out, |k| done(key_message(k), key.version(r.version)))
        })
        .await
    }

    async fn disable_key_version(
        &self,
        request: Request<proto::KeyVersionRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self
            .begin(&request, Role::Officer, "DisableKeyVersion")
            .await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            let out = self
                .custody
                .disable_version(&call.grant, key, r.version)
                .await;
            custody(call, out, |k| done(key_message(k), key.version(r.version)))
        })
        .await
    }

    async fn schedule_key_version_destruction(
        &self,
        request: Request<proto::ScheduleKeyVersionDestructionRequest>,
    ) -> Result<Response<proto::Approval>, Status> {
        let call = self
            .begin(&request, Role::Officer, "ScheduleKeyVersionDestruction")
            .await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            let out = self
                .custody
                .request_destruction(&call.grant, key, r.version)
                .await;
            custody(call, out, |a| {
                done(approval_message(a), key.version(r.version))
            })
        })
        .await
    }

    async fn cancel_key_version_destruction(
        &self,
        request: Request<proto::KeyVersionRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self
            .begin(&request, Role::Officer, "CancelKeyVersionDestruction")
            .await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &[], async |call, key| {
            let out = self
                .custody
                .cancel_destruction(&call.grant, key, r.version)
                .await;
            custody(call, out, |k| done(key_message(k), key.version(r.version)))
        })
        .await
    }

    async fn list_approvals(
        &self,
        request: Request<proto::ListApprovalsRequest>,
    ) -> Result<Response<proto::ListApprovalsResponse>, Status> {
        let call = self.begin(&request, Role::Officer, "ListApprovals").await?;
        let out = self.custody.list_approvals(&call.grant).await;
        let result = custody(&call, out, |list| {
            done(
                proto::ListApprovalsResponse {
                    approvals: list.into_iter().map(approval_message).collect(),
                },
                "",
            )
        });
        self.finish(call, result, "", &[]).await
    }

    async fn approve(
        &self,
        request: Request<proto::ApprovalRequest>,
    ) -> Result<Response<proto::Approval>, Status> {
        let call = self.begin(&request, Role::Officer, "Approve").await?;
        let out = self
            .custody
            .approve(&call.grant, &request.get_ref().id)
            .await;
        // The record names what was decided: a key version, a managed object or a window.
        let result = custody(&call, out, |a| {
            let m = approval_message(a);
            let v = m.key_version.clone();
            done(m, v)
        });
        self.finish(call, result, "", &[]).await
    }

    async fn reject(
        &self,
        request: Request<proto::ApprovalRequest>,
    ) -> Result<Response<proto::Approval>, Status> {
        let call = self.begin(&request, Role::Officer, "Reject").await?;
        let out = self
            .custody
            .reject(&call.grant, &request.get_ref().id)
            .await;
        // The record names what was decided: a key version, a managed object or a window.
        let result = custody(&call, out, |a| {
            let m = approval_message(a);
            let v = m.key_version.clone();
            done(m, v)
        });
        self.finish(call, result, "", &[]).await
    }
}
