//! The AWS KMS external key store (XKS) proxy API: AWS KMS calls this over HTTPS for every
//! encrypt and decrypt of a key in an external key store, so the key stays in the operator's
//! HSM ("AWS KMS External Key Store (XKS) Proxy API Specification" v1).
//!
//! Owns the API's routing (`{prefix}/kms/xks/v1/...`, one prefix per tenant), authentication
//! (SigV4, [`sigv4`]), its errors ([`wire`]), the mapping of external key ids to Tresor keys,
//! the ciphertext layout it returns, the deep health check, and the audit record of each call.
//! It uses custody through the same grants as the gRPC API (the prefix acts as a policy
//! identity with role `service`), so the access policy, key usage, version states and the wrap
//! budget apply unchanged. It never sees key material; it must not log plaintext, AAD or
//! secrets.
//!
//! **Ciphertext.** Encrypt uses the key's primary version with a random 96-bit IV and returns
//! `ciphertextMetadata` = `0x01 ‖ version id` (17 bytes), which Decrypt needs to find the
//! version (a ciphertext without it was not made here: `InvalidCiphertextException`). The GCM
//! AAD is the specification's, behind a domain separator so that no XKS ciphertext is ever a
//! valid Tresor blob or the other way round:
//! `"tresor/xks/v1\0" ‖ u16be(len aad) ‖ aad ‖ u8(len metadata) ‖ metadata`.

pub mod client;
mod credentials;
mod operations;
mod server;
pub mod sigv4;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{Mutex, Semaphore};
use zeroize::Zeroizing;

use crate::audit::AuditLog;
use crate::audit_record::RecordBody;
use crate::auth::{AccessContext, AwsContext, FrontEnd, Grant, Identity, Role, SharedPolicy};
use crate::config::{XksConfig, XksPrefix};
use crate::custody::{Custody, CustodyError, ProbeKey};
use crate::hsm::TokenDescription;
use crate::model::{KeyName, KeyUsage};
pub use credentials::{CredentialsError, SharedCredentials};
use operations::{parse, printable, to_json};
pub use server::{ALPN, serve, serve_ping};
use wire::XksError;

/// Largest plaintext or ciphertext accepted (the spec requires 4,300 bytes).
pub const MAX_DATA: usize = 65_536;
/// Largest AAD accepted (the spec requires 8,192; the GCM AAD encodes its length in 16 bits).
pub const MAX_AAD: usize = 65_535;
/// Largest request body read.
const MAX_BODY: usize = 256 * 1024;
const METADATA_FORMAT: u8 = 1;
const GCM_AAD_DOMAIN: &[u8] = b"tresor/xks/v1\0";
/// A health answer is never older than this (the spec: at most one minute).
const HEALTH_MAX_AGE: Duration = Duration::from_secs(60);
/// How often the deep health check runs in the background.
const HEALTH_EVERY: Duration = Duration::from_secs(20);
/// A deep check slower than this reports the HSM `DEGRADED` (KMS times out at 250 ms).
const HEALTH_SLOW: Duration = Duration::from_millis(100);
/// Label purpose of the health-check key in `audit_keys`.
const HEALTH_KEY: &str = "xks-health";

/// The XKS proxy service: cheap to clone.
#[derive(Clone)]
pub struct Xks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Xks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xks")
            .field("region", &self.inner.region)
            .finish_non_exhaustive()
    }
}

struct Inner {
    custody: Custody,
    audit: AuditLog,
    policy: Arc<SharedPolicy>,
    region: String,
    /// Longest path first, so a prefix that is a prefix of another never shadows it.
    prefixes: Vec<Prefix>,
    permits: Arc<Semaphore>,
    health_key: ProbeKey,
    /// The names a request's signed `host` may carry, lower-case, without port.
    host_names: Vec<String>,
    health: Mutex<Option<(Instant, HealthSnapshot)>>,
    node_id: String,
}

struct Prefix {
    config: XksPrefix,
    credentials: SharedCredentials,
}

impl Prefix {
    /// The policy identity AWS KMS acts as on this prefix.
    fn identity(&self) -> Identity {
        Identity {
            name: self.config.identity.clone(),
            fingerprint: String::new(),
        }
    }
}

#[derive(Clone)]
struct HealthSnapshot {
    ok: bool,
    took: Duration,
    token: Option<TokenDescription>,
    fleet: u64,
}

/// Every prefix's credentials, loaded and checked before anything else starts (a broken file
/// is a configuration error, found before the HSM is opened).
pub struct Credentials {
    prefixes: Vec<Prefix>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("prefixes", &self.prefixes.len())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads each prefix's credentials file; the first that is refused is the error.
    pub fn load(config: &XksConfig) -> Result<Self, CredentialsError> {
        let mut prefixes = Vec::with_capacity(config.prefixes.len());
        for p in &config.prefixes {
            prefixes.push(Prefix {
                credentials: SharedCredentials::load(&p.credentials)?,
                config: p.clone(),
            });
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.config.path.len()));
        Ok(Self { prefixes })
    }
}

/// The operation a request routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    /// A path that is no API operation (answered `InvalidUriPathException`, still audited).
    Unrouted,
    Health,
    Metadata,
    Encrypt,
    Decrypt,
}

impl Operation {
    fn audit_name(self) -> &'static str {
        match self {
            Self::Unrouted => "XksInvalidPath",
            Self::Health => "XksGetHealthStatus",
            Self::Metadata => "XksGetKeyMetadata",
            Self::Encrypt => "XksEncrypt",
            Self::Decrypt => "XksDecrypt",
        }
    }
}

/// A request as the transport hands it over. `Debug` leaves out the body (plaintext, AAD).
pub struct Incoming {
    /// The HTTP method.
    pub method: http::Method,
    /// The URI.
    pub uri: http::Uri,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body, not read yet: at most [`MAX_BODY`] bytes (`None` if it was longer or did not
    /// arrive in time). It is read only once the request holds a concurrency permit and its
    /// headers passed authentication, so an unauthenticated client cannot make the proxy read
    /// large bodies.
    pub body: PendingBody,
    /// The peer address.
    pub peer: Option<SocketAddr>,
    /// SHA-256 of the client certificate (mTLS), hex.
    pub client_fingerprint: String,
}

/// A request body that is read when awaited.
pub type PendingBody = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Bytes>> + Send>>;

/// What goes back: status, JSON body. `Debug` leaves out the body (a Decrypt answer holds
/// plaintext).
pub struct Outgoing {
    /// HTTP status.
    pub status: http::StatusCode,
    /// JSON (or plain text for `/ping`).
    pub body: Zeroizing<String>,
    /// `Content-Type`.
    pub content_type: &'static str,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Outgoing {
    fn json(body: Zeroizing<String>) -> Self {
        Self {
            status: http::StatusCode::OK,
            body,
            content_type: "application/json",
        }
    }

    fn error(e: &XksError) -> Self {
        Self {
            status: e.status(),
            body: Zeroizing::new(e.body()),
            content_type: "application/json",
        }
    }

    fn plain(status: http::StatusCode, text: &str) -> Self {
        Self {
            status,
            body: Zeroizing::new(text.to_owned()),
            content_type: "text/plain",
        }
    }
}

/// What the audit record of a call says, filled in as the call proceeds.
#[derive(Default)]
struct Audit {
    tenant: String,
    caller: String,
    fingerprint: String,
    key: String,
    key_version: String,
    aad_hmac: String,
    meta: wire::RequestMetadata,
    /// The access rules' decision and justification fields, once custody asked the rules.
    access: RecordBody,
    /// Whether an access rule refused the call.
    refused_by_rule: bool,
    /// Why the request did not authenticate: for the process log only, never for the caller.
    not_authenticated: Option<String>,
}

impl Audit {
    /// Takes the access rules' decision from the grant custody used.
    fn access_decided(&mut self, grant: &Grant) {
        grant.fill_record(&mut self.access);
        self.refused_by_rule = grant.refused_by_rule();
    }
}

/// One answer for every authentication failure, so a caller cannot tell a known access key from
/// an unknown one, or a wrong host from a wrong signature; the process log says which.
fn not_authenticated(audit: &mut Audit, why: impl std::fmt::Display) -> XksError {
    audit.not_authenticated = Some(why.to_string());
    XksError::AuthenticationFailed("the request's SigV4 signature could not be verified".into())
}

impl Xks {
    /// The proxy over `credentials`, with its health-check key (created if there is none).
    pub async fn open(
        config: &XksConfig,
        credentials: Credentials,
        host_names: Vec<String>,
        custody: Custody,
        audit: AuditLog,
        policy: Arc<SharedPolicy>,
        node_id: String,
    ) -> Result<Self, CustodyError> {
        let prefixes = credentials.prefixes;
        let health_key = custody.probe_key(HEALTH_KEY, "xks").await?;
        Ok(Self {
            inner: Arc::new(Inner {
                custody,
                audit,
                policy,
                region: config.region.clone(),
                prefixes,
                permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
                health_key,
                host_names,
                health: Mutex::new(None),
                node_id,
            }),
        })
    }

    /// Re-reads every prefix's credentials file (SIGHUP). A broken file keeps its prefix's
    /// credentials in force; the errors are returned.
    pub fn reload_credentials(&self) -> Vec<CredentialsError> {
        self.inner
            .prefixes
            .iter()
            .filter_map(|p| p.credentials.reload().err())
            .collect()
    }

    /// Runs the deep health check every 20 s and records this node as alive, until dropped.
    pub async fn keep_health(&self) {
        loop {
            self.refresh_health().await;
            tokio::time::sleep(HEALTH_EVERY).await;
        }
    }

    async fn refresh_health(&self) -> HealthSnapshot {
        let custody = &self.inner.custody;
        let window = i64::try_from(HEALTH_MAX_AGE.as_millis()).unwrap_or(60_000);
        let fleet = custody
            .record_alive(&self.inner.node_id, window)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not record this node as alive");
                1
            });
        let started = Instant::now();
        let ok = custody.probe(self.inner.health_key).await;
        let took = started.elapsed();
        if let Err(e) = &ok {
            tracing::warn!(error = %e, "XKS deep health check failed");
        }
        let token = custody.token_description().await.ok();
        let snapshot = HealthSnapshot {
            ok: ok.is_ok(),
            took,
            token,
            fleet,
        };
        *self.inner.health.lock().await = Some((Instant::now(), snapshot.clone()));
        snapshot
    }

    /// The latest health, at most a minute old (checked now if older).
    async fn health(&self) -> HealthSnapshot {
        if let Some((at, snapshot)) = self.inner.health.lock().await.as_ref()
            && at.elapsed() <= HEALTH_MAX_AGE
        {
            return snapshot.clone();
        }
        self.refresh_health().await
    }

    /// Serves one request.
    pub async fn handle(&self, mut request: Incoming) -> Outgoing {
        let started = Instant::now();
        let path = request.uri.path().to_owned();
        if path == "/ping" {
            return self.ping(&request.method).await;
        }
        let routed = self.route(&path);
        let operation = routed.map_or(Operation::Unrouted, |(_, op, _)| op);
        let mut audit = Audit::default();
        let request_id = crate::audit::new_request_id();
        // Held until the audit record is written, so the bound covers the whole call.
        let permit = Arc::clone(&self.inner.permits).try_acquire_owned();
        let result = match routed {
            None => Err(XksError::InvalidUriPath(format!(
                "no XKS API at {}",
                printable(&path)
            ))),
            Some(_) if request.uri.query().is_some() => Err(XksError::InvalidUriPath(
                "the XKS API takes no query string".into(),
            )),
            Some(_) if request.method != http::Method::POST => {
                Err(XksError::NotPost("the XKS API is called with POST".into()))
            }
            Some(_) if permit.is_err() => Err(XksError::Throttling(
                "too many requests in flight on this proxy; retry".into(),
            )),
            Some((prefix, operation, external_id)) => {
                self.call(prefix, operation, external_id, &mut request, &mut audit)
                    .await
            }
        };
        if let Err(XksError::Internal(_) | XksError::DependencyTimeout(_)) = &result {
            // The HSM (or database) just failed a call: the next health answer checks anew
            // instead of repeating a cached ACTIVE.
            *self.inner.health.lock().await = None;
        }
        match &result {
            Err(e @ (XksError::Internal(_) | XksError::DependencyTimeout(_))) => {
                tracing::warn!(%request_id, kms_request_id = audit.meta.kms_request_id.as_deref().unwrap_or(""), op = operation.audit_name(), error = e.name(), message = %e, "XKS request failed");
            }
            // Refusals share the process log's rate with the other front-ends' (a flood of
            // unsigned requests must not write a line each); the audit log has every one.
            Err(e) if crate::refusal_log::admit() => match &audit.not_authenticated {
                Some(why) => {
                    tracing::warn!(%request_id, peer = ?request.peer, prefix = routed.map_or("", |(p, ..)| p.config.path.as_str()), op = operation.audit_name(), reason = %why, "XKS request not authenticated");
                }
                None => {
                    tracing::info!(%request_id, kms_request_id = audit.meta.kms_request_id.as_deref().unwrap_or(""), op = operation.audit_name(), error = e.name(), message = %e, "XKS request refused");
                }
            },
            _ => {}
        }
        let code_name = result.as_ref().map_or_else(XksError::name, |_| "OK");
        let outgoing = match result {
            Ok(body) => Outgoing::json(body),
            Err(e) => Outgoing::error(&e),
        };
        let outcome = match outgoing.status.as_u16() {
            200 => "OK",
            401 => "UNAUTHENTICATED",
            403 if audit.refused_by_rule => "RULE_DENIED",
            403 => "DENIED",
            _ => "FAILED",
        };
        let body = RecordBody {
            request_id: request_id.clone(),
            caller: audit.caller,
            fingerprint: audit.fingerprint,
            role: Role::Service.to_string(),
            operation: operation.audit_name().into(),
            key: audit.key,
            key_version: audit.key_version,
            outcome: outcome.into(),
            status_code: i32::from(outgoing.status.as_u16()),
            peer: request.peer.map(|p| p.to_string()).unwrap_or_default(),
            aad_hmac: audit.aad_hmac,
            kms_request_id: audit.meta.kms_request_id.unwrap_or_default(),
            kms_operation: audit.meta.kms_operation.unwrap_or_default(),
            aws_principal_arn: audit.meta.aws_principal_arn.unwrap_or_default(),
            kms_key_arn: audit.meta.kms_key_arn.unwrap_or_default(),
            kms_via_service: audit.meta.kms_via_service.unwrap_or_default(),
            aws_source_vpc: audit.meta.aws_source_vpc.unwrap_or_default(),
            aws_source_vpce: audit.meta.aws_source_vpce.unwrap_or_default(),
            access_rule: audit.access.access_rule,
            access_window: audit.access.access_window,
            justification: audit.access.justification,
            justification_reference: audit.access.justification_reference,
            ..RecordBody::default()
        };
        crate::metrics::global().request(operation.audit_name(), code_name, started.elapsed());
        // Refusals before the caller is known (no valid signature, no such path, not POST,
        // throttled) fold into burst records, so a flood of them cannot take the audit log's
        // capacity from KMS's real calls (SECURITY.md "Audit log").
        let before_identity =
            outcome == "UNAUTHENTICATED" || matches!(outgoing.status.as_u16(), 404 | 405 | 429);
        let recorded = if before_identity {
            self.inner
                .audit
                .append_refusal(&audit.tenant, body)
                .await
                .map(|()| 0)
        } else {
            self.inner.audit.append(&audit.tenant, body).await
        };
        match recorded {
            Ok(_) => outgoing,
            Err(e) => {
                // Fail closed: no plaintext or ciphertext leaves without its audit record.
                tracing::error!(%request_id, error = %e, "audit record failed; the XKS result is withheld");
                Outgoing::error(&XksError::Internal(
                    "the audit log is unavailable; retry later".into(),
                ))
            }
        }
    }

    /// Finds the prefix, operation and external key id of an API path.
    fn route<'a>(&self, path: &'a str) -> Option<(&Prefix, Operation, &'a str)> {
        let prefix = self.inner.prefixes.iter().find(|p| {
            path.strip_prefix(p.config.path.as_str())
                .is_some_and(|rest| rest.starts_with("/kms/xks/v1/"))
        })?;
        let rest = &path[prefix.config.path.len() + "/kms/xks/v1/".len()..];
        if rest == "health" {
            return Some((prefix, Operation::Health, ""));
        }
        let (id, op) = rest.strip_prefix("keys/")?.split_once('/')?;
        let valid_id = (1..=128).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid_id {
            return None;
        }
        let operation = match op {
            "metadata" => Operation::Metadata,
            "encrypt" => Operation::Encrypt,
            "decrypt" => Operation::Decrypt,
            _ => return None,
        };
        Some((prefix, operation, id))
    }

    /// Whether `host` (a `Host` header or HTTP/2 authority, port optional) is one of the
    /// proxy's names: the signed host must be ours, or a request signed for another endpoint
    /// with the same credentials would be accepted here.
    fn is_own_host(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
            None => host
                .rsplit_once(':')
                .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
                .map_or(host, |(name, _)| name),
        };
        let name = name.to_ascii_lowercase();
        self.inner.host_names.contains(&name)
    }

    async fn call(
        &self,
        prefix: &Prefix,
        operation: Operation,
        external_id: &str,
        request: &mut Incoming,
        audit: &mut Audit,
    ) -> Result<Zeroizing<String>, XksError> {
        let credentials = prefix.credentials.current();
        let authority = request.uri.authority().map(|a| a.as_str());
        let host = request
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or(authority);
        if !host.is_some_and(|h| self.is_own_host(h)) {
            return Err(not_authenticated(
                audit,
                format_args!("host {:?} is not a name of this proxy", host.map(printable)),
            ));
        }
        let claimed = sigv4::check_headers(
            &request.headers,
            &credentials,
            &self.inner.region,
            SystemTime::now(),
        )
        .map_err(|e| not_authenticated(audit, e))?;
        // Only now, with a permit and headers that name a configured credential in time, is
        // the body read.
        let body = request.body.as_mut().await.ok_or_else(|| {
            XksError::Unsupported(format!(
                "request bodies are limited to {MAX_BODY} bytes, sent in time"
            ))
        })?;
        let signed = sigv4::Request {
            method: request.method.as_str(),
            path: request.uri.path(),
            query: request.uri.query().unwrap_or(""),
            headers: &request.headers,
            authority,
            body: &body,
        };
        let credential = claimed
            .verify(&signed, &self.inner.region)
            .map_err(|e| not_authenticated(audit, e))?;
        audit.caller = prefix.config.identity.clone();
        // The prefix's tenant, so its auditors see its health checks too (authorization of
        // key operations below still asks the policy for a grant).
        if let Some(tenant) = self.inner.policy.current().tenant_of(&prefix.identity()) {
            audit.tenant = tenant.as_str().to_owned();
        }
        audit.fingerprint = if request.client_fingerprint.is_empty() {
            format!("sigv4:{}", credential.access_key_id)
        } else {
            format!(
                "sigv4:{} tls:{}",
                credential.access_key_id, request.client_fingerprint
            )
        };
        match operation {
            Operation::Unrouted => Err(XksError::InvalidUriPath("no XKS API here".into())),
            Operation::Health => {
                let parsed: wire::MetadataOnly = parse(&body)?;
                let meta = parsed.request_metadata.unwrap_or_default();
                audit.meta = meta;
                audit.meta.check(false, false)?;
                self.health_answer().await
            }
            Operation::Metadata => {
                let parsed: wire::MetadataOnly = parse(&body)?;
                audit.meta = parsed.request_metadata.unwrap_or_default();
                audit.meta.check(true, false)?;
                let (grant, key) = self.authorize(prefix, external_id, audit)?;
                let (usage, enabled) = self
                    .inner
                    .custody
                    .usage_and_state(&grant, &key)
                    .await
                    .map_err(wire::from_custody)?;
                let key_usage = match usage {
                    KeyUsage::EncryptDecrypt => vec!["ENCRYPT", "DECRYPT"],
                    KeyUsage::EncryptOnly => vec!["ENCRYPT"],
                    KeyUsage::DecryptOnly => vec!["DECRYPT"],
                    KeyUsage::None => vec![],
                };
                to_json(&wire::KeyMetadataResponse {
                    key_spec: "AES_256",
                    key_usage,
                    key_status: if enabled { "ENABLED" } else { "DISABLED" },
                })
            }
            Operation::Encrypt => {
                let parsed: wire::EncryptRequest = parse(&body)?;
                audit.meta = parsed.request_metadata.clone().unwrap_or_default();
                audit.meta.check(true, true)?;
                self.encrypt(prefix, external_id, parsed, audit).await
            }
            Operation::Decrypt => {
                let parsed: wire::DecryptRequest = parse(&body)?;
                audit.meta = parsed.request_metadata.clone().unwrap_or_default();
                audit.meta.check(true, true)?;
                self.decrypt(prefix, external_id, parsed, audit).await
            }
        }
    }

    /// The grant of the prefix's identity and the Tresor key an external key id names.
    fn authorize(
        &self,
        prefix: &Prefix,
        external_id: &str,
        audit: &mut Audit,
    ) -> Result<(Grant, KeyName), XksError> {
        if let Some(allowed) = &prefix.config.allowed_principals {
            let principal = audit.meta.aws_principal_arn.as_deref().unwrap_or("");
            let matches = |pattern: &String| match pattern.strip_suffix('*') {
                Some(start) => principal.starts_with(start),
                None => principal == pattern,
            };
            if !allowed.iter().any(matches) {
                return Err(XksError::AccessDenied(format!(
                    "principal {} may not use this key store (xks.prefix.allowed_principals)",
                    printable(principal)
                )));
            }
        }
        let mut grant = self
            .inner
            .policy
            .current()
            .grant(&prefix.identity(), Role::Service)
            .map_err(|d| XksError::AccessDenied(d.to_string()))?;
        let meta = &audit.meta;
        grant.set_context(AccessContext {
            front_end: FrontEnd::Xks,
            operation: meta.kms_operation.clone().unwrap_or_default(),
            justification: None,
            aws: Some(AwsContext {
                kms_operation: meta.kms_operation.clone(),
                principal_arn: meta.aws_principal_arn.clone(),
                key_arn: meta.kms_key_arn.clone(),
                via_service: meta.kms_via_service.clone(),
                source_vpc: meta.aws_source_vpc.clone(),
                source_vpce: meta.aws_source_vpce.clone(),
            }),
        });
        audit.tenant = grant.tenant().as_str().to_owned();
        let key_name = match &prefix.config.keys {
            Some(map) => map.get(external_id).cloned().ok_or_else(|| {
                XksError::KeyNotFound(format!("external key {external_id} is not mapped"))
            })?,
            None => external_id.to_owned(),
        };
        let key = KeyName::new(grant.tenant().as_str(), &key_name).map_err(|_| {
            XksError::KeyNotFound(format!("external key {external_id} does not exist"))
        })?;
        audit.key = key.to_string();
        grant
            .check_key(&key)
            .map_err(|d| XksError::AccessDenied(d.to_string()))?;
        Ok((grant, key))
    }

    async fn ping(&self, method: &http::Method) -> Outgoing {
        if method != http::Method::GET && method != http::Method::HEAD {
            return Outgoing::plain(http::StatusCode::METHOD_NOT_ALLOWED, "GET /ping\n");
        }
        if self.health().await.ok {
            Outgoing::plain(http::StatusCode::OK, "ok\n")
        } else {
            Outgoing::plain(http::StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
        }
    }
}
