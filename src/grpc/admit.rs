//! Admission before decoding: a call to a Tresor service takes its concurrency permit and is
//! authenticated from its connection's certificate before tonic reads and decodes its message,
//! so an overloaded server, or a caller without a valid certificate, is refused
//! (`RESOURCE_EXHAUSTED`, `UNAUTHENTICATED`, audited as in `Api::begin`) without reading up to
//! 132 KiB for nothing; so is a caller the policy does not give the operation's role
//! (`PERMISSION_DENIED`). Key patterns need the message and are checked by the service. Health
//! and reflection pass through, as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::OwnedSemaphorePermit;
use tonic::body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::{Api, Unread};
use crate::auth::{Grant, Identity};

/// What the layer established for a call: its permit, the caller its certificate identified
/// and the grant the policy gave it for the operation's role (none for a method the layer does
/// not know). Handed to [`Api::begin`] through the request's extensions (which require
/// `Clone`, hence the shared slot), so the chain and the policy are looked up once per call.
pub(super) type AdmittedCall = (OwnedSemaphorePermit, Identity, Option<Grant>);

#[derive(Clone)]
pub(super) struct Admitted(Arc<Mutex<Option<AdmittedCall>>>);

impl Admitted {
    /// Takes what the layer established out (once).
    pub(super) fn take(&self) -> Option<AdmittedCall> {
        crate::sync::lock(&self.0).take()
    }
}

/// The layer around every service of the gRPC server.
#[derive(Clone)]
pub(super) struct AdmitLayer {
    pub(super) api: Api,
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            inner,
            api: self.api.clone(),
        }
    }
}

#[derive(Clone)]
pub(super) struct Admit<S> {
    inner: S,
    api: Api,
}

type Answer<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S> Service<http::Request<Body>> for Admit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if !request.uri().path().starts_with("/tresor.v1.") {
            return Box::pin(self.inner.call(request));
        }
        let connection = request
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>();
        // Only a refusal needs the peer as text (its audit record).
        let peer = || {
            connection
                .and_then(|i| i.get_ref().remote_addr())
                .map(|a| a.to_string())
                .unwrap_or_default()
        };
        let identified = self.api.identify(
            connection
                .and_then(|i| i.peer_certs())
                .as_deref()
                .map(Vec::as_slice),
        );
        let operation = operation_of(request.uri().path());
        let api = self.api.clone();
        let Some(permit) = self.api.try_admit() else {
            let peer = peer();
            return Box::pin(async move {
                Ok(api
                    .refuse_unread(operation, &peer, Unread::Overloaded)
                    .await
                    .into_http())
            });
        };
        let identity = match identified {
            Ok(identity) => identity,
            Err(e) => {
                // Refused before its message is read; the permit is given back first, so
                // refusals do not hold the server's capacity.
                drop(permit);
                let peer = peer();
                return Box::pin(async move {
                    Ok(api
                        .refuse_unread(operation, &peer, Unread::Unauthenticated(&e))
                        .await
                        .into_http())
                });
            }
        };
        // The policy's role check, before the message is read (key patterns need the message
        // and are checked by the service). Unknown methods are left to tonic's UNIMPLEMENTED.
        let grant = if operation == "Unknown" {
            None
        } else {
            match self.api.authorize(&identity, operation) {
                Ok(grant) => Some(grant),
                Err(e) => {
                    drop(permit);
                    let peer = peer();
                    return Box::pin(async move {
                        Ok(api
                            .refuse_unread(operation, &peer, Unread::Denied(&identity, &e))
                            .await
                            .into_http())
                    });
                }
            }
        };
        request
            .extensions_mut()
            .insert(Admitted(Arc::new(Mutex::new(Some((
                permit, identity, grant,
            ))))));
        Box::pin(self.inner.call(request))
    }
}

/// The RPC name of a `/tresor.v1.Service/Method` path, as the audit log and metrics name it.
fn operation_of(path: &str) -> &'static str {
    const OPERATIONS: &[&str] = &[
        "Wrap",
        "Unwrap",
        "GenerateDataKey",
        "Rewrap",
        "CreateKey",
        "GetKey",
        "ListKeys",
        "RotateKey",
        "UpdateKey",
        "EnableKeyVersion",
        "DisableKeyVersion",
        "ScheduleKeyVersionDestruction",
        "CancelKeyVersionDestruction",
        "ListApprovals",
        "Approve",
        "Reject",
        "ExportAuditLog",
        "GetAuditCheckpoint",
        "GetAuditPublicKey",
        "ComputeAadHmac",
        "ListManagedObjects",
        "GetManagedObject",
        "RevokeManagedObject",
        "DestroyManagedObject",
        "RequestAccessWindow",
        "ListAccessWindows",
        "CloseAccessWindow",
    ];
    let method = path.rsplit('/').next().unwrap_or("");
    OPERATIONS
        .iter()
        .copied()
        .find(|o| *o == method)
        .unwrap_or("Unknown")
}
