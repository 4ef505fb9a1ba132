//! The metadata store: the same suite on SQLite and PostgreSQL (schema versioning, atomic
//! transitions, audit batches), SQLite's file safety and WAL, and what several nodes on one
//! PostgreSQL rely on (one audit chain, change notifications, the scheduler lock).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use tresor::audit_record::{Checkpoint, Record, RecordBody};
use tresor::envelope::VersionId;
use tresor::model::VersionState::{self, *};
use tresor::store::changes::Change;
use tresor::store::{ApprovalRow, ChainHead, KeyRow, Reseal, Store, StoreError, VersionRow};

/// The compare-and-set pair of a key's integrity value (the store only compares them).
fn seal<'a>(before: &'a str, after: &'a str) -> Reseal<'a> {
    Reseal { before, after }
}

fn key_row() -> KeyRow {
    KeyRow {
        tenant: "t".into(),
        name: "k".into(),
        description: String::new(),
        labels: Default::default(),
        primary_version: 1,
        created_at: 1,
        updated_at: 1,
        rotation_period_ms: None,
        next_rotation_at: None,
        min_decryption_version: 1,
        usage: Default::default(),
        integrity: "s0".into(),
    }
}

fn version_row(n: u32, id: u8) -> VersionRow {
    VersionRow {
        id: VersionId([id; 16]),
        tenant: "t".into(),
        key_name: "k".into(),
        version: n,
        state: Enabled,
        hsm_label: format!("label-{id}"),
        created_at: 1,
        state_changed_at: 1,
        destroy_at: None,
        destroyed_at: None,
        lost_at: None,
        wraps_reserved: 0,
    }
}

/// A database for one test, on either back-end.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Db {
    fn sqlite() -> Self {
        Db::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn postgres() -> Self {
        Db::Postgres(common::postgres_database().await)
    }

    fn url(&self) -> String {
        match self {
            Db::Sqlite(dir) => format!("sqlite://{}", dir.path().join("t.db").display()),
            Db::Postgres(url) => url.clone(),
        }
    }

    async fn open(&self) -> Store {
        Store::open(&self.url()).await.unwrap()
    }
}

/// Runs a suite case on both back-ends: `name::sqlite` and `name::postgres`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$case(super::Db::sqlite()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$case(super::Db::postgres().await).await;
            }
        }
    )*};
}

on_both_backends!(
    the_installation_id_is_stable,
    a_schema_from_a_newer_tresor_is_refused,
    transitions_are_compare_and_set,
    key_updates_are_compare_and_set,
    wrap_reservations_only_grow,
    audit_batches_go_in_whole,
    approvals_allow_one_pending_request_per_version,
    nodes_are_counted_by_their_last_heartbeat,
);

async fn nodes_are_counted_by_their_last_heartbeat(db: Db) {
    let store = db.open().await;
    assert_eq!(store.live_nodes(0).await.unwrap(), 0);
    store.heartbeat("node-a", 100).await.unwrap();
    store.heartbeat("node-b", 200).await.unwrap();
    store.heartbeat("node-a", 300).await.unwrap();
    assert_eq!(store.live_nodes(0).await.unwrap(), 2);
    // node-b was last seen at 200.
    assert_eq!(store.live_nodes(250).await.unwrap(), 1);
}

async fn the_installation_id_is_stable(db: Db) {
    let store = db.open().await;
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    let id = store.installation_id().to_owned();
    assert_eq!(id.len(), 16);
    store.close().await;
    let again = db.open().await;
    assert_eq!(again.installation_id(), id);
    assert_eq!(
        again.load_versions().await.unwrap(),
        vec![version_row(1, 1)]
    );
}

async fn a_schema_from_a_newer_tresor_is_refused(db: Db) {
    let store = db.open().await;
    let checksum = match db {
        Db::Sqlite(_) => "x'00'",
        Db::Postgres(_) => "decode('00', 'hex')",
    };
    store
        .execute_raw_for_tests(&format!(
            "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
             VALUES (9999, 'from the future', CURRENT_TIMESTAMP, TRUE, {checksum}, 0)"
        ))
        .await
        .unwrap();
    store.close().await;
    let err = Store::open(&db.url()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 9999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer"));
}

#[tokio::test]
async fn unsupported_urls_are_named() {
    let err = Store::open("mysql://user:secret@db/tresor")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl(_)));
    let shown = err.to_string();
    assert!(shown.contains("sqlite://") && shown.contains("postgres://"));
    assert!(!shown.contains("secret"), "{shown}");
}

async fn transitions_are_compare_and_set(db: Db) {
    let store = db.open().await;
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    assert!(matches!(
        store.create_key(&key_row(), &version_row(1, 9)).await,
        Err(StoreError::AlreadyExists)
    ));

    // Rotation moves the primary only from the expected version.
    store
        .add_primary_version(&version_row(2, 2), 1, &seal("s0", "s1"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .add_primary_version(&version_row(3, 3), 1, &seal("s1", "s2"))
            .await,
        Err(StoreError::Conflict)
    ));
    // The same number twice is a conflict, not a second version 2.
    assert!(matches!(
        store
            .add_primary_version(&version_row(2, 4), 2, &seal("s1", "s2"))
            .await,
        Err(StoreError::Conflict)
    ));
    // So is a write that read the key before its last change (integrity value moved on).
    assert!(matches!(
        store
            .add_primary_version(&version_row(3, 3), 2, &seal("s0", "s2"))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.load_keys().await.unwrap()[0].primary_version, 2);

    let v1 = VersionId([1; 16]);
    let v2 = VersionId([2; 16]);
    store
        .transition(&v1, &[Enabled], Disabled, 5, None, true, &seal("s1", "s2"))
        .await
        .unwrap();
    // Not in the expected state any more.
    assert!(matches!(
        store
            .transition(&v1, &[Enabled], Disabled, 6, None, true, &seal("s2", "s3"))
            .await,
        Err(StoreError::Conflict)
    ));
    // The primary version is protected in SQL, not only by the caller.
    assert!(matches!(
        store
            .transition(&v2, &[Enabled], Disabled, 6, None, true, &seal("s2", "s3"))
            .await,
        Err(StoreError::Conflict)
    ));
    // A stale integrity value undoes the version's change too (one transaction).
    assert!(matches!(
        store
            .transition(&v1, &[Disabled], Enabled, 6, None, false, &seal("s1", "s3"))
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        store
            .load_versions()
            .await
            .unwrap()
            .iter()
            .find(|r| r.id == v1)
            .unwrap()
            .state,
        Disabled
    );

    store
        .transition(
            &v1,
            &[Enabled, Disabled],
            DestroyScheduled,
            7,
            Some(100),
            true,
            &seal("s2", "s3"),
        )
        .await
        .unwrap();
    store
        .transition(
            &v1,
            &[DestroyScheduled],
            Destroyed,
            8,
            None,
            false,
            &seal("s3", "s4"),
        )
        .await
        .unwrap();
    assert_eq!(store.load_keys().await.unwrap()[0].integrity, "s4");
    let rows = store.load_versions().await.unwrap();
    let row = rows.iter().find(|r| r.id == v1).unwrap();
    assert_eq!(
        (row.state, row.state_changed_at, row.destroyed_at),
        (VersionState::Destroyed, 8, Some(8))
    );
}

async fn wrap_reservations_only_grow(db: Db) {
    let store = db.open().await;
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    let id = VersionId([1; 16]);
    assert_eq!(store.reserve_wraps(&id, 4096).await.unwrap(), 4096);
    assert_eq!(store.reserve_wraps(&id, 4096).await.unwrap(), 8192);
    assert!(matches!(
        store.reserve_wraps(&VersionId([9; 16]), 1).await,
        Err(StoreError::Conflict)
    ));
}

/// `n` records continuing the chain at `head`.
fn chained(head: ChainHead, n: usize, tag: &str) -> Vec<(Record, [u8; 32])> {
    let mut prev = head.hash;
    (0..n)
        .map(|i| {
            let r = Record {
                seq: head.seq + 1 + i as u64,
                prev_hash: prev,
                time_ms: head.time_ms.max(1),
                tenant: "t".into(),
                body: RecordBody {
                    operation: "Wrap".into(),
                    request_id: format!("{tag} {i}"),
                    caller: "spiffe://hospital.example/service/ehr".into(),
                    fingerprint: "f".repeat(64),
                    aad_hmac: "a".repeat(64),
                    ..Default::default()
                },
            };
            prev = r.hash();
            (r, prev)
        })
        .collect()
}

fn head_of(batch: &[(Record, [u8; 32])]) -> ChainHead {
    let (r, hash) = batch.last().unwrap();
    ChainHead {
        seq: r.seq,
        hash: *hash,
        time_ms: r.time_ms,
    }
}

async fn audit_batches_go_in_whole(db: Db) {
    let store = db.open().await;
    let first = store
        .append_audit(ChainHead::GENESIS, |h| chained(h, 500, "first"))
        .await
        .unwrap();
    let head = head_of(&first);
    assert_eq!(store.audit_head().await.unwrap(), Some(head));
    assert_eq!(store.audit_records(1, 500, 1000).await.unwrap(), first);

    // A batch is one transaction: a duplicate sequence number anywhere refuses all of it.
    let mut batch = chained(head, 2, "clash");
    batch[1].0.seq = head.seq;
    assert!(store.append_audit(head, move |_| batch).await.is_err());
    assert_eq!(store.audit_head().await.unwrap(), Some(head));

    // A checkpoint of a record already checkpointed (another node signed the same head) keeps
    // the first.
    let c = Checkpoint {
        seq: head.seq,
        hash: head.hash,
        time_ms: 5,
        signature: vec![1, 2, 3],
    };
    store.insert_checkpoint(&c).await.unwrap();
    store
        .insert_checkpoint(&Checkpoint {
            signature: vec![9],
            ..c.clone()
        })
        .await
        .unwrap();
    assert_eq!(store.audit_latest_checkpoint().await.unwrap(), Some(c));
}

async fn key_updates_are_compare_and_set(db: Db) {
    let store = db.open().await;
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    let mut row = key_row();
    row.description = "first".into();
    row.updated_at = 2;
    row.integrity = "s1".into();
    store.update_key(&row, 1, "s0").await.unwrap();
    // A writer that read the key before that change is refused instead of undoing it.
    let mut stale = key_row();
    stale.description = "stale".into();
    stale.updated_at = 3;
    stale.integrity = "s2".into();
    assert!(matches!(
        store.update_key(&stale, 1, "s1").await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        store.update_key(&stale, 2, "s0").await,
        Err(StoreError::Conflict)
    ));
    // So is one that checked against a primary version that has moved on.
    store
        .add_primary_version(&version_row(2, 2), 1, &seal("s1", "s2"))
        .await
        .unwrap();
    let updated_at = store.load_keys().await.unwrap()[0].updated_at;
    let mut old_primary = key_row();
    old_primary.updated_at = updated_at + 1;
    old_primary.integrity = "s3".into();
    assert!(matches!(
        store.update_key(&old_primary, updated_at, "s2").await,
        Err(StoreError::Conflict)
    ));
    let (key, versions) = store.load_key("t", "k").await.unwrap().unwrap();
    assert_eq!(
        (key.description.as_str(), key.primary_version),
        ("first", 2)
    );
    assert_eq!(versions.len(), 2);
    assert!(store.load_key("t", "other").await.unwrap().is_none());
}

async fn approvals_allow_one_pending_request_per_version(db: Db) {
    let store = db.open().await;
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    let a = ApprovalRow {
        id: "a1".into(),
        tenant: "t".into(),
        key_name: "k".into(),
        version: 1,
        operation: "DestroyVersion".into(),
        requested_by: "officer-a".into(),
        requested_at: 10,
        expires_at: 100,
        state: "PENDING".into(),
        decided_by: String::new(),
        integrity: "p1".into(),
    };
    store.insert_approval(&a, 10).await.unwrap();
    let again = ApprovalRow {
        id: "a2".into(),
        ..a.clone()
    };
    assert!(matches!(
        store.insert_approval(&again, 20).await,
        Err(StoreError::Conflict)
    ));
    store
        .decide_approval("a1", "APPROVED", "officer-b", 30, "p2")
        .await
        .unwrap();
    assert!(matches!(
        store
            .decide_approval("a1", "REJECTED", "officer-c", 31, "p3")
            .await,
        Err(StoreError::Conflict)
    ));
    let stored = store.get_approval("a1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.state.as_str(),
            stored.decided_by.as_str(),
            stored.integrity.as_str()
        ),
        ("APPROVED", "officer-b", "p2")
    );
    store.insert_approval(&again, 40).await.unwrap();
    let expired = store.expired_approvals(101).await.unwrap();
    assert_eq!(
        expired.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        ["a2"]
    );
    assert_eq!(store.list_approvals("t").await.unwrap().len(), 2);
}

#[tokio::test]
async fn the_database_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tresor.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    for file in ["tresor.db", "tresor.db-wal"] {
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
    }
    store.close().await;

    // A file someone loosened is tightened again at open.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _again = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_wal_stays_bounded_under_continuous_audit_writes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let store = Store::open(db.to_str().unwrap()).await.unwrap();

    // About 25 MB of audit records, written back to back as a loaded server does.
    let mut head = ChainHead::GENESIS;
    for _ in 0..100 {
        let batch = store
            .append_audit(head, |h| chained(h, 500, "load"))
            .await
            .unwrap();
        head = head_of(&batch);
    }
    assert_eq!(store.audit_head().await.unwrap(), Some(head));
    let wal = std::fs::metadata(dir.path().join("t.db-wal"))
        .unwrap()
        .len();
    assert!(
        wal < 12 << 20,
        "the WAL grew to {wal} bytes: it is not being checkpointed"
    );
}

// ---- several nodes on one PostgreSQL --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_appending_at_once_extend_one_gap_free_audit_chain() {
    let url = common::postgres_database().await;
    let nodes = [
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
    ];
    // Each node believes the chain is empty (its own head is stale from the first batch on);
    // the store continues from the database's head instead.
    let mut writers = Vec::new();
    for (n, store) in nodes.iter().enumerate() {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            for b in 0..40 {
                store
                    .append_audit(ChainHead::GENESIS, move |h| {
                        chained(h, 1 + (b % 7), &format!("node {n} batch {b}"))
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let head = nodes[0].audit_head().await.unwrap().unwrap();
    let records = nodes[1].audit_records(1, head.seq, 10_000).await.unwrap();
    let expected: u64 = (0..3)
        .map(|_| (0..40u64).map(|b| 1 + b % 7).sum::<u64>())
        .sum();
    assert_eq!(records.len() as u64, expected);
    let mut prev = ChainHead::GENESIS;
    for (r, hash) in &records {
        assert_eq!(r.seq, prev.seq + 1, "gap before {}", r.seq);
        assert_eq!(r.prev_hash, prev.hash, "chain broken at {}", r.seq);
        assert!(r.time_ms >= prev.time_ms, "time went back at {}", r.seq);
        assert_eq!(r.hash(), *hash);
        prev = ChainHead {
            seq: r.seq,
            hash: *hash,
            time_ms: r.time_ms,
        };
    }
}

async fn next(feed: &mut tresor::store::changes::ChangeFeed) -> Change {
    tokio::time::timeout(std::time::Duration::from_secs(10), feed.next())
        .await
        .expect("a notification within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_key_change_is_announced_to_every_node_and_a_rolled_back_one_is_not() {
    let url = common::postgres_database().await;
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let mut feed = b
        .changes()
        .await
        .unwrap()
        .expect("PostgreSQL has a change feed");
    a.create_key(&key_row(), &version_row(1, 1)).await.unwrap();
    let created = Change::Key {
        tenant: "t".into(),
        name: "k".into(),
    };
    assert_eq!(next(&mut feed).await, created);
    // A failed compare-and-set sends nothing; the next real change is the next notification.
    assert!(
        a.add_primary_version(&version_row(3, 3), 7, &seal("s0", "s1"))
            .await
            .is_err()
    );
    // (version 1 is the primary, which stays enabled)
    a.transition(
        &VersionId([1; 16]),
        &[Enabled],
        Disabled,
        5,
        None,
        true,
        &seal("s0", "s1"),
    )
    .await
    .unwrap_err();
    a.add_primary_version(&version_row(2, 2), 1, &seal("s0", "s1"))
        .await
        .unwrap();
    assert_eq!(next(&mut feed).await, created);
    a.transition(
        &VersionId([1; 16]),
        &[Enabled],
        Disabled,
        5,
        None,
        true,
        &seal("s1", "s2"),
    )
    .await
    .unwrap();
    assert_eq!(next(&mut feed).await, created);

    // SQLite has no other nodes to tell.
    let dir = tempfile::tempdir().unwrap();
    let single = Store::open(dir.path().join("t.db").to_str().unwrap())
        .await
        .unwrap();
    assert!(single.changes().await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_at_a_time_holds_the_scheduler_lock_and_it_passes_on_when_the_holder_goes() {
    let url = common::postgres_database().await;
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let mut held = a.try_scheduler_lock().await.unwrap().expect("first taker");
    assert!(held.still_held().await);
    assert!(b.try_scheduler_lock().await.unwrap().is_none());
    drop(held);
    // The holder's connection closing frees the lock (as when its node dies).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(mut taken) = b.try_scheduler_lock().await.unwrap() {
            assert!(taken.still_held().await);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
