//! The database administrator against the audit history, on SQLite and PostgreSQL: cutting
//! the tail, rewriting a record and every hash after it, deleting a checkpoint. The HSM keeps
//! the latest checkpoint (the anchor); a node whose database no longer extends it refuses to
//! start, to sign and to append, naming the anchor and the database's head. And auditors can
//! prove continuity between two exports (`tresor audit verify --since`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use tresor::audit::{AuditError, AuditLog, AuditOptions, ExportFilter};
use tresor::audit_record::{self as record, ExportItem, Record, RecordBody};
use tresor::hsm::Hsm;
use tresor::model::to_hex;
use tresor::pki::Validity;
use tresor::proto;
use tresor::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");

struct Log {
    _token: TestToken,
    hsm: Hsm,
    url: String,
    store: Store,
}

fn body(i: usize) -> RecordBody {
    RecordBody {
        request_id: format!("r{i}"),
        caller: "spiffe://a.example/ehr-archive".into(),
        operation: "Wrap".into(),
        key: "tenants/a/keys/ehr".into(),
        outcome: "OK".into(),
        ..RecordBody::default()
    }
}

impl Log {
    /// A log of 250 records with checkpoints every 100, the last at 250 (the HSM's anchor).
    async fn new(db: Db) -> (Self, AuditLog) {
        let token = TestToken::new();
        let hsm = token.open();
        let url = db.url(&token);
        let store = Store::open(&url).await.unwrap();
        let log = Self {
            _token: token,
            hsm,
            url,
            store,
        };
        let audit = log.open().await.unwrap();
        for i in 0..250 {
            audit.append("a", body(i)).await.unwrap();
        }
        assert_eq!(audit.checkpoint_now().await.unwrap().unwrap().seq, 250);
        (log, audit)
    }

    async fn open(&self) -> Result<AuditLog, AuditError> {
        AuditLog::open(
            self.hsm.clone(),
            Store::open(&self.url).await.unwrap(),
            AuditOptions {
                checkpoint_every: 100,
                ..AuditOptions::default()
            },
        )
        .await
    }

    async fn sql(&self, sql: &str) {
        self.store.execute_raw_for_tests(sql).await.unwrap();
    }

    /// The anchor in the HSM, through the module that keeps it.
    async fn anchor(&self) -> tresor::audit::anchor::Anchor {
        let (id, _) = self.store.audit_key("signing").await.unwrap().unwrap();
        let id = tresor::hsm::ObjectId(tresor::model::from_hex_array(&id).unwrap());
        tresor::audit::anchor::latest(&self.hsm, id)
            .await
            .unwrap()
            .unwrap()
    }
}

/// Opening refuses, naming the anchor (sequence and hash) and the database's head.
fn refused_naming(err: AuditError, anchor_seq: u64, head: u64) {
    let shown = err.to_string();
    assert!(
        matches!(
            err,
            AuditError::Anchor(tresor::audit::anchor::AnchorError::Mismatch { .. })
        ),
        "{err:?}"
    );
    assert!(
        shown.contains(&format!("anchor {anchor_seq}:"))
            && shown.contains(&format!("database head {head}")),
        "{shown}"
    );
}

on_sqlite_and_postgres!(
    a_cut_tail_is_refused_at_start,
    a_tail_cut_while_running_is_never_signed_over,
    a_rewritten_record_with_every_later_hash_recomputed_is_refused,
    a_deleted_checkpoint_loses_no_record,
);

async fn a_cut_tail_is_refused_at_start(db: Db) {
    let (log, audit) = Log::new(db).await;
    drop(audit);
    log.sql(
        "DELETE FROM audit_records WHERE seq > 100; DELETE FROM audit_checkpoints WHERE seq > 100",
    )
    .await;
    refused_naming(log.open().await.unwrap_err(), 250, 100);
    // However often it is tried.
    refused_naming(log.open().await.unwrap_err(), 250, 100);
    assert_eq!(log.anchor().await.seq, 250);
}

async fn a_tail_cut_while_running_is_never_signed_over(db: Db) {
    let (log, audit) = Log::new(db).await;
    log.sql(
        "DELETE FROM audit_records WHERE seq > 100; DELETE FROM audit_checkpoints WHERE seq > 100",
    )
    .await;
    // On SQLite the writer appends from its own head (the gap shows at the next checkpoint);
    // on PostgreSQL a node continues from the database's head, sees it went back, and fails
    // the calls at once. Either way no checkpoint is signed over the shortened history ...
    for i in 0..5 {
        let _ = audit.append("a", body(1000 + i)).await;
    }
    let err = audit.checkpoint_now().await.unwrap_err().to_string();
    assert!(
        err.contains("does not extend") || err.contains("went back from record 250"),
        "{err}"
    );
    assert!(audit.check_chain().is_err());
    // ... and from then on nothing is appended: every call fails closed.
    assert!(audit.append("a", body(2000)).await.is_err());
    assert_eq!(log.anchor().await.seq, 250);
    let latest = log.store.audit_latest_checkpoint().await.unwrap().unwrap();
    assert_eq!(latest.seq, 100, "a checkpoint was signed over the cut");
    assert!(
        tresor::metrics::global().audit_anchor_failures.get() >= 1,
        "not counted"
    );
}

async fn a_rewritten_record_with_every_later_hash_recomputed_is_refused(db: Db) {
    let (log, audit) = Log::new(db).await;
    drop(audit);
    // The administrator changes record 50's caller and recomputes the chain from there, so
    // every link is consistent again (only a signature would tell, and the HSM has one).
    let mut rows: Vec<(Record, [u8; 32])> = log.store.audit_records(1, 250, 1000).await.unwrap();
    let mut prev = rows[48].1;
    let mut sql = String::new();
    for (r, hash) in rows.iter_mut().skip(49) {
        if r.seq == 50 {
            r.body.caller = "spiffe://nobody.example/innocent".into();
        }
        r.prev_hash = prev;
        *hash = r.hash();
        prev = *hash;
        sql.push_str(&format!(
            "UPDATE audit_records SET caller = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {};\n",
            r.body.caller,
            to_hex(&r.prev_hash),
            to_hex(hash),
            r.seq
        ));
    }
    log.sql(&sql).await;
    refused_naming(log.open().await.unwrap_err(), 250, 250);
}

async fn a_deleted_checkpoint_loses_no_record(db: Db) {
    let (log, audit) = Log::new(db).await;
    drop(audit);
    log.sql("DELETE FROM audit_checkpoints WHERE seq = 200")
        .await;
    // The records are all there and still extend the anchor, so the log opens and goes on ...
    let audit = log.open().await.unwrap();
    audit.append("a", body(250)).await.unwrap();
    assert_eq!(audit.checkpoint_now().await.unwrap().unwrap().seq, 251);
    assert_eq!(log.anchor().await.seq, 251);
    // ... an export still covers and verifies every record ...
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let filter = ExportFilter {
        tenant: "a".into(),
        from_ms: 0,
        to_ms: i64::MAX,
        key: None,
        caller: None,
        justification: None,
        outcome: None,
    };
    assert_eq!(audit.export(&filter, &tx).await.unwrap(), 251);
    drop(tx);
    let mut items = Vec::new();
    while let Some(item) = rx.recv().await {
        items.push((item, None));
    }
    let (_, point) = log.store.audit_key("signing").await.unwrap().unwrap();
    let v = record::verify(&items, &tresor::model::from_hex(&point).unwrap()).unwrap();
    assert_eq!(v.seq_range, (1, 251));
    assert!(
        !items
            .iter()
            .any(|(i, _)| matches!(i, ExportItem::Checkpoint(c) if c.seq == 200))
    );
    // ... and removing records is still refused.
    drop(audit);
    log.sql("DELETE FROM audit_records WHERE seq > 150").await;
    refused_naming(log.open().await.unwrap_err(), 251, 150);
}

/// Through `tresor serve`: a database whose audit tail was cut makes the server exit 69 at
/// start, naming the anchor and the database's head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_69_naming_the_anchor_when_the_audit_tail_was_cut() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let auditor = server.client(AUDITOR_A).await;
    create_key(&officer, "tenants/a/keys/ehr").await;
    for _ in 0..3 {
        officer
            .admin()
            .get_key(proto::GetKeyRequest {
                key: "tenants/a/keys/ehr".into(),
            })
            .await
            .unwrap();
    }
    let checkpoint = auditor
        .audit()
        .get_audit_checkpoint(proto::GetAuditCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    let deployment = server.stop_keeping().await;
    let store = Store::open(&deployment.token.db_url()).await.unwrap();
    store
        .execute_raw_for_tests(
            "DELETE FROM audit_records WHERE seq > 2; DELETE FROM audit_checkpoints WHERE seq > 2",
        )
        .await
        .unwrap();
    store.close().await;
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&deployment.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("anchor {}:", checkpoint.sequence))
            && stderr.contains("database head 2"),
        "{stderr}"
    );
}

fn cli(profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .unwrap()
}

fn verify(file: &Path, key: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["audit", "verify"])
        .arg(file)
        .arg("--public-key")
        .arg(key)
        .args(extra)
        .output()
        .unwrap()
}

/// `verify --since`: a genuine later export extends an earlier one; an export is refused as a
/// continuation of a checkpoint it does not contain, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_export_is_proved_to_extend_an_earlier_one() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, "tenants/a/keys/ehr").await;
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
    let export = |name: &str| {
        let file = d.join(name);
        let out = cli(&auditor, &["audit", "export", "-o", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        file
    };
    let old = export("old.jsonl");
    for _ in 0..5 {
        create_key(&officer, &format!("tenants/a/keys/k{}", rand_suffix())).await;
    }
    let new = export("new.jsonl");
    let out = verify(&new, &key, &["--since", old.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("extends the earlier history"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The old export's last checkpoint, as an auditor would have written it down.
    let old_checkpoint = std::fs::read_to_string(&old)
        .unwrap()
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["type"] == "checkpoint")
        .unwrap();
    let seq = old_checkpoint["seq"].as_u64().unwrap();
    let hash = old_checkpoint["hash"].as_str().unwrap();
    let out = verify(
        &new,
        &key,
        &["--since-checkpoint", &format!("{seq}:{hash}")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A checkpoint of another history (here: one hash digit changed).
    let other = format!(
        "{seq}:{}{}",
        if hash.starts_with('0') { "1" } else { "0" },
        &hash[1..]
    );
    let out = verify(&new, &key, &["--since-checkpoint", &other]);
    assert_eq!(out.status.code(), Some(8));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("record {seq} differs")),
        "{stderr}"
    );
    // An older export is no continuation of a newer one's history beyond it.
    let out = verify(&old, &key, &["--since", new.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(8));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("are missing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}

fn rand_suffix() -> String {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    to_hex(&b)
}

/// Through the server: a version the database administrator re-enabled while the server was
/// stopped. The restarted server refuses the key over gRPC with DATA_LOSS naming it, and the
/// tenant's auditors find both the start-up finding and the refused call in their export.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_key_is_refused_over_grpc_and_shows_in_its_tenants_audit_log() {
    const KEY: &str = "tenants/a/keys/ehr";
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    create_key(&officer, KEY).await;
    let blob = service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"dek".to_vec(),
            aad: b"r1".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    officer
        .admin()
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .unwrap();
    officer
        .admin()
        .disable_key_version(proto::KeyVersionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap();
    let deployment = server.stop_keeping().await;
    let store = Store::open(&deployment.token.db_url()).await.unwrap();
    store
        .execute_raw_for_tests("UPDATE key_versions SET state = 'ENABLED' WHERE version = 1")
        .await
        .unwrap();
    store.close().await;

    let server = TestServer::start_on(deployment).await;
    let service = server.client(SERVICE_A).await;
    let err = service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: blob,
            aad: b"r1".to_vec(),
            key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains(KEY) && err.message().contains("metadata integrity"),
        "{}",
        err.message()
    );
    let auditor = server.client(AUDITOR_A).await;
    let items = verified_export(&auditor).await;
    let shown: Vec<&Record> = items
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) => Some(r),
            _ => None,
        })
        .collect();
    assert!(
        shown
            .iter()
            .any(|r| r.body.operation == "MetadataIntegrityCheck"
                && r.body.key == KEY
                && r.body.status_code == tonic::Code::DataLoss as i32),
        "no start-up record of the broken key"
    );
    assert!(
        shown
            .iter()
            .any(|r| r.body.operation == "Unwrap"
                && r.body.status_code == tonic::Code::DataLoss as i32),
        "the refused Unwrap is not audited"
    );
    server.stop().await;
}
