//! `tresor bench` against a real server: closed loop, open loop, every operation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;
use tresor::pki::Validity;
use tresor::proto;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");
const KEY: &str = "tenants/a/keys/bench";

fn bench(profile: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("--profile")
        .arg(profile)
        .args(["--output", "json", "bench", "--key", KEY])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A server on SoftHSM with the bench key, and the service's profile.
async fn serving_bench_key() -> (TestServer, std::path::PathBuf) {
    let server = TestServer::start().await;
    server
        .client(OFFICER_A)
        .await
        .admin()
        .create_key(proto::CreateKeyRequest {
            key: KEY.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let service = server
        .deployment
        .profile(server.addr, Some(SERVICE_A), Validity::default());
    (server, service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_measures_throughput_latency_and_errors() {
    let (server, service) = serving_bench_key().await;

    for op in ["wrap", "unwrap", "datakey", "rewrap", "mixed"] {
        let r = bench(
            &service,
            &[
                "--op",
                op,
                "--requests",
                "200",
                "--connections",
                "2",
                "--in-flight",
                "4",
            ],
        );
        assert_eq!(r["ok"], 200, "{op}: {r}");
        assert_eq!(r["errors"], serde_json::json!({}), "{op}: {r}");
        let l = &r["latency_micros"];
        let (p50, p99, max) = (
            l["p50"].as_u64().unwrap(),
            l["p99"].as_u64().unwrap(),
            l["max"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p50 <= p99 && p99 <= max, "{op}: {r}");
    }

    // Open loop: about the target rate, however fast the server could go.
    let r = bench(
        &service,
        &[
            "--rate",
            "100",
            "--duration",
            "2s",
            "--connections",
            "1",
            "--in-flight",
            "4",
        ],
    );
    let rate = r["throughput_per_second"].as_f64().unwrap();
    assert!((60.0..=110.0).contains(&rate), "{r}");

    // The ceiling: the same encryptions straight on the server's module and token, and the
    // ratio from one invocation.
    let config = server.deployment.config_path.to_str().unwrap().to_owned();
    let out = Command::new(BIN)
        .args([
            "--output",
            "json",
            "bench",
            "--raw-hsm",
            "--config",
            &config,
            "--duration",
            "1s",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        raw["raw_hsm"]["operations"].as_u64().unwrap() > 100,
        "{raw}"
    );
    let r = bench(
        &service,
        &[
            "--compare-raw",
            "--config",
            &config,
            "--duration",
            "1s",
            "--connections",
            "1",
            "--in-flight",
            "8",
        ],
    );
    let ratio = r["service_over_raw"].as_f64().unwrap();
    assert!(ratio > 0.0 && ratio < 2.0, "{r}");
    assert!(r["raw_hsm"]["throughput_per_second"].as_f64().unwrap() > 0.0);

    // An officer may not wrap: every request fails, counted by status.
    let officer = server
        .deployment
        .profile(server.addr, Some(OFFICER_A), Validity::default());
    let r = bench(
        &officer,
        &["--requests", "20", "--connections", "1", "--in-flight", "2"],
    );
    assert_eq!(r["ok"], 0);
    assert_eq!(r["errors"]["permission denied"], 20, "{r}");
    server.stop().await;
}

/// The regression check in scripts/test: a few seconds of audited Wrap over mTLS against the
/// raw PKCS#11 loop on the same SoftHSM token, running alone (.config/nextest.toml). It fails
/// on errors or a collapse, never on a tight timing bound, because this machine is shared. In
/// this test build Tresor's own code is unoptimised (its dependencies are optimised) and gets
/// 0.08 to 0.16 of the raw loop, depending on the day's machine (0.076 to 0.09 on 2026-12-02,
/// with and without the two-call HSM path alike; a release build: 0.21-0.34, BENCHMARKS.md);
/// below half of the low end is a collapse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_bench_does_not_collapse_against_the_raw_hsm_loop() {
    let (server, service) = serving_bench_key().await;
    let config = server.deployment.config_path.to_str().unwrap().to_owned();
    let r = bench(
        &service,
        &[
            "--compare-raw",
            "--config",
            &config,
            "--threads",
            "1",
            "--duration",
            "3s",
            "--connections",
            "4",
            "--in-flight",
            "16",
            "--payload",
            "32",
            "--aad",
            "16",
        ],
    );
    println!("{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
    let ratio = r["service_over_raw"].as_f64().unwrap();
    assert!(
        ratio >= 0.04,
        "Wrap collapsed to {ratio:.3} of the raw HSM loop (0.08 to 0.16 expected here): {r}"
    );
    server.stop().await;
}
