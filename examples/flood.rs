//! A flood generator in its own process, so the server under test does not share its runtime
//! with the attacker (`scripts/flood-process`, BENCHMARKS.md "Hostile clients").
//!
//! From source addresses of its own on loopback (127.0.0.2 and up, so the allowed caller on
//! 127.0.0.1 is another host to the server), for `--seconds`:
//! (a) `--idle` TCP connections that never send a byte (with `--reopen-idle`, reopened as soon
//!     as the server closes them);
//! (b) `--anonymous` TLS connections without a client certificate sending Wrap calls as fast as
//!     they can (a tenth of them 200 KB messages), reconnecting when closed;
//! (c) `--trickle` XKS connections sending their request headers a byte every 300 ms;
//! (d) `--bodies` XKS connections announcing 200 KB bodies under a signature that does not
//!     verify, then sending the body anyway.
//! At the end it prints one JSON object with what the attackers saw.
//!
//! Run: `cargo run --release --example flood -- --grpc 127.0.0.1:18443 --ca ca.pem ...`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[derive(Parser)]
struct Args {
    /// The gRPC listener, HOST:PORT.
    #[arg(long)]
    grpc: SocketAddr,
    /// The XKS listener, HOST:PORT (parts c and d need it).
    #[arg(long)]
    xks: Option<SocketAddr>,
    /// The XKS path prefix of a tenant.
    #[arg(long, default_value = "/flood")]
    xks_prefix: String,
    /// The CA that issued the server certificates.
    #[arg(long)]
    ca: PathBuf,
    /// The name in the server certificates.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// The key the certificate-less calls name.
    #[arg(long, default_value = "tenants/demo/keys/bench")]
    key: String,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2_000)]
    idle: usize,
    /// Reopen an idle connection as soon as the server closes it (a connection storm), instead
    /// of opening each once and holding it.
    #[arg(long)]
    reopen_idle: bool,
    #[arg(long, default_value_t = 500)]
    anonymous: usize,
    #[arg(long, default_value_t = 200)]
    trickle: usize,
    #[arg(long, default_value_t = 50)]
    bodies: usize,
    /// How many source addresses (127.0.0.2, 127.0.0.3, ...) the attackers spread over.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// Print why each certificate-less connection failed.
    #[arg(long)]
    verbose: bool,
}

#[derive(Default)]
struct Seen {
    idle_opened: AtomicU64,
    idle_closed_by_server: AtomicU64,
    grpc_connect_failed: AtomicU64,
    grpc_calls: AtomicU64,
    grpc_unauthenticated: AtomicU64,
    grpc_other_errors: AtomicU64,
    trickles_cut: AtomicU64,
    bodies_refused: AtomicU64,
}

fn source(i: usize, sources: u8) -> IpAddr {
    let n = u8::try_from(i % usize::from(sources.max(1))).unwrap();
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n))
}

async fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(to).await
}

fn xks_tls(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tresor::pki::load_certs(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn xks_connection(
    src: IpAddr,
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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();

    // (a) idle TCP connections.
    for i in 0..args.idle {
        let reopen = args.reopen_idle;
        let (seen, stop, to, src) = (
            Arc::clone(&seen),
            Arc::clone(&stop),
            args.grpc,
            source(i, args.sources),
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
    let ca = std::fs::read(&args.ca).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(args.server_name.clone());
    for i in 0..args.anonymous {
        let endpoint = Endpoint::from_shared(format!("https://{}", args.grpc))
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .local_address(Some(source(i, args.sources)))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
        let (seen, stop, key) = (Arc::clone(&seen), Arc::clone(&stop), args.key.clone());
        let verbose = args.verbose;
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

    if let Some(xks) = args.xks {
        let connector = xks_tls(&args.ca);
        // (c) headers a byte every 300 ms.
        for i in 0..args.trickle {
            let (seen, stop, connector, name, prefix) = (
                Arc::clone(&seen),
                Arc::clone(&stop),
                connector.clone(),
                args.server_name.clone(),
                args.xks_prefix.clone(),
            );
            let src = source(i, args.sources);
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
        for i in 0..args.bodies {
            let (seen, stop, connector, name) = (
                Arc::clone(&seen),
                Arc::clone(&stop),
                connector.clone(),
                args.server_name.clone(),
            );
            let src = source(i, args.sources);
            let head = format!(
                "POST {}/kms/xks/v1/keys/k/encrypt HTTP/1.1\r\nHost: {name}\r\n\
                 Content-Type: application/json\r\nContent-Length: 200000\r\n\
                 x-amz-date: 20261201T120000Z\r\n\
                 Authorization: AWS4-HMAC-SHA256 Credential=AKIAI2SFODNN7EXAMPLE/20261201/eu-central-1/kms-xks-proxy/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature={}\r\n\r\n",
                args.xks_prefix,
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

    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "seconds": started.elapsed().as_secs_f64(),
            "idle_opened": n(&seen.idle_opened),
            "idle_closed_by_server": n(&seen.idle_closed_by_server),
            "grpc_connect_failed": n(&seen.grpc_connect_failed),
            "grpc_calls": n(&seen.grpc_calls),
            "grpc_unauthenticated": n(&seen.grpc_unauthenticated),
            "grpc_other_errors": n(&seen.grpc_other_errors),
            "xks_trickles_cut": n(&seen.trickles_cut),
            "xks_bodies_refused": n(&seen.bodies_refused),
        })
    );
}
