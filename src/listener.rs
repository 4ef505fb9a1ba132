//! The one TLS accept loop every front-end listens through (gRPC, the XKS proxy, and any that
//! follows): the server's TLS configuration, bounded handshakes, and the hand-over of each
//! established connection to its front-end.
//!
//! Owns TCP accept, TLS handshakes and their limits. It does not look at what a client says
//! (that is the front-end's protocol) nor decide who a client is (that is [`crate::auth`]);
//! it only hands over connections whose handshake completed in time.

use std::collections::HashMap;
use std::future::Future as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Bounds on what clients can hold of a listener. The connection bounds are enforced here;
/// the request bounds by the front-end's HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Connections open at once (from accept to close); beyond it a new one is closed at once.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress at once. When all are taken, a new connection waits for one
    /// (within its handshake time), and the oldest handshake in progress, if it has taken
    /// longer than [`STALLED_HANDSHAKE`], is abandoned to make room.
    pub max_handshakes: usize,
    /// A handshake that takes longer is abandoned and its connection closed.
    pub handshake_timeout: Duration,
    /// A connection from which nothing was read for this long is closed.
    pub idle_timeout: Duration,
    /// Time to receive a request's headers (HTTP/1.1; HTTP/2 frames are bounded by the idle
    /// and request times).
    pub header_timeout: Duration,
    /// Time to receive a request's body and answer it.
    pub request_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// TLS handshakes one source address may start per second (after a burst of as many);
    /// more are closed at accept. A handshake costs the server a signature and a key exchange,
    /// so a client reconnecting as fast as it can is bounded here.
    pub handshakes_per_source_per_sec: u32,
    /// Connections without a client certificate, per source address, when this listener
    /// requires certificates for everything but health and reflection (gRPC); `None` where a
    /// certificate is not how callers authenticate (XKS: SigV4).
    pub anonymous: Option<AnonymousLimits>,
}

/// What a connection without a client certificate may use of a listener that authenticates
/// by certificate: enough for health checks and reflection, not for a flood of refused calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonymousLimits {
    /// Such connections open at once from one source address.
    pub per_source: usize,
    /// Bytes per second read from one such connection (after a first burst of as many).
    pub read_bytes_per_sec: u32,
}

impl Default for AnonymousLimits {
    fn default() -> Self {
        Self {
            per_source: 8,
            read_bytes_per_sec: 4096,
        }
    }
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_source: 256,
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_streams_per_connection: 256,
            handshakes_per_source_per_sec: 50,
            anonymous: Some(AnonymousLimits::default()),
        }
    }
}

/// A connection whose TLS handshake completed. It holds its place in the listener's
/// connection bounds until dropped, and fails with `TimedOut` once nothing was read from it
/// for the idle time.
pub struct Connection {
    tls: TlsStream<TcpStream>,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Reads of a connection without a client certificate are rationed.
    throttle: Option<Throttle>,
    _place: Place,
    _anonymous: Option<Counted>,
}

/// A token bucket over bytes read.
struct Throttle {
    rate: f64,
    tokens: f64,
    refilled: tokio::time::Instant,
    wait: Pin<Box<tokio::time::Sleep>>,
}

impl Throttle {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate,
            refilled: tokio::time::Instant::now(),
            wait: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// How many bytes may be read now; `None`, with a wake-up registered, while none.
    fn allowance(&mut self, cx: &mut Context<'_>) -> Option<usize> {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            // Whole bytes only; the bucket never holds more than `rate`, a u32.
            return Some(self.tokens as usize);
        }
        let wait = Duration::from_secs_f64((1.0 - self.tokens) / self.rate);
        self.wait.as_mut().reset(now + wait);
        match self.wait.as_mut().poll(cx) {
            Poll::Ready(()) => Some(1),
            Poll::Pending => None,
        }
    }

    fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self._place.source.source)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The TLS session (the client's certificates).
    pub fn tls(&self) -> &rustls::ServerConnection {
        self.tls.get_ref().1
    }
}

impl Connection {
    /// After a read that made progress: the idle time starts again.
    fn active(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// While a read waits: `TimedOut` once nothing was read for the idle time.
    fn idle_or_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.idle.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let Some(throttle) = this.throttle.as_mut() else {
            return match Pin::new(&mut this.tls).poll_read(cx, buf) {
                Poll::Ready(r) => {
                    this.active();
                    Poll::Ready(r)
                }
                Poll::Pending => this.idle_or_pending(cx),
            };
        };
        let Some(allowed) = throttle.allowance(cx) else {
            return Poll::Pending;
        };
        // Read at most the allowance, through a buffer of its size (a copy, only on rationed
        // connections, so that no unsafe code is needed to limit `buf`).
        let mut chunk = vec![0u8; allowed.min(buf.remaining())];
        let mut limited = ReadBuf::new(&mut chunk);
        match Pin::new(&mut this.tls).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                throttle.spend(limited.filled().len());
                buf.put_slice(limited.filled());
                this.active();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.idle_or_pending(cx),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

/// Counts per source address; a [`Counted`] guard holds one.
type PerSource = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One count of a source in a [`PerSource`] map, given back when dropped.
struct Counted {
    map: PerSource,
    source: IpAddr,
}

impl Counted {
    /// Counts `source` in `map`, or `None` when it already has `bound`.
    fn take(map: &PerSource, source: IpAddr, bound: usize) -> Option<Self> {
        let mut counts = crate::sync::lock(map);
        let n = counts.entry(source).or_insert(0);
        if *n >= bound {
            return None;
        }
        *n += 1;
        Some(Self {
            map: Arc::clone(map),
            source,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut counts = crate::sync::lock(&self.map);
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

/// Handshakes started per source: a token bucket per address.
#[derive(Default)]
struct HandshakeRates {
    buckets: HashMap<IpAddr, (f64, std::time::Instant)>,
}

impl HandshakeRates {
    /// Whether `source` may start a handshake now, at `rate` per second.
    fn allow(&mut self, source: IpAddr, rate: u32) -> bool {
        let rate = f64::from(rate.max(1));
        let now = std::time::Instant::now();
        if self.buckets.len() > 100_000 {
            // Forget sources whose bucket is full again: they are as new.
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < rate
            });
        }
        let (tokens, at) = self.buckets.entry(source).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A handshake in progress this long, while every handshake slot is taken, is given up for a
/// newer connection. A client on the same network finishes its handshake in milliseconds; one
/// that sends nothing (or a byte at a time) holds its slot only until others need it, so clients
/// that never finish cannot keep everyone else out, from however many addresses they come.
pub const STALLED_HANDSHAKE: Duration = Duration::from_millis(100);

/// The handshakes holding a slot, oldest first, each with the means to abandon it.
#[derive(Default)]
struct InProgress {
    next: u64,
    started: std::collections::BTreeMap<u64, (tokio::time::Instant, oneshot::Sender<()>)>,
}

type HandshakeRegistry = Arc<Mutex<InProgress>>;

/// A handshake's entry in [`InProgress`], removed when dropped.
struct Registered {
    all: HandshakeRegistry,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        crate::sync::lock(&self.all).started.remove(&self.id);
    }
}

impl InProgress {
    /// Registers a handshake that holds a slot; the receiver fires if it is abandoned.
    fn register(all: &HandshakeRegistry) -> (Registered, oneshot::Receiver<()>) {
        let (abandon, abandoned) = oneshot::channel();
        let mut this = crate::sync::lock(all);
        let id = this.next;
        this.next += 1;
        this.started
            .insert(id, (tokio::time::Instant::now(), abandon));
        (
            Registered {
                all: Arc::clone(all),
                id,
            },
            abandoned,
        )
    }

    /// Abandons the oldest handshake if it has been in progress longer than `stalled`.
    fn abandon_oldest(all: &HandshakeRegistry, stalled: Duration) -> bool {
        let mut this = crate::sync::lock(all);
        let old_enough = this
            .started
            .first_key_value()
            .is_some_and(|(_, (at, _))| at.elapsed() > stalled);
        if !old_enough {
            return false;
        }
        this.started
            .pop_first()
            .is_some_and(|(_, (_, abandon))| abandon.send(()).is_ok())
    }
}

/// A connection's place in the listener's bounds: one of the total, one of its source's.
struct Place {
    _total: OwnedSemaphorePermit,
    source: Counted,
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
    let registry: HandshakeRegistry = Arc::default();
    // One source may hold only an eighth of the handshake slots, so that clients that never
    // finish their handshake cannot keep everyone else from starting one; from more sources,
    // the oldest stalled handshake gives its slot up ([`STALLED_HANDSHAKE`]).
    let handshakes_per_source = (limits.max_handshakes / 8).max(1);
    let total = Arc::new(Semaphore::new(limits.max_connections));
    let sources: PerSource = Arc::default();
    let handshaking: PerSource = Arc::default();
    let anonymous: PerSource = Arc::default();
    let mut rates = HandshakeRates::default();
    let mut in_progress = JoinSet::new();
    loop {
        while in_progress.try_join_next().is_some() {}
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
        // Over any bound, the connection is closed at once, never left in the backlog: a flood
        // from one source cannot take the listener from others.
        let admitted = rates
            .allow(peer.ip(), limits.handshakes_per_source_per_sec)
            .then(|| Arc::clone(&total).try_acquire_owned().ok())
            .flatten()
            .and_then(|permit| {
                let source = Counted::take(&sources, peer.ip(), limits.max_connections_per_source)?;
                let handshaking = Counted::take(&handshaking, peer.ip(), handshakes_per_source)?;
                Some((
                    Place {
                        _total: permit,
                        source,
                    },
                    handshaking,
                ))
            });
        let Some((place, handshaking)) = admitted else {
            crate::metrics::global().connection_refused(name);
            tracing::debug!(listener = name, %peer, "connection over the listener's bounds closed");
            continue;
        };
        // Every slot taken: this connection waits for one, and the oldest handshake, if stalled,
        // makes room.
        let slot = Arc::clone(&handshakes).try_acquire_owned().ok();
        if slot.is_none() && InProgress::abandon_oldest(&registry, STALLED_HANDSHAKE) {
            crate::metrics::global().connection_refused(name);
        }
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(listener = name, %peer, error = %e, "could not set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let established = established.clone();
        let anonymous_sources = Arc::clone(&anonymous);
        let (handshakes, registry) = (Arc::clone(&handshakes), Arc::clone(&registry));
        in_progress.spawn(async move {
            let handshake = async {
                let _slot = match slot {
                    Some(slot) => slot,
                    None => handshakes.acquire_owned().await.ok()?,
                };
                let (_registered, abandoned) = InProgress::register(&registry);
                tokio::select! {
                    tls = acceptor.accept(tcp) => Some(tls),
                    _ = abandoned => {
                        tracing::debug!(listener = name, %peer, "stalled TLS handshake abandoned for a newer connection");
                        None
                    }
                }
            };
            let outcome = tokio::time::timeout(limits.handshake_timeout, handshake).await;
            drop(handshaking);
            match outcome {
                Ok(Some(Ok(tls))) => {
                    let without_certificate = tls.get_ref().1.peer_certificates().is_none();
                    let (throttle, anonymous) = match limits.anonymous {
                        Some(a) if without_certificate => {
                            let Some(counted) =
                                Counted::take(&anonymous_sources, peer.ip(), a.per_source)
                            else {
                                crate::metrics::global().connection_refused(name);
                                tracing::debug!(listener = name, %peer, "connection without a client certificate over its source's bound closed");
                                return;
                            };
                            (Some(Throttle::new(a.read_bytes_per_sec)), Some(counted))
                        }
                        _ => (None, None),
                    };
                    let connection = Connection {
                        tls,
                        idle_timeout: limits.idle_timeout,
                        idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                        throttle,
                        _place: place,
                        _anonymous: anonymous,
                    };
                    // A closed receiver means the front-end stopped: the connection is dropped.
                    let _ = established.send((connection, peer)).await;
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                }
                Ok(None) => {}
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
