//! The audit record format: records, the hash chain, checkpoints, and the offline verifier.
//!
//! Owns the exact byte encodings that are hashed and signed (SECURITY.md "Audit log" states
//! them for independent verifiers) and the verification of an exported sequence of items.
//! Pure: no I/O, no HSM, no database. Signatures are verified with ring against a public key
//! given by the caller.

use ring::digest::{SHA256, digest};
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Hash of the record before the first one.
pub const GENESIS: [u8; 32] = [0; 32];

const RECORD_DOMAIN: &[u8] = b"tresor/audit/record/v1\0";
const BODY_DOMAIN: &[u8] = b"tresor/audit/body/v1\0";
const BODY_DOMAIN_V2: &[u8] = b"tresor/audit/body/v2\0";
const BODY_DOMAIN_V3: &[u8] = b"tresor/audit/body/v3\0";
const BODY_DOMAIN_V4: &[u8] = b"tresor/audit/body/v4\0";
const CHECKPOINT_DOMAIN: &[u8] = b"tresor/audit/checkpoint/v1\0";

/// What an audit record says about one RPC. Never plaintext, AAD or PINs: the AAD appears only
/// as an HMAC under a key that stays in the HSM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Request id, also sent to the caller.
    pub request_id: String,
    /// Caller identity (URI SAN or CN); empty if unauthenticated.
    pub caller: String,
    /// SHA-256 of the caller's certificate, hex; empty if none was presented.
    pub fingerprint: String,
    /// Role the RPC requires.
    pub role: String,
    /// RPC name (`Wrap`, `CreateKey`, …).
    pub operation: String,
    /// Key name, if the call named or resolved one.
    pub key: String,
    /// Key version name, if known.
    pub key_version: String,
    /// `OK`, `DENIED`, `UNAUTHENTICATED` or `FAILED`.
    pub outcome: String,
    /// gRPC status code (0 = OK).
    pub status_code: i32,
    /// Peer address.
    pub peer: String,
    /// HMAC-SHA256 of the caller's AAD under the HSM's audit HMAC key, hex; empty without AAD.
    pub aad_hmac: String,
    /// The node that served the call (`server.node_id`); empty in records written before
    /// records carried it.
    #[serde(default)]
    pub node: String,
    /// XKS calls: AWS KMS's request id (as in CloudTrail).
    #[serde(default)]
    pub kms_request_id: String,
    /// XKS calls: the KMS operation behind the call (`Encrypt`, `Decrypt`, …).
    #[serde(default)]
    pub kms_operation: String,
    /// XKS calls: the AWS principal that called KMS.
    #[serde(default)]
    pub aws_principal_arn: String,
    /// XKS calls: the KMS key's ARN.
    #[serde(default)]
    pub kms_key_arn: String,
    /// A burst record: how many refused calls identical to the burst's first (recorded on its
    /// own) this record stands for; 0 for a record of one call.
    #[serde(default)]
    pub repeated: u64,
    /// A burst record: UTC milliseconds of the first and the last call it stands for.
    #[serde(default)]
    pub first_ms: i64,
    /// See `first_ms`.
    #[serde(default)]
    pub last_ms: i64,
    /// The access rule that decided the call (`default-deny` when rules cover the key but
    /// none matched); empty when no rule covers the key.
    #[serde(default)]
    pub access_rule: String,
    /// The break-glass window the call used; empty if none.
    #[serde(default)]
    pub access_window: String,
    /// The justification code the call declared (or, under a window, the window's reason).
    #[serde(default)]
    pub justification: String,
    /// The justification's free-text reference (a ticket or case number).
    #[serde(default)]
    pub justification_reference: String,
    /// XKS calls: the AWS service that called KMS for the principal.
    #[serde(default)]
    pub kms_via_service: String,
    /// XKS calls: the VPC the request came from.
    #[serde(default)]
    pub aws_source_vpc: String,
    /// XKS calls: the VPC endpoint the request came through.
    #[serde(default)]
    pub aws_source_vpce: String,
}

/// A record in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number, from 1, without gaps.
    pub seq: u64,
    /// Hash of record `seq - 1` ([`GENESIS`] for the first).
    pub prev_hash: [u8; 32],
    /// UTC milliseconds.
    pub time_ms: i64,
    /// Tenant the call acted in; empty when unknown (unauthenticated).
    pub tenant: String,
    /// Everything else.
    pub body: RecordBody,
}

/// A checkpoint: a signature over the chain head at `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last record covered.
    pub seq: u64,
    /// That record's hash.
    pub hash: [u8; 32],
    /// UTC milliseconds when signed.
    pub time_ms: i64,
    /// ECDSA P-256 over SHA-256 of [`checkpoint_message`], `r ‖ s`.
    pub signature: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b);
}

impl RecordBody {
    /// SHA-256 of the body's encoding:
    /// `"tresor/audit/body/v1\0" ‖ str(request_id) ‖ str(caller) ‖ str(fingerprint) ‖ str(role)
    /// ‖ str(operation) ‖ str(key) ‖ str(key_version) ‖ str(outcome) ‖ i32be(status_code)
    /// ‖ str(peer) ‖ str(aad_hmac)`, where `str(x) = u32be(len x) ‖ x` (UTF-8). A record with
    /// a node id or XKS fields uses `"tresor/audit/body/v2\0"` instead and appends
    /// `‖ str(node) ‖ str(kms_request_id) ‖ str(kms_operation) ‖ str(aws_principal_arn)
    /// ‖ str(kms_key_arn)`; records with none of them (written before they existed) keep the
    /// v1 encoding, so old logs still verify. A burst record (`repeated` > 0) uses
    /// `"tresor/audit/body/v3\0"`, the v2 fields, and then `‖ u64be(repeated) ‖ i64be(first_ms)
    /// ‖ i64be(last_ms)`. A record with any access-rule, justification or further XKS field
    /// uses `"tresor/audit/body/v4\0"`, the v3 encoding's fields (burst or not), and then
    /// `‖ str(access_rule) ‖ str(access_window) ‖ str(justification)
    /// ‖ str(justification_reference) ‖ str(kms_via_service) ‖ str(aws_source_vpc)
    /// ‖ str(aws_source_vpce)`.
    pub fn digest(&self) -> [u8; 32] {
        let v2 = [
            &self.node,
            &self.kms_request_id,
            &self.kms_operation,
            &self.aws_principal_arn,
            &self.kms_key_arn,
        ];
        let v4 = [
            &self.access_rule,
            &self.access_window,
            &self.justification,
            &self.justification_reference,
            &self.kms_via_service,
            &self.aws_source_vpc,
            &self.aws_source_vpce,
        ];
        let is_v4 = v4.iter().any(|s| !s.is_empty());
        let is_v3 = is_v4 || self.repeated > 0;
        let is_v2 = is_v3 || v2.iter().any(|s| !s.is_empty());
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(if is_v4 {
            BODY_DOMAIN_V4
        } else if is_v3 {
            BODY_DOMAIN_V3
        } else if is_v2 {
            BODY_DOMAIN_V2
        } else {
            BODY_DOMAIN
        });
        for s in [
            &self.request_id,
            &self.caller,
            &self.fingerprint,
            &self.role,
            &self.operation,
            &self.key,
            &self.key_version,
            &self.outcome,
        ] {
            put_str(&mut b, s);
        }
        b.extend_from_slice(&self.status_code.to_be_bytes());
        put_str(&mut b, &self.peer);
        put_str(&mut b, &self.aad_hmac);
        if is_v2 {
            for s in v2 {
                put_str(&mut b, s);
            }
        }
        if is_v3 {
            b.extend_from_slice(&self.repeated.to_be_bytes());
            b.extend_from_slice(&self.first_ms.to_be_bytes());
            b.extend_from_slice(&self.last_ms.to_be_bytes());
        }
        if is_v4 {
            for s in v4 {
                put_str(&mut b, s);
            }
        }
        sha256(&b)
    }
}

/// The hash of a record from its header and body digest:
/// `SHA-256("tresor/audit/record/v1\0" ‖ u64be(seq) ‖ prev_hash ‖ i64be(time_ms) ‖ str(tenant) ‖ body_digest)`.
pub fn record_hash(
    seq: u64,
    prev_hash: &[u8; 32],
    time_ms: i64,
    tenant: &str,
    body_digest: &[u8; 32],
) -> [u8; 32] {
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(RECORD_DOMAIN);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(prev_hash);
    b.extend_from_slice(&time_ms.to_be_bytes());
    put_str(&mut b, tenant);
    b.extend_from_slice(body_digest);
    sha256(&b)
}

impl Record {
    /// This record's hash.
    pub fn hash(&self) -> [u8; 32] {
        record_hash(
            self.seq,
            &self.prev_hash,
            self.time_ms,
            &self.tenant,
            &self.body.digest(),
        )
    }
}

/// The bytes a checkpoint signs: `"tresor/audit/checkpoint/v1\0" ‖ u64be(seq) ‖ hash ‖ i64be(time_ms)`.
pub fn checkpoint_message(seq: u64, hash: &[u8; 32], time_ms: i64) -> Vec<u8> {
    let mut b = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
    b.extend_from_slice(CHECKPOINT_DOMAIN);
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(hash);
    b.extend_from_slice(&time_ms.to_be_bytes());
    b
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, b).as_ref());
    out
}

/// One item of an export, in order.
// Items are streamed one at a time and moved, not stored in bulk; boxing the large variant
// would only add an allocation per record.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportItem {
    /// A record shown in full.
    Record(Record),
    /// A record withheld (other tenant, or outside the filter): header and body digest only,
    /// enough to keep the chain verifiable.
    Withheld {
        /// Sequence number.
        seq: u64,
        /// Hash of the previous record.
        prev_hash: [u8; 32],
        /// UTC milliseconds.
        time_ms: i64,
        /// Tenant.
        tenant: String,
        /// The withheld body's digest.
        body_digest: [u8; 32],
    },
    /// A checkpoint over the item just before it.
    Checkpoint(Checkpoint),
}

impl ExportItem {
    /// A record's or withheld record's place in the chain: (sequence number, previous hash,
    /// its hash computed from what the item holds); `None` for a checkpoint.
    pub fn link(&self) -> Option<(u64, [u8; 32], [u8; 32])> {
        match self {
            Self::Record(r) => Some((r.seq, r.prev_hash, r.hash())),
            Self::Withheld {
                seq,
                prev_hash,
                time_ms,
                tenant,
                body_digest,
            } => Some((
                *seq,
                *prev_hash,
                record_hash(*seq, prev_hash, *time_ms, tenant, body_digest),
            )),
            Self::Checkpoint(_) => None,
        }
    }
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Records shown in full.
    pub records: u64,
    /// Records withheld from this export.
    pub withheld: u64,
    /// Checkpoint signatures verified.
    pub checkpoints: u64,
    /// First and last sequence number covered.
    pub seq_range: (u64, u64),
    /// Time of the first and last record shown in full.
    pub time_span: Option<(i64, i64)>,
}

/// Why an export does not verify, naming the place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Nothing to verify.
    #[error("the export holds no records")]
    Empty,
    /// A record's content no longer matches the hash stated for it.
    #[error("record {seq} was altered: its content does not match its hash")]
    Altered {
        /// The record.
        seq: u64,
    },
    /// The chain breaks between two records.
    #[error("record {seq}: its previous-record hash does not match record {}: a record was altered, removed or inserted", seq - 1)]
    Broken {
        /// The record whose link fails.
        seq: u64,
    },
    /// Sequence numbers are not consecutive.
    #[error("record {found} follows record {after}: records are missing or out of order")]
    Gap {
        /// The previous sequence number.
        after: u64,
        /// The one found.
        found: u64,
    },
    /// The first item is neither record 1 nor a checkpoint to anchor on.
    #[error("the export starts at record {0} without a checkpoint before it to anchor the chain")]
    Unanchored(u64),
    /// A checkpoint's hash or position does not match the chain.
    #[error("checkpoint at record {seq} does not match the chain")]
    CheckpointMismatch {
        /// The checkpoint's sequence number.
        seq: u64,
    },
    /// A checkpoint's signature does not verify.
    #[error("checkpoint at record {seq}: the signature does not verify with the given public key")]
    BadSignature {
        /// The checkpoint's sequence number.
        seq: u64,
    },
    /// Records at the end are not covered by a checkpoint.
    #[error(
        "records after {0} are not covered by a checkpoint: the export was truncated or is incomplete"
    )]
    Uncovered(u64),
}

/// Verifies an export: every link of the chain, every checkpoint signature, consecutive
/// sequence numbers, an anchor at the start and a checkpoint over the last record.
/// `stated_hashes` are the hashes the export states for each record (if any), used to name an
/// altered record precisely.
pub fn verify(
    items: &[(ExportItem, Option<[u8; 32]>)],
    public_key: &[u8],
) -> Result<Verified, VerifyError> {
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key);
    let mut head: Option<(u64, [u8; 32])> = None;
    let mut covered = true;
    let mut last_checkpoint = 0;
    let mut out = Verified {
        records: 0,
        withheld: 0,
        checkpoints: 0,
        seq_range: (0, 0),
        time_span: None,
    };
    for (item, stated) in items {
        match item {
            ExportItem::Checkpoint(c) => {
                let message = checkpoint_message(c.seq, &c.hash, c.time_ms);
                if key.verify(&message, &c.signature).is_err() {
                    return Err(VerifyError::BadSignature { seq: c.seq });
                }
                match head {
                    // The anchor: the chain continues from the signed hash.
                    None => head = Some((c.seq, c.hash)),
                    Some((seq, hash)) if seq == c.seq && hash == c.hash => {}
                    Some(_) => return Err(VerifyError::CheckpointMismatch { seq: c.seq }),
                }
                out.checkpoints += 1;
                last_checkpoint = c.seq;
                covered = true;
            }
            ExportItem::Record(_) | ExportItem::Withheld { .. } => {
                let Some((seq, prev_hash, hash)) = item.link() else {
                    continue;
                };
                if stated.is_some_and(|s| s != hash) {
                    return Err(VerifyError::Altered { seq });
                }
                let (prev_seq, prev) = match head {
                    Some(h) => h,
                    None if seq == 1 => (0, GENESIS),
                    None => return Err(VerifyError::Unanchored(seq)),
                };
                if seq != prev_seq + 1 {
                    return Err(VerifyError::Gap {
                        after: prev_seq,
                        found: seq,
                    });
                }
                if prev_hash != prev {
                    return Err(VerifyError::Broken { seq });
                }
                if out.records + out.withheld == 0 {
                    out.seq_range.0 = seq;
                }
                out.seq_range.1 = seq;
                match item {
                    ExportItem::Record(r) => {
                        out.records += 1;
                        out.time_span = Some(match out.time_span {
                            None => (r.time_ms, r.time_ms),
                            Some((a, b)) => (a.min(r.time_ms), b.max(r.time_ms)),
                        });
                    }
                    _ => out.withheld += 1,
                }
                head = Some((seq, hash));
                covered = false;
            }
        }
    }
    if out.records + out.withheld == 0 {
        return Err(VerifyError::Empty);
    }
    if !covered {
        return Err(VerifyError::Uncovered(last_checkpoint));
    }
    Ok(out)
}

/// The SubjectPublicKeyInfo DER of an uncompressed P-256 point (65 bytes).
pub fn p256_spki(point: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused bits) point }
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(point);
    der
}

/// The uncompressed P-256 point inside a SubjectPublicKeyInfo DER, if it is one.
pub fn p256_point_from_spki(der: &[u8]) -> Option<Vec<u8>> {
    (der.len() == 91 && p256_spki(&der[26..]) == der).then(|| der[26..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    fn chain(n: u64) -> Vec<Record> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let r = Record {
                    seq,
                    prev_hash: prev,
                    time_ms: 1_700_000_000_000 + seq as i64,
                    tenant: if seq % 3 == 0 { "b".into() } else { "a".into() },
                    body: RecordBody {
                        operation: "Wrap".into(),
                        request_id: format!("r{seq}"),
                        status_code: 0,
                        outcome: "OK".into(),
                        ..Default::default()
                    },
                };
                prev = r.hash();
                r
            })
            .collect()
    }

    fn signer() -> (EcdsaKeyPair, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref().to_vec();
        (pair, public)
    }

    fn checkpoint(pair: &EcdsaKeyPair, r: &Record) -> ExportItem {
        let hash = r.hash();
        let signature = pair
            .sign(&SystemRandom::new(), &checkpoint_message(r.seq, &hash, 5))
            .unwrap()
            .as_ref()
            .to_vec();
        ExportItem::Checkpoint(Checkpoint {
            seq: r.seq,
            hash,
            time_ms: 5,
            signature,
        })
    }

    fn export(records: &[Record], pair: &EcdsaKeyPair) -> Vec<(ExportItem, Option<[u8; 32]>)> {
        let mut items: Vec<_> = records
            .iter()
            .map(|r| (ExportItem::Record(r.clone()), Some(r.hash())))
            .collect();
        items.insert(5, (checkpoint(pair, &records[4]), None));
        items.push((checkpoint(pair, records.last().unwrap()), None));
        items
    }

    #[test]
    fn the_node_id_is_hashed_when_present_and_old_records_keep_their_encoding() {
        let old = RecordBody {
            operation: "Wrap".into(),
            ..Default::default()
        };
        // The v1 encoding, written out by hand as SECURITY.md states it: eight empty-or-set
        // strings, the status code, peer and AAD HMAC.
        let mut v1 = b"tresor/audit/body/v1\0".to_vec();
        for s in ["", "", "", "", "Wrap", "", "", ""] {
            v1.extend_from_slice(&(s.len() as u32).to_be_bytes());
            v1.extend_from_slice(s.as_bytes());
        }
        v1.extend_from_slice(&0i32.to_be_bytes());
        v1.extend_from_slice(&[0; 8]);
        assert_eq!(old.digest(), sha256(&v1));

        let on_a = RecordBody {
            node: "node-a".into(),
            ..old.clone()
        };
        let on_b = RecordBody {
            node: "node-b".into(),
            ..old.clone()
        };
        assert_ne!(on_a.digest(), old.digest());
        assert_ne!(on_a.digest(), on_b.digest());
        // Each v2 field is its own length-prefixed string: moving text between them changes
        // the digest.
        let kms = RecordBody {
            kms_request_id: "r".into(),
            kms_operation: "Encrypt".into(),
            ..on_a.clone()
        };
        let shifted = RecordBody {
            kms_request_id: "rEncrypt".into(),
            ..on_a.clone()
        };
        assert_ne!(kms.digest(), shifted.digest());
        assert_ne!(kms.digest(), on_a.digest());

        // An exported record whose node was changed no longer verifies.
        let (pair, public) = signer();
        let mut records = chain(10);
        let mut prev = GENESIS;
        for r in &mut records {
            r.body.node = "node-a".into();
            r.prev_hash = prev;
            prev = r.hash();
        }
        let mut items = export(&records, &pair);
        assert!(verify(&items, &public).is_ok());
        if let ExportItem::Record(r) = &mut items[3].0 {
            r.body.node = "node-b".into();
        }
        assert_eq!(
            verify(&items, &public),
            Err(VerifyError::Altered { seq: 4 })
        );
    }

    #[test]
    fn access_fields_use_the_v4_encoding_and_every_one_is_covered() {
        let plain = RecordBody {
            operation: "Unwrap".into(),
            node: "n".into(),
            ..Default::default()
        };
        let ruled = RecordBody {
            access_rule: "support-break-glass".into(),
            access_window: "w1".into(),
            justification: "support".into(),
            justification_reference: "INC-4711".into(),
            ..plain.clone()
        };
        // By hand, as SECURITY.md states it: v2's fields, the burst fields (zero), then v4's.
        let mut v4 = b"tresor/audit/body/v4\0".to_vec();
        let put = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u32).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        for s in ["", "", "", "", "Unwrap", "", "", ""] {
            put(&mut v4, s);
        }
        v4.extend_from_slice(&0i32.to_be_bytes());
        put(&mut v4, "");
        put(&mut v4, "");
        for s in ["n", "", "", "", ""] {
            put(&mut v4, s);
        }
        v4.extend_from_slice(&[0; 24]);
        for s in [
            "support-break-glass",
            "w1",
            "support",
            "INC-4711",
            "",
            "",
            "",
        ] {
            put(&mut v4, s);
        }
        assert_eq!(ruled.digest(), sha256(&v4));
        assert_ne!(ruled.digest(), plain.digest());
        for changed in [
            RecordBody {
                access_rule: "other".into(),
                ..ruled.clone()
            },
            RecordBody {
                access_window: "w2".into(),
                ..ruled.clone()
            },
            RecordBody {
                justification: "treatment".into(),
                ..ruled.clone()
            },
            RecordBody {
                justification_reference: "INC-4712".into(),
                ..ruled.clone()
            },
            RecordBody {
                kms_via_service: "ebs".into(),
                ..ruled.clone()
            },
            RecordBody {
                aws_source_vpc: "vpc-1".into(),
                ..ruled.clone()
            },
            RecordBody {
                aws_source_vpce: "vpce-1".into(),
                ..ruled.clone()
            },
        ] {
            assert_ne!(changed.digest(), ruled.digest(), "{changed:?}");
        }
    }

    #[test]
    fn an_intact_export_verifies() {
        let (pair, public) = signer();
        let v = verify(&export(&chain(10), &pair), &public).unwrap();
        assert_eq!(
            (v.records, v.withheld, v.checkpoints, v.seq_range),
            (10, 0, 2, (1, 10))
        );
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        let (pair, public) = signer();
        let good = export(&chain(10), &pair);

        let mut edited = good.clone();
        if let ExportItem::Record(r) = &mut edited[2].0 {
            r.body.caller = "someone else".into();
        }
        assert_eq!(
            verify(&edited, &public),
            Err(VerifyError::Altered { seq: 3 })
        );
        // Edited with its stated hash recomputed: the next link names it.
        let mut rehashed = edited.clone();
        if let ExportItem::Record(r) = &rehashed[2].0 {
            rehashed[2].1 = Some(r.hash());
        }
        assert_eq!(
            verify(&rehashed, &public),
            Err(VerifyError::Broken { seq: 4 })
        );

        let mut deleted = good.clone();
        deleted.remove(3);
        assert_eq!(
            verify(&deleted, &public),
            Err(VerifyError::Gap { after: 3, found: 5 })
        );

        let mut reordered = good.clone();
        reordered.swap(1, 2);
        assert_eq!(
            verify(&reordered, &public),
            Err(VerifyError::Gap { after: 1, found: 3 })
        );

        let mut truncated = good.clone();
        truncated.truncate(good.len() - 3); // drops the last checkpoint and two records
        assert_eq!(verify(&truncated, &public), Err(VerifyError::Uncovered(5)));

        let (other, _) = signer();
        let mut foreign = good.clone();
        let last = foreign.len() - 1;
        foreign[last].0 = checkpoint(&other, &chain(10)[9]);
        assert_eq!(
            verify(&foreign, &public),
            Err(VerifyError::BadSignature { seq: 10 })
        );
    }

    #[test]
    fn withheld_records_keep_the_chain_whole() {
        let (pair, public) = signer();
        let records = chain(10);
        let items: Vec<_> = export(&records, &pair)
            .into_iter()
            .map(|(item, h)| match item {
                ExportItem::Record(r) if r.tenant != "a" => {
                    let body_digest = r.body.digest();
                    (
                        ExportItem::Withheld {
                            seq: r.seq,
                            prev_hash: r.prev_hash,
                            time_ms: r.time_ms,
                            tenant: r.tenant,
                            body_digest,
                        },
                        h,
                    )
                }
                other => (other, h),
            })
            .collect();
        let v = verify(&items, &public).unwrap();
        assert_eq!((v.records, v.withheld), (7, 3));
    }

    #[test]
    fn an_export_may_start_at_a_checkpoint() {
        let (pair, public) = signer();
        let records = chain(10);
        let mut items = vec![(checkpoint(&pair, &records[4]), None)];
        items.extend(
            records[5..]
                .iter()
                .map(|r| (ExportItem::Record(r.clone()), None)),
        );
        items.push((checkpoint(&pair, &records[9]), None));
        assert_eq!(verify(&items, &public).unwrap().seq_range, (6, 10));
        // Without the anchor, the start is unproven.
        assert_eq!(
            verify(&items[1..], &public),
            Err(VerifyError::Unanchored(6))
        );
    }

    #[test]
    fn spki_round_trips() {
        let (_, public) = signer();
        assert_eq!(p256_point_from_spki(&p256_spki(&public)), Some(public));
    }
}
