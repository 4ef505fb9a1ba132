//! The one TLS accept loop every front-end listens through (gRPC, the XKS proxy, and any that
//! follows): the server's TLS configuration, bounded handshakes, and the hand-over of each
//! established connection to its front-end.
//!
//! Owns TCP accept, TLS handshakes and their limits. It does not look at what a client says
//! (that is the front-end's protocol) nor decide who a client is (that is [`crate::auth`]);
//! it only hands over connections whose handshake completed in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A connection whose TLS handshake completed.
pub type Connection = TlsStream<TcpStream>;

/// Bounds on what a client can hold before it has said anything.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// TLS handshakes in progress at once; more connections wait in the kernel's backlog.
    pub max_handshakes: usize,
    /// A handshake that takes longer is abandoned and its connection closed.
    pub handshake_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The server side of TLS for a listener: TLS 1.3 and 1.2 with ring's default suites (all
/// AEAD: AES-GCM and ChaCha20-Poly1305, ECDHE only; no CBC, no RSA key exchange), the given
/// client-certificate verifier (none: no client certificate is asked for), and the ALPN
/// protocols the front-end speaks, in order of preference.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Accepts connections on `listener` until the returned receiver is dropped or the task
/// aborted, runs each handshake in a task of its own (a slow client holds up no other), and
/// sends each established connection, with its peer address, to the receiver. Aborting the
/// task also ends the handshakes in progress.
pub fn accept(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    limits: ListenerLimits,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::Receiver<(Connection, SocketAddr)>,
) {
    let (tx, rx) = mpsc::channel(limits.max_handshakes.max(1));
    let task = tokio::spawn(accept_loop(
        name,
        listener,
        TlsAcceptor::from(tls),
        limits,
        tx,
    ));
    (task, rx)
}

async fn accept_loop(
    name: &'static str,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: ListenerLimits,
    established: mpsc::Sender<(Connection, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let mut in_progress = JoinSet::new();
    loop {
        while in_progress.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = established.closed() => return,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(listener = name, %peer, error = %e, "could not set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let established = established.clone();
        in_progress.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // A closed receiver means the front-end stopped: the connection is dropped.
                    let _ = established.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(listener = name, %peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Why a listener's TLS configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A certificate or the key was refused.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// The client CA could not make a verifier.
    #[error(transparent)]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A verifier that requires a client certificate issued by one of `cas` (WebPKI rules).
pub fn ca_verifier(
    cas: Vec<CertificateDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()?,
    )
}
