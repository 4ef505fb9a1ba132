//! The security officer's lifecycle with a hand-driven clock: scheduled rotation, four-eyes
//! destruction with a grace period, minimum decryption version.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{Fixture, grant, officer, service};
use tresor::auth::{Identity, Policy, Role};
use tresor::custody::{
    ApprovalState, CustodyError, CustodyOptions, DAY_MS, KeyUpdate, ManualClock,
};
use tresor::envelope;
use tresor::hsm::ObjectId;
use tresor::model::{KeyName, VersionState};
use zeroize::Zeroizing;

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_800_000_000_000;

fn name(s: &str) -> KeyName {
    s.parse().unwrap()
}

fn options(clock: &Arc<ManualClock>) -> CustodyOptions {
    CustodyOptions {
        clock: clock.clone(),
        ..CustodyOptions::default()
    }
}

/// Officer grants of tenant `a` for two different people.
fn officers() -> (tresor::auth::Grant, tresor::auth::Grant) {
    let policy = Policy::from_toml(
        "[[identity]]\nname = \"anna\"\ntenant = \"a\"\nroles = [\"officer\"]\n[[identity]]\nname = \"ben\"\ntenant = \"a\"\nroles = [\"officer\"]\n",
        "test",
    )
    .unwrap();
    let g = |n: &str| {
        policy
            .grant(
                &Identity {
                    name: n.into(),
                    fingerprint: String::new(),
                },
                Role::Officer,
            )
            .unwrap()
    };
    (g("anna"), g("ben"))
}

#[tokio::test]
async fn a_rotation_period_rotates_once_per_period_across_a_restart() {
    let clock = Arc::new(ManualClock::new(T0));
    let f = Fixture::with(options(&clock)).await;
    let key = name("tenants/a/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let update = KeyUpdate {
        rotation_period_ms: Some(Some(DAY_MS)),
        ..Default::default()
    };
    let info = f
        .custody
        .update_key(&officer(&key), &key, update)
        .await
        .unwrap();
    assert_eq!(info.next_rotation_at, Some(T0 + DAY_MS));

    clock.advance(23 * HOUR);
    assert!(
        f.custody.run_due().await.unwrap().rotated.is_empty(),
        "not due yet"
    );
    clock.advance(2 * HOUR);
    assert_eq!(
        f.custody.run_due().await.unwrap().rotated,
        vec!["tenants/a/keys/k/versions/2"]
    );
    assert!(
        f.custody.run_due().await.unwrap().rotated.is_empty(),
        "rotated twice for one period"
    );

    // A restart keeps the due time: nothing now, the next rotation a day after the last.
    let (custody, _) = f.restart(options(&clock)).await;
    assert!(custody.run_due().await.unwrap().rotated.is_empty());
    assert_eq!(
        custody
            .get_key(&officer(&key), &key)
            .unwrap()
            .next_rotation_at,
        Some(T0 + 25 * HOUR + DAY_MS)
    );
    clock.advance(DAY_MS);
    assert_eq!(
        custody.run_due().await.unwrap().rotated,
        vec!["tenants/a/keys/k/versions/3"]
    );
    // Turning rotation off stops it.
    let off = KeyUpdate {
        rotation_period_ms: Some(None),
        ..Default::default()
    };
    assert_eq!(
        custody
            .update_key(&officer(&key), &key, off)
            .await
            .unwrap()
            .next_rotation_at,
        None
    );
    clock.advance(10 * DAY_MS);
    assert!(custody.run_due().await.unwrap().rotated.is_empty());
}

#[tokio::test]
async fn three_periods_of_downtime_mean_one_rotation_not_three() {
    let clock = Arc::new(ManualClock::new(T0));
    let f = Fixture::with(options(&clock)).await;
    let key = name("tenants/a/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    f.custody
        .update_key(
            &officer(&key),
            &key,
            KeyUpdate {
                rotation_period_ms: Some(Some(DAY_MS)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The server is down for three days and a bit.
    clock.advance(3 * DAY_MS + HOUR);
    let (custody, _) = f.restart(options(&clock)).await;
    assert_eq!(custody.run_due().await.unwrap().rotated.len(), 1);
    assert!(custody.run_due().await.unwrap().rotated.is_empty());
    let info = custody.get_key(&officer(&key), &key).unwrap();
    assert_eq!(
        (info.primary_version, info.next_rotation_at),
        (2, Some(T0 + 3 * DAY_MS + HOUR + DAY_MS))
    );
}

#[tokio::test]
async fn a_version_worn_out_by_wraps_is_rotated_away_from() {
    let clock = Arc::new(ManualClock::new(T0));
    let f = Fixture::with(options(&clock)).await;
    let key = name("tenants/a/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    f.store
        .execute_raw_for_tests("UPDATE key_versions SET wraps_reserved = 2147483648")
        .await
        .unwrap();
    let (custody, _) = f.restart(options(&clock)).await;
    assert_eq!(
        custody.run_due().await.unwrap().rotated,
        vec!["tenants/a/keys/k/versions/2"]
    );
}

#[tokio::test]
async fn destruction_needs_a_second_officer_and_waits_out_its_grace_period() {
    let clock = Arc::new(ManualClock::new(T0));
    let f = Fixture::with(options(&clock)).await;
    let key = name("tenants/a/keys/k");
    let (anna, ben) = officers();
    f.custody
        .create_key(&anna, &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, Zeroizing::new(b"old".to_vec()), b"")
        .await
        .unwrap()
        .ciphertext;
    let id = envelope::parse(&blob).unwrap().version_id;
    // The primary version cannot be destroyed; rotate first.
    assert!(matches!(
        f.custody.request_destruction(&anna, &key, 1).await,
        Err(CustodyError::PrimaryVersion(_))
    ));
    f.custody.rotate_key(&anna, &key).await.unwrap();

    let request = f.custody.request_destruction(&anna, &key, 1).await.unwrap();
    assert_eq!(request.state, ApprovalState::Pending);
    // Nothing happened yet.
    assert_eq!(
        f.custody.get_key(&anna, &key).unwrap().versions[0].state,
        VersionState::Enabled
    );
    // Self-approval is refused, so is an officer of another tenant.
    assert!(matches!(
        f.custody.approve(&anna, &request.id).await,
        Err(CustodyError::SelfApproval(_))
    ));
    let other_tenant = grant("b", Role::Officer);
    assert!(matches!(
        f.custody.approve(&other_tenant, &request.id).await,
        Err(CustodyError::ApprovalNotFound(_))
    ));
    assert!(
        f.custody
            .list_approvals(&other_tenant)
            .await
            .unwrap()
            .is_empty()
    );

    // Ben approves: destroy-scheduled, a week out.
    let approved = f.custody.approve(&ben, &request.id).await.unwrap();
    assert_eq!(approved.state, ApprovalState::Approved);
    assert_eq!(approved.destroy_at, Some(T0 + 7 * DAY_MS));
    assert!(matches!(
        f.custody.unwrap(&service(&key), &blob, b"", None).await,
        Err(CustodyError::VersionDestroyScheduled(_))
    ));

    // Cancelling during the grace period restores DISABLED; the object survives.
    clock.advance(3 * DAY_MS);
    f.custody.cancel_destruction(&ben, &key, 1).await.unwrap();
    assert_eq!(
        f.custody.get_key(&anna, &key).unwrap().versions[0].state,
        VersionState::Disabled
    );
    clock.advance(10 * DAY_MS);
    assert!(f.custody.run_due().await.unwrap().destroyed.is_empty());
    assert!(f.hsm.secret_key_exists(ObjectId(id.0)).await.unwrap());

    // Asked again and approved again: after the grace period the object is gone from the token.
    let again = f.custody.request_destruction(&anna, &key, 1).await.unwrap();
    f.custody.approve(&ben, &again.id).await.unwrap();
    clock.advance(7 * DAY_MS - HOUR);
    assert!(
        f.custody.run_due().await.unwrap().destroyed.is_empty(),
        "before the grace period ends"
    );
    clock.advance(2 * HOUR);
    assert_eq!(
        f.custody.run_due().await.unwrap().destroyed,
        vec!["tenants/a/keys/k/versions/1"]
    );
    assert!(
        !f.hsm.secret_key_exists(ObjectId(id.0)).await.unwrap(),
        "the HSM object is still on the token"
    );
    assert!(matches!(
        f.custody.unwrap(&service(&key), &blob, b"", None).await,
        Err(CustodyError::VersionDestroyed(_))
    ));
}

#[tokio::test]
async fn approvals_expire() {
    let clock = Arc::new(ManualClock::new(T0));
    let f = Fixture::with(options(&clock)).await;
    let key = name("tenants/a/keys/k");
    let (anna, ben) = officers();
    f.custody
        .create_key(&anna, &key, "", Default::default())
        .await
        .unwrap();
    f.custody.rotate_key(&anna, &key).await.unwrap();
    let request = f.custody.request_destruction(&anna, &key, 1).await.unwrap();
    clock.advance(DAY_MS + 1);
    let err = f.custody.approve(&ben, &request.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            CustodyError::ApprovalClosed {
                state: ApprovalState::Expired,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        f.custody.get_key(&anna, &key).unwrap().versions[0].state,
        VersionState::Enabled
    );
    // Expired requests are swept by the scheduler too, and a new request may be made.
    let second = f.custody.request_destruction(&anna, &key, 1).await.unwrap();
    clock.advance(DAY_MS + 1);
    assert_eq!(f.custody.run_due().await.unwrap().expired_approvals, 1);
    assert!(matches!(
        f.custody.reject(&ben, &second.id).await,
        Err(CustodyError::ApprovalClosed { .. })
    ));
}

#[tokio::test]
async fn a_minimum_decryption_version_refuses_older_blobs_until_lowered() {
    let f = Fixture::new().await;
    let key = name("tenants/a/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let old = f
        .custody
        .wrap(&service(&key), &key, Zeroizing::new(b"v1".to_vec()), b"")
        .await
        .unwrap()
        .ciphertext;
    f.custody.rotate_key(&officer(&key), &key).await.unwrap();
    let raise = KeyUpdate {
        min_decryption_version: Some(2),
        ..Default::default()
    };
    f.custody
        .update_key(&officer(&key), &key, raise)
        .await
        .unwrap();
    assert!(matches!(
        f.custody.unwrap(&service(&key), &old, b"", None).await,
        Err(CustodyError::VersionBelowMinimum(_))
    ));
    // Rewrap is refused too: migration must happen before the minimum is raised.
    assert!(matches!(
        f.custody.rewrap(&service(&key), &old, b"", None).await,
        Err(CustodyError::VersionBelowMinimum(_))
    ));
    let lower = KeyUpdate {
        min_decryption_version: Some(1),
        ..Default::default()
    };
    f.custody
        .update_key(&officer(&key), &key, lower)
        .await
        .unwrap();
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &old, b"", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"v1"
    );
}

#[tokio::test]
async fn an_approval_whose_scheduling_fails_goes_back_to_pending() {
    let clock = Arc::new(ManualClock::new(T0));
    let f = Fixture::with(options(&clock)).await;
    let key = name("tenants/a/keys/k");
    let (anna, ben) = officers();
    f.custody
        .create_key(&anna, &key, "", Default::default())
        .await
        .unwrap();
    f.custody.rotate_key(&anna, &key).await.unwrap();
    let request = f.custody.request_destruction(&anna, &key, 1).await.unwrap();

    f.store
        .execute_raw_for_tests("CREATE TRIGGER no_updates BEFORE UPDATE ON key_versions BEGIN SELECT RAISE(ABORT, 'injected'); END;")
        .await
        .unwrap();
    assert!(matches!(
        f.custody.approve(&ben, &request.id).await,
        Err(CustodyError::Store(_))
    ));
    let listed = f.custody.list_approvals(&anna).await.unwrap();
    assert_eq!(
        listed[0].state,
        ApprovalState::Pending,
        "the record must not claim an approval that scheduled nothing"
    );
    assert_eq!(
        f.custody.get_key(&anna, &key).unwrap().versions[0].state,
        VersionState::Enabled
    );

    f.store
        .execute_raw_for_tests("DROP TRIGGER no_updates")
        .await
        .unwrap();
    assert_eq!(
        f.custody.approve(&ben, &request.id).await.unwrap().state,
        ApprovalState::Approved
    );
    // Once decided, a late rejection cannot flip it.
    assert!(matches!(
        f.custody.reject(&anna, &request.id).await,
        Err(CustodyError::ApprovalClosed {
            state: ApprovalState::Approved,
            ..
        })
    ));
}

#[tokio::test]
async fn key_usage_restricts_wrap_unwrap_data_keys_and_rewrap() {
    use tresor::model::KeyUsage;
    let f = Fixture::new().await;
    let key = name("tenants/a/keys/ehr");
    let anna = officer(&key);
    let svc = service(&key);
    f.custody
        .create_key(&anna, &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&svc, &key, Zeroizing::new(b"dek".to_vec()), b"r")
        .await
        .unwrap()
        .ciphertext;
    let set = |usage| {
        f.custody.update_key(
            &anna,
            &key,
            KeyUpdate {
                usage: Some(usage),
                ..KeyUpdate::default()
            },
        )
    };
    let forbidden = |r: Result<(), CustodyError>, op: &str| match r {
        Err(CustodyError::UsageForbidden { operation, .. }) => assert_eq!(operation, op),
        other => panic!("expected {op} to be forbidden, got {other:?}"),
    };
    let wrap = || async {
        f.custody
            .wrap(&svc, &key, Zeroizing::new(b"dek".to_vec()), b"r")
            .await
            .map(|_| ())
    };
    let unwrap = || async { f.custody.unwrap(&svc, &blob, b"r", None).await.map(|_| ()) };

    assert_eq!(
        set(KeyUsage::DecryptOnly).await.unwrap().usage,
        KeyUsage::DecryptOnly
    );
    forbidden(wrap().await, "encrypt");
    forbidden(
        f.custody
            .generate_data_key(&svc, &key, b"r", 32, false)
            .await
            .map(|_| ()),
        "encrypt",
    );
    unwrap().await.unwrap();
    // Rewrap decrypts and encrypts: a decrypt-only key cannot take new blobs.
    forbidden(
        f.custody.rewrap(&svc, &blob, b"r", None).await.map(|_| ()),
        "encrypt",
    );

    set(KeyUsage::EncryptOnly).await.unwrap();
    wrap().await.unwrap();
    forbidden(unwrap().await, "decrypt");

    set(KeyUsage::None).await.unwrap();
    forbidden(wrap().await, "encrypt");
    forbidden(unwrap().await, "decrypt");

    // It is kept across a restart, and turning it back gives both again.
    let (again, _) = f.restart(CustodyOptions::default()).await;
    assert_eq!(again.get_key(&anna, &key).unwrap().usage, KeyUsage::None);
    set(KeyUsage::EncryptDecrypt).await.unwrap();
    wrap().await.unwrap();
    unwrap().await.unwrap();
}
