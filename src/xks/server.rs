//! The XKS proxy's listeners: HTTPS (HTTP/1.1 and HTTP/2 by ALPN, optional mTLS with a fixed
//! client subject) and an optional plain-HTTP listener that answers only `GET /ping`.
//!
//! Owns the HTTP framing of connections the shared TLS listener ([`crate::listener`])
//! established; every request goes to [`Xks::handle`]. Bounded: body size, request time.
//! Connection tasks live in a `JoinSet` owned by the serving loop, so stopping the loop stops
//! them.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming as Body;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Incoming, MAX_BODY, Outgoing, PendingBody, Xks};
use crate::listener::{Connection, ListenerLimits};

/// ALPN for the HTTPS listener: HTTP/2 first, HTTP/1.1 for clients without it.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Serves the connections the shared TLS listener ([`crate::listener`]) established, until
/// `connections` closes or the task is aborted (its connection tasks end with it). With
/// `client_subject`, a connection whose client certificate's subject CN differs is closed
/// before any request is read.
pub async fn serve(
    xks: Xks,
    mut connections: mpsc::Receiver<(Connection, SocketAddr)>,
    client_subject: Option<String>,
    limits: ListenerLimits,
) {
    let mut serving = JoinSet::new();
    while let Some((tls, peer)) = connections.recv().await {
        while serving.try_join_next().is_some() {}
        let presented = tls
            .tls()
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned();
        let fingerprint = presented
            .as_ref()
            .map(crate::auth::fingerprint)
            .unwrap_or_default();
        if let Some(subject) = &client_subject {
            let cn = presented.as_ref().and_then(|c| subject_cn(c.as_ref()));
            if cn.as_deref() != Some(subject.as_str()) {
                tracing::warn!(%peer, presented = ?cn, expected = %subject, "XKS client certificate has another subject; connection closed");
                continue;
            }
        }
        serving.spawn(serve_connection(
            xks.clone(),
            TokioIo::new(tls),
            Some(peer),
            fingerprint,
            limits,
        ));
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

async fn serve_connection<I>(
    xks: Xks,
    io: I,
    peer: Option<SocketAddr>,
    fingerprint: String,
    limits: ListenerLimits,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: http::Request<Body>| {
        let xks = xks.clone();
        let fingerprint = fingerprint.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body: PendingBody = Box::pin(async move {
                match tokio::time::timeout(
                    limits.request_timeout,
                    Limited::new(body, MAX_BODY).collect(),
                )
                .await
                {
                    Ok(Ok(collected)) => Some(collected.to_bytes()),
                    _ => None,
                }
            });
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
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // With a timer, hyper bounds the time to receive a request's headers: a client that
    // trickles a header byte every few seconds is closed, not served forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection);
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
