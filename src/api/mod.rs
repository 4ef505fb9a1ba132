//! The gRPC front-end: tonic services, request validation, status mapping.
//!
//! Owns turning requests into custody calls and custody results into responses. Every RPC
//! starts with [`Api::begin`], which bounds concurrency, authenticates the caller from its
//! verified certificate, and asks the policy for a [`Grant`] of the RPC's role; custody then
//! requires that grant. No crypto and no SQL here.

pub mod server;
mod status;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use crate::auth::{ClientAuthenticator, Grant, Role, SharedPolicy};
use crate::custody::{Custody, CustodyError, KeyInfo, VersionInfo};
use crate::model::{KeyName, Millis, Tenant, VersionState};
pub use status::INVALID_CIPHERTEXT;

/// Generated protobuf and gRPC code for `tresor.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod proto {
    tonic::include_proto!("tresor.v1");

    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tresor_descriptor");
}

use proto::audit_service_server::AuditService;
use proto::key_admin_service_server::KeyAdminService;
use proto::key_service_server::KeyService;

/// Largest request accepted: 64 KiB of plaintext or ciphertext plus 64 KiB of AAD, plus framing.
pub const MAX_REQUEST_BYTES: usize = 2 * 64 * 1024 + 4096;
/// Default and largest page of `ListKeys`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// The services, sharing one custody core, authenticator and policy.
#[derive(Clone)]
pub struct Api {
    custody: Custody,
    authenticator: ClientAuthenticator,
    policy: Arc<SharedPolicy>,
    /// Requests being served; `try_acquire` so that overload is refused at once
    /// (`RESOURCE_EXHAUSTED`) instead of queueing without bound.
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("custody", &self.custody)
            .finish_non_exhaustive()
    }
}

/// One admitted, authenticated and authorized call.
struct Call {
    request_id: String,
    grant: Grant,
    operation: &'static str,
    _admitted: OwnedSemaphorePermit,
}

impl Call {
    fn fail(&self, e: CustodyError) -> Status {
        let s = status::from_custody(&e, &self.request_id);
        match s.code() {
            Code::Unavailable | Code::Internal | Code::DataLoss => tracing::error!(
                request_id = %self.request_id, caller = %self.grant.identity(), op = self.operation, error = %e, "request failed"),
            _ => tracing::info!(
                request_id = %self.request_id, caller = %self.grant.identity(), op = self.operation, error = %e, "request refused"),
        }
        s
    }

    fn ok<T>(&self, message: T) -> Response<T> {
        let mut r = Response::new(message);
        if let Ok(v) = self.request_id.parse() {
            r.metadata_mut().insert("x-request-id", v);
        }
        r
    }

    fn unimplemented(&self, what: &str) -> Status {
        status::status(Code::Unimplemented, what, &self.request_id)
    }
}

impl Api {
    /// Builds the services.
    pub fn new(
        custody: Custody,
        authenticator: ClientAuthenticator,
        policy: Arc<SharedPolicy>,
        max_concurrent_requests: usize,
    ) -> Self {
        Self {
            custody,
            authenticator,
            policy,
            in_flight: Arc::new(Semaphore::new(max_concurrent_requests)),
        }
    }

    /// Admits, authenticates and authorizes a call for `role`.
    fn begin<T>(
        &self,
        request: &Request<T>,
        role: Role,
        operation: &'static str,
    ) -> Result<Call, Status> {
        let request_id = new_request_id();
        let admitted = Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| {
                status::status(
                    Code::ResourceExhausted,
                    "the server is at its request limit; retry with backoff",
                    &request_id,
                )
            })?;
        let peer = request.remote_addr();
        let certs = request.peer_certs();
        let identity = self.authenticator.identify(certs.as_deref().map(Vec::as_slice)).map_err(|e| {
            tracing::info!(request_id = %request_id, op = operation, peer = ?peer, error = %e, "unauthenticated call");
            status::unauthenticated(&e, &request_id)
        })?;
        let grant = self.policy.current().grant(&identity, role).map_err(|e| {
            tracing::info!(request_id = %request_id, op = operation, caller = %identity.name, error = %e, "call denied");
            status::denied(&e, &request_id)
        })?;
        Ok(Call {
            request_id,
            grant,
            operation,
            _admitted: admitted,
        })
    }
}

fn new_request_id() -> String {
    let mut raw = [0u8; 8];
    // A request id needs uniqueness, not secrecy; fall back to the clock if the RNG fails.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
        raw = crate::model::now_millis().to_be_bytes();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn invalid(call: &Call, message: &str) -> Status {
    status::status(Code::InvalidArgument, message, &call.request_id)
}

fn key_name(call: &Call, field: &str, value: &str) -> Result<KeyName, Status> {
    value
        .parse()
        .map_err(|e| invalid(call, &format!("{field}: {e}")))
}

fn optional_key_name(call: &Call, field: &str, value: &str) -> Result<Option<KeyName>, Status> {
    if value.is_empty() {
        Ok(None)
    } else {
        key_name(call, field, value).map(Some)
    }
}

fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn version_state(s: VersionState) -> proto::KeyVersionState {
    match s {
        VersionState::Enabled => proto::KeyVersionState::Enabled,
        VersionState::Disabled => proto::KeyVersionState::Disabled,
        VersionState::DestroyScheduled => proto::KeyVersionState::DestroyScheduled,
        VersionState::Destroyed => proto::KeyVersionState::Destroyed,
    }
}

fn key_message(k: KeyInfo) -> proto::Key {
    proto::Key {
        name: k.name.to_string(),
        description: k.description,
        labels: k.labels.into_iter().collect(),
        create_time: Some(timestamp(k.created_at)),
        update_time: Some(timestamp(k.updated_at)),
        primary_version: k.primary_version,
        versions: k.versions.into_iter().map(version_message).collect(),
        rotation_period: None,
    }
}

fn version_message(v: VersionInfo) -> proto::KeyVersion {
    proto::KeyVersion {
        name: v.name,
        version: v.number,
        state: version_state(v.state).into(),
        primary: v.primary,
        create_time: Some(timestamp(v.created_at)),
        state_change_time: Some(timestamp(v.state_changed_at)),
        destroy_time: v.destroy_at.map(timestamp),
        destroyed_time: v.destroyed_at.map(timestamp),
        lost_time: v.lost_at.map(timestamp),
        wraps_at_most: v.wraps_at_most,
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

#[tonic::async_trait]
impl KeyService for Api {
    async fn wrap(
        &self,
        request: Request<proto::WrapRequest>,
    ) -> Result<Response<proto::WrapResponse>, Status> {
        let call = self.begin(&request, Role::Service, "Wrap")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        let wrapped = self
            .custody
            .wrap(&call.grant, &key, Zeroizing::new(r.plaintext), &r.aad)
            .await
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(proto::WrapResponse {
            ciphertext: wrapped.ciphertext,
            key_version: wrapped.key_version,
        }))
    }

    async fn unwrap(
        &self,
        request: Request<proto::UnwrapRequest>,
    ) -> Result<Response<proto::UnwrapResponse>, Status> {
        let call = self.begin(&request, Role::Service, "Unwrap")?;
        let r = request.into_inner();
        let expected = optional_key_name(&call, "key", &r.key)?;
        let mut out = self
            .custody
            .unwrap(&call.grant, &r.ciphertext, &r.aad, expected.as_ref())
            .await
            .map_err(|e| call.fail(e))?;
        // The response must own the bytes; what tonic does with them after encoding is out of
        // our hands (SECURITY.md).
        let plaintext = std::mem::take(&mut *out.plaintext);
        Ok(call.ok(proto::UnwrapResponse {
            plaintext,
            key_version: out.key_version,
        }))
    }

    async fn generate_data_key(
        &self,
        request: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        let call = self.begin(&request, Role::Service, "GenerateDataKey")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        let len = if r.length_bytes == 0 {
            32
        } else {
            r.length_bytes as usize
        };
        let mut dk = self
            .custody
            .generate_data_key(&call.grant, &key, &r.aad, len, !r.without_plaintext)
            .await
            .map_err(|e| call.fail(e))?;
        let plaintext = dk
            .plaintext
            .as_mut()
            .map(|p| std::mem::take(&mut **p))
            .unwrap_or_default();
        Ok(call.ok(proto::GenerateDataKeyResponse {
            plaintext,
            ciphertext: dk.ciphertext,
            key_version: dk.key_version,
        }))
    }

    async fn rewrap(
        &self,
        request: Request<proto::RewrapRequest>,
    ) -> Result<Response<proto::RewrapResponse>, Status> {
        let call = self.begin(&request, Role::Service, "Rewrap")?;
        let r = request.into_inner();
        let expected = optional_key_name(&call, "key", &r.key)?;
        let out = self
            .custody
            .rewrap(&call.grant, &r.ciphertext, &r.aad, expected.as_ref())
            .await
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(proto::RewrapResponse {
            ciphertext: out.ciphertext,
            key_version: out.key_version,
            rewrapped: out.rewrapped,
        }))
    }
}

#[tonic::async_trait]
impl KeyAdminService for Api {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "CreateKey")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        let info = self
            .custody
            .create_key(&call.grant, &key, &r.description, labels(r.labels))
            .await
            .map_err(|e| call.fail(e))?;
        tracing::info!(request_id = %call.request_id, caller = %call.grant.identity(), key = %key, "key created");
        Ok(call.ok(key_message(info)))
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "GetKey")?;
        let key = key_name(&call, "key", &request.get_ref().key)?;
        let info = self
            .custody
            .get_key(&call.grant, &key)
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(key_message(info)))
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let call = self.begin(&request, Role::Officer, "ListKeys")?;
        let r = request.into_inner();
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
            .map_err(|e| call.fail(e))?;
        let next_page_token = if keys.len() > page_size {
            keys.truncate(page_size);
            keys.last()
                .map(|k| k.name.key().to_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(call.ok(proto::ListKeysResponse {
            keys: keys.into_iter().map(key_message).collect(),
            next_page_token,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "RotateKey")?;
        let key = key_name(&call, "key", &request.get_ref().key)?;
        let info = self
            .custody
            .rotate_key(&call.grant, &key)
            .await
            .map_err(|e| call.fail(e))?;
        tracing::info!(request_id = %call.request_id, caller = %call.grant.identity(), key = %key, version = info.primary_version, "key rotated");
        Ok(call.ok(key_message(info)))
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "UpdateKey")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        if r.rotation_period.is_some() {
            return Err(call.unimplemented(
                "automatic rotation is not built yet (it arrives with the key-lifecycle work); leave rotation_period unset",
            ));
        }
        let new_labels = r.update_labels.then(|| labels(r.labels));
        let info = self
            .custody
            .update_key(&call.grant, &key, r.description, new_labels)
            .await
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(key_message(info)))
    }

    async fn enable_key_version(
        &self,
        request: Request<proto::KeyVersionRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "EnableKeyVersion")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        let info = self
            .custody
            .enable_version(&call.grant, &key, r.version)
            .await
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(key_message(info)))
    }

    async fn disable_key_version(
        &self,
        request: Request<proto::KeyVersionRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "DisableKeyVersion")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        let info = self
            .custody
            .disable_version(&call.grant, &key, r.version)
            .await
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(key_message(info)))
    }

    async fn schedule_key_version_destruction(
        &self,
        request: Request<proto::ScheduleKeyVersionDestructionRequest>,
    ) -> Result<Response<proto::Approval>, Status> {
        let call = self.begin(&request, Role::Officer, "ScheduleKeyVersionDestruction")?;
        Err(call.unimplemented(FOUR_EYES_PENDING))
    }

    async fn cancel_key_version_destruction(
        &self,
        request: Request<proto::KeyVersionRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let call = self.begin(&request, Role::Officer, "CancelKeyVersionDestruction")?;
        let r = request.into_inner();
        let key = key_name(&call, "key", &r.key)?;
        let info = self
            .custody
            .cancel_destruction(&call.grant, &key, r.version)
            .await
            .map_err(|e| call.fail(e))?;
        Ok(call.ok(key_message(info)))
    }

    async fn list_approvals(
        &self,
        request: Request<proto::ListApprovalsRequest>,
    ) -> Result<Response<proto::ListApprovalsResponse>, Status> {
        let call = self.begin(&request, Role::Officer, "ListApprovals")?;
        Err(call.unimplemented(FOUR_EYES_PENDING))
    }

    async fn approve(
        &self,
        request: Request<proto::ApprovalRequest>,
    ) -> Result<Response<proto::Approval>, Status> {
        let call = self.begin(&request, Role::Officer, "Approve")?;
        Err(call.unimplemented(FOUR_EYES_PENDING))
    }

    async fn reject(
        &self,
        request: Request<proto::ApprovalRequest>,
    ) -> Result<Response<proto::Approval>, Status> {
        let call = self.begin(&request, Role::Officer, "Reject")?;
        Err(call.unimplemented(FOUR_EYES_PENDING))
    }
}

const FOUR_EYES_PENDING: &str = "destruction with four-eyes approval is not built yet (it arrives with the key-lifecycle work); disable the version instead";

const AUDIT_PENDING: &str = "the audit log is not built yet (it arrives with the audit-log work)";

#[tonic::async_trait]
impl AuditService for Api {
    type ExportAuditLogStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::AuditRecord, Status>>;

    async fn export_audit_log(
        &self,
        request: Request<proto::ExportAuditLogRequest>,
    ) -> Result<Response<Self::ExportAuditLogStream>, Status> {
        let call = self.begin(&request, Role::Auditor, "ExportAuditLog")?;
        Err(call.unimplemented(AUDIT_PENDING))
    }

    async fn get_audit_checkpoint(
        &self,
        request: Request<proto::GetAuditCheckpointRequest>,
    ) -> Result<Response<proto::AuditCheckpoint>, Status> {
        let call = self.begin(&request, Role::Auditor, "GetAuditCheckpoint")?;
        Err(call.unimplemented(AUDIT_PENDING))
    }

    async fn get_audit_public_key(
        &self,
        request: Request<proto::GetAuditPublicKeyRequest>,
    ) -> Result<Response<proto::AuditPublicKey>, Status> {
        let call = self.begin(&request, Role::Auditor, "GetAuditPublicKey")?;
        Err(call.unimplemented(AUDIT_PENDING))
    }
}
