//! The KMIP server: the hospital data centre's storage arrays, hypervisors and databases
//! create, fetch and manage symmetric keys over KMIP 1.0 to 1.4 (TTLV over mutually
//! authenticated TLS).
//!
//! A sibling of `crate::grpc` and `crate::xks`: it owns KMIP's framing ([`ttlv`]), messages
//! ([`message`]), operations ([`operations`]), its one map from custody's errors to KMIP's
//! result reasons ([`KmipError::from_custody`]) and its connection loop ([`server`]). It
//! identifies callers by their client certificate and the access policy (role `kmip`), asks
//! custody for everything (managed objects live in `crate::custody`), and appends one audit
//! record per batch item before answering. It never touches the HSM or the database itself.

pub mod attributes;
pub mod message;
pub mod operations;
pub mod server;
pub mod ttlv;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::audit::AuditLog;
use crate::audit_record::RecordBody;
use crate::auth::{AccessContext, FrontEnd, Grant, Identity, Role, SharedPolicy};
use crate::config::KmipConfig;
use crate::custody::{Custody, CustodyError};
use message::{Request, ResponseItem, ResultReason};
use ttlv::Ttlv;

/// The largest request message read, in bytes; a longer one is answered Invalid Message and
/// the connection closed (a KMIP key operation needs a few hundred bytes).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Why a KMIP operation failed: one variant per result reason it answers. Messages name
/// fields, objects and states, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KmipError {
    /// The message could not be read.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The operation is not one this server offers.
    #[error("{0}")]
    OperationNotSupported(String),
    /// A required field is absent.
    #[error("missing data: {0}")]
    MissingData(String),
    /// A field has a value this server does not accept.
    #[error("invalid field: {0}")]
    InvalidField(String),
    /// A feature of KMIP this server does not offer.
    #[error("feature not supported: {0}")]
    FeatureNotSupported(String),
    /// A key format this server does not offer.
    #[error("{0}")]
    KeyFormatTypeNotSupported(String),
    /// No such object (or one the caller may not see).
    #[error("{0}")]
    ItemNotFound(String),
    /// Another tenant's object: answered exactly as Item Not Found; `owner` is for the owner's
    /// audit record.
    #[error("{message}")]
    ForeignObject {
        /// The Item Not Found message.
        message: String,
        /// The owning tenant.
        owner: String,
    },
    /// Data did not authenticate (Decrypt).
    #[error("{0}")]
    CryptographicFailure(String),
    /// The caller may not do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The object's state does not allow the operation.
    #[error("{0}")]
    IllegalOperation(String),
    /// The caller's certificate did not identify it.
    #[error("{0}")]
    AuthenticationNotSuccessful(String),
    /// Anything else: the server, the HSM or the database failed, or a setup step is missing.
    #[error("{0}")]
    General(String),
}

impl KmipError {
    /// The Result Reason this error answers.
    pub fn reason(&self) -> ResultReason {
        match self {
            Self::InvalidMessage(_) => ResultReason::InvalidMessage,
            Self::OperationNotSupported(_) => ResultReason::OperationNotSupported,
            Self::MissingData(_) => ResultReason::MissingData,
            Self::InvalidField(_) => ResultReason::InvalidField,
            Self::FeatureNotSupported(_) => ResultReason::FeatureNotSupported,
            Self::KeyFormatTypeNotSupported(_) => ResultReason::KeyFormatTypeNotSupported,
            Self::ItemNotFound(_) | Self::ForeignObject { .. } => ResultReason::ItemNotFound,
            Self::PermissionDenied(_) => ResultReason::PermissionDenied,
            Self::CryptographicFailure(_) => ResultReason::CryptographicFailure,
            Self::IllegalOperation(_) => ResultReason::IllegalOperation,
            Self::AuthenticationNotSuccessful(_) => ResultReason::AuthenticationNotSuccessful,
            Self::General(_) => ResultReason::GeneralFailure,
        }
    }

    /// The audit record's outcome.
    fn outcome(&self) -> &'static str {
        match self {
            Self::PermissionDenied(_) => "DENIED",
            Self::AuthenticationNotSuccessful(_) => "UNAUTHENTICATED",
            Self::InvalidMessage(_) => "INVALID",
            _ => "FAILED",
        }
    }

    /// The one map from custody's errors to KMIP's. Exhaustive, so a new custody error cannot
    /// reach a KMIP client without a decision here. The HSM's and the database's details stay
    /// in Tresor's log.
    pub fn from_custody(e: CustodyError) -> Self {
        use CustodyError as E;
        match e {
            E::PermissionDenied(d) => Self::PermissionDenied(d.to_string()),
            E::AccessRuleDenied(_) | E::AccessWindowRequired(_) => {
                Self::PermissionDenied(e.to_string())
            }
            E::InvalidName(_) | E::InvalidArgument(_) => Self::InvalidField(e.to_string()),
            E::ObjectNotFound(_) | E::ObjectAttributeNotFound { .. } => {
                Self::ItemNotFound(e.to_string())
            }
            E::ForeignObject { ref owner, .. } => Self::ForeignObject {
                message: e.to_string(),
                owner: owner.clone(),
            },
            E::ObjectDestroyed(id) => Self::IllegalOperation(format!(
                "object {id} is destroyed; its key material is gone"
            )),
            E::ObjectState { .. } | E::ObjectNotUsable { .. } => {
                Self::IllegalOperation(e.to_string())
            }
            E::FailedSetup(_) => Self::General(e.to_string()),
            E::ObjectDataUnauthentic(_) => Self::CryptographicFailure(e.to_string()),
            // The tenant's wrapping key refuses: disabled, worn out, of the wrong usage, or
            // the sealed material does not authenticate.
            E::KeyNotFound(_)
            | E::VersionNotFound(_)
            | E::VersionDisabled(_)
            | E::VersionDestroyScheduled(_)
            | E::VersionDestroyed(_)
            | E::VersionExhausted(_)
            | E::VersionBelowMinimum(_)
            | E::UsageForbidden { .. } => Self::General(format!(
                "the tenant's KMIP wrapping key cannot be used: {e}; an officer must fix it"
            )),
            E::VersionLost(_)
            | E::MetadataIntegrity { .. }
            | E::MalformedCiphertext(_)
            | E::Unauthentic
            | E::UnknownVersion
            | E::WrongKey { .. }
            | E::ForeignBlob { .. } => Self::General(
                "the object's sealed material does not open; see the server log".into(),
            ),
            E::Conflict(_) => Self::General("the object changed concurrently; retry".into()),
            E::Hsm(_) => Self::General("the HSM is unavailable; retry later".into()),
            E::Store(_) | E::NotCurrent | E::IntegrityKeyMissing(_) => {
                Self::General("the key database is unavailable; retry later".into())
            }
            E::KeyExists(_)
            | E::ApprovalNotFound(_)
            | E::ApprovalClosed { .. }
            | E::SelfApproval(_)
            | E::ApprovalPending(_)
            | E::PrimaryVersion(_)
            | E::InvalidTransition { .. }
            | E::ApprovalIntegrity(_)
            | E::WindowNotFound(_)
            | E::WindowClosed { .. }
            | E::WindowIntegrity(_)
            | E::Internal(_) => Self::General("internal error".into()),
        }
    }
}

impl From<CustodyError> for KmipError {
    fn from(e: CustodyError) -> Self {
        Self::from_custody(e)
    }
}

/// The KMIP service. Cheap to clone.
#[derive(Clone)]
pub struct Kmip {
    inner: Arc<Inner>,
}

struct Inner {
    custody: Custody,
    audit: AuditLog,
    policy: Arc<SharedPolicy>,
    config: KmipConfig,
    permits: Semaphore,
}

impl std::fmt::Debug for Kmip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kmip")
            .field("listen", &self.inner.config.listen)
            .finish_non_exhaustive()
    }
}

/// Who sent a message: the identity its certificate names, from where.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The verified identity (`None`: the certificate did not name one).
    pub identity: Option<Identity>,
    /// The peer address.
    pub peer: Option<SocketAddr>,
}

impl Caller {
    /// An audit record of this caller's `operation` with its outcome and result reason.
    fn record(&self, operation: &str, outcome: &str, status: i32) -> RecordBody {
        let (caller, fingerprint) = self
            .identity
            .as_ref()
            .map(|i| (i.name.clone(), i.fingerprint.clone()))
            .unwrap_or_default();
        RecordBody {
            request_id: crate::audit::new_request_id(),
            caller,
            fingerprint,
            role: Role::Kmip.to_string(),
            operation: operation.into(),
            outcome: outcome.into(),
            status_code: status,
            peer: self.peer.map(|p| p.to_string()).unwrap_or_default(),
            ..RecordBody::default()
        }
    }
}

impl Kmip {
    /// The service over custody and the audit log.
    pub fn new(
        config: KmipConfig,
        custody: Custody,
        audit: AuditLog,
        policy: Arc<SharedPolicy>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                permits: Semaphore::new(config.max_concurrent_requests),
                custody,
                audit,
                policy,
                config,
            }),
        }
    }

    /// The configuration it serves.
    pub fn config(&self) -> &KmipConfig {
        &self.inner.config
    }

    /// Answers one request message (its TTLV bytes); every batch item's audit record is
    /// appended before the answer is returned. The answer may hold key material: the caller
    /// sends it and drops it (it is wiped).
    pub async fn handle(&self, caller: &Caller, bytes: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
        let now_s = self.inner.custody.now() / 1000;
        let request = ttlv::decode(bytes)
            .map_err(|e| {
                (
                    message::SUPPORTED_VERSIONS[0],
                    KmipError::InvalidMessage(e.to_string()),
                )
            })
            .and_then(|m| message::parse_request(&m));
        let request = match request {
            Ok(r) => r,
            Err((version, e)) => {
                self.refuse_message(caller, &e).await;
                return ttlv::encode(&message::response(
                    version,
                    now_s,
                    vec![ResponseItem {
                        operation: None,
                        id: None,
                        result: Err(e),
                    }],
                ));
            }
        };
        let version = request.version;
        let items = self.serve(caller, request).await;
        ttlv::encode(&message::response(version, now_s, items))
    }

    /// An answer for a message that cannot even be framed (too long, not a structure); the
    /// connection is closed after it.
    pub async fn unframed(&self, caller: &Caller, e: KmipError) -> zeroize::Zeroizing<Vec<u8>> {
        self.refuse_message(caller, &e).await;
        let now_s = self.inner.custody.now() / 1000;
        ttlv::encode(&message::response(
            message::SUPPORTED_VERSIONS[0],
            now_s,
            vec![ResponseItem {
                operation: None,
                id: None,
                result: Err(e),
            }],
        ))
    }

    async fn serve(&self, caller: &Caller, request: Request) -> Vec<ResponseItem> {
        let Ok(_permit) = self.inner.permits.try_acquire() else {
            let e = KmipError::General("the server is busy; retry later".into());
            let mut answers = Vec::new();
            for item in request.items {
                // Refused either way; a failed record is logged by `record`.
                let _ = self
                    .record(
                        caller,
                        None,
                        item.operation,
                        &operations::Touched::default(),
                        Err(&e),
                    )
                    .await;
                answers.push(ResponseItem {
                    operation: Some(item.operation),
                    id: item.id,
                    result: Err(e.clone()),
                });
            }
            return answers;
        };
        let grant = self.grant(caller);
        // The justification the header declares, checked against the policy's vocabulary; a
        // bad one fails every item, recorded under the caller.
        let declared = match &grant {
            Ok(g) => {
                let (code, reference) = request
                    .correlation
                    .as_deref()
                    .and_then(message::justification_of)
                    .unwrap_or(("", ""));
                g.rules()
                    .justification(code, reference)
                    .map_err(|e| KmipError::InvalidField(format!("Client Correlation Value: {e}")))
            }
            Err(_) => Ok(None),
        };
        let mut placeholder: Option<String> = None;
        let mut answers = Vec::with_capacity(request.items.len());
        let mut failed = false;
        for item in request.items {
            if failed && !request.continue_on_error {
                break;
            }
            let mut touched = operations::Touched::default();
            // Each item is its own use for the access rules (and its own decision).
            let item_grant = grant.as_ref().map(|g| {
                g.with_context(AccessContext {
                    front_end: FrontEnd::Kmip,
                    operation: message::operation::audit_name(item.operation)
                        .trim_start_matches("Kmip")
                        .to_owned(),
                    justification: declared.clone().ok().flatten(),
                    aws: None,
                })
            });
            let item_grant = item_grant.map_err(|e| e.clone());
            let result = match (&item_grant, &declared) {
                (Ok(_), Err(e)) => Err(e.clone()),
                (Ok(grant), Ok(_)) => {
                    operations::run(
                        &self.inner.custody,
                        &self.inner.config,
                        grant,
                        request.version,
                        item.operation,
                        &item.payload,
                        &mut placeholder,
                        &mut touched,
                    )
                    .await
                }
                (Err(e), _) => Err(e.clone()),
            };
            let result = match self
                .record(
                    caller,
                    item_grant.as_ref().ok(),
                    item.operation,
                    &touched,
                    result.as_ref().map(|_| ()),
                )
                .await
            {
                Ok(()) => result,
                // Fail closed: no key leaves without its audit record.
                Err(e) => Err(e),
            };
            // A probe of another tenant's object is also recorded where the owner's auditors
            // see it, with the object and the caller (the caller's answer says nothing).
            if let Err(KmipError::ForeignObject { owner, .. }) = &result {
                let mut body = caller.record(
                    message::operation::audit_name(item.operation),
                    "DENIED",
                    ResultReason::ItemNotFound as i32,
                );
                if let Some(id) = &touched.object {
                    body.key = format!("tenants/{owner}/objects/{id}");
                }
                if let Err(e) = self.inner.audit.append(owner, body).await {
                    tracing::error!(error = %e, "the owner's record of a probe across tenants failed");
                }
            }
            failed |= result.is_err();
            answers.push(ResponseItem {
                operation: Some(item.operation),
                id: item.id,
                result,
            });
        }
        answers
    }

    fn grant(&self, caller: &Caller) -> Result<Grant, KmipError> {
        let identity = caller.identity.as_ref().ok_or_else(|| {
            KmipError::AuthenticationNotSuccessful(
                "the client certificate names no identity (no URI SAN, no subject CN)".into(),
            )
        })?;
        self.inner
            .policy
            .current()
            .grant(identity, Role::Kmip)
            .map_err(|d| KmipError::PermissionDenied(d.to_string()))
    }

    /// Appends the record of one batch item; an error when it could not be made durable.
    async fn record(
        &self,
        caller: &Caller,
        grant: Option<&Grant>,
        operation: u32,
        touched: &operations::Touched,
        result: Result<(), &KmipError>,
    ) -> Result<(), KmipError> {
        let (outcome, status) = match result {
            Ok(()) => ("OK", 0),
            Err(e) => (e.outcome(), e.reason() as i32),
        };
        let tenant = grant.map_or_else(String::new, |g| g.tenant().as_str().to_owned());
        let mut body = RecordBody {
            key: touched
                .object
                .as_deref()
                .map(|id| format!("tenants/{tenant}/objects/{id}"))
                .unwrap_or_default(),
            key_version: touched.name.clone().unwrap_or_default(),
            ..caller.record(message::operation::audit_name(operation), outcome, status)
        };
        if let Some(g) = grant {
            g.fill_record(&mut body);
        }
        let appended = if grant.is_none() {
            // Refusals before the caller is known fold into burst records (SECURITY.md).
            self.inner.audit.append_refusal(&tenant, body).await
        } else {
            self.inner.audit.append(&tenant, body).await.map(|_| ())
        };
        appended.map_err(|e| {
            tracing::error!(error = %e, "audit record failed; the KMIP result is withheld");
            KmipError::General("the audit log is unavailable; retry later".into())
        })
    }

    async fn refuse_message(&self, caller: &Caller, e: &KmipError) {
        let tenant = caller
            .identity
            .as_ref()
            .and_then(|i| {
                self.inner
                    .policy
                    .current()
                    .tenant_of(i)
                    .map(|t| t.as_str().to_owned())
            })
            .unwrap_or_default();
        let body = caller.record("KmipInvalidMessage", e.outcome(), e.reason() as i32);
        if let Err(err) = self.inner.audit.append_refusal(&tenant, body).await {
            tracing::error!(error = %err, "audit record of a malformed KMIP message failed");
        }
    }

    /// Removes the material of destroyed objects whose grace period ended, every `every`.
    pub async fn purge_destroyed(self, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match self.inner.custody.purge_destroyed_objects().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(objects = n, "destroyed KMIP objects' material removed"),
                Err(e) => {
                    tracing::warn!(error = %e, "removing destroyed KMIP objects' material failed")
                }
            }
        }
    }
}

/// The object a batch item touched, for its audit record.
impl operations::Touched {
    fn set(&mut self, object: &crate::custody::ManagedObject) {
        self.object = Some(object.id.clone());
        if !object.name.is_empty() {
            self.name = Some(object.name.clone());
        }
    }
}

/// A structure's child, or Missing Data naming it.
fn required<'a>(payload: &'a Ttlv, tag: u32, what: &str) -> Result<&'a Ttlv, KmipError> {
    payload
        .child(tag)
        .ok_or_else(|| KmipError::MissingData(format!("the request has no {what}")))
}
