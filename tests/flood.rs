//! A flood from the network, bounded in count and time, on loopback: while one service
//! measures its authenticated Wrap throughput, others open 2,000 idle TCP connections, hold
//! 500 TLS connections without a client certificate that send calls as fast as they can, and
//! send oversized messages; on the XKS listener of the same server, 200 clients trickle their
//! request headers and 50 announce large bodies under a signature that does not verify (the
//! parts of `tests/support/flood.rs`, the attackers on 127.0.0.2 and 127.0.0.3). The
//! allowed caller must not be starved, the process's memory and file descriptors stay bounded,
//! and afterwards the audit export verifies and accounts for the refused calls of both
//! listeners.
//!
//! The pass criterion is loose on purpose (a shared, noisy machine): it catches starvation, not
//! a dip. `scripts/test` runs it alone (no other test loads the CPU meanwhile);
//! `scripts/flood` runs it and prints the figures BENCHMARKS.md reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/flood.rs"]
mod parts;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const KEY: &str = "tenants/a/keys/k";
const XKS_PREFIX: &str = "/flood";

/// The default deployment with an XKS listener for tenant `a` (so its refusals land in the log
/// auditor A exports).
fn deployment() -> Deployment {
    let d = Deployment::new("");
    let mut policy = std::fs::read_to_string(&d.policy_path).unwrap();
    policy.push_str(
        "\n[[identity]]\nname = \"aws-kms-xks-a\"\ntenant = \"a\"\nroles = [\"service\"]\nkeys = [\"k\"]\n",
    );
    std::fs::write(&d.policy_path, policy).unwrap();
    let creds = d.dir().join("xks-credentials.toml");
    std::fs::write(
        &creds,
        "[[credential]]\naccess_key_id = \"AKIAI2SFODNN7EXAMPLE\"\n\
         secret_access_key = \"FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = std::fs::read_to_string(&d.config_path).unwrap();
    config.push_str(&format!(
        "\n[xks]\nlisten = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\n\
         region = \"eu-central-1\"\nlimits = {{ header_timeout_secs = 2 }}\n\
         [[xks.prefix]]\npath = \"{XKS_PREFIX}\"\nidentity = \"aws-kms-xks-a\"\n\
         credentials = \"xks-credentials.toml\"\nkeys = {{ \"k\" = \"k\" }}\n"
    ));
    std::fs::write(&d.config_path, config).unwrap();
    d
}

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
                        justification: None,
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
    let server = TestServer::start_on(deployment()).await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, KEY).await;
    let service = server.client(SERVICE_A).await;
    let window = Duration::from_secs(3);
    measure(&service, 16, Duration::from_millis(500)).await; // warm up
    let quiet = measure(&service, 16, window).await;
    let (rss_before, fds_before) = (rss_kib(), open_fds());

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(parts::Seen::default());
    // The parts of tests/support/flood.rs, from this process: 2,000 idle TCP
    // connections, 500 certificate-less TLS clients calling as fast as they can (a tenth with
    // 200 KB messages), 200 XKS clients trickling their headers (the listener's header time
    // here is 2 s), 50 announcing 200 KB bodies under a signature that does not verify.
    let anonymous = tresor::client::Profile::load(&server.deployment.profile(
        server.addr,
        None,
        tresor::pki::Validity::default(),
    ))
    .unwrap();
    let everything = parts::Flood {
        grpc: server.addr,
        xks: server.xks.0,
        xks_prefix: XKS_PREFIX.into(),
        ca: anonymous.ca.clone(),
        server_name: anonymous
            .server_name
            .clone()
            .unwrap_or_else(|| "localhost".into()),
        key: KEY.into(),
        idle: 2_000,
        reopen_idle: false,
        anonymous: 500,
        trickle: 200,
        bodies: 50,
        sources: Vec::new(),
        verbose: false,
    };
    // The idle connections from one address, everything else from another, so that the
    // certificate-less clients do not lose the race for the idle address's places and the log's
    // account of their refused calls is tested every run.
    let mut flood = parts::start(
        &parts::Flood {
            anonymous: 0,
            trickle: 0,
            bodies: 0,
            sources: vec![[127, 0, 0, 2].into()],
            ..everything.clone()
        },
        &seen,
        &stop,
    );
    flood.extend(parts::start(
        &parts::Flood {
            idle: 0,
            sources: vec![[127, 0, 0, 3].into()],
            ..everything
        },
        &seen,
        &stop,
    ));
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
    // Every call the certificate-less clients saw fail, at connect or after.
    let refused = || {
        seen.grpc_connect_failed.load(Ordering::Relaxed)
            + seen.grpc_unauthenticated.load(Ordering::Relaxed)
            + seen.grpc_other_errors.load(Ordering::Relaxed)
    };
    if std::env::var_os("TRESOR_FLOOD_REPORT").is_some() {
        eprintln!(
            "flood: quiet {quiet:.0} wraps/s, flooded {flooded:.0} wraps/s, ratio {ratio:.2}; refused gRPC calls {} ({} answered UNAUTHENTICATED by the server); XKS: {} trickling clients cut off, {} large unsigned bodies refused; RSS {rss_before} -> {rss_during} KiB; fds {fds_before} -> {fds_during}",
            refused(),
            seen.grpc_unauthenticated.load(Ordering::Relaxed),
            seen.trickles_cut.load(Ordering::Relaxed),
            seen.bodies_refused.load(Ordering::Relaxed),
        );
    }
    // Starvation, as the listener measured before its bounds, is 0.05 to 0.07; with every part
    // of the flood the runs so far gave 0.28 to 0.72 (BENCHMARKS.md "Hostile clients").
    assert!(
        ratio >= 0.2,
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
    let unauthenticated_at_server = refused();
    assert!(
        seen.trickles_cut.load(Ordering::Relaxed) >= 40,
        "the XKS listener did not cut off the trickling clients"
    );
    let xks_refused = seen.bodies_refused.load(Ordering::Relaxed);
    assert!(xks_refused > 0, "no unsigned XKS body was refused");
    let xks_accounted: u64 = items
        .iter()
        .filter_map(|i| match i {
            tresor::audit_record::ExportItem::Record(r)
                if r.body.operation.starts_with("Xks") && r.body.outcome == "UNAUTHENTICATED" =>
            {
                Some(r.body.repeated.max(1))
            }
            _ => None,
        })
        .sum();
    assert!(
        xks_accounted >= xks_refused,
        "{xks_refused} XKS requests refused, {xks_accounted} recorded"
    );
    // Each certificate-less call the server answered is recorded.
    let answered = seen.grpc_unauthenticated.load(Ordering::Relaxed);
    assert!(answered > 0, "no certificate-less call reached the server");
    assert!(
        accounted >= answered,
        "{answered} calls answered UNAUTHENTICATED, {accounted} recorded"
    );
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

/// What the server's process log says, captured from the global subscriber (nextest runs each
/// test in a process of its own).
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines the front-ends write for a refused call.
const REFUSAL_LINES: [&str; 5] = [
    "unauthenticated call",
    "call denied",
    "request refused",
    "XKS request not authenticated",
    "XKS request refused",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_refused_calls_writes_a_bounded_log_that_counts_every_one() {
    let log = CapturedLog::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let server = TestServer::start_on(deployment()).await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, KEY).await;
    let anonymous = tresor::client::Profile::load(&server.deployment.profile(
        server.addr,
        None,
        tresor::pki::Validity::default(),
    ))
    .unwrap();
    // Certificate-less Wraps and unsigned XKS bodies, both far over the log's rate.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(parts::Seen::default());
    let started = Instant::now();
    let flood = parts::start(
        &parts::Flood {
            grpc: server.addr,
            xks: server.xks.0,
            xks_prefix: XKS_PREFIX.into(),
            ca: anonymous.ca.clone(),
            server_name: "localhost".into(),
            key: KEY.into(),
            idle: 0,
            reopen_idle: false,
            anonymous: 8,
            trickle: 0,
            bodies: 4,
            sources: vec![[127, 0, 0, 3].into()],
            verbose: false,
        },
        &seen,
        &stop,
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.abort();
        let _ = f.await;
    }
    let flooded_for = started.elapsed();
    // The reporter closes the last window; the audit log's bursts are written.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let auditor = server.client(AUDITOR_A).await;
    let audited: u64 = verified_export(&auditor)
        .await
        .iter()
        .filter_map(|i| match i {
            tresor::audit_record::ExportItem::Record(r) if r.body.outcome != "OK" => {
                Some(r.body.repeated.max(1))
            }
            _ => None,
        })
        .sum();
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let logged = text
        .lines()
        .filter(|l| REFUSAL_LINES.iter().any(|m| l.contains(m)))
        .count() as u64;
    let left_out: u64 = text
        .lines()
        .filter(|l| l.contains("refused calls over the log's rate were not logged"))
        .map(|l| {
            let n = l.split("left_out=").nth(1).unwrap();
            n.split_whitespace().next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert!(
        seen.grpc_unauthenticated.load(Ordering::Relaxed) > 100
            && seen.bodies_refused.load(Ordering::Relaxed) > 0,
        "the flood did not reach both front-ends"
    );
    // At most a window's share of lines for each second the flood lasted (and one window
    // that a second's boundary split), however many calls were refused.
    let windows = flooded_for.as_secs() + 2;
    let bound = windows * u64::from(tresor::refusal_log::LINES_PER_WINDOW);
    assert!(
        logged <= bound,
        "{logged} refusal lines in {flooded_for:?}, over {bound}"
    );
    assert!(left_out > 0, "the flood never went over the log's rate");
    // Nothing refused goes missing: each refusal the audit log holds was logged or counted.
    assert_eq!(
        logged + left_out,
        audited,
        "{logged} logged and {left_out} counted, {audited} audited"
    );
    server.stop().await;
}
