//! A flood generator in its own process, so the server under test does not share its runtime
//! with the attacker (`scripts/flood-process`, BENCHMARKS.md "Hostile clients").
//!
//! From source addresses of its own on loopback (127.0.0.2 and up, so the allowed caller on
//! 127.0.0.1 is another host to the server), for `--seconds`, the parts of
//! `tests/support/flood.rs`:
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

#[path = "../tests/support/flood.rs"]
mod parts;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let flood = parts::Flood {
        grpc: args.grpc,
        xks: args.xks,
        xks_prefix: args.xks_prefix,
        ca: args.ca,
        server_name: args.server_name,
        key: args.key,
        idle: args.idle,
        reopen_idle: args.reopen_idle,
        anonymous: args.anonymous,
        trickle: args.trickle,
        bodies: args.bodies,
        sources: (0..args.sources.max(1))
            .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + n)))
            .collect(),
        verbose: args.verbose,
    };
    let seen = Arc::new(parts::Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = parts::start(&flood, &seen, &stop);
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
