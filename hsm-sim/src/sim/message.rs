//! Message-based AEAD (PKCS#11 3.0 §5.13, §5.14): `C_MessageEncryptInit` once per session and
//! key, then one `C_EncryptMessage` per message with its own IV, AAD and tag, and the same for
//! decryption. This is what makes a network HSM's Wrap one round trip instead of two. Only
//! AES-GCM with a caller-supplied 12-byte IV and a 128-bit tag; the key is looked up again on
//! every message, so a key destroyed while a session holds a context refuses the next one.

use cryptoki_sys::*;
use ring::aead::{Aad, Nonce, Tag};

use super::operations::gcm_key;
use super::{OpKind, Rv, Sim};

/// One message's GCM parameters, as `CK_GCM_MESSAGE_PARAMS` gives them.
pub(crate) struct GcmMessage<'a> {
    pub(crate) iv: &'a [u8],
    pub(crate) iv_fixed_bits: CK_ULONG,
    pub(crate) iv_generator: CK_GENERATOR_FUNCTION,
    pub(crate) tag_bits: CK_ULONG,
}

impl GcmMessage<'_> {
    fn nonce(&self) -> Result<Nonce, Rv> {
        if self.iv_generator != CKG_NO_GENERATE || self.iv_fixed_bits != 0 || self.tag_bits != 128 {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
        let iv: [u8; 12] = self
            .iv
            .try_into()
            .map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
        Ok(Nonce::assume_unique_for_key(iv))
    }
}

impl Sim {
    /// `C_MessageEncryptInit` / `C_MessageDecryptInit` with `CKM_AES_GCM`.
    pub(crate) fn message_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        kind: OpKind,
        mechanism: CK_MECHANISM_TYPE,
        key: CK_OBJECT_HANDLE,
    ) -> Result<(), Rv> {
        let session = self.session(h)?;
        let active = match kind {
            OpKind::Encrypt => session.message_encrypt,
            OpKind::Decrypt => session.message_decrypt,
            OpKind::Sign => return Err(CKR_FUNCTION_NOT_SUPPORTED),
        };
        if active.is_some() || session.op.as_ref().is_some_and(|o| o.kind() == kind) {
            return Err(CKR_OPERATION_ACTIVE);
        }
        if mechanism != CKM_AES_GCM {
            return Err(CKR_MECHANISM_INVALID);
        }
        let obj = self.object(h, key)?;
        if obj.ulong(CKA_KEY_TYPE) != Some(CKK_AES) {
            return Err(CKR_KEY_TYPE_INCONSISTENT);
        }
        let usage = if kind == OpKind::Encrypt {
            CKA_ENCRYPT
        } else {
            CKA_DECRYPT
        };
        if !obj.flag(usage) {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        if let Some(s) = self.sessions.get_mut(&h) {
            match kind {
                OpKind::Encrypt => s.message_encrypt = Some(key),
                _ => s.message_decrypt = Some(key),
            }
        }
        Ok(())
    }

    /// The key of the session's message context of `kind`.
    fn message_key(&self, h: CK_SESSION_HANDLE, kind: OpKind) -> Result<Vec<u8>, Rv> {
        let session = self.session(h)?;
        let key = match kind {
            OpKind::Encrypt => session.message_encrypt,
            OpKind::Decrypt => session.message_decrypt,
            OpKind::Sign => None,
        }
        .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        // Looked up again: a key destroyed since the init is gone for this context too.
        Ok(self.object(h, key)?.secret.to_vec())
    }

    /// `C_EncryptMessage`: the ciphertext (as long as the plaintext) and the tag.
    pub(crate) fn encrypt_message(
        &self,
        h: CK_SESSION_HANDLE,
        params: &GcmMessage<'_>,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16]), Rv> {
        let nonce = params.nonce()?;
        let key = zeroize::Zeroizing::new(self.message_key(h, OpKind::Encrypt)?);
        let mut out = plaintext.to_vec();
        let tag = gcm_key(&key)?
            .seal_in_place_separate_tag(nonce, Aad::from(aad), &mut out)
            .map_err(|_| CKR_DEVICE_ERROR)?;
        let mut t = [0u8; 16];
        t.copy_from_slice(tag.as_ref());
        Ok((out, t))
    }

    /// `C_DecryptMessage`: the plaintext, if the tag verifies.
    pub(crate) fn decrypt_message(
        &self,
        h: CK_SESSION_HANDLE,
        params: &GcmMessage<'_>,
        tag: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, Rv> {
        let nonce = params.nonce()?;
        let tag: [u8; 16] = tag.try_into().map_err(|_| CKR_MECHANISM_PARAM_INVALID)?;
        let key = zeroize::Zeroizing::new(self.message_key(h, OpKind::Decrypt)?);
        let mut buf = ciphertext.to_vec();
        gcm_key(&key)?
            .open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(tag), &mut buf, 0..)
            .map_err(|_| CKR_ENCRYPTED_DATA_INVALID)?;
        Ok(buf)
    }

    /// `C_MessageEncryptFinal` / `C_MessageDecryptFinal`.
    pub(crate) fn message_final(&mut self, h: CK_SESSION_HANDLE, kind: OpKind) -> Result<(), Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let slot = match kind {
            OpKind::Encrypt => &mut s.message_encrypt,
            _ => &mut s.message_decrypt,
        };
        if slot.is_some() && self.control.sticky_finals > 0 {
            self.control.sticky_finals -= 1;
            return Err(CKR_DEVICE_ERROR);
        }
        slot.take().map(|_| ()).ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }
}
