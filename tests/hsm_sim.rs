//! hsm-sim as a PKCS#11 module, driven directly through cryptoki: HSM behaviour, refusals with
//! the right `CKR_*`, persistence and fault injection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{Backend, PIN, TestToken};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

fn open(token: &TestToken) -> (Pkcs11, Slot) {
    let p = Pkcs11::new(&token.config.module).unwrap();
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = p.get_slots_with_token().unwrap()[0];
    (p, slot)
}

fn login(p: &Pkcs11, slot: Slot) -> Session {
    let s = p.open_rw_session(slot).unwrap();
    s.login(UserType::User, Some(&AuthPin::from(PIN))).unwrap();
    s
}

fn rv<T: std::fmt::Debug>(r: Result<T, Error>) -> RvError {
    match r {
        Err(Error::Pkcs11(rv, _)) => rv,
        other => panic!("expected a PKCS#11 error, got {other:?}"),
    }
}

fn aes_template(token: bool, sensitive: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(!sensitive),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Id(vec![token as u8, sensitive as u8]),
    ]
}

#[test]
fn keys_stay_inside_and_session_objects_vanish_with_their_session() {
    let token = TestToken::with(Backend::HsmSim);
    let (p, slot) = open(&token);
    let s = login(&p, slot);
    let info = p.get_token_info(slot).unwrap();
    assert_eq!(info.label(), token.label);
    assert_eq!(info.model(), "hsm-sim");

    let hidden = s
        .generate_key(&Mechanism::AesKeyGen, &aes_template(true, true))
        .unwrap();
    assert!(matches!(
        s.get_attribute_info(hidden, &[AttributeType::Value])
            .unwrap()[0],
        AttributeInfo::Sensitive
    ));
    let open_key = s
        .generate_key(&Mechanism::AesKeyGen, &aes_template(false, false))
        .unwrap();
    assert!(matches!(
        s.get_attribute_info(open_key, &[AttributeType::Value])
            .unwrap()[0],
        AttributeInfo::Available(32)
    ));

    // Private objects are invisible until login; the session object dies with its session.
    let other = p.open_ro_session(slot).unwrap();
    assert_eq!(
        other
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .unwrap()
            .len(),
        2
    );
    drop(s);
    // `other` is still open, so the user stays logged in; the session key is gone.
    assert_eq!(
        other
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .unwrap(),
        vec![hidden]
    );
    drop(other);
    // Closing the last session logged the user out: the private token key is hidden again.
    let fresh = p.open_ro_session(slot).unwrap();
    assert!(
        fresh
            .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
            .unwrap()
            .is_empty()
    );
    // A read-only session may not create token objects.
    fresh
        .login(UserType::User, Some(&AuthPin::from(PIN)))
        .unwrap();
    assert_eq!(
        rv(fresh.generate_key(&Mechanism::AesKeyGen, &aes_template(true, true))),
        RvError::SessionReadOnly
    );
}

#[test]
fn what_it_does_not_do_is_refused_with_the_right_code() {
    let token = TestToken::with(Backend::HsmSim);
    let (p, slot) = open(&token);
    assert_eq!(
        rv(p.init_token(slot, &AuthPin::from("12345678"), "x")),
        RvError::FunctionNotSupported
    );
    let s = p.open_rw_session(slot).unwrap();
    assert_eq!(
        rv(s.login(UserType::User, Some(&AuthPin::from("wrong-pin")))),
        RvError::PinIncorrect
    );
    s.login(UserType::User, Some(&AuthPin::from(PIN))).unwrap();
    assert_eq!(
        rv(s.login(UserType::User, Some(&AuthPin::from(PIN)))),
        RvError::UserAlreadyLoggedIn
    );
    assert_eq!(
        rv(s.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &[], &[])),
        RvError::MechanismInvalid
    );
    let key = s
        .generate_key(&Mechanism::AesKeyGen, &aes_template(true, true))
        .unwrap();
    assert_eq!(
        rv(s.encrypt(&Mechanism::AesCbc([0; 16]), key, b"0123456789abcdef")),
        RvError::MechanismInvalid
    );
    assert_eq!(
        rv(s.digest(&Mechanism::Sha256, b"x")),
        RvError::FunctionNotSupported
    );
    // ring signs messages, not digests: raw CKM_ECDSA is not offered.
    assert!(
        !p.get_mechanism_list(slot)
            .unwrap()
            .contains(&cryptoki::mechanism::MechanismType::ECDSA)
    );
    // A key made for encryption does not sign.
    assert_eq!(
        rv(s.sign(&Mechanism::Sha256Hmac, key, b"x")),
        RvError::KeyTypeInconsistent
    );
    // GCM with a caller IV of the wrong size.
    let mut iv = [0u8; 8];
    let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, b"aad", 128u64.into()).unwrap();
    assert_eq!(
        rv(s.encrypt(&Mechanism::AesGcm(params), key, b"x")),
        RvError::MechanismParamInvalid
    );

    // A failed tag check is CKR_ENCRYPTED_DATA_INVALID (SoftHSM says CKR_GENERAL_ERROR).
    let mut iv = [1u8; 12];
    let sealed = s
        .encrypt(
            &Mechanism::AesGcm(
                cryptoki::mechanism::aead::GcmParams::new(&mut iv, b"a", 128u64.into()).unwrap(),
            ),
            key,
            b"x",
        )
        .unwrap();
    let mut iv = [1u8; 12];
    let wrong = cryptoki::mechanism::aead::GcmParams::new(&mut iv, b"b", 128u64.into()).unwrap();
    assert_eq!(
        rv(s.decrypt(&Mechanism::AesGcm(wrong), key, &sealed)),
        RvError::EncryptedDataInvalid
    );
}

#[test]
fn the_state_file_is_private_and_written_atomically() {
    let token = TestToken::with(Backend::HsmSim);
    let (p, slot) = open(&token);
    let s = login(&p, slot);
    s.generate_key(&Mechanism::AesKeyGen, &aes_template(true, true))
        .unwrap();
    let state = token.dir.path().join("hsm-sim-state.json");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !token.dir.path().join("hsm-sim-state.tmp").exists(),
        "a temporary file was left behind"
    );
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(
        !text.contains(PIN),
        "the PIN is stored only as a salted hash"
    );
}

#[test]
fn faults_are_driven_at_run_time() {
    let token = TestToken::with(Backend::HsmSim);
    let (p, slot) = open(&token);
    let s = login(&p, slot);
    let key = s
        .generate_key(&Mechanism::AesKeyGen, &aes_template(true, true))
        .unwrap();

    token.faults(&hsm_sim::Faults {
        latency_ms: 60,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(30));
    let t = Instant::now();
    s.generate_random_vec(8).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(60),
        "latency not applied: {:?}",
        t.elapsed()
    );

    token.faults(&hsm_sim::Faults {
        device_error_rate: 1.0,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rv(s.generate_random_vec(8)), RvError::DeviceError);

    token.faults(&hsm_sim::Faults {
        unplugged: true,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rv(s.generate_random_vec(8)), RvError::DeviceRemoved);
    assert!(p.get_slots_with_token().unwrap().is_empty());
    assert_eq!(rv(p.open_rw_session(slot)), RvError::TokenNotPresent);

    // Plugged back in: the old session is gone, the user must log in again, the key is there.
    token.faults(&hsm_sim::Faults::default());
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rv(s.generate_random_vec(8)), RvError::SessionHandleInvalid);
    let s2 = login(&p, slot);
    assert!(
        s2.find_objects(&[Attribute::Id(vec![1, 1])])
            .unwrap()
            .contains(&key)
    );

    // Lost sessions: every open session becomes invalid and the user is logged out.
    token.faults(&hsm_sim::Faults {
        lose_sessions: 1,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(rv(s2.generate_random_vec(8)), RvError::SessionHandleInvalid);
    let s3 = p.open_ro_session(slot).unwrap();
    assert!(
        s3.find_objects(&[Attribute::Id(vec![1, 1])])
            .unwrap()
            .is_empty(),
        "still logged in"
    );
    std::mem::forget(s);
    std::mem::forget(s2);
}

/// PKCS#11 3.0 message-based AES-GCM through a third-party client (cryptoki): one
/// `C_EncryptMessage` per message after one `C_MessageEncryptInit`, interchangeable with the
/// single-part `CKM_AES_GCM` (a message encrypted one way decrypts the other), one encryption
/// operation per session, and a key destroyed under a context refuses the next message.
#[test]
fn message_based_gcm_interoperates_with_single_part_gcm() {
    use cryptoki::mechanism::aead::{GcmMessageParams, GcmParams, GeneratorFunction};
    use cryptoki::mechanism::{MechanismType, MessageParam};
    let token = TestToken::with(Backend::HsmSim);
    let (p, slot) = open(&token);
    let info = p.get_mechanism_info(slot, MechanismType::AES_GCM).unwrap();
    assert!(info.message_encrypt() && info.message_decrypt(), "{info:?}");
    let s = login(&p, slot);
    let key = s
        .generate_key(&Mechanism::AesKeyGen, &aes_template(false, true))
        .unwrap();
    let (aad, plaintext) = (b"record 17".as_slice(), b"data key".as_slice());
    let mut iv = [7u8; 12];
    let mut tag = [0u8; 16];
    let mut none = [0u8; 12];
    let mut unused = [0u8; 16];
    let init = Mechanism::AesGcmMessage(
        GcmMessageParams::new(
            &mut none,
            0.into(),
            GeneratorFunction::NoGenerate,
            &mut unused,
        )
        .unwrap(),
    );
    s.message_encrypt_init(&init, key).unwrap();
    // The single-part operation waits until the message context is closed.
    fn single<'a>(iv: &'a mut [u8; 12], aad: &'a [u8]) -> Mechanism<'a> {
        Mechanism::AesGcm(GcmParams::new(iv, aad, 128.into()).unwrap())
    }
    assert_eq!(
        rv(s.encrypt_init(&single(&mut [1u8; 12], aad), key)),
        RvError::OperationActive
    );
    let ciphertext = {
        let params = MessageParam::AesGcmMessage(
            GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut tag)
                .unwrap(),
        );
        s.encrypt_message(&params, aad, plaintext).unwrap()
    };
    assert_eq!(ciphertext.len(), plaintext.len());
    s.message_encrypt_final().unwrap();
    // ... and then opens what the message operation sealed: the same bytes either way.
    let mut sealed = ciphertext.clone();
    sealed.extend_from_slice(&tag);
    let opened = s
        .decrypt(&single(&mut [7u8; 12], aad), key, &sealed)
        .unwrap();
    assert_eq!(opened, plaintext);
    let again = s
        .encrypt(&single(&mut [7u8; 12], aad), key, plaintext)
        .unwrap();
    assert_eq!(again, sealed);
    // Message-based decryption of a single-part ciphertext; a wrong tag or AAD fails.
    s.message_decrypt_init(&init, key).unwrap();
    let (body, single_tag) = again.split_at(again.len() - 16);
    let decrypt = |aad: &[u8], tag: &[u8]| {
        let mut iv = [7u8; 12];
        let mut tag = tag.to_vec();
        let params = MessageParam::AesGcmMessage(
            GcmMessageParams::new(&mut iv, 0.into(), GeneratorFunction::NoGenerate, &mut tag)
                .unwrap(),
        );
        s.decrypt_message(&params, aad, body)
    };
    assert_eq!(decrypt(aad, single_tag).unwrap(), plaintext);
    assert_eq!(
        rv(decrypt(b"record 18", single_tag)),
        RvError::EncryptedDataInvalid
    );
    assert_eq!(rv(decrypt(aad, &[0u8; 16])), RvError::EncryptedDataInvalid);
    // A key destroyed while the context is open refuses the next message.
    s.destroy_object(key).unwrap();
    assert_eq!(rv(decrypt(aad, single_tag)), RvError::ObjectHandleInvalid);
    s.message_decrypt_final().unwrap();
    assert_eq!(
        rv(s.message_decrypt_final()),
        RvError::OperationNotInitialized
    );
}
