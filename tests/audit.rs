//! The audit log end to end: one record per call, verifiable exports, tampering detected,
//! fail closed, and no secret anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tonic::Code;
use tresor::audit_record::{self as record, ExportItem};
use tresor::client::Client;
use tresor::pki::Validity;
use tresor::proto;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");
const KEY: &str = "tenants/a/keys/ehr";
const PLAINTEXT_MARKER: &[u8] = b"PLAINTEXT-MARKER-7f3a9c";
const AAD_MARKER: &[u8] = b"AAD-MARKER-91c2d4";

async fn export(auditor: &Client) -> Vec<ExportItem> {
    // A range ending an hour from now, so the export's own record is inside it (with the
    // default end, "now", it may fall a millisecond after and be withheld).
    let later = tresor::model::now_millis() + 3_600_000;
    let to = prost_types::Timestamp {
        seconds: later / 1000,
        nanos: 0,
    };
    let mut stream = auditor
        .audit()
        .export_audit_log(proto::ExportAuditLogRequest {
            to: Some(to),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut items = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        items.push(tresor::client::audit_item(m).unwrap());
    }
    items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_workload_yields_one_verifiable_record_per_call_in_order() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    let service_b = server.client(SERVICE_B).await;
    let auditor = server.client(AUDITOR_A).await;
    let anonymous = server.client_with(None, Validity::default()).await;

    create_key(&officer, KEY).await;
    let blob = service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"dek".to_vec(),
            aad: b"record-1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: blob.clone(),
            aad: b"record-1".to_vec(),
            key: String::new(),
        })
        .await
        .unwrap();
    let wrong = service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: blob.clone(),
            aad: b"record-2".to_vec(),
            key: String::new(),
        })
        .await;
    assert_eq!(wrong.unwrap_err().code(), Code::InvalidArgument);
    let denied = service_b
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"x".to_vec(),
            aad: vec![],
        })
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let unauthenticated = anonymous
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"x".to_vec(),
            aad: vec![],
        })
        .await;
    assert_eq!(unauthenticated.unwrap_err().code(), Code::Unauthenticated);
    let point = public_point(&auditor).await;
    let hmac = auditor
        .audit()
        .compute_aad_hmac(proto::ComputeAadHmacRequest {
            aad: b"record-1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .aad_hmac;

    let items = export(&auditor).await;
    let v = record::verify(
        &items.iter().map(|i| (i.clone(), None)).collect::<Vec<_>>(),
        &point,
    )
    .unwrap();
    let shown: Vec<(String, String, String)> = items
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) => Some((
                r.body.operation.clone(),
                r.body.outcome.clone(),
                r.body.caller.clone(),
            )),
            _ => None,
        })
        .collect();
    let expected = [
        ("CreateKey", "OK", OFFICER_A),
        ("Wrap", "OK", SERVICE_A),
        ("Unwrap", "OK", SERVICE_A),
        ("Unwrap", "FAILED", SERVICE_A),
        ("Wrap", "UNAUTHENTICATED", ""),
        ("GetAuditPublicKey", "OK", AUDITOR_A),
        ("ComputeAadHmac", "OK", AUDITOR_A),
    ];
    let got: Vec<(&str, &str, &str)> = shown
        .iter()
        .take(expected.len())
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    assert_eq!(got, expected);
    // Tenant B's denied call is in the chain, withheld from tenant A's auditor.
    assert_eq!(v.withheld, 1, "{v:?}");
    assert_eq!(v.seq_range.0, 1);
    // Every call is exactly one record: 8 calls before the export, plus the export itself.
    assert_eq!(v.records + v.withheld, 9, "{v:?}");
    // The AAD appears only as its HMAC, which an auditor can compute to search.
    let wraps: Vec<&record::Record> = items
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) if r.body.operation == "Wrap" && r.body.outcome == "OK" => {
                Some(r)
            }
            _ => None,
        })
        .collect();
    assert_eq!(wraps[0].body.aad_hmac, hmac);
    assert_eq!(wraps[0].body.key_version, "tenants/a/keys/ehr/versions/1");
    assert_eq!(wraps[0].body.key, KEY);
    assert_eq!(hmac.len(), 64);
    server.stop().await;
}

async fn aad_hmac(server: &TestServer, aad: &[u8]) -> String {
    server
        .client(AUDITOR_A)
        .await
        .audit()
        .compute_aad_hmac(proto::ComputeAadHmacRequest { aad: aad.to_vec() })
        .await
        .unwrap()
        .into_inner()
        .aad_hmac
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aad_hmacs_are_keyed_by_the_hsm_and_stable_across_restarts() {
    let server = TestServer::start().await;
    let first = aad_hmac(&server, b"patient-4711").await;
    assert_eq!(first.len(), 64);
    assert_ne!(first, aad_hmac(&server, b"patient-4712").await);
    // Not an unkeyed digest anyone could compute from a guessed AAD.
    let digest = ring::digest::digest(&ring::digest::SHA256, b"patient-4711");
    assert_ne!(first, tresor::model::to_hex(digest.as_ref()));
    // The same HSM key after a restart gives the same value, so old records stay searchable.
    let deployment = server.stop_keeping().await;
    let again = TestServer::start_on(deployment).await;
    assert_eq!(aad_hmac(&again, b"patient-4711").await, first);
    again.stop().await;
    // Another installation (another HSM key) gives another value.
    let other = TestServer::start().await;
    assert_ne!(aad_hmac(&other, b"patient-4711").await, first);
    other.stop().await;
}

fn cli(profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .unwrap()
}

fn verify_file(file: &Path, key: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["audit", "verify"])
        .arg(file)
        .arg("--public-key")
        .arg(key)
        .output()
        .unwrap()
}

fn failure(out: &std::process::Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(8),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) -> PathBuf {
    let out = path.with_extension("tampered.jsonl");
    std::fs::write(&out, lines.join("\n") + "\n").unwrap();
    out
}

fn set(line: &str, field: &str, value: serde_json::Value) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    v[field] = value;
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_verify_offline_and_every_tampering_is_named() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    create_key(&officer, KEY).await;
    for i in 0..30u8 {
        service
            .keys()
            .wrap(proto::WrapRequest {
                justification: None,
                key: KEY.into(),
                plaintext: vec![i; 16],
                aad: vec![i],
            })
            .await
            .unwrap();
    }
    let d = server.deployment.dir().to_owned();
    let auditor = server
        .deployment
        .profile(server.addr, Some(AUDITOR_A), Validity::default());
    let key = d.join("audit.pem");
    assert!(
        cli(
            &auditor,
            &["audit", "public-key", "-o", key.to_str().unwrap()]
        )
        .status
        .success()
    );
    let jsonl = d.join("export.jsonl");
    let csv = d.join("export.csv");
    for (format, file) in [("jsonl", &jsonl), ("csv", &csv)] {
        let out = cli(
            &auditor,
            &[
                "audit",
                "export",
                "--format",
                format,
                "-o",
                file.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = verify_file(file, &key);
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && summary.starts_with("verified: "),
            "{summary}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A filtered export proves completeness through withheld rows and says so.
    let filtered = d.join("filtered.jsonl");
    assert!(
        cli(
            &auditor,
            &[
                "audit",
                "export",
                "--caller",
                OFFICER_A,
                "-o",
                filtered.to_str().unwrap()
            ]
        )
        .status
        .success()
    );
    let summary = String::from_utf8(verify_file(&filtered, &key).stdout).unwrap();
    assert!(
        summary.contains("verified: 1 records") && summary.contains("withheld"),
        "{summary}"
    );

    // The CSV opens in a spreadsheet-style reader: a header row and quoted fields.
    let py = Command::new("python3")
        .arg("-c")
        .arg("import csv,sys\nrows=list(csv.DictReader(open(sys.argv[1],newline='')))\nprint(len(rows), rows[0]['type'], rows[0]['operation'], rows[0]['caller'])")
        .arg(&csv)
        .output()
        .unwrap();
    let parsed = String::from_utf8(py.stdout).unwrap();
    let rows = tresor::audit::file::read(&std::fs::read_to_string(&csv).unwrap()).unwrap();
    assert_eq!(
        parsed.trim(),
        format!("{} record CreateKey {OFFICER_A}", rows.len()),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(
        std::fs::read_to_string(&csv)
            .unwrap()
            .starts_with("\"type\",\"seq\",\"time\"")
    );

    let good = lines(&jsonl);
    let record_at = |seq: u64| {
        good.iter()
            .position(|l| {
                l.contains("\"type\":\"record\"") && l.contains(&format!("\"seq\":{seq},"))
            })
            .unwrap()
    };

    // Editing a field of a record.
    let mut edited = good.clone();
    let i = record_at(5);
    edited[i] = set(&edited[i], "caller", "someone-else".into());
    assert!(
        failure(&verify_file(&write_lines(&jsonl, &edited), &key)).contains("record 5 was altered")
    );
    // Editing it and its stated hash: the next link names the place.
    let mut rehashed = edited.clone();
    rehashed[i] = set(
        &rehashed[i],
        "hash",
        serde_json::Value::String(String::new()),
    );
    let e = failure(&verify_file(&write_lines(&jsonl, &rehashed), &key));
    assert!(e.contains("record 6") || e.contains("checkpoint"), "{e}");
    // Deleting a record.
    let mut deleted = good.clone();
    deleted.remove(record_at(7));
    assert!(
        failure(&verify_file(&write_lines(&jsonl, &deleted), &key))
            .contains("record 8 follows record 6")
    );
    // Reordering two records.
    let mut reordered = good.clone();
    reordered.swap(record_at(10), record_at(11));
    assert!(
        failure(&verify_file(&write_lines(&jsonl, &reordered), &key)).contains("follows record")
    );
    // Truncating the tail past the last checkpoint.
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 2);
    assert!(
        failure(&verify_file(&write_lines(&jsonl, &truncated), &key))
            .contains("not covered by a checkpoint")
    );
    // A checkpoint signed by another key.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .unwrap();
    let other = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8.as_ref(),
        &rng,
    )
    .unwrap();
    let mut forged = good.clone();
    let last = forged.len() - 1;
    let c: serde_json::Value = serde_json::from_str(&forged[last]).unwrap();
    let hash: [u8; 32] = tresor::model::from_hex(c["hash"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let message = record::checkpoint_message(
        c["seq"].as_u64().unwrap(),
        &hash,
        c["time_ms"].as_i64().unwrap(),
    );
    let signature = other.sign(&rng, &message).unwrap();
    forged[last] = set(
        &forged[last],
        "signature",
        tresor::model::to_hex(signature.as_ref()).into(),
    );
    assert!(
        failure(&verify_file(&write_lines(&jsonl, &forged), &key))
            .contains("signature does not verify")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_audit_store_fails_nothing_is_returned() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    create_key(&officer, KEY).await;
    let blob = service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: PLAINTEXT_MARKER.to_vec(),
            aad: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;

    let side = tresor::store::Store::open(&format!(
        "sqlite://{}",
        server.deployment.dir().join("tresor.db").display()
    ))
    .await
    .unwrap();
    side.execute_raw_for_tests("CREATE TRIGGER audit_down BEFORE INSERT ON audit_records BEGIN SELECT RAISE(ABORT, 'disk full'); END;")
        .await
        .unwrap();
    let unwrap = service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: blob.clone(),
            aad: vec![],
            key: String::new(),
        })
        .await;
    let s = unwrap.expect_err("plaintext returned without a durable audit record");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let wrap = service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"x".to_vec(),
            aad: vec![],
        })
        .await;
    assert_eq!(wrap.unwrap_err().code(), Code::Unavailable);
    let dk = service
        .keys()
        .generate_data_key(proto::GenerateDataKeyRequest {
            justification: None,
            key: KEY.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(dk.unwrap_err().code(), Code::Unavailable);

    side.execute_raw_for_tests("DROP TRIGGER audit_down")
        .await
        .unwrap();
    let back = service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: blob,
            aad: vec![],
            key: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(back.into_inner().plaintext, PLAINTEXT_MARKER);
    // The chain has no gap where the failed batch would have been.
    let auditor = server.client(AUDITOR_A).await;
    let point = public_point(&auditor).await;
    let items = export(&auditor).await;
    record::verify(
        &items.iter().map(|i| (i.clone(), None)).collect::<Vec<_>>(),
        &point,
    )
    .unwrap();
    server.stop().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_plaintext_aad_or_pin_in_the_database_exports_or_debug_log() {
    use base64::Engine;
    let d = Deployment::new("");
    let log = d.dir().join("server.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&d.config_path)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("tresor: serving on ") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("tresor: serving on ")
        .unwrap()
        .parse()
        .unwrap();
    let officer = d.profile(addr, Some(OFFICER_A), Validity::default());
    let service = d.profile(addr, Some(SERVICE_A), Validity::default());
    let auditor = d.profile(addr, Some(AUDITOR_A), Validity::default());
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);

    assert!(cli(&officer, &["key", "create", KEY]).status.success());
    let wrapped = cli(
        &service,
        &[
            "--output",
            "json",
            "wrap",
            "--key",
            KEY,
            "--plaintext-base64",
            &b64(PLAINTEXT_MARKER),
            "--aad-base64",
            &b64(AAD_MARKER),
        ],
    );
    assert!(wrapped.status.success());
    let blob = serde_json::from_slice::<serde_json::Value>(&wrapped.stdout).unwrap()["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let opened = cli(
        &service,
        &[
            "--output",
            "json",
            "unwrap",
            "--ciphertext-base64",
            &blob,
            "--aad-base64",
            &b64(AAD_MARKER),
        ],
    );
    assert!(opened.status.success());
    // A failing unwrap with the AAD too, so error paths are covered.
    assert!(
        !cli(
            &service,
            &["unwrap", "--ciphertext-base64", &blob, "--aad", "wrong"]
        )
        .status
        .success()
    );
    let dk = cli(
        &service,
        &[
            "--output",
            "json",
            "datakey",
            "--key",
            KEY,
            "--aad-base64",
            &b64(AAD_MARKER),
        ],
    );
    let dek = base64::engine::general_purpose::STANDARD
        .decode(
            serde_json::from_slice::<serde_json::Value>(&dk.stdout).unwrap()["plaintext"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let exports = [d.dir().join("all.jsonl"), d.dir().join("all.csv")];
    for (f, format) in exports.iter().zip(["jsonl", "csv"]) {
        assert!(
            cli(
                &auditor,
                &[
                    "audit",
                    "export",
                    "--format",
                    format,
                    "-o",
                    f.to_str().unwrap()
                ]
            )
            .status
            .success()
        );
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));

    let mut places: Vec<PathBuf> = vec![log.clone(), d.dir().join("tresor.db")];
    if d.dir().join("tresor.db-wal").exists() {
        places.push(d.dir().join("tresor.db-wal"));
    }
    places.extend(exports);
    let secrets: [(&str, Vec<u8>); 6] = [
        ("plaintext", PLAINTEXT_MARKER.to_vec()),
        ("plaintext (base64)", b64(PLAINTEXT_MARKER).into_bytes()),
        ("AAD", AAD_MARKER.to_vec()),
        ("AAD (base64)", b64(AAD_MARKER).into_bytes()),
        ("PIN", PIN.as_bytes().to_vec()),
        ("data key (base64)", b64(&dek).into_bytes()),
    ];
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("DEBUG"), "the log was not at debug level");
    for place in &places {
        let bytes = std::fs::read(place).unwrap();
        for (what, secret) in &secrets {
            assert!(
                !contains(&bytes, secret),
                "{what} found in {}",
                place.display()
            );
        }
        assert!(
            !contains(&bytes, &dek),
            "raw data key found in {}",
            place.display()
        );
    }
}

/// A checkpoint is signed off the commit path: while the HSM takes seconds over a signature,
/// records keep being committed and their callers answered; `checkpoint_now` waits for a
/// checkpoint that covers the head as it was when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_commit_while_a_checkpoint_is_being_signed() {
    use tresor::audit::{AuditLog, AuditOptions};
    use tresor::audit_record::RecordBody;

    let token = TestToken::with(Backend::HsmSim);
    let hsm = token.open();
    let store = tresor::store::Store::open(&token.db_url()).await.unwrap();
    let audit = AuditLog::open(
        hsm,
        store.clone(),
        AuditOptions {
            checkpoint_every: 10,
            ..AuditOptions::default()
        },
    )
    .await
    .unwrap();
    let record = |i: usize| RecordBody {
        request_id: format!("r{i}"),
        operation: "Wrap".into(),
        outcome: "OK".into(),
        ..RecordBody::default()
    };

    // Every PKCS#11 call now takes 0.7 s: a checkpoint is about a dozen of them (reading the
    // audit anchor, the signature, moving the anchor on), each HSM operation within its 5 s
    // deadline.
    token.faults(&hsm_sim::Faults {
        latency_ms: 700,
        ..hsm_sim::Faults::default()
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for i in 0..10 {
        audit.append("a", record(i)).await.unwrap();
    }
    // The tenth record made a checkpoint due; these commit while it is being signed.
    for i in 10..30 {
        assert_eq!(audit.append("a", record(i)).await.unwrap(), i as u64 + 1);
    }
    assert_eq!(
        store.audit_latest_checkpoint().await.unwrap(),
        None,
        "records waited for the checkpoint's signature"
    );

    let c = audit.checkpoint_now().await.unwrap().unwrap();
    assert_eq!(c.seq, 30);
    assert_eq!(
        store.audit_latest_checkpoint().await.unwrap(),
        Some(c.clone())
    );
    assert_eq!(store.audit_head().await.unwrap().unwrap().hash, c.hash);
    let (_, point) = store.audit_key("signing").await.unwrap().unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_FIXED,
        tresor::model::from_hex(&point).unwrap(),
    )
    .verify(
        &record::checkpoint_message(c.seq, &c.hash, c.time_ms),
        &c.signature,
    )
    .expect("the checkpoint is signed by the audit key");
}

/// A flood of identical refused calls is audited as the burst's first record plus one burst
/// record with the count and time span: every refusal is accounted for, in the hash chain, and
/// allowed callers do not queue behind a record per refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_refusals_is_accounted_for_in_few_records() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, "tenants/a/keys/k").await;
    let anonymous = server
        .client_with(None, tresor::pki::Validity::default())
        .await;
    const FLOOD: u64 = 200;
    let calls = (0..FLOOD).map(|_| {
        let keys = anonymous.keys();
        async move {
            let mut keys = keys;
            keys.wrap(tresor::proto::WrapRequest {
                justification: None,
                key: "tenants/a/keys/k".into(),
                plaintext: b"x".to_vec(),
                aad: Vec::new(),
            })
            .await
        }
    });
    let answers = futures_join_all(calls).await;
    assert!(answers.iter().all(|a| {
        a.as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unauthenticated)
    }));
    // The burst's window closes after a second; then its record is appended.
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let auditor = server.client(AUDITOR_A).await;
    let items = verified_export(&auditor).await;
    let refusals: Vec<&tresor::audit_record::Record> = items
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r)
                if r.body.operation == "Wrap" && r.body.outcome == "UNAUTHENTICATED" =>
            {
                Some(r)
            }
            _ => None,
        })
        .collect();
    // A record of one call counts 1; a burst record counts the calls it stands for.
    let accounted: u64 = refusals.iter().map(|r| r.body.repeated.max(1)).sum();
    assert_eq!(
        accounted,
        FLOOD,
        "every refused call is accounted for: {:?}",
        refusals
            .iter()
            .map(|r| (
                r.seq,
                r.time_ms,
                r.body.repeated,
                r.body.first_ms,
                r.body.last_ms
            ))
            .collect::<Vec<_>>()
    );
    assert!(
        refusals.len() < 20,
        "{} records for {FLOOD} identical refusals",
        refusals.len()
    );
    let burst = refusals
        .iter()
        .find(|r| r.body.repeated > 0)
        .expect("a burst record");
    assert!(burst.body.first_ms <= burst.body.last_ms);
    assert_eq!(burst.body.peer, "127.0.0.1");
    server.stop().await;
}

/// `join_all` without another dependency: the calls run concurrently on the runtime.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
