//! The typed gRPC client: connection profiles, mTLS, and envelope encryption for services.
//!
//! Owns connecting to a Tresor server as one identity and the client-side envelope format
//! ([`Client::seal`] / [`Client::open`]): a payload is encrypted locally with a fresh data key
//! from `GenerateDataKey`, and the wrapped data key is kept beside it. Knows nothing of the
//! server's internals; speaks only the public API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use crate::proto::MAX_MESSAGE_BYTES;
use crate::proto::audit_service_client::AuditServiceClient;
use crate::proto::key_admin_service_client::KeyAdminServiceClient;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::{self};

/// Client-side failures. Server refusals arrive as [`ClientError::Status`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The profile file is missing or wrong.
    #[error("profile {path}: {problem}")]
    Profile {
        /// The profile file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The server could not be reached or the TLS handshake failed.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The server refused or failed the call.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// A sealed envelope is malformed or does not authenticate.
    #[error("sealed data: {0}")]
    Envelope(&'static str),
    /// The server sent an audit item that is not well-formed.
    #[error("malformed audit item from the server: {0}")]
    AuditItem(&'static str),
}

/// Where a server is and who to be: a TOML file such as
///
/// ```toml
/// endpoint = "https://localhost:8443"
/// ca = "ca.pem"          # CA that issued the server certificate
/// cert = "officer.pem"   # client certificate
/// key = "officer.key"    # its private key (mode 0600)
/// # server_name = "tresor.example"  # if the endpoint's host is not in the server certificate
/// ```
///
/// Relative paths are relative to the profile file (`Path::join` keeps absolute ones).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `https://host:port`.
    pub endpoint: String,
    /// CA certificate(s) that issued the server certificate, PEM.
    pub ca: PathBuf,
    /// Client certificate, PEM.
    pub cert: Option<PathBuf>,
    /// Client private key, PEM.
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against, if not the endpoint's host.
    pub server_name: Option<String>,
}

impl Profile {
    /// Reads a profile file, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let err = |problem: String| ClientError::Profile {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut p: Profile = toml::from_str(&text).map_err(|e| err(e.message().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        p.ca = base.join(&p.ca);
        p.cert = p.cert.map(|f| base.join(f));
        p.key = p.key.map(|f| base.join(f));
        if p.cert.is_some() != p.key.is_some() {
            return Err(err("give both cert and key, or neither".into()));
        }
        if !p.endpoint.starts_with("https://") {
            return Err(err(format!(
                "endpoint {:?} must start with https://",
                p.endpoint
            )));
        }
        Ok(p)
    }
}

/// A connection to one server as one identity. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    /// Sent with every key use [`Client::seal`] and [`Client::open`] make.
    justification: Option<proto::Justification>,
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Profile {
        path: path.display().to_string(),
        problem: format!("cannot read the {what}: {e}"),
    })
}

impl Client {
    /// Connects with mTLS as the profile's identity.
    pub async fn connect(profile: &Profile) -> Result<Self, ClientError> {
        let connect_err = |reason: String| ClientError::Connect {
            endpoint: profile.endpoint.clone(),
            reason,
        };
        let ca = read_file(&profile.ca, "CA certificate")?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (&profile.cert, &profile.key) {
            let cert = read_file(cert, "client certificate")?;
            let key = Zeroizing::new(read_file(key, "client key")?);
            tls = tls.identity(Identity::from_pem(cert, key.as_slice()));
        }
        if let Some(name) = &profile.server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = Endpoint::from_shared(profile.endpoint.clone())
            .map_err(|e| connect_err(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .map_err(|e| connect_err(error_chain(&e)))?;
        Ok(Self {
            channel,
            justification: None,
        })
    }

    /// The `KeyService` client (role service).
    pub fn keys(&self) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The `KeyAdminService` client (role officer).
    pub fn admin(&self) -> KeyAdminServiceClient<Channel> {
        KeyAdminServiceClient::new(self.channel.clone())
    }

    /// The `AccessService` client (role officer): break-glass windows.
    pub fn access(&self) -> crate::proto::access_service_client::AccessServiceClient<Channel> {
        crate::proto::access_service_client::AccessServiceClient::new(self.channel.clone())
    }

    /// Officers' view of KMIP's managed objects.
    pub fn objects(
        &self,
    ) -> crate::proto::managed_object_admin_service_client::ManagedObjectAdminServiceClient<Channel>
    {
        crate::proto::managed_object_admin_service_client::ManagedObjectAdminServiceClient::new(
            self.channel.clone(),
        )
    }

    /// The `AuditService` client (role auditor).
    pub fn audit(&self) -> AuditServiceClient<Channel> {
        AuditServiceClient::new(self.channel.clone())
    }

    /// The underlying channel, for services this client has no method for (e.g. reflection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The standard health service.
    pub fn health(&self) -> tonic_health::pb::health_client::HealthClient<Channel> {
        tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
    }

    /// This client, declaring `code` (from the server's access policy) and `reference` (a
    /// ticket or case number) as the justification of every key use [`Client::seal`] and
    /// [`Client::open`] make. Requests built by hand set `justification` themselves.
    pub fn with_justification(mut self, code: &str, reference: &str) -> Self {
        self.justification = Some(proto::Justification {
            code: code.to_owned(),
            reference: reference.to_owned(),
        });
        self
    }

    /// The justification set by [`Client::with_justification`], for requests built by hand.
    pub fn justification(&self) -> Option<proto::Justification> {
        self.justification.clone()
    }

    /// Encrypts `plaintext` locally under a fresh data key from `key`, binding `aad`, and
    /// returns one self-contained envelope (see [`Sealed`]). Only the wrapped data key is ever
    /// sent to the server; the payload never is.
    pub async fn seal(
        &self,
        key: &str,
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let dk = self
            .keys()
            .generate_data_key(proto::GenerateDataKeyRequest {
                justification: self.justification.clone(),
                key: key.to_owned(),
                aad: aad.to_vec(),
                length_bytes: 32,
                without_plaintext: false,
            })
            .await?
            .into_inner();
        let data_key = Zeroizing::new(dk.plaintext);
        let mut nonce = [0u8; 12];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ClientError::Envelope("no system randomness"))?;
        let mut body = plaintext.to_vec();
        aead_key(&data_key)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Sealed::local_aad(&dk.ciphertext, aad)?),
                &mut body,
            )
            .map_err(|_| ClientError::Envelope("local encryption failed"))?;
        Sealed {
            wrapped_key: dk.ciphertext,
            nonce,
            body,
        }
        .to_bytes()
    }

    /// Opens an envelope made by [`Client::seal`] with the same `aad`.
    pub async fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let s = Sealed::from_bytes(sealed)?;
        let unwrapped = self
            .keys()
            .unwrap(proto::UnwrapRequest {
                justification: self.justification.clone(),
                ciphertext: s.wrapped_key.clone(),
                aad: aad.to_vec(),
                key: String::new(),
            })
            .await?
            .into_inner();
        let data_key = Zeroizing::new(unwrapped.plaintext);
        let mut body = Zeroizing::new(s.body);
        let n = aead_key(&data_key)?
            .open_in_place(
                Nonce::assume_unique_for_key(s.nonce),
                Aad::from(Sealed::local_aad(&s.wrapped_key, aad)?),
                &mut body,
            )
            .map_err(|_| ClientError::Envelope("the payload does not authenticate"))?
            .len();
        body.truncate(n);
        Ok(body)
    }
}

fn aead_key(data_key: &[u8]) -> Result<LessSafeKey, ClientError> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, data_key)
            .map_err(|_| ClientError::Envelope("data key is not 32 bytes"))?,
    ))
}

/// A client-side envelope:
/// `"TSE1" ‖ u16be(len W) ‖ W ‖ nonce (12) ‖ AES-256-GCM(payload) ‖ tag (16)`, where `W` is the
/// data key wrapped by Tresor. The local AAD is `u16be(len W) ‖ W ‖ caller AAD`, binding the
/// payload to its wrapped key as well as to the caller's context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The data key, wrapped by Tresor.
    pub wrapped_key: Vec<u8>,
    /// Nonce of the local encryption.
    pub nonce: [u8; 12],
    /// Payload ciphertext and tag.
    pub body: Vec<u8>,
}

const SEALED_MAGIC: &[u8; 4] = b"TSE1";

impl Sealed {
    fn local_aad(wrapped_key: &[u8], aad: &[u8]) -> Result<Vec<u8>, ClientError> {
        let len = u16::try_from(wrapped_key.len())
            .map_err(|_| ClientError::Envelope("wrapped key too long"))?;
        let mut out = Vec::with_capacity(2 + wrapped_key.len() + aad.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(wrapped_key);
        out.extend_from_slice(aad);
        Ok(out)
    }

    /// Serialises the envelope.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ClientError> {
        let len = u16::try_from(self.wrapped_key.len())
            .map_err(|_| ClientError::Envelope("wrapped key too long"))?;
        let mut out = Vec::with_capacity(4 + 2 + self.wrapped_key.len() + 12 + self.body.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.wrapped_key);
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Parses an envelope.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ClientError> {
        let bad = || ClientError::Envelope("not a Tresor envelope (TSE1)");
        let rest = bytes
            .strip_prefix(SEALED_MAGIC.as_slice())
            .ok_or_else(bad)?;
        let (len, rest) = rest
            .split_first_chunk::<2>()
            .ok_or(ClientError::Envelope("truncated envelope"))?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len + 12 + 16 {
            return Err(bad());
        }
        let (wrapped_key, rest) = rest.split_at(len);
        let (nonce, body) = rest.split_at(12);
        let mut n = [0u8; 12];
        n.copy_from_slice(nonce);
        Ok(Self {
            wrapped_key: wrapped_key.to_vec(),
            nonce: n,
            body: body.to_vec(),
        })
    }
}

/// The export item carried by one message of `ExportAuditLog`.
pub fn audit_item(r: proto::AuditRecord) -> Result<crate::audit_record::ExportItem, ClientError> {
    use crate::audit_record::{Checkpoint, ExportItem, Record, RecordBody};
    let hash = |b: &[u8], what: &'static str| {
        <[u8; 32]>::try_from(b).map_err(|_| ClientError::AuditItem(what))
    };
    Ok(match proto::AuditItemKind::try_from(r.kind) {
        Ok(proto::AuditItemKind::Record) => ExportItem::Record(Record {
            seq: r.sequence,
            prev_hash: hash(&r.previous_hash, "previous hash is not 32 bytes")?,
            time_ms: r.time_ms,
            tenant: r.tenant,
            body: RecordBody {
                request_id: r.request_id,
                caller: r.caller,
                fingerprint: r.certificate_fingerprint,
                role: r.role,
                operation: r.operation,
                key: r.key,
                key_version: r.key_version,
                outcome: r.outcome,
                status_code: r.status_code,
                peer: r.peer,
                aad_hmac: r.aad_hmac,
                node: r.node,
                kms_request_id: r.kms_request_id,
                kms_operation: r.kms_operation,
                aws_principal_arn: r.aws_principal_arn,
                kms_key_arn: r.kms_key_arn,
                repeated: r.repeated,
                first_ms: r.first_ms,
                last_ms: r.last_ms,
                access_rule: r.access_rule,
                access_window: r.access_window,
                justification: r.justification,
                justification_reference: r.justification_reference,
                kms_via_service: r.kms_via_service,
                aws_source_vpc: r.aws_source_vpc,
                aws_source_vpce: r.aws_source_vpce,
            },
        }),
        Ok(proto::AuditItemKind::Withheld) => ExportItem::Withheld {
            seq: r.sequence,
            prev_hash: hash(&r.previous_hash, "previous hash is not 32 bytes")?,
            time_ms: r.time_ms,
            tenant: r.tenant,
            body_digest: hash(&r.body_digest, "body digest is not 32 bytes")?,
        },
        Ok(proto::AuditItemKind::Checkpoint) => {
            let c = r
                .checkpoint
                .ok_or(ClientError::AuditItem("checkpoint without its signature"))?;
            ExportItem::Checkpoint(Checkpoint {
                seq: c.sequence,
                hash: hash(&c.chain_hash, "chain hash is not 32 bytes")?,
                time_ms: c.time_ms,
                signature: c.signature,
            })
        }
        _ => return Err(ClientError::AuditItem("unknown kind")),
    })
}

/// The whole chain of an error's causes, for connection failures whose top level says little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_envelopes_round_trip_and_reject_garbage() {
        let s = Sealed {
            wrapped_key: vec![1; 70],
            nonce: [2; 12],
            body: vec![3; 40],
        };
        assert_eq!(Sealed::from_bytes(&s.to_bytes().unwrap()).unwrap(), s);
        assert!(Sealed::from_bytes(b"TSE2\0\0").is_err());
        assert!(Sealed::from_bytes(&s.to_bytes().unwrap()[..50]).is_err());
        assert!(Sealed::from_bytes(b"").is_err());
    }

    #[test]
    fn profiles_resolve_paths_and_refuse_half_identities() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "endpoint = \"https://localhost:8443\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"/abs/c.key\"\n").unwrap();
        let p = Profile::load(&path).unwrap();
        assert_eq!(p.ca, dir.path().join("ca.pem"));
        assert_eq!(p.key, Some(PathBuf::from("/abs/c.key")));
        std::fs::write(
            &path,
            "endpoint = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\n",
        )
        .unwrap();
        assert!(
            Profile::load(&path)
                .unwrap_err()
                .to_string()
                .contains("both cert and key")
        );
        std::fs::write(&path, "endpoint = \"http://x:1\"\nca = \"ca.pem\"\n").unwrap();
        assert!(
            Profile::load(&path)
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
    }
}
