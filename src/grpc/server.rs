//! Starting, serving and stopping: TLS, health, reflection, limits, graceful shutdown.
//!
//! Owns the order of start-up (everything that can be wrong with the configuration is found
//! before a port is bound) and the TLS listener. The library entry point is
//! [`Server::serve`], which takes a bound listener and a shutdown future, so tests run the real
//! server in-process on `127.0.0.1:0`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::Server as TonicServer;

use super::Api;
use super::proto::audit_service_server::AuditServiceServer;
use super::proto::key_admin_service_server::KeyAdminServiceServer;
use super::proto::key_service_server::KeyServiceServer;
use crate::audit::{AuditError, AuditLog, AuditOptions};
use crate::auth::{ClientAuthenticator, SharedPolicy};
use crate::config::{Config, ConfigError};
use crate::custody::{Clock, Custody, CustodyError, CustodyOptions, SystemClock};
use crate::hsm::{Hsm, HsmError};
use crate::pki;
use crate::proto::{self, MAX_MESSAGE_BYTES};
use crate::store::{Store, StoreError};

/// TLS handshakes in progress at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams per connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Why the server did not start. [`StartError::exit_code`] gives the process exit status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration (or a file it names) is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HSM could not be opened.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The database could not be opened.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The audit log could not be opened.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// Loading or reconciling key metadata failed.
    #[error("key metadata: {0}")]
    Custody(#[from] CustodyError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The XKS proxy could not start (its health-check key).
    #[error("XKS proxy: {0}")]
    Xks(String),
    /// Serving failed.
    #[error("server failed: {0}")]
    Serve(String),
}

impl StartError {
    /// 64 (EX_USAGE) for configuration errors, 69 (EX_UNAVAILABLE) when a dependency is
    /// unreachable, 70 (EX_SOFTWARE) otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 64,
            Self::Hsm(_)
            | Self::Store(_)
            | Self::Custody(_)
            | Self::Audit(_)
            | Self::Xks(_)
            | Self::Bind { .. } => 69,
            Self::Serve(_) => 70,
        }
    }
}

/// A server with its dependencies open, ready to serve.
pub struct Server {
    config: Config,
    api: Api,
    custody: Custody,
    audit: AuditLog,
    policy: Arc<SharedPolicy>,
    tls: Arc<ServerConfig>,
    /// The metrics listener, bound by [`Server::bind`] and served by [`Server::serve`].
    metrics: std::sync::Mutex<Option<TcpListener>>,
    /// The AWS KMS external key store proxy, when `[xks]` is configured.
    xks: Option<XksParts>,
}

struct XksParts {
    service: crate::xks::Xks,
    tls: Arc<ServerConfig>,
    client_subject: Option<String>,
    /// Its HTTPS and ping listeners, bound by [`Server::bind`].
    listeners: std::sync::Mutex<(Option<TcpListener>, Option<TcpListener>)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

fn config_error(config: &Config, key: &str, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        file: config.source.display().to_string(),
        key: key.to_owned(),
        problem: problem.to_string(),
    }
}

impl Server {
    /// Loads TLS material and the policy (configuration errors), then opens the HSM and the
    /// database and reconciles them. Binds nothing.
    pub async fn prepare(config: Config) -> Result<Self, StartError> {
        Self::prepare_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Server::prepare`] with another time source (tests drive rotation periods, grace
    /// periods and approval expiry with a [`crate::custody::ManualClock`]).
    pub async fn prepare_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        let certs =
            pki::load_certs(&config.tls_cert).map_err(|e| config_error(&config, "tls.cert", e))?;
        let key =
            pki::load_key(&config.tls_key).map_err(|e| config_error(&config, "tls.key", e))?;
        let client_ca = pki::load_certs(&config.client_ca)
            .map_err(|e| config_error(&config, "tls.client_ca", e))?;
        let authenticator = ClientAuthenticator::new(&client_ca)
            .map_err(|e| config_error(&config, "tls.client_ca", e))?;
        let tls = tls_config(certs, key, &authenticator)
            .map_err(|e| config_error(&config, "tls.key", e))?;
        let policy = Arc::new(
            SharedPolicy::load(&config.policy_file)
                .map_err(|e| config_error(&config, "policy.file", e))?,
        );
        if policy.current().is_empty() {
            tracing::warn!(file = %config.policy_file.display(), "the access policy names no identity: every call will be denied");
        }

        let hsm_config = config.hsm.clone();
        let hsm = tokio::task::spawn_blocking(move || Hsm::open(&hsm_config))
            .await
            .map_err(|e| StartError::Serve(e.to_string()))??;
        let store = Store::open(secrecy::ExposeSecret::expose_secret(&config.database_url)).await?;
        let options = CustodyOptions {
            orphans: config.orphans,
            destruction_grace_ms: i64::try_from(config.destruction_grace.as_millis())
                .unwrap_or(i64::MAX),
            approval_ttl_ms: i64::try_from(config.approval_ttl.as_millis()).unwrap_or(i64::MAX),
            clock,
        };
        let (custody, report) = Custody::open(hsm, store, options).await?;
        if report != Default::default() {
            tracing::warn!(
                ?report,
                "start-up reconciliation changed or reported something"
            );
        }
        let audit = AuditLog::open(
            custody.hsm().clone(),
            custody.store().clone(),
            AuditOptions {
                node_id: config.node_id.clone(),
                ..AuditOptions::default()
            },
        )
        .await?;
        record_integrity_failures(&custody, &audit, &config.node_id).await?;
        let xks = match &config.xks {
            None => None,
            Some(x) => {
                let certs =
                    pki::load_certs(&x.cert).map_err(|e| config_error(&config, "xks.cert", e))?;
                let key = pki::load_key(&x.key).map_err(|e| config_error(&config, "xks.key", e))?;
                let client_ca = x
                    .client_ca
                    .as_deref()
                    .map(pki::load_certs)
                    .transpose()
                    .map_err(|e| config_error(&config, "xks.client_ca", e))?;
                let tls = crate::xks::tls_config(certs, key, client_ca)
                    .map_err(|e| config_error(&config, "xks.key", e))?;
                let service = crate::xks::Xks::open(
                    x,
                    custody.clone(),
                    audit.clone(),
                    Arc::clone(&policy),
                    config.node_id.clone(),
                )
                .await
                .map_err(|e| match e {
                    crate::xks::XksStartError::Credentials(c) => {
                        StartError::Config(config_error(&config, "xks.prefix.credentials", c))
                    }
                    other => StartError::Xks(other.to_string()),
                })?;
                Some(XksParts {
                    service,
                    tls: Arc::new(tls),
                    client_subject: x.client_subject.clone(),
                    listeners: std::sync::Mutex::new((None, None)),
                })
            }
        };
        let api = Api::new(
            custody.clone(),
            audit.clone(),
            authenticator,
            Arc::clone(&policy),
            config.max_concurrent_requests,
        );
        Ok(Self {
            config,
            api,
            custody,
            audit,
            policy,
            tls: Arc::new(tls),
            metrics: std::sync::Mutex::new(None),
            xks,
        })
    }

    /// The same server with the audit writer replaced by a no-op, to measure what auditing
    /// costs. Only in builds with the `bench-unaudited` feature, which production never uses.
    #[cfg(feature = "bench-unaudited")]
    pub fn unaudited_for_benchmarks(mut self) -> Self {
        self.api = self.api.unaudited_for_benchmarks();
        self
    }

    /// The policy in force; [`SharedPolicy::reload`] replaces it while serving.
    pub fn policy(&self) -> Arc<SharedPolicy> {
        Arc::clone(&self.policy)
    }

    /// Binds the configured address, and the metrics address if one is configured.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let grpc = bind(self.config.listen).await?;
        if let Some(addr) = self.config.metrics_listen {
            *crate::sync::lock(&self.metrics) = Some(bind(addr).await?);
        }
        if let (Some(parts), Some(x)) = (&self.xks, &self.config.xks) {
            let https = bind(x.listen).await?;
            let ping = match x.ping_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            };
            *crate::sync::lock(&parts.listeners) = (Some(https), ping);
        }
        Ok(grpc)
    }

    /// Where the XKS proxy listens (HTTPS, and plain-HTTP ping), once bound.
    pub fn xks_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let Some(parts) = &self.xks else {
            return (None, None);
        };
        let listeners = crate::sync::lock(&parts.listeners);
        (
            listeners.0.as_ref().and_then(|l| l.local_addr().ok()),
            listeners.1.as_ref().and_then(|l| l.local_addr().ok()),
        )
    }

    /// Re-reads what may change while serving (SIGHUP): the access policy and the XKS
    /// credentials. A broken file is refused and logged; what was in force stays.
    pub fn reload(&self) {
        match self.policy.reload() {
            Ok(n) => tracing::info!(identities = n, "access policy reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "access policy NOT reloaded; the previous policy stays in force");
            }
        }
        if let Some(parts) = &self.xks {
            let failed = parts.service.reload_credentials();
            for e in &failed {
                tracing::error!(error = %e, "XKS credentials NOT reloaded; the previous ones stay in force");
            }
            if failed.is_empty() {
                tracing::info!("XKS credentials reloaded");
            }
        }
    }

    /// Where the metrics endpoint listens, once bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        crate::sync::lock(&self.metrics)
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting, lets in-flight
    /// requests finish, and returns.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Serve(e.to_string()))?;

        let metrics_task = crate::sync::lock(&self.metrics)
            .take()
            .map(|listener| tokio::spawn(crate::metrics::serve(listener)));
        let scheduler_task = tokio::spawn(run_scheduler(
            self.custody.clone(),
            self.config.scheduler_interval,
        ));
        let mut xks_tasks = Vec::new();
        if let Some(parts) = &self.xks {
            let (https, ping) = {
                let mut listeners = crate::sync::lock(&parts.listeners);
                (listeners.0.take(), listeners.1.take())
            };
            if let Some(listener) = https {
                xks_tasks.push(tokio::spawn(crate::xks::serve(
                    parts.service.clone(),
                    listener,
                    Arc::clone(&parts.tls),
                    parts.client_subject.clone(),
                )));
            }
            if let Some(listener) = ping {
                xks_tasks.push(tokio::spawn(crate::xks::serve_ping(
                    parts.service.clone(),
                    listener,
                )));
            }
            let health = parts.service.clone();
            xks_tasks.push(tokio::spawn(async move { health.keep_health().await }));
        }
        let changes_task = self.custody.follow_changes();
        let health_task = tokio::spawn(watch_health(
            self.custody.clone(),
            self.audit.clone(),
            reporter,
            self.config.health_check_interval,
        ));
        let (incoming_tx, incoming_rx) = mpsc::channel(MAX_HANDSHAKES);
        let accept_task = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(Arc::clone(&self.tls)),
            incoming_tx,
        ));

        let result = TonicServer::builder()
            .timeout(self.config.request_timeout)
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                KeyServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                KeyAdminServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                AuditServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming_rx),
                shutdown,
            )
            .await
            .map_err(|e| StartError::Serve(e.to_string()));
        // Wait for the aborted tasks to be dropped, so the HSM context and database they hold
        // are released when `serve` returns (an in-process restart can then open them again).
        for task in [accept_task, health_task, scheduler_task, changes_task]
            .into_iter()
            .chain(metrics_task)
            .chain(xks_tasks)
        {
            task.abort();
            let _ = task.await;
        }
        tracing::info!("server stopped; in-flight requests finished");
        result
    }
}

fn tls_config(
    certs: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    authenticator: &ClientAuthenticator,
) -> Result<ServerConfig, rustls::Error> {
    // ring's default suites are all AEAD: TLS 1.3 AES-GCM and ChaCha20-Poly1305, TLS 1.2 ECDHE
    // with AES-GCM or ChaCha20-Poly1305. No CBC, no RSA key exchange.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(authenticator.tls_verifier())
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections and runs each TLS handshake in its own task, so a slow client
/// cannot hold up the others.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    incoming: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let incoming = incoming.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = incoming.send(Ok(tls)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Runs due rotations, destructions and approval expiries. Due times live in the database, so
/// work missed while the server was down happens at the first run after start — once. With
/// several nodes only the holder of the scheduler lock runs them; the others try to take the
/// lock at every run, so one of them takes over within a run interval when the holder dies.
async fn run_scheduler(custody: Custody, every: Duration) {
    let mut lock: Option<crate::store::SchedulerLock> = None;
    loop {
        if let Some(held) = lock.as_mut()
            && !held.still_held().await
        {
            tracing::warn!("lost the scheduler lock (database connection broke)");
            lock = None;
        }
        if lock.is_none() {
            match custody.store().try_scheduler_lock().await {
                Ok(Some(taken)) => {
                    if custody.store().backend() == crate::store::Backend::Postgres {
                        tracing::info!("took the scheduler lock: this node runs scheduled work");
                    }
                    lock = Some(taken);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "could not try the scheduler lock"),
            }
        }
        let outcome = if lock.is_none() {
            "standby"
        } else {
            match custody.run_due().await {
                Ok(r) if r != Default::default() => {
                    tracing::info!(rotated = ?r.rotated, destroyed = ?r.destroyed, expired_approvals = r.expired_approvals, "scheduled work done");
                    "work_done"
                }
                Ok(_) => "nothing_due",
                Err(e) => {
                    tracing::error!(error = %e, "scheduled work failed; retrying at the next run");
                    "failed"
                }
            }
        };
        crate::metrics::global().scheduler_run(outcome);
        tokio::time::sleep(every).await;
    }
}

/// One audit record per key that start-up found with rows failing their integrity check, in
/// the key's tenant, so its auditors see it (SECURITY.md "Metadata integrity").
async fn record_integrity_failures(
    custody: &Custody,
    audit: &AuditLog,
    node: &str,
) -> Result<(), AuditError> {
    for (key, reason) in custody.integrity_failures() {
        tracing::error!(key = %key, reason = %reason, "start-up: key refuses service (metadata integrity)");
        audit
            .append(
                key.tenant().as_str(),
                crate::audit_record::RecordBody {
                    request_id: crate::audit::new_request_id(),
                    caller: format!("tresor/{node}"),
                    role: "system".into(),
                    operation: "MetadataIntegrityCheck".into(),
                    key: key.to_string(),
                    outcome: "FAILED".into(),
                    status_code: tonic::Code::DataLoss as i32,
                    ..Default::default()
                },
            )
            .await?;
    }
    Ok(())
}

/// Keeps `grpc.health.v1.Health` true: NOT_SERVING while the HSM or the database fails, or
/// while the audit log refuses to go on (its chain does not extend the HSM anchor).
async fn watch_health(
    custody: Custody,
    audit: AuditLog,
    reporter: tonic_health::server::HealthReporter,
    every: Duration,
) {
    let services = [
        "",
        "tresor.v1.KeyService",
        "tresor.v1.KeyAdminService",
        "tresor.v1.AuditService",
    ];
    let mut serving = None;
    loop {
        let checked = match custody.check_dependencies().await {
            Ok(()) => audit.check_chain(),
            Err(e) => Err(e.to_string()),
        };
        let healthy = match checked {
            Ok(()) => true,
            Err(e) => {
                if serving != Some(false) {
                    tracing::error!(error = %e, "dependency check failed: health is NOT_SERVING");
                }
                false
            }
        };
        if serving != Some(healthy) {
            for s in services {
                if healthy {
                    reporter
                        .set_service_status(s, tonic_health::ServingStatus::Serving)
                        .await;
                } else {
                    reporter
                        .set_service_status(s, tonic_health::ServingStatus::NotServing)
                        .await;
                }
            }
            if healthy && serving.is_some() {
                tracing::info!("dependencies reachable again: health is SERVING");
            }
            serving = Some(healthy);
        }
        tokio::time::sleep(every).await;
    }
}
