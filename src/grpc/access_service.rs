//! `tresor.v1.AccessService` (role `officer`): break-glass access windows. A window opens only
//! when a second officer approves it with `KeyAdminService.Approve` (the approval has the
//! window's id); custody decides everything else.

use tonic::{Request, Response, Status};

use super::convert::timestamp;
use super::{Api, custody, done, invalid, status};
use crate::auth::Role;
use crate::custody::{WindowInfo, WindowRequest};
use crate::model::Tenant;
use crate::proto;
use crate::proto::access_service_server::AccessService;

fn window_message(w: WindowInfo) -> proto::AccessWindow {
    proto::AccessWindow {
        id: w.id,
        tenant: w.tenant,
        identity: w.identity,
        key_pattern: w.key_pattern,
        reason: Some(proto::Justification {
            code: w.reason,
            reference: w.reference,
        }),
        duration: Some(prost_types::Duration {
            seconds: w.duration_ms / 1000,
            nanos: 0,
        }),
        requested_by: w.requested_by,
        requested_at: Some(timestamp(w.requested_at)),
        state: w.state.as_str().into(),
        approved_by: w.approved_by,
        opened_at: w.opened_at.map(timestamp),
        expires_at: w.expires_at.map(timestamp),
        closed_by: w.closed_by,
        closed_at: w.closed_at.map(timestamp),
    }
}

/// The audit record's key of a window.
fn window_key(tenant: &Tenant, id: &str) -> String {
    format!("tenants/{}/windows/{id}", tenant.as_str())
}

impl Api {
    /// Refuses a request naming another tenant than the officer's.
    fn own_tenant(&self, call: &super::Call, tenant: &str) -> Result<(), Status> {
        if tenant.is_empty() {
            return Ok(());
        }
        let tenant = tenant.strip_prefix("tenants/").unwrap_or(tenant);
        let tenant = Tenant::new(tenant).map_err(|e| invalid(call, &format!("tenant: {e}")))?;
        call.grant
            .check_tenant(&tenant)
            .map_err(|e| status::denied(&e, &call.request_id))
    }
}

#[tonic::async_trait]
impl AccessService for Api {
    async fn request_access_window(
        &self,
        request: Request<proto::RequestAccessWindowRequest>,
    ) -> Result<Response<proto::AccessWindow>, Status> {
        let call = self
            .begin(&request, Role::Officer, "RequestAccessWindow")
            .await?;
        let r = request.into_inner();
        let result = async {
            self.own_tenant(&call, &r.tenant)?;
            let duration_ms = match &r.duration {
                Some(d) if d.seconds > 0 && d.nanos == 0 => d.seconds.saturating_mul(1000),
                _ => return Err(invalid(&call, "duration: give a whole number of seconds")),
            };
            let reason = r.reason.clone().unwrap_or_default();
            let out = self
                .custody
                .request_window(
                    &call.grant,
                    WindowRequest {
                        identity: r.identity.clone(),
                        key_pattern: r.key_pattern.clone(),
                        reason: reason.code,
                        reference: reason.reference,
                        duration_ms,
                    },
                )
                .await;
            custody(&call, out, |w| done(window_message(w), ""))
        }
        .await;
        let key = match &result {
            Ok(d) => window_key(call.grant.tenant(), &d.response.id),
            Err(_) => String::new(),
        };
        self.finish(call, result, &key, &[]).await
    }

    async fn list_access_windows(
        &self,
        request: Request<proto::ListAccessWindowsRequest>,
    ) -> Result<Response<proto::ListAccessWindowsResponse>, Status> {
        let call = self
            .begin(&request, Role::Officer, "ListAccessWindows")
            .await?;
        let r = request.into_inner();
        let result = async {
            self.own_tenant(&call, &r.tenant)?;
            let out = self.custody.list_windows(&call.grant).await;
            custody(&call, out, |ws| {
                done(
                    proto::ListAccessWindowsResponse {
                        windows: ws.into_iter().map(window_message).collect(),
                    },
                    "",
                )
            })
        }
        .await;
        self.finish(call, result, "", &[]).await
    }

    async fn close_access_window(
        &self,
        request: Request<proto::CloseAccessWindowRequest>,
    ) -> Result<Response<proto::AccessWindow>, Status> {
        let call = self
            .begin(&request, Role::Officer, "CloseAccessWindow")
            .await?;
        let id = request.into_inner().id;
        let key = window_key(call.grant.tenant(), &id);
        let out = self.custody.close_window(&call.grant, &id).await;
        let result = custody(&call, out, |w| done(window_message(w), ""));
        self.finish(call, result, &key, &[]).await
    }
}
