//! Client certificates: verifying a presented chain against the client CA and naming the
//! caller (URI SAN, else subject CN), remembering chains that verified, and the TLS-layer
//! verifier that only checks possession of the key. Knows nothing of the policy or of grants.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use super::{AuthError, Identity};
use crate::sync::lock;

/// Verifies client certificates against the client CA and names the caller.
#[derive(Debug, Clone)]
pub struct ClientAuthenticator {
    verifier: Arc<dyn ClientCertVerifier>,
    /// Chains that verified, by the SHA-256 of the chain: a connection presents the same chain
    /// on every request, and verifying its signatures each time cost a fifth of the server's
    /// CPU. An entry lives until the earliest `notAfter` in the chain, at most
    /// [`VERIFIED_TTL_SECS`]; failures are never cached.
    verified: Arc<std::sync::Mutex<VerifiedChains>>,
}

/// Chain hash → (identity, Unix second until which it may be trusted).
type VerifiedChains = HashMap<[u8; 32], (Identity, u64)>;

/// Longest a verified chain is trusted without verifying it again.
pub const VERIFIED_TTL_SECS: u64 = 300;
const VERIFIED_MAX_ENTRIES: usize = 4096;

impl ClientAuthenticator {
    /// Trusts client certificates issued by these CA certificates.
    pub fn new(client_ca: &[CertificateDer<'static>]) -> Result<Self, AuthError> {
        let mut roots = RootCertStore::empty();
        for ca in client_ca {
            roots
                .add(ca.clone())
                .map_err(|e| AuthError::ClientCa(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| AuthError::ClientCa(e.to_string()))?;
        Ok(Self {
            verifier,
            verified: Arc::default(),
        })
    }

    /// Verifies the chain a client presented and returns who it is.
    pub fn identify(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<Identity, AuthError> {
        self.identify_at(chain, UnixTime::now())
    }

    /// [`Self::identify`] at a given time.
    pub(crate) fn identify_at(
        &self,
        chain: Option<&[CertificateDer<'_>]>,
        now: UnixTime,
    ) -> Result<Identity, AuthError> {
        let Some((end_entity, intermediates)) = chain.and_then(|c| c.split_first()) else {
            return Err(AuthError::NoCertificate);
        };
        let key = chain_key(end_entity, intermediates);
        let now_secs = now.as_secs();
        {
            let cache = lock(&self.verified);
            if let Some((identity, until)) = cache.get(&key)
                && now_secs < *until
            {
                return Ok(identity.clone());
            }
        }
        let fingerprint = fingerprint(end_entity);
        self.verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| AuthError::Rejected {
                reason: e.to_string(),
                fingerprint: fingerprint.clone(),
            })?;
        let name = identity_name(end_entity).ok_or(AuthError::NoIdentity)?;
        let identity = Identity { name, fingerprint };
        let expires = std::iter::once(end_entity)
            .chain(intermediates)
            .map(not_after)
            .min()
            .flatten();
        let until = expires.map_or(now_secs, |e| e.min(now_secs + VERIFIED_TTL_SECS));
        let mut cache = lock(&self.verified);
        if cache.len() >= VERIFIED_MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (identity.clone(), until));
        Ok(identity)
    }

    /// The verifier for the TLS handshake: it asks for a client certificate and checks that the
    /// client holds its private key, but leaves the chain to [`Self::identify`], which runs on
    /// every request.
    pub fn tls_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(ProofOfPossession {
            inner: Arc::clone(&self.verifier),
        })
    }
}

/// SHA-256 over a whole chain, each certificate length-prefixed.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        ctx.update(&(cert.as_ref().len() as u64).to_be_bytes());
        ctx.update(cert.as_ref());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// A certificate's `notAfter`, in Unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    u64::try_from(parsed.validity().not_after.timestamp()).ok()
}

/// SHA-256 of a certificate, hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    crate::model::to_hex(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref())
}

/// The URI SAN of a certificate, else its subject CN.
fn identity_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                return Some((*uri).to_owned());
            }
        }
    }
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

#[derive(Debug)]
struct ProofOfPossession {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ProofOfPossession {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deliberately deferred to ClientAuthenticator::identify, which every RPC calls.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevCa, Validity};
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn identities_come_from_uri_san_else_cn_and_bad_certificates_are_rejected() {
        let ca = DevCa::new("test CA").unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let auth = ClientAuthenticator::new(&[ca_der]).unwrap();
        let chain = |pem: &str| vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];

        let spiffe = ca
            .issue_client("spiffe://uksh.example/lab", Validity::default())
            .unwrap();
        let who = auth.identify(Some(&chain(&spiffe.cert_pem))).unwrap();
        assert_eq!(who.name, "spiffe://uksh.example/lab");
        assert_eq!(who.fingerprint.len(), 64);
        let cn = ca
            .issue_client("officer-anna", Validity::default())
            .unwrap();
        assert_eq!(
            auth.identify(Some(&chain(&cn.cert_pem))).unwrap().name,
            "officer-anna"
        );

        assert_eq!(auth.identify(None), Err(AuthError::NoCertificate));
        let expired = ca
            .issue_client(
                "old",
                Validity {
                    from_days: -30,
                    to_days: -1,
                },
            )
            .unwrap();
        assert!(matches!(
            auth.identify(Some(&chain(&expired.cert_pem))),
            Err(AuthError::Rejected { .. })
        ));
        let other = DevCa::new("other CA")
            .unwrap()
            .issue_client("officer-anna", Validity::default())
            .unwrap();
        assert!(matches!(
            auth.identify(Some(&chain(&other.cert_pem))),
            Err(AuthError::Rejected { .. })
        ));
        // A server certificate is not a client certificate.
        let server = ca.issue_server(&["localhost"]).unwrap();
        assert!(matches!(
            auth.identify(Some(&chain(&server.cert_pem))),
            Err(AuthError::Rejected { .. })
        ));
    }

    #[test]
    fn a_verified_chain_is_remembered_only_while_it_is_valid() {
        let ca = DevCa::new("test CA").unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let auth = ClientAuthenticator::new(&[ca_der]).unwrap();
        let chain = |pem: &str| vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()];
        let day = 86_400;
        let short = ca
            .issue_client(
                "officer-anna",
                Validity {
                    from_days: -1,
                    to_days: 2,
                },
            )
            .unwrap();
        let now = UnixTime::now();
        let first = auth
            .identify_at(Some(&chain(&short.cert_pem)), now)
            .unwrap();
        // Served from the cache within its lifetime, under the same name.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() + 60));
        assert_eq!(
            auth.identify_at(Some(&chain(&short.cert_pem)), later)
                .unwrap(),
            first
        );
        // Three days on the certificate has expired: the cache must not say otherwise.
        let expired =
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.as_secs() + 3 * day));
        assert!(matches!(
            auth.identify_at(Some(&chain(&short.cert_pem)), expired),
            Err(AuthError::Rejected { .. })
        ));
        // Another certificate is never answered from this one's entry, and failures are not kept.
        let other = ca.issue_client("officer-ben", Validity::default()).unwrap();
        assert_eq!(
            auth.identify_at(Some(&chain(&other.cert_pem)), later)
                .unwrap()
                .name,
            "officer-ben"
        );
        let foreign = DevCa::new("other CA")
            .unwrap()
            .issue_client("officer-anna", Validity::default())
            .unwrap();
        for _ in 0..2 {
            assert!(matches!(
                auth.identify(Some(&chain(&foreign.cert_pem))),
                Err(AuthError::Rejected { .. })
            ));
        }
    }
}
