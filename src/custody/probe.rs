//! What a front-end's deep health check asks of the HSM and the database, as custody
//! operations, so that no front-end holds either: a probe key of its own, one encryption and
//! decryption under it, the token's description, and this node's place in the fleet.
//!
//! A probe key is never a key that protects data: an AES key of its own in the HSM, found by
//! a row in `audit_keys` so every node uses the same one, and used only to show that the HSM
//! encrypts (the XKS specification asks for a test key).

use zeroize::Zeroizing;

use super::{Custody, CustodyError};
use crate::hsm::{ObjectId, TokenDescription};
use crate::model::Millis;
use crate::store::StoreError;

/// A probe key: an HSM AES key that protects nothing.
#[derive(Debug, Clone, Copy)]
pub struct ProbeKey(ObjectId);

const PROBE_AAD: &[u8] = b"tresor health probe";

impl Custody {
    /// The probe key recorded under `purpose`, created (label `tresor-{scope}/{installation}
    /// /health`) if there is none yet or its HSM object is gone. Nodes starting together
    /// agree on one: the row that commits first wins, the others destroy theirs.
    pub async fn probe_key(&self, purpose: &str, scope: &str) -> Result<ProbeKey, CustodyError> {
        let store = &self.inner.store;
        let hsm = &self.inner.hsm;
        let label = format!("tresor-{scope}/{}/health", store.installation_id());
        if let Some(id) = self.recorded_probe_key(purpose).await? {
            if !hsm.secret_key_exists(id).await? {
                hsm.generate_version_key(id, label).await?;
            }
            return Ok(ProbeKey(id));
        }
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| CustodyError::Internal("no system randomness".into()))?;
        let id = ObjectId(raw);
        hsm.generate_version_key(id, label).await?;
        match store.insert_audit_key(purpose, &id.to_string(), "").await {
            Ok(()) => Ok(ProbeKey(id)),
            Err(StoreError::AlreadyExists) => {
                // Another node created one first: use it, drop ours.
                self.discard_probe_object(id).await;
                self.recorded_probe_key(purpose)
                    .await?
                    .map(ProbeKey)
                    .ok_or_else(|| CustodyError::Internal(format!("the {purpose} key vanished")))
            }
            Err(e) => {
                self.discard_probe_object(id).await;
                Err(e.into())
            }
        }
    }

    async fn recorded_probe_key(&self, purpose: &str) -> Result<Option<ObjectId>, CustodyError> {
        let Some((id, _)) = self.inner.store.audit_key(purpose).await? else {
            return Ok(None);
        };
        crate::model::from_hex_array(&id)
            .map(|raw| Some(ObjectId(raw)))
            .ok_or_else(|| {
                CustodyError::Internal(format!(
                    "the recorded {purpose} key id is not 16 bytes of hex"
                ))
            })
    }

    async fn discard_probe_object(&self, id: ObjectId) {
        if let Err(e) = self.inner.hsm.destroy_secret_key(id).await {
            tracing::warn!(object = %id, error = %e, "could not destroy an unused probe key; it protects nothing and can be removed by hand");
        }
    }

    /// One AES-GCM encryption and decryption of fresh random bytes under the probe key.
    pub async fn probe(&self, key: ProbeKey) -> Result<(), CustodyError> {
        let hsm = &self.inner.hsm;
        let plaintext = hsm.random(32).await?;
        let iv: [u8; 12] = hsm
            .random(12)
            .await?
            .as_slice()
            .try_into()
            .map_err(|_| CustodyError::Internal("the HSM returned no IV".into()))?;
        let sealed = hsm
            .encrypt_gcm(key.0, iv, PROBE_AAD.to_vec(), plaintext.clone())
            .await?;
        let opened: Zeroizing<Vec<u8>> = hsm
            .decrypt_gcm(key.0, iv, PROBE_AAD.to_vec(), sealed)
            .await?;
        if opened != plaintext {
            return Err(CustodyError::Internal(
                "the probe key did not decrypt what it encrypted".into(),
            ));
        }
        Ok(())
    }

    /// The token's manufacturer, model and firmware.
    pub async fn token_description(&self) -> Result<TokenDescription, CustodyError> {
        Ok(self.inner.hsm.token_description().await?)
    }

    /// Records `node` as alive now and returns how many nodes were alive within the last
    /// `window_ms` (at least 1: this one).
    pub async fn record_alive(&self, node: &str, window_ms: Millis) -> Result<u64, CustodyError> {
        let now = self.now();
        self.inner.store.heartbeat(node, now).await?;
        Ok(self.inner.store.live_nodes(now - window_ms).await?.max(1))
    }
}
