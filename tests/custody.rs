//! Custody against a real PKCS#11 module (SoftHSM2): lifecycle, wrap/unwrap, failure paths.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Fixture, after_grace, grant, officer, schedule_by_two_officers, service};
use tresor::auth::Role;
use tresor::custody::{CustodyError, CustodyOptions, OrphanPolicy};
use tresor::envelope;
use tresor::hsm::ObjectId;
use tresor::model::{KeyName, VersionState, now_millis};
use zeroize::Zeroizing;

fn name(s: &str) -> KeyName {
    s.parse().unwrap()
}

fn pt(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(bytes.to_vec())
}

#[tokio::test]
async fn create_wrap_unwrap_round_trip() {
    let f = Fixture::new().await;
    let key = name("tenants/uksh/keys/ehr-archive");
    let created = f
        .custody
        .create_key(&officer(&key), &key, "EHR archive DEKs", Default::default())
        .await
        .unwrap();
    assert_eq!(created.primary_version, 1);
    assert_eq!(created.versions.len(), 1);
    assert_eq!(created.versions[0].state, VersionState::Enabled);
    assert!(created.versions[0].primary);

    let dek = [0x42u8; 32];
    let wrapped = f
        .custody
        .wrap(&service(&key), &key, pt(&dek), b"patient=4711")
        .await
        .unwrap();
    assert_eq!(
        wrapped.key_version,
        "tenants/uksh/keys/ehr-archive/versions/1"
    );
    assert_eq!(
        wrapped.ciphertext.len(),
        envelope::HEADER_LEN + dek.len() + envelope::TAG_LEN
    );
    assert!(
        !wrapped.ciphertext.windows(dek.len()).any(|w| w == dek),
        "plaintext visible in blob"
    );

    let unwrapped = f
        .custody
        .unwrap(&service(&key), &wrapped.ciphertext, b"patient=4711", None)
        .await
        .unwrap();
    assert_eq!(unwrapped.plaintext.as_slice(), dek);
    assert_eq!(unwrapped.key_version, wrapped.key_version);
    // Naming the right key is fine too.
    f.custody
        .unwrap(
            &service(&key),
            &wrapped.ciphertext,
            b"patient=4711",
            Some(&key),
        )
        .await
        .unwrap();
    // Empty caller AAD works (the GCM AAD is never empty).
    let w2 = f
        .custody
        .wrap(&service(&key), &key, pt(b"x"), b"")
        .await
        .unwrap();
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &w2.ciphertext, b"", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"x"
    );

    let info = f.custody.get_key(&officer(&key), &key).unwrap();
    assert!(info.versions[0].wraps_at_most >= 2);
    assert_eq!(info.description, "EHR archive DEKs");

    assert!(matches!(
        f.custody
            .create_key(&officer(&key), &key, "", Default::default())
            .await,
        Err(CustodyError::KeyExists(_))
    ));
    assert!(matches!(
        f.custody
            .wrap(
                &service(&name("tenants/uksh/keys/nope")),
                &name("tenants/uksh/keys/nope"),
                pt(b"x"),
                b""
            )
            .await,
        Err(CustodyError::KeyNotFound(_))
    ));
}

#[tokio::test]
async fn every_bad_blob_gets_its_own_error() {
    let f = Fixture::new().await;
    let key = name("tenants/uksh/keys/pacs");
    let other = name("tenants/uksh/keys/lab");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    f.custody
        .create_key(&officer(&other), &other, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"data-encryption-key"), b"ctx")
        .await
        .unwrap()
        .ciphertext;

    // Wrong AAD.
    let err = f
        .custody
        .unwrap(&service(&key), &blob, b"other ctx", None)
        .await
        .unwrap_err();
    assert!(matches!(err, CustodyError::Unauthentic), "{err:?}");

    // Tampered body, and a tampered header.
    let mut body = blob.clone();
    *body.last_mut().unwrap() ^= 1;
    assert!(matches!(
        f.custody.unwrap(&service(&key), &body, b"ctx", None).await,
        Err(CustodyError::Unauthentic)
    ));
    let mut header = blob.clone();
    header[0] = 0x7f;
    assert!(matches!(
        f.custody
            .unwrap(&service(&key), &header, b"ctx", None)
            .await,
        Err(CustodyError::MalformedCiphertext(_))
    ));
    assert!(matches!(
        f.custody
            .unwrap(&service(&key), &blob[..20], b"ctx", None)
            .await,
        Err(CustodyError::MalformedCiphertext(_))
    ));

    // Blob of another key: refused when the caller names the key it expects...
    let err = f
        .custody
        .unwrap(&service(&key), &blob, b"ctx", Some(&other))
        .await
        .unwrap_err();
    assert!(matches!(err, CustodyError::WrongKey { .. }), "{err:?}");
    // ...and a blob spliced onto another key's version id fails authentication.
    let other_blob = f
        .custody
        .wrap(&service(&other), &other, pt(b"k"), b"ctx")
        .await
        .unwrap()
        .ciphertext;
    let mut spliced = blob.clone();
    spliced[1..17].copy_from_slice(&other_blob[1..17]);
    assert!(matches!(
        f.custody
            .unwrap(&service(&key), &spliced, b"ctx", None)
            .await,
        Err(CustodyError::Unauthentic)
    ));

    // Unknown version.
    let mut unknown = blob.clone();
    unknown[1..17].copy_from_slice(&[0xee; 16]);
    assert!(matches!(
        f.custody
            .unwrap(&service(&key), &unknown, b"ctx", None)
            .await,
        Err(CustodyError::UnknownVersion)
    ));

    // Disabled version.
    f.custody.rotate_key(&officer(&key), &key).await.unwrap();
    f.custody
        .disable_version(&officer(&key), &key, 1)
        .await
        .unwrap();
    let err = f
        .custody
        .unwrap(&service(&key), &blob, b"ctx", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CustodyError::VersionDisabled(ref v) if v == "tenants/uksh/keys/pacs/versions/1"),
        "{err:?}"
    );

    // Scheduled for destruction, then destroyed.
    schedule_by_two_officers(&f.custody, &key, 1).await.unwrap();
    assert!(matches!(
        f.custody.unwrap(&service(&key), &blob, b"ctx", None).await,
        Err(CustodyError::VersionDestroyScheduled(_))
    ));
    assert_eq!(
        f.custody.destroy_due(after_grace()).await.unwrap(),
        vec!["tenants/uksh/keys/pacs/versions/1"]
    );
    assert!(matches!(
        f.custody.unwrap(&service(&key), &blob, b"ctx", None).await,
        Err(CustodyError::VersionDestroyed(_))
    ));
}

#[tokio::test]
async fn every_single_bit_flip_truncation_and_extension_is_rejected_by_the_hsm_path() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"0123456789abcdef"), b"aad")
        .await
        .unwrap()
        .ciphertext;
    for bit in 0..blob.len() * 8 {
        let mut bad = blob.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        assert!(
            f.custody
                .unwrap(&service(&key), &bad, b"aad", None)
                .await
                .is_err(),
            "bit {bit} accepted"
        );
    }
    for len in 0..blob.len() {
        assert!(
            f.custody
                .unwrap(&service(&key), &blob[..len], b"aad", None)
                .await
                .is_err(),
            "truncation to {len} accepted"
        );
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(
        f.custody
            .unwrap(&service(&key), &longer, b"aad", None)
            .await
            .is_err()
    );
    // The session pool survives all those failures.
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &blob, b"aad", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"0123456789abcdef"
    );
}

#[tokio::test]
async fn rotation_moves_the_primary_and_old_blobs_still_unwrap() {
    let f = Fixture::new().await;
    let key = name("tenants/uksh/keys/lab");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let old = f
        .custody
        .wrap(&service(&key), &key, pt(b"old-dek"), b"a")
        .await
        .unwrap();
    let rotated = f.custody.rotate_key(&officer(&key), &key).await.unwrap();
    assert_eq!(rotated.primary_version, 2);
    assert_eq!(rotated.versions.iter().filter(|v| v.primary).count(), 1);
    assert_eq!(rotated.versions[0].state, VersionState::Enabled);

    let new = f
        .custody
        .wrap(&service(&key), &key, pt(b"new-dek"), b"a")
        .await
        .unwrap();
    assert_eq!(new.key_version, "tenants/uksh/keys/lab/versions/2");
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &old.ciphertext, b"a", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"old-dek"
    );

    // Rewrap moves an old blob to the primary version; a current blob comes back unchanged.
    let moved = f
        .custody
        .rewrap(&service(&key), &old.ciphertext, b"a", None)
        .await
        .unwrap();
    assert!(moved.rewrapped);
    assert_eq!(moved.key_version, "tenants/uksh/keys/lab/versions/2");
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &moved.ciphertext, b"a", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"old-dek"
    );
    let same = f
        .custody
        .rewrap(&service(&key), &new.ciphertext, b"a", None)
        .await
        .unwrap();
    assert!(!same.rewrapped);
    assert_eq!(same.ciphertext, new.ciphertext);
    // Rewrap honours the AAD: it is not a way around it.
    assert!(matches!(
        f.custody
            .rewrap(&service(&key), &old.ciphertext, b"b", None)
            .await,
        Err(CustodyError::Unauthentic)
    ));
    assert!(matches!(
        f.custody
            .rewrap(&service(&key), &new.ciphertext, b"b", None)
            .await,
        Err(CustodyError::Unauthentic)
    ));

    // The primary version cannot be disabled or scheduled for destruction.
    assert!(matches!(
        f.custody.disable_version(&officer(&key), &key, 2).await,
        Err(CustodyError::PrimaryVersion(_))
    ));
    assert!(matches!(
        schedule_by_two_officers(&f.custody, &key, 2).await,
        Err(CustodyError::PrimaryVersion(_))
    ));
    assert!(matches!(
        f.custody.disable_version(&officer(&key), &key, 9).await,
        Err(CustodyError::VersionNotFound(_))
    ));

    // Metadata survives a restart.
    let (again, _) = f.restart(CustodyOptions::default()).await;
    assert_eq!(
        again.get_key(&officer(&key), &key).unwrap(),
        f.custody.get_key(&officer(&key), &key).unwrap()
    );
    assert_eq!(
        again
            .unwrap(&service(&key), &old.ciphertext, b"a", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"old-dek"
    );
}

#[tokio::test]
async fn the_state_machine_allows_only_designed_transitions() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    f.custody.rotate_key(&officer(&key), &key).await.unwrap();

    let state =
        |c: &tresor::custody::Custody| c.get_key(&officer(&key), &key).unwrap().versions[0].state;
    f.custody
        .disable_version(&officer(&key), &key, 1)
        .await
        .unwrap();
    assert_eq!(state(&f.custody), VersionState::Disabled);
    f.custody
        .disable_version(&officer(&key), &key, 1)
        .await
        .unwrap(); // idempotent
    f.custody
        .enable_version(&officer(&key), &key, 1)
        .await
        .unwrap();
    assert_eq!(state(&f.custody), VersionState::Enabled);

    let before = now_millis();
    let approval = schedule_by_two_officers(&f.custody, &key, 1).await.unwrap();
    let info = f.custody.get_key(&officer(&key), &key).unwrap();
    assert_eq!(info.versions[0].state, VersionState::DestroyScheduled);
    let due = info.versions[0].destroy_at.unwrap();
    assert!(due >= before + 7 * tresor::custody::DAY_MS, "{due}");
    assert_eq!(approval.destroy_at, Some(due));
    assert!(matches!(
        f.custody.enable_version(&officer(&key), &key, 1).await,
        Err(CustodyError::InvalidTransition { .. })
    ));
    assert!(
        f.custody
            .destroy_due(now_millis())
            .await
            .unwrap()
            .is_empty(),
        "not due yet"
    );

    f.custody
        .cancel_destruction(&officer(&key), &key, 1)
        .await
        .unwrap();
    assert_eq!(state(&f.custody), VersionState::Disabled);
    assert!(matches!(
        f.custody.cancel_destruction(&officer(&key), &key, 1).await,
        Err(CustodyError::InvalidTransition { .. })
    ));

    schedule_by_two_officers(&f.custody, &key, 1).await.unwrap();
    f.custody.destroy_due(after_grace()).await.unwrap();
    let v1 = &f.custody.get_key(&officer(&key), &key).unwrap().versions[0];
    assert_eq!(v1.state, VersionState::Destroyed);
    assert!(v1.destroyed_at.is_some());
    for r in [
        f.custody.enable_version(&officer(&key), &key, 1).await,
        f.custody.disable_version(&officer(&key), &key, 1).await,
        schedule_by_two_officers(&f.custody, &key, 1)
            .await
            .map(|_| f.custody.get_key(&officer(&key), &key).unwrap()),
    ] {
        assert!(
            matches!(
                r,
                Err(CustodyError::InvalidTransition {
                    from: VersionState::Destroyed,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    // The HSM object is gone, the metadata is kept, and a restart does not call it lost.
    let id = f
        .store
        .load_versions()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.version == 1)
        .unwrap()
        .id;
    assert!(!f.hsm.secret_key_exists(ObjectId(id.0)).await.unwrap());
    let (_, report) = f.restart(CustodyOptions::default()).await;
    assert!(report.lost.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_wraps_and_unwraps_survive_twenty_rotations() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/busy");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();

    let mut workers = Vec::new();
    for w in 0..8u8 {
        let custody = f.custody.clone();
        let key = key.clone();
        workers.push(tokio::spawn(async move {
            let mut blobs = Vec::new();
            for i in 0..60u32 {
                let plaintext = format!("worker {w} dek {i}").into_bytes();
                let aad = [w];
                let wrapped = custody
                    .wrap(
                        &service(&key),
                        &key,
                        Zeroizing::new(plaintext.clone()),
                        &aad,
                    )
                    .await
                    .unwrap();
                let back = custody
                    .unwrap(&service(&key), &wrapped.ciphertext, &aad, Some(&key))
                    .await
                    .unwrap();
                assert_eq!(back.plaintext.as_slice(), plaintext);
                blobs.push((wrapped.ciphertext, aad, plaintext));
            }
            blobs
        }));
    }
    let rotator = {
        let custody = f.custody.clone();
        let key = key.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                custody.rotate_key(&officer(&key), &key).await.unwrap();
            }
        })
    };
    rotator.await.unwrap();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let info = f.custody.get_key(&officer(&key), &key).unwrap();
    assert_eq!(info.primary_version, 21);
    assert_eq!(info.versions.len(), 21);
    assert_eq!(all.len(), 480);
    for (blob, aad, plaintext) in &all {
        assert_eq!(
            f.custody
                .unwrap(&service(&key), blob, aad, None)
                .await
                .unwrap()
                .plaintext
                .as_slice(),
            plaintext.as_slice()
        );
    }
    // Every version row has exactly one HSM object behind it.
    assert_eq!(
        common::version_objects(&f.hsm, f.store.installation_id())
            .await
            .len(),
        21
    );
}

#[tokio::test]
async fn version_keys_are_sensitive_and_never_extractable_in_the_token() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"x"), b"")
        .await
        .unwrap()
        .ciphertext;
    let id = envelope::parse(&blob).unwrap().version_id;
    let a = f.hsm.inspect_secret_key(ObjectId(id.0)).await.unwrap();
    assert!(a.sensitive && a.always_sensitive, "{a:?}");
    assert!(!a.extractable && a.never_extractable, "{a:?}");
    assert!(a.token && a.private, "{a:?}");
    assert!(!a.modifiable && !a.copyable, "{a:?}");
    assert!(a.aes && a.value_len == 32, "{a:?}");
    assert!(!a.value_readable, "the token handed out CKA_VALUE");
    let label = &common::version_objects(&f.hsm, f.store.installation_id()).await[0].label;
    assert_eq!(
        label,
        &format!("tresor/{}/{}", f.store.installation_id(), id.to_hex())
    );
}

#[tokio::test]
async fn a_crash_between_hsm_object_and_row_is_cleaned_up_at_start() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"keep me"), b"")
        .await
        .unwrap()
        .ciphertext;

    // What a crash after step one of create/rotate leaves: an object with this installation's
    // label, its creation journal, and no row. Next to it, an object of another installation,
    // one of another application, and one with our label but no journal (its row was deleted
    // in the database), all of which must survive.
    let prefix = format!("tresor/{}/", f.store.installation_id());
    let orphan = ObjectId([0xa1; 16]);
    f.hsm
        .generate_version_key(orphan, format!("{prefix}{orphan}"))
        .await
        .unwrap();
    common::write_creation_journal(&f.hsm, f.store.installation_id(), orphan).await;
    let unjournaled = ObjectId([0xa2; 16]);
    f.hsm
        .generate_version_key(unjournaled, format!("{prefix}{unjournaled}"))
        .await
        .unwrap();
    let foreign = ObjectId([0xb2; 16]);
    f.hsm
        .generate_version_key(foreign, format!("tresor/0000000000000000/{foreign}"))
        .await
        .unwrap();
    let other_app = ObjectId([0xc3; 16]);
    f.hsm
        .generate_version_key(other_app, "payroll-master-key".into())
        .await
        .unwrap();

    // With orphans = report, nothing is destroyed.
    let (_, report) = f
        .restart(CustodyOptions {
            orphans: OrphanPolicy::Report,
            ..Default::default()
        })
        .await;
    assert_eq!(report.orphans_kept, vec![format!("{prefix}{orphan}")]);
    assert!(f.hsm.secret_key_exists(orphan).await.unwrap());

    assert_eq!(
        report.orphans_unaccounted,
        vec![format!("{prefix}{unjournaled}")]
    );

    let (custody, report) = f.restart(CustodyOptions::default()).await;
    assert_eq!(report.orphans_removed, vec![format!("{prefix}{orphan}")]);
    assert_eq!(
        report.orphans_unaccounted,
        vec![format!("{prefix}{unjournaled}")]
    );
    assert_eq!(report.foreign_objects, 2);
    assert!(report.lost.is_empty());
    assert!(!f.hsm.secret_key_exists(orphan).await.unwrap());
    assert!(f.hsm.secret_key_exists(unjournaled).await.unwrap());
    // The journal went with its object: a second start finds nothing to remove.
    let (_, report) = f.restart(CustodyOptions::default()).await;
    assert!(report.orphans_removed.is_empty(), "{report:?}");
    assert!(f.hsm.secret_key_exists(foreign).await.unwrap());
    assert!(f.hsm.secret_key_exists(other_app).await.unwrap());
    assert_eq!(
        custody
            .unwrap(&service(&key), &blob, b"", None)
            .await
            .unwrap()
            .plaintext
            .as_slice(),
        b"keep me"
    );
}

#[tokio::test]
async fn a_failed_row_commit_destroys_the_new_hsm_object() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let before = f.hsm.list_secret_keys().await.unwrap().len();

    f.store
        .execute_raw_for_tests(
            "CREATE TRIGGER fail_versions BEFORE INSERT ON key_versions \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
        )
        .await
        .unwrap();
    let err = f
        .custody
        .rotate_key(&officer(&key), &key)
        .await
        .unwrap_err();
    assert!(matches!(err, CustodyError::Store(_)), "{err:?}");
    let err = f
        .custody
        .create_key(
            &officer(&name("tenants/t/keys/k2")),
            &name("tenants/t/keys/k2"),
            "",
            Default::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CustodyError::Store(_)), "{err:?}");
    assert_eq!(
        f.hsm.list_secret_keys().await.unwrap().len(),
        before,
        "an uncommitted version left its HSM object"
    );

    // Nothing half-done is visible: the key is unchanged and still works.
    let info = f.custody.get_key(&officer(&key), &key).unwrap();
    assert_eq!((info.primary_version, info.versions.len()), (1, 1));
    assert!(matches!(
        f.custody.get_key(
            &officer(&name("tenants/t/keys/k2")),
            &name("tenants/t/keys/k2")
        ),
        Err(CustodyError::KeyNotFound(_))
    ));
    f.store
        .execute_raw_for_tests("DROP TRIGGER fail_versions")
        .await
        .unwrap();
    let (again, report) = f.restart(CustodyOptions::default()).await;
    assert!(report.orphans_removed.is_empty());
    assert_eq!(
        again.get_key(&officer(&key), &key).unwrap().versions.len(),
        1
    );
    f.custody
        .wrap(&service(&key), &key, pt(b"x"), b"")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_version_deleted_behind_tresors_back_is_reported_lost() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"x"), b"")
        .await
        .unwrap()
        .ciphertext;
    let id = envelope::parse(&blob).unwrap().version_id;
    f.custody.rotate_key(&officer(&key), &key).await.unwrap();

    assert!(f.hsm.destroy_secret_key(ObjectId(id.0)).await.unwrap());
    let (custody, report) = f.restart(CustodyOptions::default()).await;
    assert_eq!(report.lost, vec!["tenants/t/keys/k/versions/1"]);
    let v1 = custody.get_key(&officer(&key), &key).unwrap().versions[0].clone();
    assert!(v1.lost_at.is_some());
    assert_eq!(
        v1.state,
        VersionState::Enabled,
        "lost is a mark, not a lifecycle state"
    );
    assert!(matches!(
        custody.unwrap(&service(&key), &blob, b"", None).await,
        Err(CustodyError::VersionLost(_))
    ));
    // Reported once; the mark is persistent.
    let (_, report) = f.restart(CustodyOptions::default()).await;
    assert!(report.lost.is_empty());
    assert!(
        f.store
            .load_versions()
            .await
            .unwrap()
            .iter()
            .any(|v| v.version == 1 && v.lost_at.is_some())
    );
}

#[tokio::test]
async fn a_missing_object_found_while_serving_marks_the_version_lost() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"x"), b"")
        .await
        .unwrap()
        .ciphertext;
    let id = envelope::parse(&blob).unwrap().version_id;
    f.hsm.destroy_secret_key(ObjectId(id.0)).await.unwrap();

    assert!(matches!(
        f.custody.unwrap(&service(&key), &blob, b"", None).await,
        Err(CustodyError::VersionLost(_))
    ));
    // The mark is written in the background; wait for it rather than sleeping blindly.
    for _ in 0..100 {
        if f.custody.get_key(&officer(&key), &key).unwrap().versions[0]
            .lost_at
            .is_some()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        f.custody.get_key(&officer(&key), &key).unwrap().versions[0]
            .lost_at
            .is_some()
    );
    assert!(matches!(
        f.custody.wrap(&service(&key), &key, pt(b"y"), b"").await,
        Err(CustodyError::VersionLost(_))
    ));
}

#[tokio::test]
async fn data_keys_come_from_the_hsm_and_unwrap() {
    let f = Fixture::new().await;
    let key = name("tenants/t/keys/k");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let dk = f
        .custody
        .generate_data_key(&service(&key), &key, b"obj-1", 32, true)
        .await
        .unwrap();
    let plaintext = dk.plaintext.clone().unwrap();
    assert_eq!(plaintext.len(), 32);
    assert!(!format!("{dk:?}").contains(&format!("{:?}", &plaintext[..4])));
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &dk.ciphertext, b"obj-1", None)
            .await
            .unwrap()
            .plaintext,
        plaintext
    );
    let other = f
        .custody
        .generate_data_key(&service(&key), &key, b"obj-1", 32, true)
        .await
        .unwrap();
    assert_ne!(other.plaintext, dk.plaintext);

    let blind = f
        .custody
        .generate_data_key(&service(&key), &key, b"", 64, false)
        .await
        .unwrap();
    assert!(blind.plaintext.is_none());
    assert_eq!(
        f.custody
            .unwrap(&service(&key), &blind.ciphertext, b"", None)
            .await
            .unwrap()
            .plaintext
            .len(),
        64
    );
    for len in [0, 15, 1025] {
        assert!(matches!(
            f.custody
                .generate_data_key(&service(&key), &key, b"", len, true)
                .await,
            Err(CustodyError::InvalidArgument(_))
        ));
    }
}

#[tokio::test]
async fn sizes_are_checked_and_keys_are_listed_per_tenant() {
    let f = Fixture::new().await;
    let key = name("tenants/a/keys/k1");
    for k in [
        "tenants/a/keys/k1",
        "tenants/a/keys/k3",
        "tenants/a/keys/k2",
        "tenants/b/keys/k1",
    ] {
        f.custody
            .create_key(&officer(&name(k)), &name(k), "", Default::default())
            .await
            .unwrap();
    }
    assert!(matches!(
        f.custody.wrap(&service(&key), &key, pt(b""), b"").await,
        Err(CustodyError::InvalidArgument(_))
    ));
    assert!(matches!(
        f.custody
            .wrap(
                &service(&key),
                &key,
                Zeroizing::new(vec![0; envelope::MAX_PLAINTEXT_LEN + 1]),
                b""
            )
            .await,
        Err(CustodyError::InvalidArgument(_))
    ));
    let big = f
        .custody
        .wrap(
            &service(&key),
            &key,
            Zeroizing::new(vec![7; envelope::MAX_PLAINTEXT_LEN]),
            &vec![1; envelope::MAX_AAD_LEN],
        )
        .await
        .unwrap();
    assert_eq!(
        f.custody
            .unwrap(
                &service(&key),
                &big.ciphertext,
                &vec![1; envelope::MAX_AAD_LEN],
                None
            )
            .await
            .unwrap()
            .plaintext
            .len(),
        envelope::MAX_PLAINTEXT_LEN
    );
    assert!(matches!(
        f.custody
            .wrap(
                &service(&key),
                &key,
                pt(b"x"),
                &vec![0; envelope::MAX_AAD_LEN + 1]
            )
            .await,
        Err(CustodyError::InvalidArgument(_))
    ));
    assert!(matches!(
        f.custody
            .create_key(
                &officer(&name("tenants/a/keys/long")),
                &name("tenants/a/keys/long"),
                &"d".repeat(1025),
                Default::default()
            )
            .await,
        Err(CustodyError::InvalidArgument(_))
    ));

    let a = grant("a", Role::Officer);
    let names = |after, limit| -> Vec<String> {
        f.custody
            .list_keys(&a, after, limit)
            .unwrap()
            .into_iter()
            .map(|k| k.name.to_string())
            .collect()
    };
    assert_eq!(
        names(None, 10),
        [
            "tenants/a/keys/k1",
            "tenants/a/keys/k2",
            "tenants/a/keys/k3"
        ]
    );
    assert_eq!(names(None, 2), ["tenants/a/keys/k1", "tenants/a/keys/k2"]);
    assert_eq!(names(Some("k2"), 2), ["tenants/a/keys/k3"]);
    assert_eq!(
        f.custody
            .list_keys(&grant("c", Role::Officer), None, 10)
            .unwrap(),
        vec![]
    );
    // Only officers list keys.
    assert!(matches!(
        f.custody.list_keys(&grant("a", Role::Service), None, 10),
        Err(CustodyError::PermissionDenied(_))
    ));
}

#[tokio::test]
async fn every_operation_requires_a_grant_for_its_role_tenant_and_keys() {
    let f = Fixture::new().await;
    let key = name("tenants/uksh/keys/ehr");
    let other_tenant = name("tenants/other/keys/ehr");
    f.custody
        .create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    f.custody
        .create_key(
            &officer(&other_tenant),
            &other_tenant,
            "",
            Default::default(),
        )
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(&service(&key), &key, pt(b"x"), b"")
        .await
        .unwrap()
        .ciphertext;
    let denied = |r: Result<(), CustodyError>| {
        assert!(matches!(r, Err(CustodyError::PermissionDenied(_))), "{r:?}")
    };

    // Another tenant's service: its blob and its key are refused.
    let stranger = service(&other_tenant);
    denied(
        f.custody
            .wrap(&stranger, &key, pt(b"x"), b"")
            .await
            .map(|_| ()),
    );
    // Its blob is refused as foreign; the front-ends answer that like an unknown version.
    for r in [
        f.custody
            .unwrap(&stranger, &blob, b"", None)
            .await
            .map(|_| ()),
        f.custody
            .rewrap(&stranger, &blob, b"", None)
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(&r, Err(CustodyError::ForeignBlob { key: k }) if *k == key),
            "{r:?}"
        );
    }
    denied(
        f.custody
            .generate_data_key(&stranger, &key, b"", 32, true)
            .await
            .map(|_| ()),
    );
    // An officer may not wrap or unwrap; a service may not administer.
    denied(
        f.custody
            .wrap(&officer(&key), &key, pt(b"x"), b"")
            .await
            .map(|_| ()),
    );
    denied(
        f.custody
            .unwrap(&officer(&key), &blob, b"", None)
            .await
            .map(|_| ()),
    );
    denied(f.custody.rotate_key(&service(&key), &key).await.map(|_| ()));
    denied(f.custody.get_key(&service(&key), &key).map(|_| ()));
    denied(
        f.custody
            .disable_version(&service(&key), &key, 1)
            .await
            .map(|_| ()),
    );
    // An auditor does neither.
    let auditor = grant("uksh", Role::Auditor);
    denied(
        f.custody
            .unwrap(&auditor, &blob, b"", None)
            .await
            .map(|_| ()),
    );
    denied(
        f.custody
            .create_key(
                &auditor,
                &name("tenants/uksh/keys/new"),
                "",
                Default::default(),
            )
            .await
            .map(|_| ()),
    );

    // Key patterns narrow a service to some keys of its tenant.
    let policy = tresor::auth::Policy::from_toml(
        "[[identity]]\nname = \"lab\"\ntenant = \"uksh\"\nroles = [\"service\"]\nkeys = [\"lab-*\"]\n",
        "test",
    )
    .unwrap();
    let lab = policy
        .grant(
            &tresor::auth::Identity {
                name: "lab".into(),
                fingerprint: String::new(),
            },
            Role::Service,
        )
        .unwrap();
    denied(f.custody.wrap(&lab, &key, pt(b"x"), b"").await.map(|_| ()));
    // A blob of a key outside its patterns is foreign to it, as another tenant's is.
    let r = f.custody.unwrap(&lab, &blob, b"", None).await.map(|_| ());
    assert!(matches!(r, Err(CustodyError::ForeignBlob { .. })), "{r:?}");
    assert!(
        f.custody
            .unwrap(&service(&key), &blob, b"", None)
            .await
            .is_ok()
    );
}

/// Two nodes (two custody services on one PostgreSQL database and one token): a node that
/// starts while another is between creating a version's object and committing its row must
/// not destroy that object, and must see versions committed after it loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_leaves_another_nodes_uncommitted_object_alone() {
    use tresor::custody::Custody;
    use tresor::store::Store;
    let token = common::TestToken::new();
    let hsm = token.open();
    let url = common::postgres_database().await;
    let store_a = Store::open(&url).await.unwrap();
    let (a, _) = Custody::open(hsm.clone(), store_a.clone(), CustodyOptions::default())
        .await
        .unwrap();
    let key = name("tenants/uksh/keys/ehr-archive");
    a.create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();

    // Node A has created the object of a new version and not yet committed its row.
    let in_flight = ObjectId([0xd4; 16]);
    let label = format!("tresor/{}/{in_flight}", store_a.installation_id());
    common::write_creation_journal(&hsm, store_a.installation_id(), in_flight).await;
    hsm.generate_version_key(in_flight, label.clone())
        .await
        .unwrap();

    let (b, report) = Custody::open(
        hsm.clone(),
        Store::open(&url).await.unwrap(),
        CustodyOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(report.orphans_deferred, vec![label]);
    assert!(report.orphans_removed.is_empty() && report.lost.is_empty());
    assert!(hsm.secret_key_exists(in_flight).await.unwrap());

    // Node B serves A's key, and A's blobs.
    let blob = a
        .wrap(&service(&key), &key, pt(b"from node a"), b"")
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(
        &b.unwrap(&service(&key), &blob, b"", None)
            .await
            .unwrap()
            .plaintext[..],
        b"from node a"
    );
}
