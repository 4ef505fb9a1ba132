//! A full day (well, weeks) of a security officer, through the CLI, against a server whose
//! clock the test moves: create, set a rotation period, automatic and manual rotation, bulk
//! re-wrap, raise the minimum decryption version, request destruction, a second officer
//! approves, the grace period passes, the version is destroyed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use tresor::custody::{DAY_MS, ManualClock};
use tresor::pki::Validity;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");
const KEY: &str = "tenants/a/keys/lab-results";

fn run(profile: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

/// Polls the CLI until `check` holds (the scheduler runs every second).
async fn eventually(
    profile: &Path,
    args: &[&str],
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = json(run(profile, args));
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_officer_day_through_the_cli() {
    let clock = Arc::new(ManualClock::new(tresor::model::now_millis()));
    let deployment = Deployment::with(
        Backend::SoftHsm,
        "",
        "[custody]\nscheduler_interval_secs = 1\ndestruction_grace_hours = 168",
    );
    let server = TestServer::start_with_clock(deployment, clock.clone()).await;
    let d = server.deployment.dir().to_owned();
    let anna = server
        .deployment
        .profile(server.addr, Some(OFFICER_A), Validity::default());
    let ben = server
        .deployment
        .profile(server.addr, Some(OFFICER_A2), Validity::default());
    let service = server
        .deployment
        .profile(server.addr, Some(SERVICE_A), Validity::default());
    let b64 = base64::engine::general_purpose::STANDARD;

    // Morning: a new key with a daily rotation; a service wraps results under version 1.
    ok(run(
        &anna,
        &["key", "create", KEY, "--description", "lab results"],
    ));
    let key = json(run(
        &anna,
        &[
            "--output",
            "json",
            "key",
            "update",
            KEY,
            "--rotation-period",
            "1d",
        ],
    ));
    assert!(key["versions"][0]["state"] == "ENABLED");
    let mut file = std::fs::File::create(d.join("blobs.jsonl")).unwrap();
    for i in 0..20 {
        let plaintext = b64.encode(format!("result {i}"));
        let aad = format!("sample-{i}");
        let w = json(run(
            &service,
            &[
                "--output",
                "json",
                "wrap",
                "--key",
                KEY,
                "--plaintext-base64",
                &plaintext,
                "--aad",
                &aad,
            ],
        ));
        writeln!(file, "{}", serde_json::json!({ "ciphertext": w["ciphertext"], "aad": b64.encode(&aad), "sample": i })).unwrap();
    }
    drop(file);

    // A day passes: the scheduler rotates once; the officer rotates once more by hand.
    clock.advance(DAY_MS + 60_000);
    eventually(&anna, &["--output", "json", "key", "get", KEY], |k| {
        k["primary_version"] == 2
    })
    .await;
    let key = json(run(&anna, &["--output", "json", "key", "rotate", KEY]));
    assert_eq!(key["primary_version"], 3);

    // Bulk re-wrap to version 3, then refuse anything older.
    let summary = ok(run(
        &service,
        &[
            "rewrap",
            "--in",
            d.join("blobs.jsonl").to_str().unwrap(),
            "--out",
            d.join("moved.jsonl").to_str().unwrap(),
        ],
    ));
    assert!(
        summary.contains("re-wrapped 20, already current 0, failed 0"),
        "{summary}"
    );
    let key = json(run(
        &anna,
        &[
            "--output",
            "json",
            "key",
            "update",
            KEY,
            "--min-decryption-version",
            "3",
        ],
    ));
    assert_eq!(key["min_decryption_version"], 3);
    let first = std::fs::read_to_string(d.join("blobs.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let old: serde_json::Value = serde_json::from_str(&first).unwrap();
    let refused = run(
        &service,
        &[
            "unwrap",
            "--ciphertext-base64",
            old["ciphertext"].as_str().unwrap(),
            "--aad",
            "sample-0",
        ],
    );
    assert_eq!(
        refused.status.code(),
        Some(6),
        "below the minimum decryption version"
    );
    let moved = std::fs::read_to_string(d.join("moved.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let moved: serde_json::Value = serde_json::from_str(&moved).unwrap();
    let opened = json(run(
        &service,
        &[
            "--output",
            "json",
            "unwrap",
            "--ciphertext-base64",
            moved["ciphertext"].as_str().unwrap(),
            "--aad",
            "sample-0",
        ],
    ));
    assert_eq!(opened["plaintext"], b64.encode("result 0"));

    // Anna looks first (dry run changes nothing), then asks to destroy version 1; she cannot
    // approve it herself; Ben approves.
    let dry = ok(run(
        &anna,
        &["key", "destroy", KEY, "--version", "1", "--dry-run"],
    ));
    assert!(
        dry.contains("dry run") && dry.contains("second officer"),
        "{dry}"
    );
    assert!(
        json(run(&ben, &["--output", "json", "approvals", "list"]))
            .as_array()
            .unwrap()
            .is_empty()
    );
    let request = json(run(
        &anna,
        &[
            "--output",
            "json",
            "key",
            "destroy",
            KEY,
            "--version",
            "1",
            "--yes",
        ],
    ));
    assert_eq!(request["state"], "PENDING");
    let id = request["id"].as_str().unwrap().to_owned();
    let own = run(&anna, &["approvals", "approve", &id, "--yes"]);
    assert_eq!(own.status.code(), Some(4), "self-approval must be refused");
    assert!(String::from_utf8_lossy(&own.stderr).contains("different officer"));
    let pending = json(run(&ben, &["--output", "json", "approvals", "list"]));
    assert_eq!(pending[0]["id"], id.as_str());
    let approved = json(run(
        &ben,
        &["--output", "json", "approvals", "approve", &id, "--yes"],
    ));
    assert_eq!(approved["state"], "APPROVED");
    let versions = json(run(&anna, &["--output", "json", "key", "versions", KEY]));
    assert_eq!(versions[0]["state"], "DESTROY_SCHEDULED");

    // A week passes: version 1 is destroyed; its metadata stays.
    clock.advance(7 * DAY_MS + 60_000);
    let versions = eventually(&anna, &["--output", "json", "key", "versions", KEY], |v| {
        v[0]["state"] == "DESTROYED"
    })
    .await;
    assert!(versions[0]["destroyed_time"].is_string());
    let table = ok(run(&anna, &["key", "versions", KEY]));
    assert!(
        table.contains("DESTROYED") && table.contains("DESTROY TIME"),
        "{table}"
    );
    server.stop().await;
}
