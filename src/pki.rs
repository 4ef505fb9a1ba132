//! Certificates for development and tests: a CA that issues server and client certificates.
//!
//! Owns certificate generation (rcgen) and PEM encoding/decoding. Production deployments bring
//! certificates from their own PKI; this module is what `tresor dev` and the tests use. Private
//! keys are returned zeroizing and written with mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

/// Errors creating, reading or writing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused the parameters.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
}

/// A certificate and its private key, both PEM. `Debug` does not print the key.
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM, zeroized on drop.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Validity of an issued certificate, in days relative to now (negative = in the past).
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start, days from now.
    pub from_days: i64,
    /// End, days from now.
    pub to_days: i64,
}

impl Default for Validity {
    fn default() -> Self {
        Self {
            from_days: -1,
            to_days: 825,
        }
    }
}

/// A certificate authority held in memory.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert: IssuedCert,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

impl DevCa {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(
            &mut params,
            Validity {
                from_days: -1,
                to_days: 3650,
            },
        );
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let issued = IssuedCert {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: key_pem(&key),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: issued,
        })
    }

    /// Loads a CA written by [`DevCa::write`].
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = read(cert_path)?;
        let key_text = Zeroizing::new(read(key_path)?);
        let cert = first_cert(&cert_pem, cert_path)?;
        let key_der =
            PrivateKeyDer::from_pem_slice(key_text.as_bytes()).map_err(|e| PkiError::Pem {
                path: key_path.display().to_string(),
                what: format!("no private key found: {e}"),
            })?;
        let key = KeyPair::try_from(&key_der)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            issuer,
            cert: IssuedCert {
                cert_pem,
                key_pem: key_text,
            },
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert.cert_pem
    }

    /// Writes the CA certificate and key (key mode 0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        self.cert.write(cert_path, key_path)
    }

    /// A server certificate for these DNS names or IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, PkiError> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name = dn(names.first().copied().unwrap_or("tresor"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, Validity::default());
        self.sign(params)
    }

    /// A client certificate. An identity that parses as a URI (`spiffe://…`) becomes the URI SAN
    /// (and the subject CN); anything else only the subject CN.
    pub fn issue_client(&self, identity: &str, validity: Validity) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(identity);
        if identity.contains("://") {
            params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: pem("CERTIFICATE", cert.der()),
            key_pem: key_pem(&key),
        })
    }
}

impl IssuedCert {
    /// Writes the certificate (mode 0644) and key (mode 0600).
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem.as_bytes(), 0o600)
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, v: Validity) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::days(v.from_days);
    params.not_after = now + time::Duration::days(v.to_days);
}

fn key_pem(key: &KeyPair) -> Zeroizing<String> {
    let der = Zeroizing::new(key.serialize_der());
    Zeroizing::new(pem("PRIVATE KEY", &der))
}

/// PEM-encodes DER with the given label.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

fn first_cert(pem_text: &str, path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| PkiError::Pem {
            path: path.display().to_string(),
            what: "no certificate found".into(),
        })
}

/// The DNS names and IP addresses a certificate is issued for (its subject alternative
/// names), lower-case; empty if it cannot be parsed.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => <[u8; 4]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let text = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| PkiError::Pem {
            path: path.display().to_string(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.display().to_string(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let text = Zeroizing::new(read(path)?);
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| PkiError::Pem {
        path: path.display().to_string(),
        what: format!("no private key found: {e}"),
    })
}
