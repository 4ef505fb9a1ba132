//! The composition root of `tresor serve`: checks the configuration, opens the HSM and the
//! store, builds custody and the audit log on them, starts each configured front-end (gRPC,
//! the XKS proxy) on the shared TLS listener ([`crate::listener`]), the scheduler, the change
//! follower and the health watcher, and stops them in order.
//!
//! The only module that knows every part. The front-ends get custody, the audit log and the
//! policy from here and never each other; nothing below imports this module. Tests run the
//! real server in-process: [`Server::bind`] binds `127.0.0.1:0`, [`Server::serve`] takes a
//! shutdown future.

mod checks;
mod health;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ServerConfig;
use tokio::net::TcpListener;

use crate::audit::{AuditError, AuditLog, AuditOptions};
use crate::auth::SharedPolicy;
use crate::config::{Config, ConfigError};
use crate::custody::{Clock, Custody, CustodyError, CustodyOptions, SystemClock};
use crate::grpc::{self, Api};
use crate::hsm::{Hsm, HsmError};
use crate::listener;
use crate::store::{Store, StoreError};
use crate::sync::lock;

/// Why the server did not start or stopped serving.
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
    /// Loading or reconciling key metadata failed, or a front-end's custody set-up (the XKS
    /// health-check key).
    #[error("key metadata: {0}")]
    Custody(#[from] CustodyError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] grpc::ServeError),
    /// A start-up task panicked or was cancelled.
    #[error("start-up task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What kind of failure a [`StartError`] is, for the CLI's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFailure {
    /// The configuration must be fixed.
    Config,
    /// A dependency (HSM, database, a port) is unreachable or taken.
    Unavailable,
    /// A defect: report it.
    Internal,
}

impl StartError {
    /// What kind of failure this is.
    pub fn kind(&self) -> StartFailure {
        match self {
            Self::Config(_) => StartFailure::Config,
            Self::Hsm(_)
            | Self::Store(_)
            | Self::Custody(_)
            | Self::Audit(_)
            | Self::Bind { .. } => StartFailure::Unavailable,
            Self::Grpc(_) | Self::Task(_) => StartFailure::Internal,
        }
    }
}

/// A server with its dependencies open, ready to bind and serve.
pub struct Server {
    config: Config,
    api: Api,
    custody: Custody,
    audit: AuditLog,
    policy: Arc<SharedPolicy>,
    grpc_tls: Arc<ServerConfig>,
    /// Bound by [`Server::bind`], taken by [`Server::serve`].
    listeners: std::sync::Mutex<Listeners>,
    /// The AWS KMS external key store proxy, when `[xks]` is configured.
    xks: Option<XksParts>,
    /// The KMIP server, when `[kmip]` is configured.
    kmip: Option<KmipParts>,
}

#[derive(Default)]
struct Listeners {
    metrics: Option<TcpListener>,
    xks: Option<TcpListener>,
    xks_ping: Option<TcpListener>,
    kmip: Option<TcpListener>,
}

struct KmipParts {
    service: crate::kmip::Kmip,
    tls: Arc<ServerConfig>,
    authenticator: crate::auth::ClientAuthenticator,
}

struct XksParts {
    service: crate::xks::Xks,
    tls: Arc<ServerConfig>,
    client_subject: Option<String>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Checks every file the configuration names (configuration errors, before anything is
    /// opened), then opens the HSM and the database and reconciles them. Binds nothing.
    pub async fn prepare(config: Config) -> Result<Self, StartError> {
        Self::prepare_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Server::prepare`] with another time source (tests drive rotation periods, grace
    /// periods and approval expiry with a [`crate::custody::ManualClock`]).
    pub async fn prepare_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartError> {
        let checked = checks::check(&config)?;

        let hsm_config = config.hsm.clone();
        let hsm = tokio::task::spawn_blocking(move || Hsm::open(&hsm_config)).await??;
        let store = Store::open(secrecy::ExposeSecret::expose_secret(&config.database_url)).await?;
        let options = CustodyOptions {
            orphans: config.orphans,
            destruction_grace_ms: i64::try_from(config.destruction_grace.as_millis())
                .unwrap_or(i64::MAX),
            approval_ttl_ms: i64::try_from(config.approval_ttl.as_millis()).unwrap_or(i64::MAX),
            max_access_window_ms: i64::try_from(config.max_access_window.as_millis())
                .unwrap_or(i64::MAX),
            clock,
            ..CustodyOptions::default()
        };
        let options = match &config.kmip {
            None => options,
            Some(k) => {
                let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                CustodyOptions {
                    object_destroy_grace_ms: ms(k.destroy_grace),
                    tenant_object_destroy_grace_ms: k
                        .tenant_destroy_grace
                        .iter()
                        .map(|(t, d)| (t.clone(), ms(*d)))
                        .collect(),
                    object_destroy_approval: k.officer_destroy_approval,
                    ..options
                }
            }
        };
        let (custody, report) = Custody::open(hsm.clone(), store.clone(), options).await?;
        if report != Default::default() {
            tracing::warn!(
                ?report,
                "start-up reconciliation changed or reported something"
            );
        }
        let audit = AuditLog::open(
            hsm,
            store,
            AuditOptions {
                node_id: config.node_id.clone(),
                ..AuditOptions::default()
            },
        )
        .await?;
        health::record_integrity_failures(&custody, &audit, &config.node_id).await?;
        let xks = match (&config.xks, checked.xks) {
            (Some(x), Some(parts)) => Some(XksParts {
                service: crate::xks::Xks::open(
                    x,
                    parts.credentials,
                    parts.host_names,
                    custody.clone(),
                    audit.clone(),
                    Arc::clone(&checked.policy),
                    config.node_id.clone(),
                )
                .await?,
                tls: parts.tls,
                client_subject: x.client_subject.clone(),
            }),
            _ => None,
        };
        let kmip = match (&config.kmip, checked.kmip) {
            (Some(k), Some(parts)) => Some(KmipParts {
                service: crate::kmip::Kmip::new(
                    k.clone(),
                    custody.clone(),
                    audit.clone(),
                    Arc::clone(&checked.policy),
                ),
                tls: parts.tls,
                authenticator: parts.authenticator,
            }),
            _ => None,
        };
        let api = Api::new(
            custody.clone(),
            audit.clone(),
            checked.authenticator,
            Arc::clone(&checked.policy),
            config.max_concurrent_requests,
        );
        Ok(Self {
            config,
            api,
            custody,
            audit,
            policy: checked.policy,
            grpc_tls: checked.grpc_tls,
            listeners: std::sync::Mutex::new(Listeners::default()),
            xks,
            kmip,
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

    /// Binds the gRPC address (returned), and the metrics and XKS addresses if configured.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let grpc = bind(self.config.listen).await?;
        let mut bound = Listeners::default();
        if let Some(addr) = self.config.metrics_listen {
            bound.metrics = Some(bind(addr).await?);
        }
        if let (Some(_), Some(x)) = (&self.xks, &self.config.xks) {
            bound.xks = Some(bind(x.listen).await?);
            if let Some(addr) = x.ping_listen {
                bound.xks_ping = Some(bind(addr).await?);
            }
        }
        if let Some(k) = &self.config.kmip {
            bound.kmip = Some(bind(k.listen).await?);
        }
        *lock(&self.listeners) = bound;
        Ok(grpc)
    }

    /// Where the KMIP server listens, once bound.
    pub fn kmip_addr(&self) -> Option<SocketAddr> {
        lock(&self.listeners)
            .kmip
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Where the XKS proxy listens (HTTPS, and plain-HTTP ping), once bound.
    pub fn xks_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let listeners = lock(&self.listeners);
        (
            listeners.xks.as_ref().and_then(|l| l.local_addr().ok()),
            listeners
                .xks_ping
                .as_ref()
                .and_then(|l| l.local_addr().ok()),
        )
    }

    /// Where the metrics endpoint listens, once bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        lock(&self.listeners)
            .metrics
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Re-reads what may change while serving (SIGHUP): the access policy and the XKS
    /// credentials. A broken file is refused and logged; what was in force stays.
    pub fn reload(&self) {
        match self.policy.reload() {
            Ok(n) => tracing::info!(
                identities = n,
                access_rules = self.policy.current().rules().len(),
                "access policy reloaded"
            ),
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

    /// Serves gRPC on `listener` (and whatever else [`Server::bind`] bound) until `shutdown`
    /// completes; then stops accepting, lets in-flight gRPC requests finish, stops the other
    /// front-ends and background tasks, and returns.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let bound = std::mem::take(&mut *lock(&self.listeners));
        let mut tasks = Vec::new();
        if let Some(metrics) = bound.metrics {
            tasks.push(tokio::spawn(crate::metrics::serve(metrics)));
        }
        tasks.push(tokio::spawn(
            self.custody
                .clone()
                .run_scheduler(self.config.scheduler_interval),
        ));
        tasks.push(self.custody.follow_changes());
        tasks.push(tokio::spawn(crate::refusal_log::report_windows()));
        let (healthy, health) = tokio::sync::watch::channel(false);
        tasks.push(tokio::spawn(health::watch(
            self.custody.clone(),
            self.audit.clone(),
            healthy,
            self.config.health_check_interval,
        )));
        if let (Some(parts), Some(x)) = (&self.xks, &self.config.xks) {
            let xks_limits = x.limits;
            if let Some(https) = bound.xks {
                let (accept, connections) =
                    listener::accept("xks", https, Arc::clone(&parts.tls), xks_limits);
                tasks.push(accept);
                tasks.push(tokio::spawn(crate::xks::serve(
                    parts.service.clone(),
                    connections,
                    parts.client_subject.clone(),
                    xks_limits,
                )));
            }
            if let Some(ping) = bound.xks_ping {
                tasks.push(tokio::spawn(crate::xks::serve_ping(
                    parts.service.clone(),
                    ping,
                )));
            }
            let service = parts.service.clone();
            tasks.push(tokio::spawn(async move { service.keep_health().await }));
        }
        if let (Some(parts), Some(k), Some(tcp)) = (&self.kmip, &self.config.kmip, bound.kmip) {
            let (accept, connections) =
                listener::accept("kmip", tcp, Arc::clone(&parts.tls), k.limits);
            tasks.push(accept);
            tasks.push(tokio::spawn(crate::kmip::server::serve(
                parts.service.clone(),
                parts.authenticator.clone(),
                connections,
                k.limits,
            )));
            tasks.push(tokio::spawn(
                parts
                    .service
                    .clone()
                    .purge_destroyed(self.config.scheduler_interval),
            ));
        }
        let (accept, connections) = listener::accept(
            "grpc",
            listener,
            Arc::clone(&self.grpc_tls),
            self.config.limits,
        );
        tasks.push(accept);

        let result = grpc::serve(
            self.api.clone(),
            connections,
            health,
            self.config.limits,
            shutdown,
        )
        .await
        .map_err(StartError::from);
        // Front-ends first (started last), then the background tasks. Each aborted task is
        // awaited until dropped, so the HSM context and database it holds are released when
        // `serve` returns (an in-process restart can then open them again).
        for task in tasks.into_iter().rev() {
            task.abort();
            // An aborted task's JoinError says only that it was cancelled.
            let _ = task.await;
        }
        // The counts of refusals still folding into bursts go into the chain before the end.
        self.audit.flush_bursts().await;
        tracing::info!("server stopped; in-flight requests finished");
        result
    }
}
