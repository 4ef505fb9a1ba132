//! The XKS operations that touch keys: Encrypt, Decrypt (with the ciphertext layout and AAD of the
//! module docs), GetHealthStatus's answer, and the request-body helpers they share.

use zeroize::Zeroizing;

use super::wire::XksError;
use super::{
    Audit, GCM_AAD_DOMAIN, HEALTH_SLOW, MAX_AAD, MAX_DATA, METADATA_FORMAT, Prefix, Xks, wire,
};
use crate::envelope::VersionId;

impl Xks {
    pub(super) async fn encrypt(
        &self,
        prefix: &Prefix,
        external_id: &str,
        request: wire::EncryptRequest,
        audit: &mut Audit,
    ) -> Result<Zeroizing<String>, XksError> {
        let plaintext = Zeroizing::new(wire::required(
            "plaintext",
            request.plaintext.as_ref(),
            MAX_DATA,
        )?);
        let aad = wire::optional(
            "additionalAuthenticatedData",
            request.additional_authenticated_data.as_ref(),
            MAX_AAD,
        )?;
        algorithm(request.encryption_algorithm.as_deref())?;
        let cdiv = match request.ciphertext_data_integrity_value_algorithm.as_deref() {
            None => false,
            Some("SHA_256") => true,
            Some(other) => {
                return Err(XksError::Unsupported(format!(
                    "ciphertextDataIntegrityValueAlgorithm {} is not supported; use SHA_256",
                    printable(other)
                )));
            }
        };
        if plaintext.is_empty() {
            return Err(XksError::Validation("plaintext is empty".into()));
        }
        audit.aad_hmac = self.inner.audit.hmac_aad(&aad);
        let (grant, key) = self.authorize(prefix, external_id, audit)?;
        let aad_of = |id: &VersionId| gcm_aad(&aad, &metadata(id));
        let custody = &self.inner.custody;
        let (sealed, integrity) = if cdiv {
            // The value is computed before the check decrypt, as the spec's appendix C asks.
            let sealed = custody
                .seal_raw_checked(&grant, &key, plaintext, aad_of, |s| {
                    integrity_value(&aad, &metadata(&s.version_id), &s.iv, &s.sealed)
                })
                .await;
            audit.access_decided(&grant);
            let (sealed, value) = sealed.map_err(wire::from_custody)?;
            (sealed, Some(value))
        } else {
            let sealed = custody.seal_raw(&grant, &key, plaintext, aad_of).await;
            audit.access_decided(&grant);
            (sealed.map_err(wire::from_custody)?, None)
        };
        audit.key_version = sealed.key_version.clone();
        let metadata = metadata(&sealed.version_id);
        let split = sealed.sealed.len().saturating_sub(16);
        let (ciphertext, tag) = sealed.sealed.split_at(split);
        to_json(&wire::EncryptResponse {
            ciphertext: wire::encode(ciphertext),
            ciphertext_metadata: wire::encode(&metadata),
            initialization_vector: wire::encode(&sealed.iv),
            authentication_tag: wire::encode(tag),
            ciphertext_data_integrity_value: integrity,
        })
    }

    pub(super) async fn decrypt(
        &self,
        prefix: &Prefix,
        external_id: &str,
        request: wire::DecryptRequest,
        audit: &mut Audit,
    ) -> Result<Zeroizing<String>, XksError> {
        algorithm(request.encryption_algorithm.as_deref())?;
        let ciphertext = wire::required("ciphertext", request.ciphertext.as_ref(), MAX_DATA)?;
        let aad = wire::optional(
            "additionalAuthenticatedData",
            request.additional_authenticated_data.as_ref(),
            MAX_AAD,
        )?;
        let iv = wire::required(
            "initializationVector",
            request.initialization_vector.as_ref(),
            16,
        )?;
        let tag = wire::required("authenticationTag", request.authentication_tag.as_ref(), 16)?;
        let metadata = wire::optional(
            "ciphertextMetadata",
            request.ciphertext_metadata.as_ref(),
            20,
        )?;
        audit.aad_hmac = self.inner.audit.hmac_aad(&aad);
        let (grant, key) = self.authorize(prefix, external_id, audit)?;
        let invalid = |what: &str| {
            XksError::InvalidCiphertext(format!(
                "the ciphertext, its metadata, IV, tag or AAD is not valid: {what}"
            ))
        };
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| invalid("this proxy writes 12-byte IVs"))?;
        if tag.len() != 16 {
            return Err(invalid("the tag must be 16 bytes"));
        }
        let version = match metadata.as_slice() {
            [METADATA_FORMAT, id @ ..] => {
                VersionId(<[u8; 16]>::try_from(id).map_err(|_| invalid("ciphertextMetadata"))?)
            }
            _ => {
                return Err(invalid(
                    "ciphertextMetadata is missing or not from this proxy",
                ));
            }
        };
        let mut sealed = ciphertext;
        sealed.extend_from_slice(&tag);
        let opened = self
            .inner
            .custody
            .open_raw(&grant, &key, &version, iv, sealed, gcm_aad(&aad, &metadata))
            .await;
        audit.access_decided(&grant);
        let (plaintext, key_version) = opened.map_err(wire::from_custody)?;
        audit.key_version = key_version;
        Ok(wire::decrypt_response(&plaintext))
    }

    pub(super) async fn health_answer(&self) -> Result<Zeroizing<String>, XksError> {
        let health = self.health().await;
        let status = match (health.ok, health.took > HEALTH_SLOW) {
            (false, _) => "UNAVAILABLE",
            (true, true) => "DEGRADED",
            (true, false) => "ACTIVE",
        };
        let (vendor, id, model) = match &health.token {
            Some(t) => (
                t.manufacturer.clone(),
                t.serial.clone(),
                format!("{} (firmware {})", t.model, t.firmware),
            ),
            None => ("unknown".into(), "unknown".into(), "unknown".into()),
        };
        to_json(&wire::HealthResponse {
            xks_proxy_fleet_size: health.fleet,
            xks_proxy_vendor: "Tresor".into(),
            xks_proxy_model: format!("Tresor XKS proxy {}", env!("CARGO_PKG_VERSION")),
            ekm_vendor: vendor,
            ekm_fleet_details: vec![wire::EkmDetails {
                id,
                model,
                health_status: status,
            }],
        })
    }
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, XksError> {
    // Only the kind of error and its position: serde's own message can quote a value.
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "not well-formed JSON"
            }
            serde_json::error::Category::Data => "a field has the wrong type",
            serde_json::error::Category::Io => "unreadable",
        };
        XksError::Validation(format!(
            "the body is not the API's JSON: {what} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> Result<Zeroizing<String>, XksError> {
    serde_json::to_string(value)
        .map(Zeroizing::new)
        .map_err(|e| XksError::Internal(format!("cannot encode the answer: {e}")))
}

pub(super) fn algorithm(value: Option<&str>) -> Result<(), XksError> {
    match value {
        Some("AES_GCM") => Ok(()),
        None => Err(XksError::Validation(
            "encryptionAlgorithm is required".into(),
        )),
        Some(other) => Err(XksError::Unsupported(format!(
            "encryptionAlgorithm {} is not supported; use AES_GCM",
            printable(other)
        ))),
    }
}

/// The spec's `ciphertextDataIntegrityValue`: base64 of SHA-256 over AAD, metadata, IV,
/// ciphertext and tag (`sealed` is ciphertext followed by the tag).
fn integrity_value(aad: &[u8], metadata: &[u8], iv: &[u8], sealed: &[u8]) -> String {
    let mut hashed = Vec::with_capacity(aad.len() + metadata.len() + iv.len() + sealed.len());
    hashed.extend_from_slice(aad);
    hashed.extend_from_slice(metadata);
    hashed.extend_from_slice(iv);
    hashed.extend_from_slice(sealed);
    wire::encode(ring::digest::digest(&ring::digest::SHA256, &hashed).as_ref())
}

/// `ciphertextMetadata`: format byte and version id.
pub(super) fn metadata(id: &VersionId) -> Vec<u8> {
    let mut m = Vec::with_capacity(17);
    m.push(METADATA_FORMAT);
    m.extend_from_slice(&id.0);
    m
}

/// The GCM AAD of an XKS ciphertext (module docs).
pub(super) fn gcm_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(GCM_AAD_DOMAIN.len() + 3 + aad.len() + metadata.len());
    out.extend_from_slice(GCM_AAD_DOMAIN);
    out.extend_from_slice(&u16::try_from(aad.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(u8::try_from(metadata.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(metadata);
    out
}

/// At most 64 printable ASCII characters of caller input, for error messages.
pub(super) fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::VersionId;

    #[test]
    fn the_gcm_aad_separates_aad_from_metadata_and_from_tresor_blobs() {
        let meta = metadata(&VersionId([9; 16]));
        assert_eq!(meta.len(), 17);
        // The spec's example of moving metadata into the AAD must not authenticate.
        assert_ne!(gcm_aad(b"", &meta), gcm_aad(&meta, b""));
        assert_ne!(gcm_aad(b"ab", b"c"), gcm_aad(b"a", b"bc"));
        let a = gcm_aad(b"project=nile", &meta);
        assert!(a.starts_with(GCM_AAD_DOMAIN));
        assert_eq!(&a[GCM_AAD_DOMAIN.len()..GCM_AAD_DOMAIN.len() + 2], &[0, 12]);
        let blob_aad =
            crate::envelope::gcm_aad(&VersionId([9; 16]), "tenants/t/keys/k/versions/1", b"x");
        assert!(!blob_aad.starts_with(GCM_AAD_DOMAIN));
    }
}
