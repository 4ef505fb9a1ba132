//! KMIP's Encrypt and Decrypt: AES-GCM in the Tresor process with a managed object's opened
//! key (ring), for clients that let the server do the cryptography.
//!
//! Owns the state and usage-mask rules of such a use and the IV (always the server's). Opens
//! the key only through [`Custody::object_material`], so every rule of a Get applies first.

use zeroize::Zeroizing;

use super::{Custody, CustodyError, ManagedObject, ObjectState};
use crate::auth::Grant;

/// KMIP's usage mask bits for Encrypt and Decrypt.
const USAGE_ENCRYPT: u32 = 0x04;
const USAGE_DECRYPT: u32 = 0x08;

fn gcm_key(material: &[u8]) -> Result<ring::aead::LessSafeKey, CustodyError> {
    let algorithm = match material.len() {
        16 => &ring::aead::AES_128_GCM,
        32 => &ring::aead::AES_256_GCM,
        _ => {
            return Err(CustodyError::InvalidArgument(
                "AES-GCM here takes 128- or 256-bit keys; this object is 192 bits".into(),
            ));
        }
    };
    ring::aead::UnboundKey::new(algorithm, material)
        .map(ring::aead::LessSafeKey::new)
        .map_err(|_| CustodyError::Internal("AES key setup failed".into()))
}

/// Refuses a use of `object` outside `states` or without `usage` in its mask.
fn check_use(
    object: &ManagedObject,
    states: &[ObjectState],
    usage: u32,
    operation: &'static str,
) -> Result<(), CustodyError> {
    if !states.contains(&object.state) {
        return Err(CustodyError::ObjectNotUsable {
            id: object.id.clone(),
            state: object.state,
            operation,
        });
    }
    if object.usage_mask & usage == 0 {
        return Err(CustodyError::InvalidArgument(format!(
            "object {}'s usage mask does not allow {operation}",
            object.id
        )));
    }
    Ok(())
}

impl Custody {
    /// AES-GCM under an Active object whose usage mask allows Encrypt, for a client that lets
    /// the server do the cryptography: the IV is always the server's (12 random bytes), so no
    /// client can make it repeat one. Returns (IV, ciphertext, 16-byte tag).
    pub async fn encrypt_with_object(
        &self,
        grant: &Grant,
        wrapping_key: &str,
        id: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<(ManagedObject, [u8; 12], Vec<u8>, Vec<u8>), CustodyError> {
        super::checks::check_plaintext(plaintext)?;
        super::checks::check_aad(aad)?;
        let (object, material) = self.object_material(grant, wrapping_key, id).await?;
        check_use(&object, &[ObjectState::Active], USAGE_ENCRYPT, "encrypt")?;
        let iv = self.random_bytes::<12>()?;
        let key = gcm_key(&material)?;
        let mut sealed = plaintext.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(iv),
                ring::aead::Aad::from(aad),
                &mut sealed,
            )
            .map_err(|_| CustodyError::Internal("AES-GCM sealing failed".into()))?;
        Ok((object, iv, sealed, tag.as_ref().to_vec()))
    }

    /// Opens AES-GCM output of [`Custody::encrypt_with_object`] under an object that is
    /// Active, Deactivated or Compromised (old data stays readable) and allows Decrypt.
    pub async fn decrypt_with_object(
        &self,
        grant: &Grant,
        wrapping_key: &str,
        id: &str,
        (iv, ciphertext, tag): (&[u8], &[u8], &[u8]),
        aad: &[u8],
    ) -> Result<(ManagedObject, Zeroizing<Vec<u8>>), CustodyError> {
        super::checks::check_aad(aad)?;
        let (object, material) = self.object_material(grant, wrapping_key, id).await?;
        check_use(
            &object,
            &[
                ObjectState::Active,
                ObjectState::Deactivated,
                ObjectState::Compromised,
            ],
            USAGE_DECRYPT,
            "decrypt",
        )?;
        let iv: [u8; 12] = iv.try_into().map_err(|_| {
            CustodyError::InvalidArgument("the IV must be the 12 bytes Encrypt returned".into())
        })?;
        if tag.len() != 16 || ciphertext.len() > crate::envelope::MAX_PLAINTEXT_LEN {
            return Err(CustodyError::InvalidArgument(
                "the tag must be 16 bytes and the data at most 64 KiB".into(),
            ));
        }
        let key = gcm_key(&material)?;
        let mut opened = Zeroizing::new([ciphertext, tag].concat());
        let len = key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(iv),
                ring::aead::Aad::from(aad),
                &mut opened,
            )
            .map_err(|_| CustodyError::ObjectDataUnauthentic(id.to_owned()))?
            .len();
        opened.truncate(len);
        Ok((object, opened))
    }
}
