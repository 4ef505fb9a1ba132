//! Token objects and mechanisms: generating, finding, listing and destroying keys, AES-GCM,
//! HMAC-SHA-256, ECDSA P-256 and random bytes. Every call goes through the session pool
//! ([`super::session`]).

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

#[cfg(feature = "test-support")]
use super::KeyAttributes;
use super::ckr::Call;
use super::direct::{Direction, MessageCalls};
use super::session::{OpCtx, OpError, Prefer, Retry, unavailable};
use super::{Hsm, HsmError, Kind, ObjectId, P256_PARAMS, TokenObject};

impl Hsm {
    /// Creates a version key: a token AES-256 key, sensitive, never extractable, not
    /// modifiable or copyable, usable only to encrypt and decrypt. Not retried.
    pub async fn generate_version_key(&self, id: ObjectId, label: String) -> Result<(), HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Sign(false),
                Attribute::Verify(false),
                Attribute::Derive(false),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let _serialised = cx.object_lock();
            let handle = cx.session.generate_key(&Mechanism::AesKeyGen, &template)?;
            cx.remember(id, Kind::Secret, handle);
            Ok(())
        })
        .await
    }

    /// AES-256-GCM encryption with a 128-bit tag inside the HSM. Returns `ciphertext ‖ tag`.
    pub async fn encrypt_gcm(
        &self,
        key: ObjectId,
        iv: [u8; 12],
        aad: Vec<u8>,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<Vec<u8>, HsmError> {
        let prefer = Prefer::Context(Direction::Encrypt, key);
        self.run_hot(prefer, Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(key, Kind::Secret)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, 128u64.into())?;
            let mechanism = Mechanism::AesGcm(params);
            match &cx.inner.direct {
                // One call: C_EncryptMessage on the session's context for this key.
                Some(direct) if cx.live.message_gcm => {
                    let calls = direct
                        .message
                        .as_ref()
                        .ok_or(OpError::Pkcs11(CkError::NullFunctionPointer))?;
                    in_message_context(cx, calls, Direction::Encrypt, handle, || {
                        calls.encrypt(cx.session.handle(), iv, &aad, &plaintext)
                    })
                }
                // Two calls: C_EncryptInit, and C_Encrypt into plaintext + tag.
                Some(direct) => {
                    cx.session.encrypt_init(&mechanism, handle)?;
                    Ok(direct.encrypt(cx.session.handle(), &plaintext, plaintext.len() + 16)?)
                }
                None => Ok(cx.session.encrypt(&mechanism, handle, &plaintext)?),
            }
        })
        .await
    }

    /// AES-256-GCM decryption of `ciphertext ‖ tag` inside the HSM. A failed tag check is
    /// [`HsmError::BadCiphertext`].
    pub async fn decrypt_gcm(
        &self,
        key: ObjectId,
        iv: [u8; 12],
        aad: Vec<u8>,
        sealed: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let prefer = Prefer::Context(Direction::Decrypt, key);
        self.run_hot(prefer, Call::GcmDecrypt, Retry::Once, move |cx| {
            let handle = cx.object(key, Kind::Secret)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, 128u64.into())?;
            let mechanism = Mechanism::AesGcm(params);
            match &cx.inner.direct {
                // One call: C_DecryptMessage on the session's context for this key.
                Some(direct) if cx.live.message_gcm => {
                    let calls = direct
                        .message
                        .as_ref()
                        .ok_or(OpError::Pkcs11(CkError::NullFunctionPointer))?;
                    in_message_context(cx, calls, Direction::Decrypt, handle, || {
                        calls.decrypt(cx.session.handle(), iv, &aad, &sealed)
                    })
                }
                // Two calls: C_DecryptInit, and C_Decrypt into a buffer as long as the input
                // (the plaintext is 16 bytes shorter; some tokens want the room anyway).
                Some(direct) => {
                    cx.session.decrypt_init(&mechanism, handle)?;
                    Ok(direct.decrypt(cx.session.handle(), &sealed, sealed.len())?)
                }
                None => Ok(Zeroizing::new(
                    cx.session.decrypt(&mechanism, handle, &sealed)?,
                )),
            }
        })
        .await
    }

    /// `len` random bytes from the token's generator.
    pub async fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>, HsmError> {
        let len = u32::try_from(len).map_err(|_| unavailable("random length too large"))?;
        self.run_hot(Prefer::Any, Call::Other, Retry::Once, move |cx| {
            Ok(Zeroizing::new(cx.session.generate_random_vec(len)?))
        })
        .await
    }

    /// Whether a secret key with this `CKA_ID` is in the token.
    pub async fn secret_key_exists(&self, id: ObjectId) -> Result<bool, HsmError> {
        match self
            .run(Call::Other, Retry::Once, move |cx| {
                cx.object(id, Kind::Secret)
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(HsmError::ObjectNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Destroys the secret key with this `CKA_ID`. Returns whether it existed.
    pub async fn destroy_secret_key(&self, id: ObjectId) -> Result<bool, HsmError> {
        self.destroy(id, &[Kind::Secret]).await
    }

    /// Destroys both halves of a signing key pair. Returns whether any existed.
    pub async fn destroy_signing_key(&self, id: ObjectId) -> Result<bool, HsmError> {
        self.destroy(id, &[Kind::Private, Kind::Public]).await
    }

    async fn destroy(&self, id: ObjectId, kinds: &'static [Kind]) -> Result<bool, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let _serialised = cx.object_lock();
            let mut existed = false;
            for &kind in kinds {
                let handle = match cx.object(id, kind) {
                    Ok(h) => h,
                    Err(OpError::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                cx.forget(id, kind);
                cx.session.destroy_object(handle)?;
                existed = true;
            }
            Ok(existed)
        })
        .await
    }

    /// Every secret-key token object, with its `CKA_ID` and `CKA_LABEL`.
    pub async fn list_secret_keys(&self) -> Result<Vec<TokenObject>, HsmError> {
        self.run(Call::Other, Retry::Once, |cx| {
            let handles = cx.session.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
            ])?;
            let mut objects = Vec::with_capacity(handles.len());
            for handle in handles {
                let mut object = TokenObject {
                    id: Vec::new(),
                    label: String::new(),
                };
                for attr in cx
                    .session
                    .get_attributes(handle, &[AttributeType::Id, AttributeType::Label])?
                {
                    match attr {
                        Attribute::Id(id) => object.id = id,
                        Attribute::Label(l) => {
                            object.label = String::from_utf8_lossy(&l).into_owned()
                        }
                        _ => {}
                    }
                }
                objects.push(object);
            }
            Ok(objects)
        })
        .await
    }

    /// Reads a secret key's protection attributes back from the token, and whether the token
    /// would reveal `CKA_VALUE`. For the conformance tests only.
    #[cfg(feature = "test-support")]
    pub async fn inspect_secret_key(&self, id: ObjectId) -> Result<KeyAttributes, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Secret)?;
            let mut a = KeyAttributes {
                token: false,
                private: false,
                sensitive: false,
                extractable: true,
                modifiable: true,
                copyable: true,
                always_sensitive: false,
                never_extractable: false,
                aes: false,
                value_len: 0,
                value_readable: true,
            };
            let types = [
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Modifiable,
                AttributeType::Copyable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::KeyType,
                AttributeType::ValueLen,
            ];
            for attr in cx.session.get_attributes(handle, &types)? {
                match attr {
                    Attribute::Token(v) => a.token = v,
                    Attribute::Private(v) => a.private = v,
                    Attribute::Sensitive(v) => a.sensitive = v,
                    Attribute::Extractable(v) => a.extractable = v,
                    Attribute::Modifiable(v) => a.modifiable = v,
                    Attribute::Copyable(v) => a.copyable = v,
                    Attribute::AlwaysSensitive(v) => a.always_sensitive = v,
                    Attribute::NeverExtractable(v) => a.never_extractable = v,
                    Attribute::KeyType(t) => a.aes = t == KeyType::AES,
                    Attribute::ValueLen(n) => a.value_len = u64::from(n),
                    _ => {}
                }
            }
            let value = cx
                .session
                .get_attribute_info(handle, &[AttributeType::Value])?;
            a.value_readable = matches!(
                value.first(),
                Some(cryptoki::object::AttributeInfo::Available(_))
            );
            Ok(a)
        })
        .await
    }

    /// Creates an ECDSA P-256 key pair in the token (the private half sensitive and never
    /// extractable, usable only to sign). Returns the public point, uncompressed (65 bytes).
    /// Not retried.
    pub async fn generate_signing_key(
        &self,
        id: ObjectId,
        label: String,
    ) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::Modifiable(false),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let _serialised = cx.object_lock();
            let (pub_handle, priv_handle) =
                cx.session
                    .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
            cx.remember(id, Kind::Public, pub_handle);
            cx.remember(id, Kind::Private, priv_handle);
            public_point(cx.session, pub_handle)
        })
        .await
    }

    /// Creates a 256-bit HMAC key (generic secret): sensitive, never extractable, sign only.
    /// Not retried.
    pub async fn generate_hmac_key(&self, id: ObjectId, label: String) -> Result<(), HsmError> {
        self.run(Call::Other, Retry::Never, move |cx| {
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Modifiable(false),
                Attribute::Copyable(false),
                Attribute::Sign(true),
                Attribute::Verify(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Derive(false),
                Attribute::Id(id.0.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
            ];
            let _serialised = cx.object_lock();
            let handle = cx
                .session
                .generate_key(&Mechanism::GenericSecretKeyGen, &template)?;
            cx.remember(id, Kind::Secret, handle);
            Ok(())
        })
        .await
    }

    /// HMAC-SHA256 of `data` under the HMAC key with this `CKA_ID`.
    pub async fn hmac_sha256(&self, id: ObjectId, data: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Secret)?;
            Ok(cx.session.sign(&Mechanism::Sha256Hmac, handle, &data)?)
        })
        .await
    }

    /// The public point (uncompressed, 65 bytes) of the signing key pair with this `CKA_ID`.
    pub async fn signing_public_key(&self, id: ObjectId) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Public)?;
            public_point(cx.session, handle)
        })
        .await
    }

    /// Signs `message` with ECDSA P-256 over SHA-256: `CKM_ECDSA_SHA256` where the token offers
    /// it, else SHA-256 here and raw `CKM_ECDSA`. Returns `r ‖ s` (64 bytes).
    pub async fn sign_p256(&self, id: ObjectId, message: Vec<u8>) -> Result<Vec<u8>, HsmError> {
        self.run(Call::Other, Retry::Once, move |cx| {
            let handle = cx.object(id, Kind::Private)?;
            if cx.live.ecdsa_sha256 {
                Ok(cx.session.sign(&Mechanism::EcdsaSha256, handle, &message)?)
            } else {
                let digest = ring::digest::digest(&ring::digest::SHA256, &message);
                Ok(cx
                    .session
                    .sign(&Mechanism::Ecdsa, handle, digest.as_ref())?)
            }
        })
        .await
    }
}

/// Reads `CKA_EC_POINT` and strips its DER OCTET STRING wrapper where the module adds one.
pub(super) fn public_point(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, OpError> {
    for attr in session.get_attributes(handle, &[AttributeType::EcPoint])? {
        if let Attribute::EcPoint(der) = attr {
            return Ok(match der.as_slice() {
                [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
                _ => der,
            });
        }
    }
    Err(OpError::Pkcs11(CkError::Pkcs11(
        RvError::AttributeTypeInvalid,
        cryptoki::context::Function::GetAttributeValue,
    )))
}

/// Runs one message (`run`: a `C_EncryptMessage` or `C_DecryptMessage`) in the session's
/// message-based context of `direction` for `key`, opening that context first if the session
/// has none for this key (and closing one it has for another). A message that fails closes the
/// context: the next one opens it anew rather than trust what the token kept. A session lost on
/// the way takes its contexts with it, and the retry on a fresh session opens one there.
fn in_message_context<T>(
    cx: &OpCtx<'_>,
    calls: &MessageCalls,
    direction: Direction,
    key: ObjectHandle,
    run: impl FnOnce() -> Result<T, CkError>,
) -> Result<T, OpError> {
    let session = cx.session.handle();
    let mut state = cx.message.get();
    let open = *state.slot(direction);
    if open != Some(key.handle()) {
        if open.is_some() {
            *state.slot(direction) = None;
            cx.message.set(state);
            // Another key's context; if closing it fails, it is gone already.
            let _ = calls.finish(session, direction);
        }
        match calls.init(session, direction, key.handle()) {
            // The token still holds a context this session lost track of (a close that
            // failed): close it and open ours, rather than fail on this session for good.
            Err(CkError::Pkcs11(RvError::OperationActive, _)) => {
                let _ = calls.finish(session, direction);
                calls.init(session, direction, key.handle())?;
            }
            other => other?,
        }
        *state.slot(direction) = Some(key.handle());
        cx.message.set(state);
    }
    run().map_err(|e| {
        *state.slot(direction) = None;
        cx.message.set(state);
        let _ = calls.finish(session, direction);
        OpError::Pkcs11(e)
    })
}
