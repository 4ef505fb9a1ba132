//! Single-part cryptographic operations: init, output length, finish and abort of encrypt,
//! decrypt, sign and digest-and-sign, and random bytes.

use cryptoki_sys::*;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::{Mechanism, Op, OpKind, Rv, Sim};

impl Sim {
    // ---- single-part operations ------------------------------------------------------------

    pub(crate) fn op_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        mech: Mechanism,
        key: CK_OBJECT_HANDLE,
    ) -> Result<(), Rv> {
        let session = self.session(h)?;
        // One encryption (or decryption) operation per session, single-part or message-based.
        let message_active = match kind {
            OpKind::Encrypt => session.message_encrypt.is_some(),
            OpKind::Decrypt => session.message_decrypt.is_some(),
            OpKind::Sign => false,
        };
        if session.op.is_some() || message_active {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let obj = self.object(h, key)?;
        let usage = match kind {
            OpKind::Encrypt => CKA_ENCRYPT,
            OpKind::Decrypt => CKA_DECRYPT,
            OpKind::Sign => CKA_SIGN,
        };
        let class = obj.ulong(CKA_CLASS);
        let key_type = obj.ulong(CKA_KEY_TYPE);
        let op = match (kind, mech) {
            (OpKind::Encrypt | OpKind::Decrypt, Mechanism::AesGcm { iv, aad, tag_bits }) => {
                if key_type != Some(CKK_AES) {
                    return Err(CKR_KEY_TYPE_INCONSISTENT);
                }
                let iv: [u8; 12] = iv
                    .as_slice()
                    .try_into()
                    .map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
                if tag_bits != 128 {
                    return Err(CKR_MECHANISM_PARAM_INVALID);
                }
                let key = obj.secret.clone();
                if kind == OpKind::Encrypt {
                    Op::Encrypt { key, iv, aad }
                } else {
                    Op::Decrypt { key, iv, aad }
                }
            }
            (OpKind::Sign, Mechanism::EcdsaSha256) => {
                if class != Some(CKO_PRIVATE_KEY) || key_type != Some(CKK_EC) {
                    return Err(CKR_KEY_TYPE_INCONSISTENT);
                }
                Op::SignEcdsa {
                    pkcs8: obj.secret.clone(),
                }
            }
            (OpKind::Sign, Mechanism::Sha256Hmac) => {
                if key_type != Some(CKK_GENERIC_SECRET) {
                    return Err(CKR_KEY_TYPE_INCONSISTENT);
                }
                Op::SignHmac {
                    key: obj.secret.clone(),
                }
            }
            (_, Mechanism::Other) => return Err(CKR_MECHANISM_INVALID),
            _ => return Err(CKR_KEY_FUNCTION_NOT_PERMITTED),
        };
        if !obj.flag(usage) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        if let Some(s) = self.sessions.get_mut(&h) {
            s.op = Some(op);
        }
        Ok(())
    }

    /// The output length of the active operation for `input_len` bytes, without running it.
    pub(crate) fn op_output_len(
        &self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        input_len: usize,
    ) -> Result<usize, Rv> {
        let op = self
            .session(h)?
            .op
            .as_ref()
            .filter(|o| o.kind() == kind)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        Ok(match op {
            Op::Encrypt { .. } => input_len + 16,
            Op::Decrypt { .. } => input_len
                .checked_sub(16)
                .ok_or(CKR_ENCRYPTED_DATA_LEN_RANGE)?,
            Op::SignEcdsa { .. } => 64,
            Op::SignHmac { .. } => 32,
        })
    }

    /// Runs the active operation and ends it, whatever the outcome.
    pub(crate) fn op_finish(
        &mut self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        input: &[u8],
    ) -> Result<Vec<u8>, Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        if s.op.as_ref().is_none_or(|o| o.kind() != kind) {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        }
        let Some(op) = s.op.take() else {
            return Err(CKR_OPERATION_NOT_INITIALIZED);
        };
        match op {
            Op::Encrypt { key, iv, aad } => {
                let mut out = input.to_vec();
                gcm_key(&key)?
                    .seal_in_place_append_tag(
                        Nonce::assume_unique_for_key(iv),
                        Aad::from(aad),
                        &mut out,
                    )
                    .map_err(|_| CKR_DEVICE_ERROR)?;
                Ok(out)
            }
            Op::Decrypt { key, iv, aad } => {
                if input.len() < 16 {
                    return Err(CKR_ENCRYPTED_DATA_LEN_RANGE);
                }
                let mut buf = input.to_vec();
                let n = gcm_key(&key)?
                    .open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(aad), &mut buf)
                    .map_err(|_| CKR_ENCRYPTED_DATA_INVALID)?
                    .len();
                buf.truncate(n);
                Ok(buf)
            }
            Op::SignEcdsa { pkcs8 } => {
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &self.rng)
                        .map_err(|_| CKR_DEVICE_ERROR)?;
                Ok(pair
                    .sign(&self.rng, input)
                    .map_err(|_| CKR_DEVICE_ERROR)?
                    .as_ref()
                    .to_vec())
            }
            Op::SignHmac { key } => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
                Ok(ring::hmac::sign(&k, input).as_ref().to_vec())
            }
        }
    }

    /// Ends the active operation of this kind (after a failed output-length query).
    pub(crate) fn op_abort(&mut self, h: CK_SESSION_HANDLE) {
        if let Some(s) = self.sessions.get_mut(&h) {
            s.op = None;
        }
    }

    pub(crate) fn random(&self, h: CK_SESSION_HANDLE, out: &mut [u8]) -> Result<(), Rv> {
        self.session(h)?;
        self.rng.fill(out).map_err(|_| CKR_DEVICE_ERROR)
    }
}

pub(super) fn gcm_key(key: &[u8]) -> Result<LessSafeKey, Rv> {
    let alg = match key.len() {
        16 => &AES_128_GCM,
        32 => &AES_256_GCM,
        _ => return Err(CKR_KEY_SIZE_RANGE),
    };
    Ok(LessSafeKey::new(
        UnboundKey::new(alg, key).map_err(|_| CKR_KEY_SIZE_RANGE)?,
    ))
}
