//! Serving the gRPC services on connections from the shared TLS listener: tonic's HTTP/2
//! server with its limits, `grpc.health.v1` fed by the composition root's health watcher, and
//! server reflection (`grpc.reflection.v1` and `v1alpha`, for older tools).

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::transport::Server as TonicServer;

use super::Api;
use crate::listener::{Connection, ListenerLimits};
use crate::proto::access_service_server::AccessServiceServer;
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::key_admin_service_server::KeyAdminServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::proto::managed_object_admin_service_server::ManagedObjectAdminServiceServer;
use crate::proto::{self, MAX_MESSAGE_BYTES};

/// ALPN for the gRPC listener.
pub const ALPN: &[&[u8]] = &[b"h2"];
/// The services whose health `grpc.health.v1.Health` reports ("" is the server as a whole).
const HEALTH_SERVICES: [&str; 6] = [
    "",
    "tresor.v1.AccessService",
    "tresor.v1.KeyService",
    "tresor.v1.KeyAdminService",
    "tresor.v1.ManagedObjectAdminService",
    "tresor.v1.AuditService",
];

/// Why the gRPC server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not be built from the descriptors.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The HTTP/2 server failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Serves every gRPC service on `connections` until `shutdown` completes, then lets in-flight
/// requests finish. `health` is true while Tresor can serve (NOT_SERVING otherwise).
pub async fn serve(
    api: Api,
    connections: mpsc::Receiver<(Connection, SocketAddr)>,
    health: watch::Receiver<bool>,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reporting = tokio::spawn(report_health(reporter, health));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(connections)
        .map(|(connection, _peer)| Ok::<_, std::io::Error>(connection));
    let served = TonicServer::builder()
        .timeout(limits.request_timeout)
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        // No server pings: a connection's liveness is what it sends (the listener closes one
        // idle for `idle_timeout`), and pings answered would keep an idle flood open.
        .http2_keepalive_interval(None)
        .layer(super::admit::AdmitLayer { api: api.clone() })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            KeyServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            KeyAdminServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(ManagedObjectAdminServiceServer::new(api.clone()))
        .add_service(AccessServiceServer::new(api.clone()))
        .add_service(AuditServiceServer::new(api).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    reporting.abort();
    Ok(served?)
}

/// Mirrors the health watcher's verdict into `grpc.health.v1.Health`.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut healthy: watch::Receiver<bool>,
) {
    loop {
        let status = if *healthy.borrow_and_update() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for service in HEALTH_SERVICES {
            reporter.set_service_status(service, status).await;
        }
        if healthy.changed().await.is_err() {
            return;
        }
    }
}
