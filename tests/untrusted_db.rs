//! The database administrator as attacker: each of their moves, made with plain SQL on SQLite
//! and on PostgreSQL, followed by the restarts and calls that would exploit it. Whatever the
//! database says, no HSM object is destroyed (the token's objects are listed before and after),
//! no forbidden use succeeds, and the refusal names the key and "metadata integrity".
//! The genuine paths keep working: two officers destroy a version after its grace period.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Db, TestToken, after_grace, officer, officer_named, schedule_by_two_officers, service,
};
use tresor::custody::{Custody, CustodyError, CustodyOptions, KeyUpdate, ReconcileReport};
use tresor::hsm::Hsm;
use tresor::model::{KeyName, KeyUsage, VersionState};
use tresor::store::Store;
use zeroize::Zeroizing;

/// One installation: a token, a database, custody over them, and what was wrapped.
struct Install {
    token: TestToken,
    hsm: Hsm,
    url: String,
    store: Store,
    custody: Custody,
    first: KeyName,
    second: KeyName,
    /// Blobs of `first` under versions 1 and 2 (the primary), and one of `second`.
    blob_v1: Vec<u8>,
    blob_v2: Vec<u8>,
    blob_second: Vec<u8>,
}

fn pt(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(bytes.to_vec())
}

impl Install {
    async fn new(db: Db) -> Self {
        let token = TestToken::new();
        let hsm = token.open();
        let url = db.url(&token);
        let store = Store::open(&url).await.unwrap();
        let (custody, report) =
            Custody::open(hsm.clone(), store.clone(), CustodyOptions::default())
                .await
                .unwrap();
        assert_eq!(report, ReconcileReport::default());
        let first: KeyName = "tenants/t/keys/first".parse().unwrap();
        let second: KeyName = "tenants/t/keys/second".parse().unwrap();
        for k in [&first, &second] {
            custody
                .create_key(&officer(k), k, "", Default::default())
                .await
                .unwrap();
        }
        let wrap = |k: KeyName, text: &'static [u8]| {
            let custody = custody.clone();
            async move {
                custody
                    .wrap(&service(&k), &k, pt(text), b"ctx")
                    .await
                    .unwrap()
                    .ciphertext
            }
        };
        let blob_v1 = wrap(first.clone(), b"under v1").await;
        custody.rotate_key(&officer(&first), &first).await.unwrap();
        let blob_v2 = wrap(first.clone(), b"under v2").await;
        let blob_second = wrap(second.clone(), b"second").await;
        Self {
            token,
            hsm,
            url,
            store,
            custody,
            first,
            second,
            blob_v1,
            blob_v2,
            blob_second,
        }
    }

    /// The labels of every version object in the token.
    async fn objects(&self) -> Vec<String> {
        common::version_objects(&self.hsm, self.store.installation_id())
            .await
            .into_iter()
            .map(|o| o.label)
            .collect()
    }

    async fn sql(&self, sql: &str) {
        self.store.execute_raw_for_tests(sql).await.unwrap();
    }

    /// A new custody service over the same token and database, as after a restart.
    async fn restart(&self) -> (Custody, ReconcileReport) {
        let store = Store::open(&self.url).await.unwrap();
        Custody::open(self.hsm.clone(), store, CustodyOptions::default())
            .await
            .unwrap()
    }

    async fn unwrap(&self, custody: &Custody, blob: &[u8]) -> Result<Vec<u8>, CustodyError> {
        custody
            .unwrap(&service(&self.first), blob, b"ctx", None)
            .await
            .map(|u| u.plaintext.to_vec())
    }

    /// The untouched key keeps working on `custody`.
    async fn second_still_works(&self, custody: &Custody) {
        assert_eq!(
            custody
                .unwrap(&service(&self.second), &self.blob_second, b"ctx", None)
                .await
                .unwrap()
                .plaintext
                .as_slice(),
            b"second"
        );
        custody
            .wrap(&service(&self.second), &self.second, pt(b"x"), b"")
            .await
            .unwrap();
    }
}

/// The refusal a key with altered rows gives: it names the key and metadata integrity.
fn refused<T: std::fmt::Debug>(r: Result<T, CustodyError>, key: &KeyName) {
    match r {
        Err(e @ CustodyError::MetadataIntegrity { .. }) => {
            let shown = e.to_string();
            assert!(
                shown.contains(&key.to_string()) && shown.contains("metadata integrity"),
                "{shown}"
            );
        }
        other => panic!("expected a metadata integrity refusal, got {other:?}"),
    }
}

/// After the move: start again, run the scheduler past every grace period, and check that
/// nothing was destroyed, `first` refuses every use with a metadata-integrity error, start-up
/// named it, and `second` still works.
async fn exploit_fails(i: &Install, objects_before: &[String]) -> Custody {
    exploit_fails_with(i, objects_before, true).await
}

/// [`exploit_fails`]; without `v1_row`, version 1's row is gone and its blobs name a version
/// this installation does not know (the generic ciphertext refusal; start-up named its object).
async fn exploit_fails_with(i: &Install, objects_before: &[String], v1_row: bool) -> Custody {
    let (custody, report) = i.restart().await;
    assert!(report.destructions_completed.is_empty(), "{report:?}");
    assert!(custody.destroy_due(after_grace()).await.unwrap().is_empty());
    assert_eq!(
        i.objects().await,
        objects_before,
        "an HSM object was destroyed"
    );
    assert!(
        custody
            .integrity_failures()
            .iter()
            .any(|(k, _)| k == &i.first),
        "{:?}",
        custody.integrity_failures()
    );
    if v1_row {
        refused(i.unwrap(&custody, &i.blob_v1).await, &i.first);
    } else {
        assert!(matches!(
            i.unwrap(&custody, &i.blob_v1).await,
            Err(CustodyError::UnknownVersion)
        ));
    }
    refused(i.unwrap(&custody, &i.blob_v2).await, &i.first);
    refused(
        custody
            .wrap(&service(&i.first), &i.first, pt(b"x"), b"")
            .await,
        &i.first,
    );
    refused(custody.get_key(&officer(&i.first), &i.first), &i.first);
    refused(
        custody.rotate_key(&officer(&i.first), &i.first).await,
        &i.first,
    );
    i.second_still_works(&custody).await;
    custody
}

on_sqlite_and_postgres!(
    a_version_set_destroyed_keeps_its_object,
    a_past_destroy_time_in_the_database_destroys_nothing,
    a_rolled_back_destruction_that_was_cancelled_destroys_nothing,
    a_scheduled_version_forged_destroyed_is_not_destroyed_early_or_on_a_broken_key,
    a_deleted_version_row_leaves_its_object_and_breaks_the_key,
    a_deleted_key_row_leaves_its_objects_and_its_blobs_are_refused,
    an_approval_no_officer_gave_decides_nothing,
    a_reenabled_version_stays_refused,
    widened_usage_is_refused,
    a_lowered_minimum_decryption_version_is_refused,
    a_moved_primary_version_is_refused,
    a_change_announced_to_running_nodes_is_refused_there_too,
    two_officers_still_destroy_a_version_after_its_grace_period,
);

async fn a_version_set_destroyed_keeps_its_object(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    i.custody.reload().await.unwrap();
    // The primary version, on a stopped installation.
    i.sql("UPDATE key_versions SET state = 'DESTROYED', destroyed_at = 1 WHERE key_name = 'first' AND version = 2")
        .await;
    let (_, report) = i.restart().await;
    assert_eq!(
        report.destroyed_without_order,
        vec!["tenants/t/keys/first/versions/2"]
    );
    exploit_fails(&i, &before).await;
}

async fn a_past_destroy_time_in_the_database_destroys_nothing(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    i.sql("UPDATE key_versions SET state = 'DESTROY_SCHEDULED', destroy_at = 1 WHERE key_name = 'first' AND version = 1")
        .await;
    let custody = exploit_fails(&i, &before).await;
    // The scheduler's own pass as well.
    assert!(custody.run_due().await.unwrap().destroyed.is_empty());
    assert_eq!(i.objects().await, before);
}

/// A genuine, sealed earlier state: a destruction that two officers approved and one then
/// cancelled. Rolling the rows back to the scheduled state (its integrity value was genuine)
/// does not bring the destruction back: the HSM's order went with the cancellation.
async fn a_rolled_back_destruction_that_was_cancelled_destroys_nothing(db: Db) {
    let i = Install::new(db).await;
    schedule_by_two_officers(&i.custody, &i.first, 1)
        .await
        .unwrap();
    let snapshot_keys = i.store.load_keys().await.unwrap();
    let snapshot = snapshot_keys.iter().find(|k| k.name == "first").unwrap();
    let versions = i.store.load_versions().await.unwrap();
    let v1 = versions
        .iter()
        .find(|v| v.key_name == "first" && v.version == 1)
        .unwrap();
    assert_eq!(v1.state, VersionState::DestroyScheduled);
    i.custody
        .cancel_destruction(&officer(&i.first), &i.first, 1)
        .await
        .unwrap();
    let before = i.objects().await;
    i.sql(&format!(
        "UPDATE key_versions SET state = 'DESTROY_SCHEDULED', state_changed_at = {}, destroy_at = {} \
         WHERE key_name = 'first' AND version = 1; \
         UPDATE keys SET integrity = '{}', updated_at = {} WHERE name = 'first'",
        v1.state_changed_at,
        v1.destroy_at.unwrap(),
        snapshot.integrity,
        snapshot.updated_at,
    ))
    .await;
    let (custody, _) = i.restart().await;
    // An exact earlier state passes its integrity check (SECURITY.md says so) ...
    assert!(custody.integrity_failures().is_empty());
    assert_eq!(
        custody
            .get_key(&officer(&i.first), &i.first)
            .unwrap()
            .versions[0]
            .state,
        VersionState::DestroyScheduled
    );
    // ... but no destruction order backs it, so nothing is destroyed.
    assert!(custody.destroy_due(after_grace()).await.unwrap().is_empty());
    assert!(custody.run_due().await.unwrap().destroyed.is_empty());
    assert_eq!(i.objects().await, before, "an HSM object was destroyed");
}

/// Two officers approved a destruction (so the HSM holds its order); during the grace period the
/// administrator marks the version DESTROYED. A restart during the grace period destroys nothing
/// (the order is not due); one after it destroys nothing either, because the key's rows no
/// longer pass their check and its officers could not have cancelled.
async fn a_scheduled_version_forged_destroyed_is_not_destroyed_early_or_on_a_broken_key(db: Db) {
    let i = Install::new(db).await;
    schedule_by_two_officers(&i.custody, &i.first, 1)
        .await
        .unwrap();
    let before = i.objects().await;
    i.sql("UPDATE key_versions SET state = 'DESTROYED', destroyed_at = 1 WHERE key_name = 'first' AND version = 1")
        .await;
    for at in [tresor::model::now_millis(), after_grace()] {
        let (custody, report) = Custody::open(
            i.hsm.clone(),
            Store::open(&i.url).await.unwrap(),
            CustodyOptions {
                clock: std::sync::Arc::new(tresor::custody::ManualClock::new(at)),
                ..CustodyOptions::default()
            },
        )
        .await
        .unwrap();
        assert!(report.destructions_completed.is_empty(), "{report:?}");
        assert!(custody.destroy_due(after_grace()).await.unwrap().is_empty());
        assert_eq!(i.objects().await, before, "an HSM object was destroyed");
        refused(i.unwrap(&custody, &i.blob_v2).await, &i.first);
    }
}

async fn a_deleted_version_row_leaves_its_object_and_breaks_the_key(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    i.sql("DELETE FROM key_versions WHERE key_name = 'first' AND version = 1")
        .await;
    let (_, report) = i.restart().await;
    assert_eq!(report.orphans_unaccounted.len(), 1, "{report:?}");
    assert!(report.orphans_removed.is_empty());
    let custody = exploit_fails_with(&i, &before, false).await;
    // The orphan is never removed, however often the node starts.
    drop(custody);
    let (_, report) = i.restart().await;
    assert!(report.orphans_removed.is_empty());
    assert_eq!(i.objects().await, before);
}

async fn a_deleted_key_row_leaves_its_objects_and_its_blobs_are_refused(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    let unchecked = match &i.url {
        u if u.starts_with("postgres") => "SET session_replication_role = replica; ",
        _ => "PRAGMA foreign_keys = OFF; ",
    };
    i.sql(&format!("{unchecked}DELETE FROM keys WHERE name = 'first'"))
        .await;
    let (custody, report) = i.restart().await;
    assert!(report.orphans_removed.is_empty(), "{report:?}");
    assert!(report.lost.is_empty(), "{report:?}");
    assert_eq!(i.objects().await, before);
    refused(i.unwrap(&custody, &i.blob_v1).await, &i.first);
    refused(i.unwrap(&custody, &i.blob_v2).await, &i.first);
    // Creating the name again cannot take over the old versions' blobs either.
    refused(
        custody
            .create_key(&officer(&i.first), &i.first, "", Default::default())
            .await,
        &i.first,
    );
    i.second_still_works(&custody).await;
}

async fn an_approval_no_officer_gave_decides_nothing(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    // A decided approval, and a request that only one (real) officer would then approve.
    i.sql(
        "INSERT INTO approvals (id, tenant, key_name, version, operation, requested_by, requested_at, expires_at, state, decided_by, decided_at) \
         VALUES ('forged-approved', 't', 'first', 1, 'DESTROY_KEY_VERSION', 'officer-ghost', 1, 9999999999999, 'APPROVED', 'officer-two', 2); \
         INSERT INTO approvals (id, tenant, key_name, version, operation, requested_by, requested_at, expires_at, state) \
         VALUES ('forged-pending', 't', 'first', 1, 'DESTROY_KEY_VERSION', 'officer-ghost', 1, 9999999999999, 'PENDING')",
    )
    .await;
    let (custody, _) = i.restart().await;
    let officer_two = officer_named("t", "officer-two");
    assert!(
        custody
            .list_approvals(&officer_two)
            .await
            .unwrap()
            .is_empty(),
        "a forged approval is listed"
    );
    let err = custody
        .approve(&officer_two, "forged-pending")
        .await
        .unwrap_err();
    assert!(
        matches!(err, CustodyError::ApprovalIntegrity(ref id) if id == "forged-pending"),
        "{err:?}"
    );
    assert!(err.to_string().contains("metadata integrity"), "{err}");
    assert!(matches!(
        custody.approve(&officer_two, "forged-approved").await,
        Err(CustodyError::ApprovalIntegrity(_))
    ));
    assert!(custody.destroy_due(after_grace()).await.unwrap().is_empty());
    assert_eq!(i.objects().await, before);
    // Nothing else was refused: the key itself is intact.
    assert_eq!(i.unwrap(&custody, &i.blob_v1).await.unwrap(), b"under v1");
}

async fn a_reenabled_version_stays_refused(db: Db) {
    let i = Install::new(db).await;
    i.custody
        .disable_version(&officer(&i.first), &i.first, 1)
        .await
        .unwrap();
    assert!(matches!(
        i.unwrap(&i.custody, &i.blob_v1).await,
        Err(CustodyError::VersionDisabled(_))
    ));
    let before = i.objects().await;
    i.sql("UPDATE key_versions SET state = 'ENABLED' WHERE key_name = 'first' AND version = 1")
        .await;
    // The running node does not take the database's word for it either.
    assert!(matches!(
        i.unwrap(&i.custody, &i.blob_v1).await,
        Err(CustodyError::VersionDisabled(_))
    ));
    exploit_fails(&i, &before).await;
}

async fn widened_usage_is_refused(db: Db) {
    let i = Install::new(db).await;
    i.custody
        .update_key(
            &officer(&i.first),
            &i.first,
            KeyUpdate {
                usage: Some(KeyUsage::EncryptOnly),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let before = i.objects().await;
    i.sql("UPDATE keys SET usage = 'ENCRYPT_DECRYPT' WHERE name = 'first'")
        .await;
    exploit_fails(&i, &before).await;
}

async fn a_lowered_minimum_decryption_version_is_refused(db: Db) {
    let i = Install::new(db).await;
    i.custody
        .update_key(
            &officer(&i.first),
            &i.first,
            KeyUpdate {
                min_decryption_version: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let before = i.objects().await;
    i.sql("UPDATE keys SET min_decryption_version = 1 WHERE name = 'first'")
        .await;
    exploit_fails(&i, &before).await;
}

async fn a_moved_primary_version_is_refused(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    i.sql("UPDATE keys SET primary_version = 1 WHERE name = 'first'")
        .await;
    exploit_fails(&i, &before).await;
}

/// On a running installation: the administrator re-enables a disabled version and makes the
/// nodes re-read the key (on PostgreSQL by announcing a change as Tresor would). The node
/// re-reads, finds the rows unsealed, and refuses the key from then on.
async fn a_change_announced_to_running_nodes_is_refused_there_too(db: Db) {
    let i = Install::new(db).await;
    i.custody.follow_changes();
    i.custody
        .disable_version(&officer(&i.first), &i.first, 1)
        .await
        .unwrap();
    i.sql("UPDATE key_versions SET state = 'ENABLED' WHERE key_name = 'first' AND version = 1")
        .await;
    if i.url.starts_with("postgres") {
        i.sql("SELECT pg_notify('tresor_keys', 't/first')").await;
    } else {
        // One node: nothing tells it; an explicit re-read is what a notification would cause.
        i.custody.refresh_key("t", "first").await.unwrap();
    }
    let mut last = None;
    for _ in 0..100 {
        match i.unwrap(&i.custody, &i.blob_v1).await {
            Err(CustodyError::MetadataIntegrity { .. }) => return,
            Ok(_) => panic!("a version the database re-enabled unwrapped"),
            other => last = Some(other),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the running node never refused the altered key: {last:?}");
}

async fn two_officers_still_destroy_a_version_after_its_grace_period(db: Db) {
    let i = Install::new(db).await;
    let before = i.objects().await;
    let approval = schedule_by_two_officers(&i.custody, &i.first, 1)
        .await
        .unwrap();
    // Not before its time, even though the database would allow it.
    assert!(
        i.custody
            .destroy_due(approval.destroy_at.unwrap() - 1)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        i.custody.destroy_due(after_grace()).await.unwrap(),
        vec!["tenants/t/keys/first/versions/1"]
    );
    let after = i.objects().await;
    assert_eq!(after.len(), before.len() - 1);
    assert!(matches!(
        i.unwrap(&i.custody, &i.blob_v1).await,
        Err(CustodyError::VersionDestroyed(_))
    ));
    // A restart finds everything in order: no leftover evidence, nothing refused.
    let (custody, report) = i.restart().await;
    assert_eq!(report, ReconcileReport::default());
    assert!(custody.integrity_failures().is_empty());
    assert_eq!(
        custody
            .get_key(&officer(&i.first), &i.first)
            .unwrap()
            .versions[0]
            .state,
        VersionState::Destroyed
    );
    assert_eq!(i.unwrap(&custody, &i.blob_v2).await.unwrap(), b"under v2");
    assert!(
        i.hsm
            .data_objects(format!("tresor/{}/", i.store.installation_id()))
            .await
            .unwrap()
            .is_empty(),
        "destruction order or journal left behind"
    );
    let _ = &i.token;
}
