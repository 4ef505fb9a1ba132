//! Bulk re-wrap through the CLI: 10,000 blobs over three versions, interrupted half-way and
//! resumed; nothing lost, nothing duplicated, everything under the primary version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use tresor::pki::Validity;
use tresor::proto;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");
const KEY: &str = "tenants/a/keys/archive";
const BLOBS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_blobs_over_three_versions_interrupted_and_resumed() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    create_key(&officer, KEY).await;
    let b64 = base64::engine::general_purpose::STANDARD;

    // 10,000 blobs, a third under each of versions 1, 2 and 3, each with its own AAD.
    let mut lines = Vec::with_capacity(BLOBS);
    for version in 1..=3usize {
        let range: Vec<usize> = (0..BLOBS).filter(|i| i % 3 == version - 1).collect();
        for chunk in range.chunks(256) {
            let calls: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    let service = service.clone();
                    tokio::spawn(async move {
                        let r = service
                            .keys()
                            .wrap(proto::WrapRequest {
                                justification: None,
                                key: KEY.into(),
                                plaintext: format!("dek {i}").into_bytes(),
                                aad: format!("object {i}").into_bytes(),
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        (i, r.ciphertext)
                    })
                })
                .collect();
            for c in calls {
                let (i, ct) = c.await.unwrap();
                lines.push((i, serde_json::json!({ "id": i, "ciphertext": b64.encode(ct), "aad": b64.encode(format!("object {i}")), "bucket": "pacs" })));
            }
        }
        if version < 3 {
            officer
                .admin()
                .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
                .await
                .unwrap();
        }
    }
    lines.sort_by_key(|(i, _)| *i);
    let dir = server.deployment.dir().to_owned();
    let input = dir.join("blobs.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for (_, l) in &lines {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    let output = dir.join("rewrapped.jsonl");
    let profile = server
        .deployment
        .profile(server.addr, Some(SERVICE_A), Validity::default());
    let args = |p: &std::path::Path| {
        let mut c = Command::new(BIN);
        c.arg("--profile")
            .arg(p)
            .args(["rewrap", "--parallel", "16", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&output);
        c
    };

    // Interrupt the first run once about half is done (SIGKILL: no chance to tidy up).
    let mut first = args(&profile)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = std::fs::read(&output)
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0);
        if done >= BLOBS / 2 {
            break;
        }
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run ended before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the first run made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let after_kill = std::fs::read_to_string(&output).unwrap().lines().count();
    assert!(after_kill < BLOBS, "the run finished before the kill");

    // Resume.
    let second = args(&profile).output().unwrap();
    let summary = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "{summary}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        summary.contains("failed 0") && summary.contains("resumed after"),
        "{summary}"
    );

    // Every blob exactly once, under the primary version, unwrapping with its AAD.
    let text = std::fs::read_to_string(&output).unwrap();
    let out: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), BLOBS);
    let ids: HashSet<u64> = out.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), BLOBS, "a line was duplicated or lost");
    for v in &out {
        assert_eq!(v["key_version"], "tenants/a/keys/archive/versions/3");
        assert_eq!(v["bucket"], "pacs", "other fields are copied through");
    }
    assert_eq!(
        out.iter().filter(|v| v["rewrapped"] == true).count(),
        BLOBS * 2 / 3 + 1
    );
    for chunk in out.chunks(500) {
        let calls: Vec<_> = chunk
            .iter()
            .map(|v| {
                let service = service.clone();
                let (id, ct, aad) = (
                    v["id"].as_u64().unwrap(),
                    b64.decode(v["ciphertext"].as_str().unwrap()).unwrap(),
                    b64.decode(v["aad"].as_str().unwrap()).unwrap(),
                );
                tokio::spawn(async move {
                    let r = service
                        .keys()
                        .unwrap(proto::UnwrapRequest {
                            justification: None,
                            ciphertext: ct,
                            aad,
                            key: String::new(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.plaintext, format!("dek {id}").into_bytes());
                    assert_eq!(r.key_version, "tenants/a/keys/archive/versions/3");
                })
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
    }
    assert!(!dir.join("rewrapped.jsonl.failed.jsonl").exists());
    server.stop().await;
}
