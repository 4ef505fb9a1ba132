//! The metadata store on SQLite: file safety, schema versioning, atomic transitions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;

use tresor::envelope::VersionId;
use tresor::model::VersionState::{self, *};
use tresor::store::{KeyRow, Store, StoreError, VersionRow};

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

async fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn the_database_file_is_private_and_the_installation_id_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tresor.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    store
        .create_key(&key_row(), &version_row(1, 1))
        .await
        .unwrap();
    let id = store.installation_id().to_owned();
    assert_eq!(id.len(), 16);
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
    let again = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(again.installation_id(), id);
    assert_eq!(
        again.load_versions().await.unwrap(),
        vec![version_row(1, 1)]
    );
}

#[tokio::test]
async fn a_schema_from_a_newer_tresor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    store
        .execute_raw_for_tests(
            "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
             VALUES (9999, 'from the future', CURRENT_TIMESTAMP, TRUE, x'00', 0)",
        )
        .await
        .unwrap();
    store.close().await;
    let err = Store::open(&url).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 9999, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer"));
}

#[tokio::test]
async fn unsupported_urls_are_named() {
    let err = Store::open("postgres://db/tresor").await.unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedUrl(_)));
    assert!(err.to_string().contains("sqlite://"));
}

#[tokio::test]
async fn transitions_are_compare_and_set() {
    let (_dir, store) = fresh().await;
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
        .add_primary_version(&version_row(2, 2), 1)
        .await
        .unwrap();
    assert!(matches!(
        store.add_primary_version(&version_row(3, 3), 1).await,
        Err(StoreError::Conflict)
    ));
    // The same number twice is a conflict, not a second version 2.
    assert!(matches!(
        store.add_primary_version(&version_row(2, 4), 2).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.load_keys().await.unwrap()[0].primary_version, 2);

    let v1 = VersionId([1; 16]);
    let v2 = VersionId([2; 16]);
    store
        .transition(&v1, &[Enabled], Disabled, 5, None, true)
        .await
        .unwrap();
    // Not in the expected state any more.
    assert!(matches!(
        store
            .transition(&v1, &[Enabled], Disabled, 6, None, true)
            .await,
        Err(StoreError::Conflict)
    ));
    // The primary version is protected in SQL, not only by the caller.
    assert!(matches!(
        store
            .transition(&v2, &[Enabled], Disabled, 6, None, true)
            .await,
        Err(StoreError::Conflict)
    ));

    store
        .transition(
            &v1,
            &[Enabled, Disabled],
            DestroyScheduled,
            7,
            Some(100),
            true,
        )
        .await
        .unwrap();
    store
        .transition(&v1, &[DestroyScheduled], Destroyed, 8, None, false)
        .await
        .unwrap();
    let rows = store.load_versions().await.unwrap();
    let row = rows.iter().find(|r| r.id == v1).unwrap();
    assert_eq!(
        (row.state, row.state_changed_at, row.destroyed_at),
        (VersionState::Destroyed, 8, Some(8))
    );
}

#[tokio::test]
async fn wrap_reservations_only_grow() {
    let (_dir, store) = fresh().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_batches_go_in_whole_and_the_wal_stays_bounded_under_continuous_writes() {
    use tresor::audit::record::{GENESIS, Record, RecordBody};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let store = Store::open(db.to_str().unwrap()).await.unwrap();

    // About 25 MB of audit records, written back to back as a loaded server does.
    let mut prev = GENESIS;
    let mut seq = 0u64;
    for _ in 0..100 {
        let batch: Vec<(Record, [u8; 32])> = (0..500)
            .map(|i| {
                seq += 1;
                let r = Record {
                    seq,
                    prev_hash: prev,
                    time_ms: 1,
                    tenant: "t".into(),
                    body: RecordBody {
                        operation: "Wrap".into(),
                        request_id: format!("request {i}"),
                        caller: "spiffe://hospital.example/service/ehr".into(),
                        fingerprint: "f".repeat(64),
                        aad_hmac: "a".repeat(64),
                        ..Default::default()
                    },
                };
                prev = r.hash();
                (r, prev)
            })
            .collect();
        store.append_audit(&batch).await.unwrap();
    }
    assert_eq!(store.audit_head().await.unwrap(), Some((seq, prev)));
    let wal = std::fs::metadata(dir.path().join("t.db-wal"))
        .unwrap()
        .len();
    assert!(
        wal < 12 << 20,
        "the WAL grew to {wal} bytes: it is not being checkpointed"
    );

    // A batch is one statement: a duplicate sequence number anywhere refuses all of it.
    let mut clash = Record {
        seq: seq + 1,
        prev_hash: prev,
        time_ms: 1,
        tenant: "t".into(),
        body: RecordBody::default(),
    };
    let fresh = (clash.clone(), clash.hash());
    clash.seq = seq;
    assert!(
        store
            .append_audit(&[fresh, (clash.clone(), clash.hash())])
            .await
            .is_err()
    );
    assert_eq!(store.audit_head().await.unwrap(), Some((seq, prev)));
}
