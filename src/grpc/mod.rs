//! The gRPC front-end: tonic services, request validation, status mapping.
//!
//! Owns turning requests into custody calls and custody results into responses. Every RPC
//! starts with [`Api::begin`], which bounds concurrency, authenticates the caller from its
//! verified certificate, and asks the policy for a [`Grant`] of the RPC's role; custody then
//! requires that grant. Every RPC ends with [`Api::finish`] (or a refusal inside `begin`),
//! which appends the call's audit record and waits until it is durable before anything —
//! least of all a plaintext — goes back to the caller. No crypto and no SQL here.

mod access_service;
mod admin_service;
mod admit;
mod audit_service;
mod convert;
mod key_service;
mod object_service;
mod serve;
mod status;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Request, Response, Status};

use crate::audit::AuditLog;
use crate::audit_record::RecordBody;
use crate::auth::{AuthError, ClientAuthenticator, Grant, Role, SharedPolicy};
use crate::custody::{Custody, CustodyError};
use crate::model::KeyName;
pub use serve::{ALPN, ServeError, serve};
pub use status::INVALID_CIPHERTEXT;

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
    /// Zeroizes the secret a response carries (a plaintext, a data key) when the response is
    /// withheld because its audit record failed; once sent, the bytes are tonic's (SECURITY.md).
    wipe: Option<fn(&mut T)>,
}

fn done<T>(response: T, key_version: impl Into<String>) -> Done<T> {
    Done {
        response,
        key_version: key_version.into(),
        wipe: None,
    }
}

/// [`done`] for a response that carries a secret, wiped by `wipe` if it is withheld.
fn done_secret<T>(response: T, key_version: impl Into<String>, wipe: fn(&mut T)) -> Done<T> {
    Done {
        wipe: Some(wipe),
        ..done(response, key_version)
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
            _ => {
                if crate::refusal_log::admit() {
                    tracing::info!(request_id = %self.request_id, caller = %self.grant.identity(), op = self.operation, error = %e, "request refused");
                }
            }
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
        let answer = match self.audit.append_refusal(tenant, body).await {
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

    /// A concurrency permit, if one is free.
    fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.in_flight).try_acquire_owned().ok()
    }

    /// The audited `RESOURCE_EXHAUSTED` of a call refused for overload.
    async fn overloaded(&self, admission: &Admission<'_>) -> Status {
        let s = status::status(
            Code::ResourceExhausted,
            "the server is at its request limit; retry with backoff",
            admission.request_id,
        );
        self.refuse(admission, s, "", "", "").await
    }

    /// The audited `UNAUTHENTICATED` of a call whose certificate did not identify a caller.
    async fn unauthenticated(&self, admission: &Admission<'_>, e: &AuthError) -> Status {
        if crate::refusal_log::admit() {
            tracing::info!(request_id = %admission.request_id, op = admission.operation, peer = %admission.peer, error = %e, "unauthenticated call");
        }
        let fingerprint = match e {
            AuthError::Rejected { fingerprint, .. } => fingerprint.as_str(),
            _ => "",
        };
        let s = status::unauthenticated(e, admission.request_id);
        self.refuse(admission, s, "", "", fingerprint).await
    }

    /// The caller a connection's certificate chain identifies, for the admission layer: a call
    /// that would be refused `UNAUTHENTICATED` is refused before its message is read.
    fn identify(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'static>]>,
    ) -> Result<crate::auth::Identity, AuthError> {
        self.authenticator.identify(certs)
    }

    /// A refusal by the admission layer, before the call's message was read: audited as
    /// [`Api::begin`] audits it.
    async fn refuse_unread(&self, operation: &'static str, peer: &str, why: Unread<'_>) -> Status {
        let request_id = crate::audit::new_request_id();
        let admission = Admission {
            request_id: &request_id,
            role: role_of(operation),
            operation,
            peer,
            started: std::time::Instant::now(),
        };
        match why {
            Unread::Overloaded => self.overloaded(&admission).await,
            Unread::Unauthenticated(e) => self.unauthenticated(&admission, e).await,
            Unread::Denied(identity, e) => self.denied(&admission, identity, e).await,
        }
    }

    /// The grant of the role `operation` needs, for the admission layer (key patterns are
    /// checked later, against the key the message names).
    fn authorize(
        &self,
        identity: &crate::auth::Identity,
        operation: &str,
    ) -> Result<Grant, crate::auth::Denied> {
        self.policy.current().grant(identity, role_of(operation))
    }

    /// The audited `PERMISSION_DENIED` of a caller the policy does not allow the role.
    async fn denied(
        &self,
        admission: &Admission<'_>,
        identity: &crate::auth::Identity,
        e: &crate::auth::Denied,
    ) -> Status {
        let tenant = self
            .policy
            .current()
            .tenant_of(identity)
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default();
        if crate::refusal_log::admit() {
            tracing::info!(request_id = %admission.request_id, op = admission.operation, caller = %identity.name, error = %e, "call denied");
        }
        let s = status::denied(e, admission.request_id);
        self.refuse(admission, s, &tenant, &identity.name, &identity.fingerprint)
            .await
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
        // The admission layer (`admit.rs`) took the permit, identified the caller and asked
        // the policy before the message was decoded; it stands in front of every Tresor RPC.
        let Some((admitted, identity, granted)) = request
            .extensions()
            .get::<admit::Admitted>()
            .and_then(admit::Admitted::take)
        else {
            tracing::error!(request_id = %request_id, op = operation, "a call reached its service without the admission layer");
            return Err(status::status(
                Code::Internal,
                "internal error",
                &request_id,
            ));
        };
        let grant = match granted.filter(|g| g.role() == role) {
            Some(grant) => Ok(grant),
            // A method the layer does not name: the policy is asked here.
            None => self.policy.current().grant(&identity, role),
        };
        let grant = match grant {
            Ok(grant) => grant,
            Err(e) => return Err(self.denied(&admission, &identity, &e).await),
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
        let body = record_body(&call, code, key, key_version, aad_hmac);
        let answer = match self.audit.append(call.grant.tenant().as_str(), body).await {
            Ok(_) => result.map(|d| call.ok(d.response)),
            Err(e) => {
                if let Ok(Done {
                    mut response,
                    wipe: Some(wipe),
                    ..
                }) = result
                {
                    wipe(&mut response);
                }
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
    ///
    /// A failed call is recorded with the key its blob belongs to, when this node knows it, so
    /// that key-filtered exports contain it. If that key is another tenant's, the caller's own
    /// record names no key (its auditors learn nothing of the other tenant) and the owner's
    /// log gets a record of the attempt, with the key and the caller, so that "who tried to use
    /// our key?" has an answer there.
    async fn optionally_keyed<T>(
        &self,
        call: Call,
        raw_key: &str,
        aad: &[u8],
        blob: &[u8],
        op: impl AsyncFnOnce(&Call, Option<&KeyName>) -> Result<Done<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let result = match optional_key_name(&call, "key", raw_key) {
            Ok(key) => op(&call, key.as_ref()).await,
            Err(s) => Err(s),
        };
        let aad_hmac = self.audit.hmac_aad(aad);
        let mut key = raw_key.to_owned();
        if let Err(refused) = &result
            && let Some(owner) = self.custody.key_of_blob(blob)
        {
            if owner.tenant() == call.grant.tenant() {
                if key.is_empty() {
                    key = owner.to_string();
                }
            } else {
                let body = record_body(
                    &call,
                    refused.code(),
                    owner.to_string(),
                    String::new(),
                    aad_hmac.clone(),
                );
                if let Err(e) = self.audit.append(owner.tenant().as_str(), body).await {
                    // The call fails anyway; its own record below still shows the attempt.
                    tracing::error!(request_id = %call.request_id, error = %e, "the owning tenant's audit record of a refused call failed");
                }
            }
        }
        self.record(call, result, &key, aad_hmac).await
    }
}

/// Why the admission layer refused a call before reading it.
enum Unread<'a> {
    /// No concurrency permit was free.
    Overloaded,
    /// The connection's certificate does not identify a caller.
    Unauthenticated(&'a AuthError),
    /// The policy does not give the caller the operation's role.
    Denied(&'a crate::auth::Identity, &'a crate::auth::Denied),
}

/// The role an RPC requires, by its name.
fn role_of(operation: &str) -> Role {
    match operation {
        "Wrap" | "Unwrap" | "GenerateDataKey" | "Rewrap" => Role::Service,
        "ExportAuditLog" | "GetAuditCheckpoint" | "GetAuditPublicKey" | "ComputeAadHmac" => {
            Role::Auditor
        }
        _ => Role::Officer,
    }
}

/// The audit record of a call: who, from where, which operation on which key, and its outcome.
fn record_body(
    call: &Call,
    code: Code,
    key: String,
    key_version: String,
    aad_hmac: String,
) -> RecordBody {
    let mut body = RecordBody {
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
    call.grant.fill_record(&mut body);
    body
}

/// Describes a key use to the access rules: the RPC and the justification the request
/// declares, checked against the policy's vocabulary (`INVALID_ARGUMENT` if it is not in it).
fn justify(
    call: &mut Call,
    justification: Option<&crate::proto::Justification>,
) -> Result<(), Status> {
    let (code, reference) =
        justification.map_or(("", ""), |j| (j.code.as_str(), j.reference.as_str()));
    let declared = call
        .grant
        .rules()
        .justification(code, reference)
        .map_err(|e| invalid(call, &format!("justification: {e}")))?;
    call.grant.set_context(crate::auth::AccessContext {
        front_end: crate::auth::FrontEnd::Grpc,
        operation: call.operation.to_owned(),
        justification: declared,
        aws: None,
    });
    Ok(())
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

/// Maps a custody result for [`Api::finish`].
fn custody<T, U>(
    call: &Call,
    r: Result<T, CustodyError>,
    f: impl FnOnce(T) -> Done<U>,
) -> Result<Done<U>, Status> {
    r.map(f).map_err(|e| call.fail(&e))
}
