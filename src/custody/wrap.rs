//! The hot path: wrap, unwrap, data keys and rewrap, and the raw AES-GCM the XKS proxy uses. Reads
//! the cache, then calls the HSM with no lock held.

use std::sync::Arc;

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use super::cache::{KeyEntry, Take, VersionEntry};
use super::{
    Custody, CustodyError, DATA_KEY_LEN_RANGE, DataKey, RawSealed, Rewrapped, Unwrapped, Wrapped,
    authorize, check_aad, check_plaintext, usable,
};
use crate::auth::{Grant, Role};
use crate::envelope::{self, IV_LEN, VersionId};
use crate::hsm::{HsmError, ObjectId};
use crate::model::{KeyName, KeyUsage, VersionState};
use crate::sync::read;

impl Custody {
    // ---- service operations (the hot path) ----------------------------------------------

    /// Wraps `plaintext` (1 byte to 64 KiB) under the key's primary version, binding `aad`.
    pub async fn wrap(
        &self,
        grant: &Grant,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad: &[u8],
    ) -> Result<Wrapped, CustodyError> {
        authorize(grant, Role::Service, name)?;
        self.check_access(grant, name.key()).await?;
        self.wrap_authorized(name, plaintext, aad).await
    }

    /// Wrap, once the caller's grant was checked for `name`.
    pub(super) async fn wrap_authorized(
        &self,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad: &[u8],
    ) -> Result<Wrapped, CustodyError> {
        check_plaintext(&plaintext)?;
        check_aad(aad)?;
        let (version, iv, sealed) = self
            .seal_under_primary(name, plaintext, |v| {
                envelope::gcm_aad(&v.id, &v.full_name, aad)
            })
            .await?;
        Ok(Wrapped {
            ciphertext: envelope::encode(&version.id, &iv, &sealed),
            key_version: version.full_name.to_string(),
        })
    }

    /// Unwraps a blob with the AAD given at wrap time. The version comes from the blob; with
    /// `expected_key`, a blob of any other key is refused before the HSM is asked.
    pub async fn unwrap(
        &self,
        grant: &Grant,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<Unwrapped, CustodyError> {
        let (plaintext, version, _) = self.open_blob(grant, ciphertext, aad, expected_key).await?;
        Ok(Unwrapped {
            plaintext,
            key_version: version.full_name.to_string(),
        })
    }

    /// Draws `len` random bytes from the HSM and wraps them under the key's primary version.
    pub async fn generate_data_key(
        &self,
        grant: &Grant,
        name: &KeyName,
        aad: &[u8],
        len: usize,
        with_plaintext: bool,
    ) -> Result<DataKey, CustodyError> {
        if !DATA_KEY_LEN_RANGE.contains(&len) {
            return Err(CustodyError::InvalidArgument(format!(
                "data key length must be {} to {} bytes, not {len}",
                DATA_KEY_LEN_RANGE.start(),
                DATA_KEY_LEN_RANGE.end()
            )));
        }
        authorize(grant, Role::Service, name)?;
        check_aad(aad)?;
        self.check_access(grant, name.key()).await?;
        // Fail on an unknown key before spending HSM randomness (a key another node has just
        // created is read first).
        self.fresh_entry(name).await?;
        let key = self.inner.hsm.random(len).await?;
        let wrapped = self
            .wrap_authorized(name, Zeroizing::new(key.to_vec()), aad)
            .await?;
        Ok(DataKey {
            plaintext: with_plaintext.then_some(key),
            ciphertext: wrapped.ciphertext,
            key_version: wrapped.key_version,
        })
    }

    /// Re-wraps a blob under its key's primary version. A blob already under the primary
    /// version is still authenticated, then returned unchanged with `rewrapped = false`.
    pub async fn rewrap(
        &self,
        grant: &Grant,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<Rewrapped, CustodyError> {
        let (plaintext, version, opened) =
            self.open_blob(grant, ciphertext, aad, expected_key).await?;
        // Re-read: the primary may have moved while the HSM decrypted.
        let current = self.entry(&opened.name)?;
        // Rewrap is decrypt-then-encrypt even when the blob needs no new wrap: a key that may
        // not encrypt answers no rewrap at all.
        if !current.usage.encrypts() {
            return Err(CustodyError::UsageForbidden {
                key: opened.name.to_string(),
                usage: current.usage,
                operation: "encrypt",
            });
        }
        let primary = current.primary;
        if version.number == primary {
            return Ok(Rewrapped {
                ciphertext: ciphertext.to_vec(),
                key_version: version.full_name.to_string(),
                rewrapped: false,
            });
        }
        let wrapped = self.wrap_authorized(&opened.name, plaintext, aad).await?;
        Ok(Rewrapped {
            ciphertext: wrapped.ciphertext,
            key_version: wrapped.key_version,
            rewrapped: true,
        })
    }

    /// Encrypts under the primary version of an authorized key (usage, state and wrap budget
    /// checked, a fresh random IV) with the GCM AAD `aad_for` builds for that version.
    pub(super) async fn seal_under_primary(
        &self,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad_for: impl FnOnce(&VersionEntry) -> Vec<u8>,
    ) -> Result<(Arc<VersionEntry>, [u8; IV_LEN], Vec<u8>), CustodyError> {
        let version = {
            let entry = self.fresh_entry(name).await?;
            if !entry.usage.encrypts() {
                return Err(CustodyError::UsageForbidden {
                    key: name.to_string(),
                    usage: entry.usage,
                    operation: "encrypt",
                });
            }
            let primary = entry.primary_version().cloned();
            primary.ok_or_else(|| CustodyError::VersionNotFound(name.version(entry.primary)))?
        };
        usable(&version)?;
        match version.wraps.take(&self.inner.store, &version.id).await? {
            Take::Granted => {}
            Take::Exhausted => {
                return Err(CustodyError::VersionExhausted(
                    version.full_name.to_string(),
                ));
            }
        }
        let mut iv = [0u8; IV_LEN];
        self.inner
            .rng
            .fill(&mut iv)
            .map_err(|_| CustodyError::Internal("no system randomness".into()))?;
        let full_aad = aad_for(&version);
        let sealed = self
            .inner
            .hsm
            .encrypt_gcm(ObjectId(version.id.0), iv, full_aad, plaintext)
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        Ok((version, iv, sealed))
    }

    /// Parses, resolves, authorizes and decrypts a blob; returns the plaintext, its version and
    /// the snapshot of its key that was checked.
    pub(super) async fn open_blob(
        &self,
        grant: &Grant,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<(Zeroizing<Vec<u8>>, Arc<VersionEntry>, Arc<KeyEntry>), CustodyError> {
        grant.require(Role::Service)?;
        if let Some(expected) = expected_key {
            grant.check_key(expected)?;
        }
        check_aad(aad)?;
        self.open_blob_allowed(
            &|key| grant.allows_key(key),
            Some(grant),
            ciphertext,
            aad,
            expected_key,
        )
        .await
    }

    /// [`Custody::open_blob`] once the caller was authorized: `allows` says which keys the
    /// blob may belong to; with `rules`, that grant's access rules are asked about the blob's
    /// key before the HSM is (custody's own blobs, a managed object's material, have none).
    pub(super) async fn open_blob_allowed(
        &self,
        allows: &(dyn Fn(&KeyName) -> bool + Sync),
        rules: Option<&Grant>,
        ciphertext: &[u8],
        aad: &[u8],
        expected_key: Option<&KeyName>,
    ) -> Result<(Zeroizing<Vec<u8>>, Arc<VersionEntry>, Arc<KeyEntry>), CustodyError> {
        let blob = envelope::parse(ciphertext).map_err(CustodyError::MalformedCiphertext)?;
        let (version, entry) = self
            .decrypting_version(allows, &blob.version_id, expected_key)
            .await?;
        if let Some(grant) = rules {
            self.check_access(grant, entry.name.key()).await?;
        }
        let full_aad = envelope::gcm_aad(&version.id, &version.full_name, aad);
        let plaintext = self
            .inner
            .hsm
            .decrypt_gcm(
                ObjectId(version.id.0),
                blob.iv,
                full_aad,
                blob.sealed.to_vec(),
            )
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        Ok((plaintext, version, entry))
    }

    /// The version that may decrypt a ciphertext naming `id`: known (re-read if stale or new
    /// on another node), of `expected_key` when given, covered by the grant, of a key whose
    /// usage allows decrypt, at or above the minimum decryption version, and usable.
    pub(super) async fn decrypting_version(
        &self,
        allows: &(dyn Fn(&KeyName) -> bool + Sync),
        id: &VersionId,
        expected_key: Option<&KeyName>,
    ) -> Result<(Arc<VersionEntry>, Arc<KeyEntry>), CustodyError> {
        self.check_current()?;
        self.refresh_for_version(id).await?;
        let (version, entry) = {
            let cache = read(&self.inner.cache);
            let key = cache.versions.get(id).ok_or(CustodyError::UnknownVersion)?;
            if let Some(expected) = expected_key
                && expected != key
            {
                return Err(CustodyError::WrongKey {
                    expected: expected.to_string(),
                });
            }
            if !allows(key) {
                return Err(CustodyError::ForeignBlob { key: key.clone() });
            }
            let entry = cache.keys.get(key).ok_or(CustodyError::UnknownVersion)?;
            entry.check_seal()?;
            if !entry.usage.decrypts() {
                return Err(CustodyError::UsageForbidden {
                    key: key.to_string(),
                    usage: entry.usage,
                    operation: "decrypt",
                });
            }
            let version = entry
                .versions
                .iter()
                .find(|v| v.id == *id)
                .cloned()
                .ok_or(CustodyError::UnknownVersion)?;
            if version.number < entry.min_decryption_version {
                return Err(CustodyError::VersionBelowMinimum(
                    version.full_name.to_string(),
                ));
            }
            (version, Arc::clone(entry))
        };
        usable(&version)?;
        Ok((version, entry))
    }

    /// The key a blob names, if this node knows its version; `None` for anything else. For a
    /// front-end's audit record of a failed call only (which key was tried): never an answer
    /// to the caller.
    pub fn key_of_blob(&self, ciphertext: &[u8]) -> Option<KeyName> {
        let blob = envelope::parse(ciphertext).ok()?;
        read(&self.inner.cache)
            .versions
            .get(&blob.version_id)
            .cloned()
    }

    // ---- raw AES-GCM for the XKS proxy --------------------------------------------------

    /// A key's usage and whether its primary version can encrypt now (enabled, not lost or
    /// worn out), for a service caller (the XKS proxy's GetKeyMetadata).
    pub async fn usage_and_state(
        &self,
        grant: &Grant,
        name: &KeyName,
    ) -> Result<(KeyUsage, bool), CustodyError> {
        authorize(grant, Role::Service, name)?;
        let entry = self.fresh_entry(name).await?;
        let enabled = entry.primary_version().is_some_and(|v| usable(v).is_ok());
        Ok((entry.usage, enabled))
    }

    /// Encrypts `plaintext` under the key's primary version with the GCM AAD `aad_for` builds
    /// from the version id (the XKS proxy binds it; see `crate::xks`). Same rules as
    /// [`Custody::wrap`] (grant, usage, version state, wrap budget); no Tresor blob.
    pub async fn seal_raw(
        &self,
        grant: &Grant,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad_for: impl FnOnce(&VersionId) -> Vec<u8>,
    ) -> Result<RawSealed, CustodyError> {
        authorize(grant, Role::Service, name)?;
        check_plaintext(&plaintext)?;
        self.check_access(grant, name.key()).await?;
        let (version, iv, sealed) = self
            .seal_under_primary(name, plaintext, |v| aad_for(&v.id))
            .await?;
        Ok(RawSealed {
            version_id: version.id,
            key_version: version.full_name.to_string(),
            iv,
            sealed,
        })
    }

    /// [`Custody::seal_raw`], then a check decrypt of the fresh ciphertext with the same
    /// version and AAD, which must give `plaintext` back (the XKS proxy's
    /// `ciphertextDataIntegrityValue`). `digest` sees the ciphertext before the check, so a
    /// corruption after it is caught by the check, not folded into the digest. The check is
    /// Tresor verifying its own output, not a use of the key: it runs also on a key whose usage
    /// is `encrypt`, and only inside this call, so it is no decryption service.
    pub async fn seal_raw_checked<T>(
        &self,
        grant: &Grant,
        name: &KeyName,
        plaintext: Zeroizing<Vec<u8>>,
        aad_for: impl FnOnce(&VersionId) -> Vec<u8>,
        digest: impl FnOnce(&RawSealed) -> T,
    ) -> Result<(RawSealed, T), CustodyError> {
        authorize(grant, Role::Service, name)?;
        check_plaintext(&plaintext)?;
        self.check_access(grant, name.key()).await?;
        let mut full_aad = Vec::new();
        let (version, iv, sealed) = self
            .seal_under_primary(name, plaintext.clone(), |v| {
                full_aad = aad_for(&v.id);
                full_aad.clone()
            })
            .await?;
        let raw = RawSealed {
            version_id: version.id,
            key_version: version.full_name.to_string(),
            iv,
            sealed,
        };
        let value = digest(&raw);
        let again = self
            .inner
            .hsm
            .decrypt_gcm(ObjectId(version.id.0), iv, full_aad, raw.sealed.clone())
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        if again != plaintext {
            return Err(CustodyError::Internal(format!(
                "the check decrypt of a fresh ciphertext of {} did not give the plaintext back",
                version.full_name
            )));
        }
        Ok((raw, value))
    }

    /// Decrypts what [`Custody::seal_raw`] produced under version `id` of key `name`. Same
    /// rules as [`Custody::unwrap`]; a version of another key is [`CustodyError::WrongKey`].
    pub async fn open_raw(
        &self,
        grant: &Grant,
        name: &KeyName,
        id: &VersionId,
        iv: [u8; IV_LEN],
        sealed: Vec<u8>,
        full_aad: Vec<u8>,
    ) -> Result<(Zeroizing<Vec<u8>>, String), CustodyError> {
        grant.require(Role::Service)?;
        grant.check_key(name)?;
        let (version, _) = self
            .decrypting_version(&|key| grant.allows_key(key), id, Some(name))
            .await?;
        self.check_access(grant, name.key()).await?;
        let plaintext = self
            .inner
            .hsm
            .decrypt_gcm(ObjectId(version.id.0), iv, full_aad, sealed)
            .await
            .map_err(|e| self.hsm_failure(&version, e))?;
        Ok((plaintext, version.full_name.to_string()))
    }

    /// Maps an HSM failure on a version's key; a missing object marks the version lost.
    pub(super) fn hsm_failure(&self, version: &VersionEntry, e: HsmError) -> CustodyError {
        match e {
            HsmError::BadCiphertext => CustodyError::Unauthentic,
            HsmError::ObjectNotFound(_) => {
                let custody = self.clone();
                let id = version.id;
                tokio::spawn(async move { custody.mark_lost(id).await });
                CustodyError::VersionLost(version.full_name.to_string())
            }
            e => CustodyError::Hsm(e),
        }
    }

    /// Records that a version's HSM object is gone, in the database and the cache.
    pub(super) async fn mark_lost(&self, id: VersionId) {
        let result = self
            .admin(move |c| async move {
                let Some(name) = c.inner.cache_key_of(&id) else { return Ok(()) };
                let entry = c.entry(&name)?;
                let Some(v) = entry.versions.iter().find(|v| v.id == id).cloned() else { return Ok(()) };
                if v.lost_at.is_some() || v.state == VersionState::Destroyed {
                    return Ok(());
                }
                let now = c.now();
                c.inner.store.set_lost(&id, Some(now)).await?;
                tracing::error!(version = %v.full_name, "HSM object of key version is missing: version marked LOST; blobs it wrapped cannot be unwrapped until the object is restored");
                c.publish(entry.with_version(v.number, |v| VersionEntry { lost_at: Some(now), ..v.clone() }));
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::error!(version_id = %id, error = %e, "could not record a lost key version");
        }
    }
}
