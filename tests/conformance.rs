//! The conformance suite of the PKCS#11 back-end: one set of tests, mounted once per module
//! (SoftHSM2 and hsm-sim), through Tresor's HSM layer and nothing above it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Backend, PIN, TestToken};
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use tresor::custody::{Custody, CustodyOptions};
use tresor::hsm::{Dispatch, Hsm, HsmConfig, HsmError, ObjectId, Pin, PinSource};
use tresor::store::Store;
use zeroize::Zeroizing;

async fn gcm_round_trip_and_a_failed_tag_is_a_bad_ciphertext(backend: Backend, dispatch: Dispatch) {
    let token = TestToken::with(backend).dispatching(dispatch);
    let hsm = token.open();
    let id = ObjectId([1; 16]);
    hsm.generate_version_key(id, "test/gcm".into())
        .await
        .unwrap();

    let iv = [9u8; 12];
    let sealed = hsm
        .encrypt_gcm(id, iv, b"aad".to_vec(), Zeroizing::new(b"secret".to_vec()))
        .await
        .unwrap();
    assert_eq!(sealed.len(), 6 + 16);
    let opened = hsm
        .decrypt_gcm(id, iv, b"aad".to_vec(), sealed.clone())
        .await
        .unwrap();
    assert_eq!(opened.as_slice(), b"secret");

    // SoftHSM 2.6.1 reports a failed tag check as CKR_GENERAL_ERROR; it must not look like a
    // device failure, and the session must stay usable.
    for _ in 0..10 {
        let err = hsm
            .decrypt_gcm(id, iv, b"other".to_vec(), sealed.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, HsmError::BadCiphertext), "{err:?}");
    }
    let mut tampered = sealed.clone();
    tampered[0] ^= 0x80;
    assert!(matches!(
        hsm.decrypt_gcm(id, iv, b"aad".to_vec(), tampered).await,
        Err(HsmError::BadCiphertext)
    ));
    assert_eq!(
        hsm.decrypt_gcm(id, iv, b"aad".to_vec(), sealed)
            .await
            .unwrap()
            .as_slice(),
        b"secret"
    );

    let missing = ObjectId([2; 16]);
    let err = hsm
        .encrypt_gcm(missing, iv, b"a".to_vec(), Zeroizing::new(b"x".to_vec()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, HsmError::ObjectNotFound(m) if m == missing),
        "{err:?}"
    );
    assert!(!hsm.secret_key_exists(missing).await.unwrap());
    assert!(!hsm.destroy_secret_key(missing).await.unwrap());
    assert!(hsm.destroy_secret_key(id).await.unwrap());
    assert!(!hsm.secret_key_exists(id).await.unwrap());
}

async fn random_bytes_come_from_the_token(backend: Backend, dispatch: Dispatch) {
    let token = TestToken::with(backend).dispatching(dispatch);
    let hsm = token.open();
    let a = hsm.random(32).await.unwrap();
    let b = hsm.random(32).await.unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
}

async fn ecdsa_p256_signatures_verify_with_the_exported_public_key(
    backend: Backend,
    dispatch: Dispatch,
) {
    let token = TestToken::with(backend).dispatching(dispatch);
    let hsm = token.open();
    let id = ObjectId([7; 16]);
    let public = hsm
        .generate_signing_key(id, "test/audit".into())
        .await
        .unwrap();
    assert_eq!(public.len(), 65);
    assert_eq!(public[0], 0x04, "uncompressed point");
    assert_eq!(hsm.signing_public_key(id).await.unwrap(), public);

    let message = b"audit chain head 1000";
    let signature = hsm.sign_p256(id, message.to_vec()).await.unwrap();
    assert_eq!(signature.len(), 64);
    let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &public);
    verifier.verify(message, &signature).unwrap();
    assert!(
        verifier
            .verify(b"audit chain head 1001", &signature)
            .is_err()
    );

    assert!(hsm.destroy_signing_key(id).await.unwrap());
    assert!(matches!(
        hsm.sign_p256(id, message.to_vec()).await,
        Err(HsmError::ObjectNotFound(_))
    ));
}

async fn concurrent_key_generation_leaves_exactly_the_keys_asked_for(
    backend: Backend,
    dispatch: Dispatch,
) {
    // SoftHSM before 2.7.0 corrupts the token when threads of one process create token
    // objects at once; the back-end serialises creation, so this must come out exact.
    let token = TestToken::with(backend).dispatching(dispatch);
    let config = HsmConfig {
        sessions: 4,
        ..token.config.clone()
    };
    let hsm = Hsm::open(&config).unwrap();
    let mut tasks = Vec::new();
    for t in 0..4u8 {
        let hsm = hsm.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u8 {
                let id = ObjectId([t, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                hsm.generate_version_key(id, format!("test/{t}/{i}"))
                    .await
                    .unwrap();
                let sealed = hsm
                    .encrypt_gcm(id, [0; 12], vec![1], Zeroizing::new(vec![t, i]))
                    .await
                    .unwrap();
                assert_eq!(
                    hsm.decrypt_gcm(id, [0; 12], vec![1], sealed)
                        .await
                        .unwrap()
                        .as_slice(),
                    [t, i]
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut labels: Vec<String> = hsm
        .list_secret_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.label)
        .collect();
    labels.sort();
    let mut expected: Vec<String> = (0..4)
        .flat_map(|t| (0..40).map(move |i| format!("test/{t}/{i}")))
        .collect();
    expected.sort();
    assert_eq!(labels, expected);
}

async fn one_context_per_process_and_clear_errors_for_bad_configuration(
    backend: Backend,
    dispatch: Dispatch,
) {
    let token = TestToken::with(backend).dispatching(dispatch);
    let hsm = token.open();
    assert!(matches!(
        Hsm::open(&token.config),
        Err(HsmError::AlreadyOpen)
    ));
    drop(hsm);
    // Finalised on drop; a new context can be opened and finds its keys again.
    let hsm = token.open();
    hsm.random(1).await.unwrap();
    drop(hsm);

    let wrong_label = HsmConfig {
        token_label: "no-such-token".into(),
        ..token.config.clone()
    };
    let err = Hsm::open(&wrong_label).unwrap_err();
    assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-token"), "{err}");

    let wrong_serial = HsmConfig {
        token_serial: Some("0000".into()),
        ..token.config.clone()
    };
    assert!(matches!(
        Hsm::open(&wrong_serial),
        Err(HsmError::TokenNotFound { .. })
    ));

    let wrong_module = HsmConfig {
        module: "/nonexistent/libpkcs11.so".into(),
        ..token.config.clone()
    };
    let err = Hsm::open(&wrong_module).unwrap_err();
    assert!(matches!(err, HsmError::ModuleLoad { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/libpkcs11.so"));

    let missing_pin = HsmConfig {
        pin: PinSource::Env("TRESOR_TEST_UNSET_PIN".into()),
        ..token.config.clone()
    };
    let err = Hsm::open(&missing_pin).unwrap_err();
    assert!(err.to_string().contains("TRESOR_TEST_UNSET_PIN"), "{err}");

    // A wrong PIN is refused once and reported; the right PIN still works afterwards (the
    // back-end did not burn the token's retry counter).
    let err = Hsm::open_with_pin(&token.config, Pin::new("wrong-pin-123".into())).unwrap_err();
    assert!(matches!(err, HsmError::PinRefused(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("wrong-pin-123"));
    token.open().random(1).await.unwrap();
}

async fn the_pin_never_appears_in_debug_output(backend: Backend, dispatch: Dispatch) {
    let token = TestToken::with(backend).dispatching(dispatch);
    let pin_source = token.config.pin.clone();
    let pin = pin_source.read().unwrap();
    let hsm = token.open();
    let store = Store::open(&token.db_url()).await.unwrap();
    let (custody, report) = Custody::open(hsm.clone(), store.clone(), CustodyOptions::default())
        .await
        .unwrap();
    let wrong = Hsm::open_with_pin(&token.config, Pin::new(PIN.to_owned())).unwrap_err();

    let shown = [
        format!("{:?} {:#?}", token.config, token.config),
        format!("{pin_source:?} {pin:?} {pin:#?}"),
        format!("{hsm:?} {hsm:#?}"),
        format!("{custody:?} {custody:#?} {report:?}"),
        format!("{store:?}"),
        format!("{wrong:?} {wrong}"),
    ];
    for s in &shown {
        assert!(!s.contains(PIN), "PIN printed: {s}");
    }
    assert!(shown[1].contains("<redacted>"));
}

async fn token_objects_survive_reopening_the_module(backend: Backend, dispatch: Dispatch) {
    let token = TestToken::with(backend).dispatching(dispatch);
    let hsm = token.open();
    let id = ObjectId([5; 16]);
    hsm.generate_version_key(id, "test/persist".into())
        .await
        .unwrap();
    let sealed = hsm
        .encrypt_gcm(id, [1; 12], b"a".to_vec(), Zeroizing::new(b"kept".to_vec()))
        .await
        .unwrap();
    let a = hsm.inspect_secret_key(id).await.unwrap();
    assert!(
        a.sensitive && !a.extractable && !a.value_readable && a.token && a.private,
        "{a:?}"
    );
    drop(hsm);
    let hsm = token.open();
    assert_eq!(
        hsm.decrypt_gcm(id, [1; 12], b"a".to_vec(), sealed)
            .await
            .unwrap()
            .as_slice(),
        b"kept"
    );
    assert_eq!(hsm.list_secret_keys().await.unwrap().len(), 1);
}

/// Mounts every test once per module and per dispatch (hot calls on the async worker, and on
/// blocking threads), so both paths show the same behaviour; on hsm-sim also on the two-call
/// path (message-based AES-GCM switched off), so both encryption paths do too.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        conformance!(@mount softhsm_inline, SoftHsm, Inline; $($name),*);
        conformance!(@mount softhsm_threads, SoftHsm, Threads; $($name),*);
        conformance!(@mount hsm_sim_inline, HsmSim, Inline; $($name),*);
        conformance!(@mount hsm_sim_threads, HsmSim, Threads; $($name),*);
        conformance!(@mount hsm_sim_two_calls_inline, HsmSimTwoCalls, Inline; $($name),*);
    };
    (@mount $module:ident, $backend:ident, $dispatch:ident; $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::$backend, super::Dispatch::$dispatch).await
                }
            )*
        }
    };
}

/// A version disabled while sessions hold message contexts for its key (hsm-sim's message
/// path, where a session keeps `C_MessageDecryptInit` open between Unwraps) refuses the next
/// Unwrap, and unwraps again once enabled: custody decides before the HSM is asked, whatever
/// the token keeps open.
async fn a_version_disabled_under_an_open_context_refuses_the_next_unwrap(
    backend: Backend,
    dispatch: Dispatch,
) {
    use tresor::custody::CustodyError;
    let token = TestToken::with(backend).dispatching(dispatch);
    let hsm = token.open();
    let store = Store::open(&token.db_url()).await.unwrap();
    let (custody, _) = Custody::open(hsm, store, CustodyOptions::default())
        .await
        .unwrap();
    let key: tresor::model::KeyName = "tenants/t/keys/k".parse().unwrap();
    custody
        .create_key(&common::officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let wrap = |n: u8| {
        let custody = custody.clone();
        let key = key.clone();
        async move {
            custody
                .wrap(
                    &common::service(&key),
                    &key,
                    Zeroizing::new(vec![n; 32]),
                    b"a",
                )
                .await
                .unwrap()
                .ciphertext
        }
    };
    let unwrap = |blob: Vec<u8>| {
        let custody = custody.clone();
        async move {
            custody
                .unwrap(
                    &common::service(&"tenants/t/keys/k".parse().unwrap()),
                    &blob,
                    b"a",
                    None,
                )
                .await
        }
    };
    let v1 = wrap(1).await;
    custody
        .rotate_key(&common::officer(&key), &key)
        .await
        .unwrap();
    // Every session that will serve the Unwraps below holds a context for version 1's key.
    for _ in 0..8 {
        assert_eq!(
            unwrap(v1.clone()).await.unwrap().plaintext.as_slice(),
            [1; 32]
        );
    }
    custody
        .disable_version(&common::officer(&key), &key, 1)
        .await
        .unwrap();
    for _ in 0..8 {
        assert!(matches!(
            unwrap(v1.clone()).await,
            Err(CustodyError::VersionDisabled(_))
        ));
    }
    let v2 = wrap(2).await;
    assert_eq!(unwrap(v2).await.unwrap().plaintext.as_slice(), [2; 32]);
    custody
        .enable_version(&common::officer(&key), &key, 1)
        .await
        .unwrap();
    assert_eq!(unwrap(v1).await.unwrap().plaintext.as_slice(), [1; 32]);
}

conformance!(
    a_version_disabled_under_an_open_context_refuses_the_next_unwrap,
    gcm_round_trip_and_a_failed_tag_is_a_bad_ciphertext,
    random_bytes_come_from_the_token,
    ecdsa_p256_signatures_verify_with_the_exported_public_key,
    concurrent_key_generation_leaves_exactly_the_keys_asked_for,
    one_context_per_process_and_clear_errors_for_bad_configuration,
    the_pin_never_appears_in_debug_output,
    token_objects_survive_reopening_the_module,
);

/// Reads hsm-sim's call count after waiting out its write interval and making one cheap call
/// (which writes the count, itself included).
async fn calls_so_far(hsm: &Hsm, file: &std::path::Path) -> u64 {
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    hsm.random(1).await.unwrap();
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// What a Wrap and an Unwrap cost on each path (counted in hsm-sim). With message-based
/// AES-GCM (hsm-sim's PKCS#11 3.0 functions), one call each, `C_EncryptMessage` or
/// `C_DecryptMessage`, after the session opened its context for the key once; with it off (the
/// path of every PKCS#11 2.40 token, SoftHSM included), two: `C_EncryptInit` and `C_Encrypt`
/// into a buffer of the known size, no length query. A blob made on one path opens on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkcs11_calls_per_wrap_and_unwrap_on_each_path_and_blobs_cross_paths() {
    let token = TestToken::with(Backend::HsmSim);
    let file = token.dir.path().join("calls.txt");
    token.faults(&hsm_sim::Faults {
        count_calls_to: Some(file.clone()),
        ..Default::default()
    });
    let id = ObjectId([4; 16]);
    let wrap_50 = |hsm: Hsm| async move {
        let mut sealed = Vec::new();
        for i in 0..50u8 {
            sealed.push(
                hsm.encrypt_gcm(id, [i; 12], b"a".to_vec(), Zeroizing::new(vec![i; 32]))
                    .await
                    .unwrap(),
            );
        }
        sealed
    };
    let unwrap_all = |hsm: Hsm, sealed: Vec<Vec<u8>>| async move {
        for (i, s) in sealed.into_iter().enumerate() {
            let opened = hsm
                .decrypt_gcm(id, [i as u8; 12], b"a".to_vec(), s)
                .await
                .unwrap();
            assert_eq!(opened.as_slice(), vec![i as u8; 32].as_slice());
        }
    };
    // Each call below costs one PKCS#11 call more: the counter's own C_GenerateRandom.
    let message = {
        let hsm = token.open();
        hsm.generate_version_key(id, "test/calls".into())
            .await
            .unwrap();
        // The key's handle is looked up once and cached; the session opens its context.
        hsm.encrypt_gcm(id, [99; 12], b"a".to_vec(), Zeroizing::new(vec![1; 32]))
            .await
            .unwrap();
        let before = calls_so_far(&hsm, &file).await;
        let sealed = wrap_50(hsm.clone()).await;
        let wrapped = calls_so_far(&hsm, &file).await;
        assert_eq!(wrapped - before - 1, 50, "calls for 50 message-based wraps");
        unwrap_all(hsm.clone(), sealed.clone()).await;
        let unwrapped = calls_so_far(&hsm, &file).await;
        assert_eq!(
            unwrapped - wrapped - 1,
            51,
            "calls for 50 message-based unwraps (and one C_MessageDecryptInit)"
        );
        sealed
    };
    // The same token without the message path: two calls each, and it opens those blobs.
    let mut config = token.config.clone();
    config.message_aead = false;
    let two_calls = {
        let hsm = Hsm::open(&config).unwrap();
        // A fresh context looks the key's handle up again.
        hsm.encrypt_gcm(id, [99; 12], b"a".to_vec(), Zeroizing::new(vec![1; 32]))
            .await
            .unwrap();
        let before = calls_so_far(&hsm, &file).await;
        let sealed = wrap_50(hsm.clone()).await;
        let wrapped = calls_so_far(&hsm, &file).await;
        assert_eq!(wrapped - before - 1, 100, "calls for 50 two-call wraps");
        unwrap_all(hsm.clone(), message).await;
        let unwrapped = calls_so_far(&hsm, &file).await;
        assert_eq!(
            unwrapped - wrapped - 1,
            100,
            "calls for 50 two-call unwraps"
        );
        sealed
    };
    // And back: the message path opens what the two-call path made.
    unwrap_all(token.open(), two_calls).await;
}

/// A close of a message-based context whose answer was lost (`CKR_DEVICE_ERROR`) leaves the
/// context open in the token while the session has forgotten it. The next Wrap with another
/// key on that session meets `CKR_OPERATION_ACTIVE` at its `C_MessageEncryptInit`: it closes
/// the stale context and opens its own, instead of failing on that session for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_the_token_kept_after_a_failed_close_is_closed_and_opened_anew() {
    let mut token = TestToken::with(Backend::HsmSim);
    // One session, so every call below meets what the one before left in it.
    token.config.sessions = 1;
    let hsm = token.open();
    let (a, b) = (ObjectId([6; 16]), ObjectId([7; 16]));
    for id in [a, b] {
        hsm.generate_version_key(id, "test/stale".into())
            .await
            .unwrap();
    }
    let wrap = |id, byte| {
        hsm.encrypt_gcm(
            id,
            [byte; 12],
            b"s".to_vec(),
            Zeroizing::new(vec![byte; 32]),
        )
    };
    wrap(a, 1).await.unwrap();
    token.faults(&hsm_sim::Faults {
        stick_message_finals: 1,
        ..Default::default()
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    // Switching to b closes a's context; that close fails and the token keeps it. Then back to
    // a on the same session.
    for (id, byte) in [(b, 2), (a, 3)] {
        let sealed = wrap(id, byte)
            .await
            .expect("a Wrap on a session whose token kept a stale context");
        assert_eq!(
            hsm.decrypt_gcm(id, [byte; 12], b"s".to_vec(), sealed)
                .await
                .unwrap()
                .as_slice(),
            [byte; 32].as_slice()
        );
    }
}

/// A session lost in the middle of message-based operations (a network HSM dropping its
/// connection) takes its contexts with it: the call is retried once on a fresh session, which
/// opens its own context, and the next calls go on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_with_a_message_context_is_replaced_and_the_call_retried() {
    let token = TestToken::with(Backend::HsmSim);
    let hsm = token.open();
    let id = ObjectId([5; 16]);
    hsm.generate_version_key(id, "test/lost".into())
        .await
        .unwrap();
    let sealed = hsm
        .encrypt_gcm(id, [1; 12], b"a".to_vec(), Zeroizing::new(vec![1; 32]))
        .await
        .unwrap();
    hsm.decrypt_gcm(id, [1; 12], b"a".to_vec(), sealed.clone())
        .await
        .unwrap();
    for round in 1..=3 {
        token.faults(&hsm_sim::Faults {
            lose_sessions: round,
            ..Default::default()
        });
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        let again = hsm
            .encrypt_gcm(id, [2; 12], b"a".to_vec(), Zeroizing::new(vec![2; 32]))
            .await
            .unwrap();
        assert_eq!(
            hsm.decrypt_gcm(id, [2; 12], b"a".to_vec(), again)
                .await
                .unwrap()
                .as_slice(),
            [2; 32].as_slice()
        );
        assert_eq!(
            hsm.decrypt_gcm(id, [1; 12], b"a".to_vec(), sealed.clone())
                .await
                .unwrap()
                .as_slice(),
            [1; 32].as_slice()
        );
    }
}

/// hsm-sim counting its calls into the returned file, opened with `sessions` sessions and a
/// version key for each of `keys`.
async fn counted_hsm_with_keys(
    sessions: usize,
    keys: &[ObjectId],
) -> (TestToken, std::path::PathBuf, Hsm) {
    let token = TestToken::with(Backend::HsmSim);
    let file = token.dir.path().join("calls.txt");
    token.faults(&hsm_sim::Faults {
        count_calls_to: Some(file.clone()),
        ..Default::default()
    });
    let mut config = token.config.clone();
    config.sessions = sessions;
    let hsm = Hsm::open(&config).unwrap();
    for (i, id) in keys.iter().enumerate() {
        hsm.generate_version_key(*id, format!("test/counted-{i}"))
            .await
            .unwrap();
    }
    (token, file, hsm)
}

/// Wraps and Unwraps that alternate between two keys, with more than one session in the pool,
/// cost one PKCS#11 call each on the message path, as with one key: each key keeps its own
/// session's context, rather than one session closing one key's context and opening the
/// other's on every call (three calls: `C_MessageEncryptFinal`, `C_MessageEncryptInit`,
/// `C_EncryptMessage`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_alternating_between_two_keys_keep_one_call_each_on_the_message_path() {
    let keys = [ObjectId([5; 16]), ObjectId([6; 16])];
    let (_token, file, hsm) = counted_hsm_with_keys(4, &keys).await;
    let wrap = |i: u8| {
        let hsm = hsm.clone();
        async move {
            hsm.encrypt_gcm(
                keys[usize::from(i % 2)],
                [i; 12],
                b"a".to_vec(),
                Zeroizing::new(vec![i; 32]),
            )
            .await
            .unwrap()
        }
    };
    // Each key's handle is looked up and a context opened for it once.
    wrap(98).await;
    wrap(99).await;
    let before = calls_so_far(&hsm, &file).await;
    let mut sealed = Vec::new();
    for i in 0..50u8 {
        sealed.push(wrap(i).await);
    }
    let wrapped = calls_so_far(&hsm, &file).await;
    assert_eq!(
        wrapped - before - 1,
        50,
        "calls for 50 wraps alternating between two keys"
    );
    for (i, s) in sealed.into_iter().enumerate() {
        let i = i as u8;
        let opened = hsm
            .decrypt_gcm(keys[usize::from(i % 2)], [i; 12], b"a".to_vec(), s)
            .await
            .unwrap();
        assert_eq!(opened.as_slice(), vec![i; 32].as_slice());
    }
    let unwrapped = calls_so_far(&hsm, &file).await;
    assert_eq!(
        unwrapped - wrapped - 1,
        52,
        "calls for 50 unwraps alternating between two keys (and a C_MessageDecryptInit for each)"
    );
}

/// With more keys in use than sessions, a key whose context no session holds takes the session
/// used longest ago, so the keys used since keep their contexts: after A and B (a session
/// each), A, C, A costs 1 + 3 + 1 calls (C closes B's context, not A's just used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_more_keys_than_sessions_the_context_used_longest_ago_is_closed() {
    let [a, b, c] = [ObjectId([7; 16]), ObjectId([8; 16]), ObjectId([9; 16])];
    let (_token, file, hsm) = counted_hsm_with_keys(2, &[a, b, c]).await;
    let wrap = |id: ObjectId| {
        let hsm = hsm.clone();
        async move {
            hsm.encrypt_gcm(id, [1; 12], b"a".to_vec(), Zeroizing::new(vec![1; 32]))
                .await
                .unwrap()
        }
    };
    // A and B get a session each; C's handle is looked up (and cached), outside the count.
    wrap(a).await;
    wrap(b).await;
    assert!(hsm.secret_key_exists(c).await.unwrap());
    let before = calls_so_far(&hsm, &file).await;
    wrap(a).await;
    wrap(c).await;
    wrap(a).await;
    let after = calls_so_far(&hsm, &file).await;
    assert_eq!(after - before - 1, 5, "A, C, A after A, B on two sessions");
}
