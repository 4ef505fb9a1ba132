//! The four parts of a flood from the network, shared by `tests/flood.rs` (in the server's
//! process) and `examples/flood.rs` (a process of its own, `scripts/flood-process`):
//! (a) idle TCP connections that never send a byte (with `reopen_idle`, reopened as soon as
//!     the server closes them);
//! (b) TLS connections without a client certificate sending Wrap calls as fast as they can
//!     (a tenth of them 200 KB messages), reconnecting when closed;
//! (c) XKS connections sending their request headers a byte every 300 ms;
//! (d) XKS connections announcing 200 KB bodies under a signature that does not verify, then
//!     sending the body anyway.
//! [`Seen`] counts what the attackers saw.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// What to flood, and with how much.
#[derive(Debug, Clone)]
pub struct Flood {
    /// The gRPC listener.
    pub grpc: SocketAddr,
    /// The XKS listener (parts c and d need it).
    pub xks: Option<SocketAddr>,
    /// The XKS path prefix of a tenant.
    pub xks_prefix: String,
    /// The CA that issued the server certificates.
    pub ca: PathBuf,
    /// The name in the server certificates.
    pub server_name: String,
    /// The key the certificate-less calls name.
    pub key: String,
    pub idle: usize,
    pub reopen_idle: bool,
    pub anonymous: usize,
    pub trickle: usize,
    pub bodies: usize,
    /// The attackers' source addresses, round-robin; empty: the OS's choice.
    pub sources: Vec<IpAddr>,
    /// Print why each certificate-less connection failed.
    pub verbose: bool,
}

#[derive(Default)]
pub struct Seen {
    pub idle_opened: AtomicU64,
    pub idle_closed_by_server: AtomicU64,
    pub grpc_connect_failed: AtomicU64,
    pub grpc_calls: AtomicU64,
    pub grpc_unauthenticated: AtomicU64,
    pub grpc_other_errors: AtomicU64,
    pub trickles_cut: AtomicU64,
    pub bodies_refused: AtomicU64,
}

/// The source address of the `i`th attacker: round-robin over `sources`, the OS's choice if none.
fn source(sources: &[IpAddr], i: usize) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[i % sources.len()])
}

async fn tcp_from(src: Option<IpAddr>, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(src) = src {
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.connect(to).await
}

fn xks_tls(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tresor::pki::load_certs(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let config =
        tresor::xks::client::tls_config(roots, tresor::xks::client::HttpVersion::Http1, None)
            .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn xks_connection(
    src: Option<IpAddr>,
    to: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    name: &str,
) -> std::io::Result<Tls> {
    let tcp = tcp_from(src, to).await?;
    let name = rustls::pki_types::ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tls.connect(name, tcp).await
}

/// Reads until the server closes the connection or `limit` passes; true when it closed.
async fn closed_within(conn: &mut Tls, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Starts every part; they run until `stop` is set (or their tasks are aborted).
pub fn start(f: &Flood, seen: &Arc<Seen>, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();

    // (a) idle TCP connections.
    for i in 0..f.idle {
        let reopen = f.reopen_idle;
        let (seen, stop, to, src) = (
            Arc::clone(seen),
            Arc::clone(stop),
            f.grpc,
            source(&f.sources, i),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut tcp) = tcp_from(src, to).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                seen.idle_opened.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 64];
                loop {
                    match tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await
                    {
                        Ok(Ok(0) | Err(_)) => {
                            seen.idle_closed_by_server.fetch_add(1, Ordering::Relaxed);
                            if reopen {
                                break;
                            }
                            return;
                        }
                        _ if stop.load(Ordering::Relaxed) => return,
                        _ => {}
                    }
                }
            }
        }));
    }

    // (b) TLS without a client certificate, Wrap calls as fast as they come back.
    let ca = std::fs::read(&f.ca).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(f.server_name.clone());
    for i in 0..f.anonymous {
        let endpoint = Endpoint::from_shared(format!("https://{}", f.grpc))
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .local_address(source(&f.sources, i))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        let (seen, stop, key) = (Arc::clone(seen), Arc::clone(stop), f.key.clone());
        let verbose = f.verbose;
        tasks.push(tokio::spawn(async move {
            let plaintext = if i % 10 == 0 {
                vec![0; 200_000]
            } else {
                vec![1; 32]
            };
            while !stop.load(Ordering::Relaxed) {
                let channel = match endpoint.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        if verbose {
                            eprintln!("connect: {}", tresor::client::error_chain(&e));
                        }
                        seen.grpc_connect_failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let mut keys = tresor::proto::key_service_client::KeyServiceClient::new(channel);
                while !stop.load(Ordering::Relaxed) {
                    let r = keys
                        .wrap(tresor::proto::WrapRequest {
                            justification: None,
                            key: key.clone(),
                            plaintext: plaintext.clone(),
                            aad: Vec::new(),
                        })
                        .await;
                    seen.grpc_calls.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Err(s) if s.code() == tonic::Code::Unauthenticated => {
                            seen.grpc_unauthenticated.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            // Closed by the server, or refused: reconnect, as an attacker would.
                            seen.grpc_other_errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            break;
                        }
                        Ok(_) => {}
                    }
                }
            }
        }));
    }

    if let Some(xks) = f.xks {
        let connector = xks_tls(&f.ca);
        // (c) headers a byte every 300 ms.
        for i in 0..f.trickle {
            let (seen, stop, connector, name, prefix) = (
                Arc::clone(seen),
                Arc::clone(stop),
                connector.clone(),
                f.server_name.clone(),
                f.xks_prefix.clone(),
            );
            let src = source(&f.sources, i);
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = xks_connection(src, xks, &connector, &name).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let head = format!("POST {prefix}/kms/xks/v1/keys/k/encrypt HTTP/1.1\r\nHo");
                    let _ = conn.write_all(head.as_bytes()).await;
                    for byte in b"st: localhost\r\nX-Trickle: aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if closed_within(&mut conn, Duration::from_millis(300)).await
                            || conn.write_all(&[*byte]).await.is_err()
                        {
                            seen.trickles_cut.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }));
        }
        // (d) large bodies under a signature that does not verify.
        for i in 0..f.bodies {
            let (seen, stop, connector, name) = (
                Arc::clone(seen),
                Arc::clone(stop),
                connector.clone(),
                f.server_name.clone(),
            );
            let src = source(&f.sources, i);
            let head = format!(
                "POST {}/kms/xks/v1/keys/k/encrypt HTTP/1.1\r\nHost: {name}\r\n\
                 Content-Type: application/json\r\nContent-Length: 200000\r\n\
                 x-amz-date: 20261201T120000Z\r\n\
                 Authorization: AWS4-HMAC-SHA256 Credential=AKIAI2SFODNN7EXAMPLE/20261201/eu-central-1/kms-xks-proxy/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature={}\r\n\r\n",
                f.xks_prefix,
                "0".repeat(64)
            );
            tasks.push(tokio::spawn(async move {
                let body = vec![b'{'; 200_000];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut conn) = xks_connection(src, xks, &connector, &name).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        continue;
                    }
                    let mut answer = [0u8; 16];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(2), conn.read(&mut answer)).await
                        && answer[..n].starts_with(b"HTTP/1.1 401")
                    {
                        seen.bodies_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = conn.write_all(&body).await;
                }
            }));
        }
    }

    tasks
}
