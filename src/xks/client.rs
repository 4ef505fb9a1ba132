//! A small HTTPS client for the XKS API, over one connection (HTTP/1.1 or HTTP/2), for
//! `tresor bench --xks` and the tests. It sends what it is given; signing is the caller's
//! ([`super::sigv4::sign`] in the bench, AWS's `aws-sigv4` in the tests).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Which HTTP version to speak (negotiated by ALPN, so the server must offer it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    /// HTTP/1.1: one request at a time per connection.
    Http1,
    /// HTTP/2: many requests at once on one connection.
    Http2,
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One connection to an XKS proxy.
pub struct XksClient {
    sender: Sender,
    /// `host:port` as the requests' `Host` / `:authority`.
    pub authority: String,
}

impl std::fmt::Debug for XksClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XksClient")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// The TLS client side of an XKS connection: ring's default suites, the proxy verified against
/// `roots`, `identity` presented when given, and the ALPN protocol of `version`.
pub fn tls_config(
    roots: rustls::RootCertStore,
    version: HttpVersion,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?,
    };
    config.alpn_protocols = vec![match version {
        HttpVersion::Http1 => b"http/1.1".to_vec(),
        HttpVersion::Http2 => b"h2".to_vec(),
    }];
    Ok(config)
}

impl XksClient {
    /// Connects to `addr`, verifying the server as `server_name` against `roots`, presenting
    /// `identity` (certificate chain and key) when given.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        roots: rustls::RootCertStore,
        version: HttpVersion,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Self, String> {
        let config = tls_config(roots, version, identity)?;
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
        let io = TokioIo::new(tls);
        let sender = match version {
            HttpVersion::Http1 => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Sender::Http1(sender)
            }
            HttpVersion::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Sender::Http2(sender)
            }
        };
        Ok(Self {
            sender,
            authority: format!("{server_name}:{}", addr.port()),
        })
    }

    /// Sends a request; returns the status and the whole body.
    pub async fn send(
        &mut self,
        request: http::Request<Bytes>,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let request = request.map(Full::new);
        let response = match &mut self.sender {
            Sender::Http1(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(request).await
            }
            Sender::Http2(s) => {
                s.ready().await.map_err(|e| e.to_string())?;
                s.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// A request to `path` with `body`, addressed to this connection's authority (URI and
    /// `Host`), unsigned.
    pub fn request(&self, method: http::Method, path: &str, body: Bytes) -> http::Request<Bytes> {
        let mut request = http::Request::new(body);
        *request.method_mut() = method;
        if let Ok(uri) = format!("https://{}{path}", self.authority).parse() {
            *request.uri_mut() = uri;
        }
        if matches!(self.sender, Sender::Http1(_))
            && let Ok(host) = http::HeaderValue::from_str(&self.authority)
        {
            request.headers_mut().insert(http::header::HOST, host);
        }
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        request
    }
}
