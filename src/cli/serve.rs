//! `tresor serve`: the server in the foreground, with its signals: SIGHUP reloads the policy
//! and credentials, SIGTERM and SIGINT stop it after the requests in flight.

use std::io::Write;
use std::path::Path;

use super::exit::{Exit, Failure};
use super::logging;
use crate::server::Server;

pub(super) async fn serve(config_path: &Path) -> Result<(), Failure> {
    let config = crate::config::Config::load(config_path).map_err(|e| {
        Failure::new(
            Exit::Config,
            e.to_string(),
            "fix the configuration (README \"Configuration reference\")",
        )
    })?;
    logging::init(config.log_format, &config.node_id);
    let server = Server::prepare(config).await?;
    // Signal handlers are installed before the port is bound, so a signal that arrives once
    // clients can connect is never the default action (terminate).
    let signals = Signals::install().map_err(|e| {
        Failure::new(
            Exit::Software,
            format!("cannot install signal handlers: {e}"),
            "report this",
        )
    })?;
    let listener = server.bind().await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::new(Exit::Software, e.to_string(), "report this"))?;
    tracing::info!(%addr, "serving");
    println!("tresor: serving on {addr}");
    if let Some(metrics) = server.metrics_addr() {
        tracing::info!(%metrics, "metrics endpoint");
        println!("tresor: metrics on http://{metrics}/metrics");
    }
    let (xks, ping) = server.xks_addrs();
    if let Some(xks) = xks {
        tracing::info!(%xks, "AWS KMS external key store proxy");
        println!("tresor: xks on {xks}");
    }
    if let Some(ping) = ping {
        println!("tresor: xks ping on http://{ping}/ping");
    }
    // The lines above are how `tresor dev` and scripts learn the addresses; a closed stdout
    // changes nothing for the server.
    let _ = std::io::stdout().flush();

    let server = std::sync::Arc::new(server);
    let reloader = std::sync::Arc::clone(&server);
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = signals;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            reloader.reload();
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
            _ = interrupt.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
        }
    };
    Ok(server.serve(listener, shutdown).await?)
}

struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}
