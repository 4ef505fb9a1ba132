//! The gRPC front-end: tonic services, request validation, status mapping.
//!
//! Owns turning requests into custody calls and custody results into responses. Every RPC
//! starts with [`Api::begin`], which bounds concurrency, authenticates the caller from its
//! verified certificate, and asks the policy for a [`Grant`] of the RPC's role; custody then
//! requires that grant. Every RPC ends with [`Api::finish`] (or a refusal inside `begin`),
//! which appends the call's audit record and waits until it is durable before anything —
//! least of all a plaintext — goes back to the caller. No crypto and no SQL here.

mod serve;
mod status;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use crate::audit::{AuditLog, ExportFilter};
use crate::audit_record::{Checkpoint, ExportItem, RecordBody};
use crate::auth::{AuthError, ClientAuthenticator, Grant, Role, SharedPolicy};
use crate::custody::{
    ApprovalInfo, ApprovalState, Custody, CustodyError, KeyInfo, KeyUpdate, VersionInfo,
};
use crate::model::{KeyName, KeyUsage, Millis, Tenant, VersionState};
pub use serve::{ALPN, ServeError, serve};
pub use status::INVALID_CIPHERTEXT;

use crate::proto;
use proto::audit_service_server::AuditService;
use proto::key_admin_service_server::KeyAdminService;
use proto::key_service_server::KeyService;

/// Default and largest page of `ListKeys`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

/// The services, sharing one custody core, authenticator and policy.
#[derive(Clone)]
pub struct Api {
    custody: Custody,
    audit: AuditLog,
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
    role: Role,
    peer: String,
    fingerprint: String,
    /// When the call was admitted, for the latency metric.
    started: std::time::Instant,
    _admitted: OwnedSemaphorePermit,
}

/// A call being admitted: what its audit record needs if it is refused.
struct Admission<'a> {
    request_id: &'a str,
    role: Role,
    operation: &'static str,
    peer: &'a str,
    started: std::time::Instant,
}

/// What a successful call returns, and what its audit record says it touched.
struct Done<T> {
    response: T,
    key_version: String,
}

fn done<T>(response: T, key_version: impl Into<String>) -> Done<T> {
    Done {
        response,
        key_version: key_version.into(),
    }
}

/// `tenants/t/keys/k` of `tenants/t/keys/k/versions/n`.
fn key_of(key_version: &str) -> &str {
    key_version
        .split_once("/versions/")
        .map_or(key_version, |(k, _)| k)
}

impl Call {
    fn fail(&self, e: &CustodyError) -> Status {
        let s = status::from_custody(e, &self.request_id);
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
}

fn outcome(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::PermissionDenied => "DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        _ => "FAILED",
    }
}

impl Api {
    /// Builds the services.
    pub fn new(
        custody: Custody,
        audit: AuditLog,
        authenticator: ClientAuthenticator,
        policy: Arc<SharedPolicy>,
        max_concurrent_requests: usize,
    ) -> Self {
        Self {
            custody,
            audit,
            authenticator,
            policy,
            in_flight: Arc::new(Semaphore::new(max_concurrent_requests)),
        }
    }

    /// The same services with auditing replaced by a no-op (benchmark builds only).
    #[cfg(feature = "bench-unaudited")]
    pub(crate) fn unaudited_for_benchmarks(mut self) -> Self {
        self.audit = self.audit.unaudited_for_benchmarks();
        self
    }

    /// Appends a refusal's audit record, then returns the refusal (or `UNAVAILABLE` if the record
    /// could not be made durable). The record is only built here, so an admitted call builds
    /// none of it.
    async fn refuse(
        &self,
        call: &Admission<'_>,
        refusal: Status,
        tenant: &str,
        caller: &str,
        fingerprint: &str,
    ) -> Status {
        let body = RecordBody {
            request_id: call.request_id.to_owned(),
            caller: caller.to_owned(),
            fingerprint: fingerprint.to_owned(),
            role: call.role.to_string(),
            operation: call.operation.to_owned(),
            outcome: outcome(refusal.code()).into(),
            status_code: refusal.code() as i32,
            peer: call.peer.to_owned(),
            ..Default::default()
        };
        let answer = match self.audit.append(tenant, body).await {
            Ok(_) => refusal,
            Err(e) => {
                tracing::error!(request_id = %call.request_id, error = %e, "audit record failed; answering UNAVAILABLE");
                status::status(
                    Code::Unavailable,
                    "the audit log is unavailable; retry later",
                    call.request_id,
                )
            }
        };
        crate::metrics::global().request(
            call.operation,
            status::code_label(answer.code()),
            call.started.elapsed(),
        );
        answer
    }

    /// Admits, authenticates and authorizes a call for `role`; a refusal is audited here.
    async fn begin<T>(
        &self,
        request: &Request<T>,
        role: Role,
        operation: &'static str,
    ) -> Result<Call, Status> {
        let started = std::time::Instant::now();
        let request_id = crate::audit::new_request_id();
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let admission = Admission {
            request_id: &request_id,
            role,
            operation,
            peer: &peer,
            started,
        };
        let Ok(admitted) = Arc::clone(&self.in_flight).try_acquire_owned() else {
            let s = status::status(
                Code::ResourceExhausted,
                "the server is at its request limit; retry with backoff",
                &request_id,
            );
            return Err(self.refuse(&admission, s, "", "", "").await);
        };
        let certs = request.peer_certs();
        let identity = match self
            .authenticator
            .identify(certs.as_deref().map(Vec::as_slice))
        {
            Ok(identity) => identity,
            Err(e) => {
                tracing::info!(request_id = %request_id, op = operation, peer = %peer, error = %e, "unauthenticated call");
                let fingerprint = match &e {
                    AuthError::Rejected { fingerprint, .. } => fingerprint.as_str(),
                    _ => "",
                };
                let s = status::unauthenticated(&e, &request_id);
                drop(admitted);
                return Err(self.refuse(&admission, s, "", "", fingerprint).await);
            }
        };
        let policy = self.policy.current();
        let grant = match policy.grant(&identity, role) {
            Ok(grant) => grant,
            Err(e) => {
                let tenant = policy
                    .tenant_of(&identity)
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default();
                tracing::info!(request_id = %request_id, op = operation, caller = %identity.name, error = %e, "call denied");
                let s = status::denied(&e, &request_id);
                return Err(self
                    .refuse(
                        &admission,
                        s,
                        &tenant,
                        &identity.name,
                        &identity.fingerprint,
                    )
                    .await);
            }
        };
        Ok(Call {
            request_id,
            grant,
            operation,
            role,
            peer,
            fingerprint: identity.fingerprint,
            started,
            _admitted: admitted,
        })
    }

    /// Audits the call's outcome and, once the record is durable, answers. `key` is the key the
    /// request named (if any); `aad` is recorded as an HMAC.
    async fn finish<T>(
        &self,
        call: Call,
        result: Result<Done<T>, Status>,
        key: &str,
        aad: &[u8],
    ) -> Result<Response<T>, Status> {
        let aad_hmac = self.audit.hmac_aad(aad);
        self.record(call, result, key, aad_hmac).await
    }

    /// [`Api::finish`] with the AAD's HMAC already computed.
    async fn record<T>(
        &self,
        call: Call,
        result: Result<Done<T>, Status>,
        key: &str,
        aad_hmac: String,
    ) -> Result<Response<T>, Status> {
        let (code, key_version) = match &result {
            Ok(d) => (Code::Ok, d.key_version.clone()),
            Err(s) => (s.code(), String::new()),
        };
        let key = if key_version.is_empty() {
            key.to_owned()
        } else {
            key_of(&key_version).to_owned()
        };
        let body = RecordBody {
            request_id: call.request_id.clone(),
            caller: call.grant.identity().to_owned(),
            fingerprint: call.fingerprint.clone(),
            role: call.role.to_string(),
            operation: call.operation.to_owned(),
            key,
            key_version,
            outcome: outcome(code).into(),
            status_code: code as i32,
            peer: call.peer.clone(),
            aad_hmac,
            // Stamped by the audit writer.
            node: String::new(),
            ..RecordBody::default()
        };
        let answer = match self.audit.append(call.grant.tenant().as_str(), body).await {
            Ok(_) => result.map(|d| call.ok(d.response)),
            Err(e) => {
                tracing::error!(request_id = %call.request_id, error = %e, "audit record failed; the result is withheld");
                Err(status::status(
                    Code::Unavailable,
                    "the audit log is unavailable; retry later",
                    &call.request_id,
                ))
            }
        };
        let code = answer.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        crate::metrics::global().request(
            call.operation,
            status::code_label(code),
            call.started.elapsed(),
        );
        answer
    }
}

impl Api {
    /// The shape of every call about one key: parse the request's key name, run `op`, audit.
    async fn keyed<T>(
        &self,
        call: Call,
        raw_key: &str,
        aad: &[u8],
        op: impl AsyncFnOnce(&Call, &KeyName) -> Result<Done<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let result = match key_name(&call, "key", raw_key) {
            Ok(key) => op(&call, &key).await,
            Err(s) => Err(s),
        };
        self.finish(call, result, raw_key, aad).await
    }

    /// [`Api::keyed`] for calls whose key is optional: the blob names it, the request may pin it.
    async fn optionally_keyed<T>(
        &self,
        call: Call,
        raw_key: &str,
        aad: &[u8],
        op: impl AsyncFnOnce(&Call, Option<&KeyName>) -> Result<Done<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let result = match optional_key_name(&call, "key", raw_key) {
            Ok(key) => op(&call, key.as_ref()).await,
            Err(s) => Err(s),
        };
        self.finish(call, result, raw_key, aad).await
    }
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

fn millis(t: &prost_types::Timestamp) -> Millis {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000))
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
        rotation_period: k.rotation_period_ms.map(|ms| prost_types::Duration {
            seconds: ms / 1000,
            nanos: 0,
        }),
        next_rotation_time: k.next_rotation_at.map(timestamp),
        min_decryption_version: k.min_decryption_version,
        usage: usage_message(k.usage).into(),
    }
}

fn usage_message(u: KeyUsage) -> proto::KeyUsage {
    match u {
        KeyUsage::EncryptDecrypt => proto::KeyUsage::EncryptDecrypt,
        KeyUsage::EncryptOnly => proto::KeyUsage::EncryptOnly,
        KeyUsage::DecryptOnly => proto::KeyUsage::DecryptOnly,
        KeyUsage::None => proto::KeyUsage::NoUse,
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

fn checkpoint_message(c: &Checkpoint) -> proto::AuditCheckpoint {
    proto::AuditCheckpoint {
        sequence: c.seq,
        chain_hash: c.hash.to_vec(),
        time: Some(timestamp(c.time_ms)),
        signature: c.signature.clone(),
        time_ms: c.time_ms,
    }
}

/// The wire form of one export item.
fn export_message(item: ExportItem) -> proto::AuditRecord {
    match item {
        ExportItem::Record(r) => proto::AuditRecord {
            sequence: r.seq,
            time: Some(timestamp(r.time_ms)),
            time_ms: r.time_ms,
            request_id: r.body.request_id,
            caller: r.body.caller,
            tenant: r.tenant,
            role: r.body.role,
            operation: r.body.operation,
            key_version: r.body.key_version,
            outcome: r.body.outcome,
            status_code: r.body.status_code,
            peer: r.body.peer,
            aad_hmac: r.body.aad_hmac,
            node: r.body.node,
            kms_request_id: r.body.kms_request_id,
            kms_operation: r.body.kms_operation,
            aws_principal_arn: r.body.aws_principal_arn,
            kms_key_arn: r.body.kms_key_arn,
            previous_hash: r.prev_hash.to_vec(),
            key: r.body.key,
            certificate_fingerprint: r.body.fingerprint,
            kind: proto::AuditItemKind::Record.into(),
            ..Default::default()
        },
        ExportItem::Withheld {
            seq,
            prev_hash,
            time_ms,
            tenant,
            body_digest,
        } => proto::AuditRecord {
            sequence: seq,
            time: Some(timestamp(time_ms)),
            time_ms,
            tenant,
            previous_hash: prev_hash.to_vec(),
            body_digest: body_digest.to_vec(),
            kind: proto::AuditItemKind::Withheld.into(),
            ..Default::default()
        },
        ExportItem::Checkpoint(c) => proto::AuditRecord {
            sequence: c.seq,
            time: Some(timestamp(c.time_ms)),
            time_ms: c.time_ms,
            kind: proto::AuditItemKind::Checkpoint.into(),
            checkpoint: Some(checkpoint_message(&c)),
            ..Default::default()
        },
    }
}

fn approval_message(a: ApprovalInfo) -> proto::Approval {
    proto::Approval {
        id: a.id,
        operation: a.operation,
        key_version: a.key.version(a.version),
        requested_by: a.requested_by,
        state: match a.state {
            ApprovalState::Pending => proto::ApprovalState::Pending,
            ApprovalState::Approved => proto::ApprovalState::Approved,
            ApprovalState::Rejected => proto::ApprovalState::Rejected,
            ApprovalState::Expired => proto::ApprovalState::Expired,
        }
        .into(),
        create_time: Some(timestamp(a.requested_at)),
        expire_time: Some(timestamp(a.expires_at)),
        decided_by: a.decided_by,
        version: a.version,
        key: a.key.to_string(),
        destroy_time: a.destroy_at.map(timestamp),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

/// Maps a custody result for [`Api::finish`].
fn custody<T, U>(
    call: &Call,
    r: Result<T, CustodyError>,
    f: impl FnOnce(T) -> Done<U>,
) -> Result<Done<U>, Status> {
    r.map(f).map_err(|e| call.fail(&e))
}

#[tonic::async_trait]
impl KeyService for Api {
    async fn wrap(
        &self,
        request: Request<proto::WrapRequest>,
    ) -> Result<Response<proto::WrapResponse>, Status> {
        let call = self.begin(&request, Role::Service, "Wrap").await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &r.aad, async |call, key| {
            let out = self
                .custody
                .wrap(&call.grant, key, Zeroizing::new(r.plaintext), &r.aad)
                .await;
            custody(call, out, |w| {
                done(
                    proto::WrapResponse {
                        ciphertext: w.ciphertext,
                        key_version: w.key_version.clone(),
                    },
                    w.key_version,
                )
            })
        })
        .await
    }

    async fn unwrap(
        &self,
        request: Request<proto::UnwrapRequest>,
    ) -> Result<Response<proto::UnwrapResponse>, Status> {
        let call = self.begin(&request, Role::Service, "Unwrap").await?;
        let r = request.into_inner();
        self.optionally_keyed(call, &r.key, &r.aad, async |call, expected| {
            let out = self
                .custody
                .unwrap(&call.grant, &r.ciphertext, &r.aad, expected)
                .await;
            // The response must own the bytes; what tonic does with them after encoding is out
            // of our hands (SECURITY.md). If the audit record fails, this value is dropped unsent.
            custody(call, out, |mut u| {
                let plaintext = std::mem::take(&mut *u.plaintext);
                done(
                    proto::UnwrapResponse {
                        plaintext,
                        key_version: u.key_version.clone(),
                    },
                    u.key_version,
                )
            })
        })
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        let call = self
            .begin(&request, Role::Service, "GenerateDataKey")
            .await?;
        let r = request.into_inner();
        self.keyed(call, &r.key, &r.aad, async |call, key| {
            let len = if r.length_bytes == 0 {
                32
            } else {
                r.length_bytes as usize
            };
            let out = self
                .custody
                .generate_data_key(&call.grant, key, &r.aad, len, !r.without_plaintext)
                .await;
            custody(call, out, |mut dk| {
                let plaintext = dk
                    .plaintext
                    .as_mut()
                    .map(|p| std::mem::take(&mut **p))
                    .unwrap_or_default();
                let v = dk.key_version.clone();
                done(
                    proto::GenerateDataKeyResponse {
                        plaintext,
                        ciphertext: dk.ciphertext,
                        key_version: dk.key_version,
                    },
                    v,
                )
            })
        })
        .await
    }

    async fn rewrap(
        &self,
        request: Request<proto::RewrapRequest>,
    ) -> Result<Response<proto::RewrapResponse>, Status> {
        let call = self.begin(&request, Role::Service, "Rewrap").await?;
        let r = request.into_inner();
        self.optionally_keyed(call, &r.key, &r.aad, async |call, expected| {
            let out = self
                .custody
                .rewrap(&call.grant, &r.ciphertext, &r.aad, expected)
                .await;
            custody(call, out, |w| {
                let v = w.key_version.clone();
                done(
                    proto::RewrapResponse {
                        ciphertext: w.ciphertext,
                        key_version: w.key_version,
                        rewrapped: w.rewrapped,
                    },
                    v,
                )
            })
        })
        .await
    }
}

/// A key as answered, recorded under its primary version.
fn key_done(k: KeyInfo) -> Done<proto::Key> {
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
        let result = custody(&call, out, |a| {
            let v = a.key.version(a.version);
            done(approval_message(a), v)
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
        let result = custody(&call, out, |a| {
            let v = a.key.version(a.version);
            done(approval_message(a), v)
        });
        self.finish(call, result, "", &[]).await
    }
}

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
            let key = match optional_key_name(&call, "key", &r.key)? {
                Some(k) => {
                    call.grant
                        .check_key(&k)
                        .map_err(|e| status::denied(&e, &call.request_id))?;
                    Some(k.to_string())
                }
                None => None,
            };
            Ok(ExportFilter {
                tenant: call.grant.tenant().as_str().to_owned(),
                from_ms: r.from.as_ref().map_or(0, millis),
                to_ms: r.to.as_ref().map_or_else(crate::model::now_millis, millis),
                key,
                caller: (!r.caller.is_empty()).then(|| r.caller.clone()),
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
