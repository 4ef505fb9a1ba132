//! The XKS proxy's listeners: HTTPS (HTTP/1.1 and HTTP/2 by ALPN, optional mTLS with a fixed
//! client subject) and an optional plain-HTTP listener that answers only `GET /ping`.
//!
//! Owns connections, TLS handshakes and the HTTP framing; every request goes to
//! [`Xks::handle`]. Bounded everywhere: handshakes in progress, handshake time, body size,
//! request time. Connection tasks live in a `JoinSet` owned by the accept loop, so stopping
//! the loop stops them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming as Body;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::{Incoming, MAX_BODY, Outgoing, Xks};

const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (body read and answer) that takes longer is answered with a 503 by hyper's
/// connection being dropped; KMS gives up after 250 ms anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The TLS configuration: TLS 1.3 and 1.2 with ring's AEAD suites (which include the spec's
/// required ones), ALPN `h2` and `http/1.1`, client certificates from `client_ca` when given.
pub fn tls_config(
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    client_ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca).map_err(|e| e.to_string())?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves HTTPS on `listener` until the returned future is dropped (the server aborts it).
/// With `client_subject`, a connection whose client certificate's subject CN differs is
/// closed right after the handshake.
pub async fn serve(
    xks: Xks,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    client_subject: Option<String>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "XKS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let xks = xks.clone();
        let subject = client_subject.clone();
        connections.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "XKS TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            drop(permit);
            let presented = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned();
            let fingerprint = presented
                .as_ref()
                .map(crate::auth::fingerprint)
                .unwrap_or_default();
            if let Some(subject) = &subject {
                let cn = presented.as_ref().and_then(|c| subject_cn(c.as_ref()));
                if cn.as_deref() != Some(subject.as_str()) {
                    tracing::warn!(%peer, presented = ?cn, expected = %subject, "XKS client certificate has another subject; connection closed");
                    return;
                }
            }
            serve_connection(xks, TokioIo::new(tls), Some(peer), fingerprint).await;
        });
    }
}

/// Serves plain HTTP on `listener`, answering only `GET /ping` (for load balancers).
pub async fn serve_ping(xks: Xks, listener: TcpListener) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let xks = xks.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<Body>| {
                let xks = xks.clone();
                async move {
                    let answer = if request.uri().path() == "/ping" {
                        xks.ping(request.method()).await
                    } else {
                        Outgoing::plain(http::StatusCode::NOT_FOUND, "only GET /ping here\n")
                    };
                    Ok::<_, std::convert::Infallible>(response(answer))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            tracing::trace!(%peer, "ping connection closed");
        });
    }
}

async fn serve_connection<I>(xks: Xks, io: I, peer: Option<SocketAddr>, fingerprint: String)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: http::Request<Body>| {
        let xks = xks.clone();
        let fingerprint = fingerprint.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body =
                match tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, MAX_BODY).collect())
                    .await
                {
                    Ok(Ok(collected)) => Some(collected.to_bytes()),
                    _ => None,
                };
            let answer = xks
                .handle(Incoming {
                    method: parts.method,
                    uri: parts.uri,
                    headers: parts.headers,
                    body,
                    peer,
                    client_fingerprint: fingerprint,
                })
                .await;
            Ok::<_, std::convert::Infallible>(response(answer))
        }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(?peer, error = %e, "XKS connection ended with an error");
    }
}

fn response(answer: Outgoing) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::copy_from_slice(answer.body.as_bytes())));
    *r.status_mut() = answer.status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(answer.content_type),
    );
    r
}

/// The subject CN of a DER certificate.
fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
