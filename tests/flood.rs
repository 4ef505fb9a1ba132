//! A flood from the network, bounded in count and time, on loopback: while one service
//! measures its authenticated Wrap throughput, others open 2,000 idle TCP connections, hold
//! 500 TLS connections without a client certificate that send calls as fast as they can, and
//! send oversized messages. The allowed caller must not be starved, the process's memory and
//! file descriptors stay bounded, and afterwards the audit export verifies and accounts for
//! the refused calls.
//!
//! The pass criterion is loose on purpose (a shared, noisy machine): it catches starvation, not
//! a dip. `scripts/test` runs it alone (no other test loads the CPU meanwhile);
//! `scripts/flood` runs it and prints the figures BENCHMARKS.md reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "tenants/a/keys/k";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Wraps as fast as `callers` concurrent calls allow for `duration`; returns wraps per second.
async fn measure(service: &tresor::client::Client, callers: usize, duration: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let mut keys = service.keys();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let r = keys
                    .wrap(tresor::proto::WrapRequest {
                        key: KEY.into(),
                        plaintext: vec![7; 32],
                        aad: b"flood".to_vec(),
                    })
                    .await;
                if r.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_without_certificates_does_not_starve_an_allowed_caller() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, KEY).await;
    let service = server.client(SERVICE_A).await;
    let window = Duration::from_secs(3);
    measure(&service, 16, Duration::from_millis(500)).await; // warm up
    let quiet = measure(&service, 16, window).await;
    let (rss_before, fds_before) = (rss_kib(), open_fds());

    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    // (a) 2,000 idle TCP connections.
    let addr = server.addr;
    flood.push(tokio::spawn(async move {
        let mut idle = Vec::new();
        for _ in 0..2_000 {
            if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await {
                idle.push(tcp);
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(idle);
    }));
    // (b) 500 TLS connections without a client certificate, calling as fast as they can, and
    // (d) oversized messages on some of them.
    let anonymous = tresor::client::Profile::load(&server.deployment.profile(
        server.addr,
        None,
        tresor::pki::Validity::default(),
    ))
    .unwrap();
    for i in 0..500 {
        let profile = anonymous.clone();
        let stop = Arc::clone(&stop);
        let refused = Arc::clone(&refused);
        flood.push(tokio::spawn(async move {
            // Over the listener's bounds a connection is closed at once: try again, as an
            // attacker would.
            let anonymous = loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match tresor::client::Client::connect(&profile).await {
                    Ok(c) => break c,
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            let mut keys = anonymous.keys();
            let plaintext = if i % 10 == 0 {
                vec![0; 200_000]
            } else {
                vec![1; 32]
            };
            while !stop.load(Ordering::Relaxed) {
                let r = keys
                    .wrap(tresor::proto::WrapRequest {
                        key: KEY.into(),
                        plaintext: plaintext.clone(),
                        aad: Vec::new(),
                    })
                    .await;
                if r.is_err() {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                if r.is_err_and(|s| s.code() == tonic::Code::Unavailable) {
                    // A connection the server closed: the client reconnects.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooded = measure(&service, 16, window).await;
    let (rss_during, fds_during) = (rss_kib(), open_fds());
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), async {
        for f in flood {
            f.abort();
            let _ = f.await;
        }
    })
    .await
    .expect("the flood's tasks did not stop within a minute");
    let progress = |what: &str| {
        if std::env::var_os("TRESOR_FLOOD_REPORT").is_some() {
            eprintln!("flood: {what}");
        }
    };
    progress("flood stopped");
    let ratio = flooded / quiet;
    if std::env::var_os("TRESOR_FLOOD_REPORT").is_some() {
        eprintln!(
            "flood: quiet {quiet:.0} wraps/s, flooded {flooded:.0} wraps/s, ratio {ratio:.2}; refused calls {}; RSS {rss_before} -> {rss_during} KiB; fds {fds_before} -> {fds_during}",
            refused.load(Ordering::Relaxed)
        );
    }
    assert!(
        ratio >= 0.3,
        "the allowed caller was starved: {flooded:.0} wraps/s under the flood, {quiet:.0} without"
    );
    // The server side of the flood holds at most its connection bounds; the rest of the fds
    // are the test's own client sockets (2,000 idle + 500 TLS), closed by now.
    assert!(
        rss_during < rss_before + 1_024 * 1_024,
        "memory grew from {rss_before} KiB to {rss_during} KiB"
    );

    // Every refused call is accounted for in a verifiable log.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let auditor = server.client(AUDITOR_A).await;
    progress("exporting");
    let items = tokio::time::timeout(Duration::from_secs(60), verified_export(&auditor))
        .await
        .expect("the export after the flood took more than a minute");
    progress("exported");
    let accounted: u64 = items
        .iter()
        .filter_map(|i| match i {
            tresor::audit_record::ExportItem::Record(r)
                if r.body.operation == "Wrap" && r.body.outcome != "OK" =>
            {
                Some(r.body.repeated.max(1))
            }
            _ => None,
        })
        .sum();
    let unauthenticated_at_server = refused.load(Ordering::Relaxed);
    assert!(accounted > 0, "no refused call was recorded");
    // Calls the client counted as refused include ones the listener closed before the
    // server saw a request; the log can account for at most the ones that reached it.
    assert!(
        accounted <= unauthenticated_at_server + 1_000,
        "{accounted} recorded, {unauthenticated_at_server} refused"
    );
    tokio::time::timeout(Duration::from_secs(60), server.stop())
        .await
        .expect("the server took more than a minute to stop after the flood");
}
