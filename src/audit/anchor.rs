//! The audit anchor: the latest signed checkpoint, kept where the database cannot reach it.
//!
//! Owns one kind of token data object ([`crate::hsm::DataObject`]), labelled
//! `tresor-audit/anchor/{signing key id hex}/{seq, 20 digits}`, value
//! `"tresor/audit-anchor/v1\0" ‖ u64be(seq) ‖ hash(seq) (32)`. It is keyed by the checkpoint
//! signing key, so a database that is made to forget its signing key (and get a new one) gets no
//! old anchor, but also no checkpoint an auditor's public key accepts.
//!
//! The anchor only moves forward: after a checkpoint of sequence `s` is stored, an anchor for
//! `s` is created and the older ones destroyed; readers take the highest (two nodes that
//! checkpoint at once each leave theirs, and the higher wins). Before a checkpoint is signed,
//! and when the log opens, the database's chain must contain the anchor's record with the
//! anchor's hash and link from it to the head being signed ([`extends`]); if it does not, the
//! node refuses to sign (and to append) instead of signing over a shortened or rewritten history.

use crate::hsm::{Hsm, HsmError, ObjectId};
use crate::model::to_hex;
use crate::store::{ChainHead, Store, StoreError};

const MAGIC: &[u8] = b"tresor/audit-anchor/v1\0";

/// The sequence number and chain hash of the latest checkpoint, as the HSM holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// Last record the checkpoint covered.
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, to_hex(&self.hash))
    }
}

fn prefix(signing_key: ObjectId) -> String {
    format!("tresor-audit/anchor/{signing_key}/")
}

fn encode(a: &Anchor) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&a.seq.to_be_bytes());
    v.extend_from_slice(&a.hash);
    v
}

fn parse(bytes: &[u8]) -> Option<Anchor> {
    let rest = bytes.strip_prefix(MAGIC)?;
    if rest.len() != 8 + 32 {
        return None;
    }
    let (seq, hash) = rest.split_at(8);
    Some(Anchor {
        seq: u64::from_be_bytes(seq.try_into().ok()?),
        hash: hash.try_into().ok()?,
    })
}

/// The anchors in the token for one signing key, as read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Anchors {
    /// The highest.
    pub latest: Option<Anchor>,
    /// Every anchor object's sequence number and label (to destroy the old ones when moving on
    /// without listing the token again).
    labels: Vec<(u64, String)>,
}

/// Reads the anchors in the token for this signing key. Objects under the prefix that do not
/// parse are ignored (and logged); two anchors of one sequence number with different hashes are
/// an error, since only one chain can have been signed.
pub async fn read(hsm: &Hsm, signing_key: ObjectId) -> Result<Anchors, AnchorError> {
    let mut found = Anchors::default();
    for o in hsm.data_objects(prefix(signing_key)).await? {
        let Some(a) = parse(&o.value) else {
            tracing::warn!(label = %o.label, "token data object under the audit anchor prefix does not parse; ignored");
            continue;
        };
        found.labels.push((a.seq, o.label));
        match found.latest {
            Some(b) if b.seq == a.seq && b.hash != a.hash => {
                return Err(AnchorError::Conflicting(b, a));
            }
            Some(b) if b.seq >= a.seq => {}
            _ => found.latest = Some(a),
        }
    }
    Ok(found)
}

/// The highest anchor in the token for this signing key, if any ([`read`]).
pub async fn latest(hsm: &Hsm, signing_key: ObjectId) -> Result<Option<Anchor>, AnchorError> {
    Ok(read(hsm, signing_key).await?.latest)
}

/// Moves the anchor forward to `a` (a checkpoint that is stored): creates its object, then
/// destroys the anchors `current` saw below it. An `a` not above `current` changes nothing.
/// Returns the anchors as they are now (as far as this node's own moves go).
pub async fn advance(
    hsm: &Hsm,
    signing_key: ObjectId,
    current: &Anchors,
    a: Anchor,
) -> Result<Anchors, AnchorError> {
    if current.latest.is_some_and(|c| c.seq >= a.seq) {
        return Ok(current.clone());
    }
    let label = format!("{}{:020}", prefix(signing_key), a.seq);
    hsm.create_data_object(label.clone(), encode(&a)).await?;
    for (seq, old) in &current.labels {
        if *seq < a.seq {
            hsm.destroy_data_objects(old.clone()).await?;
        }
    }
    Ok(Anchors {
        latest: Some(a),
        labels: vec![(a.seq, label)],
    })
}

/// How thoroughly [`extends`] looks at the records between anchor and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Recompute every record's hash from its content too (at open).
    Content,
    /// Only the stored hashes and links (before each signature). Enough never to sign over a
    /// shortened or re-chained history: the signature then commits to the stored chain, and a
    /// body changed without its hash fails any export's verification.
    Links,
}

/// Checks that the database's chain contains `anchor` and links from it to `head` (or, when
/// another node already anchored past `head`, from `head` to the anchor): every record between
/// the two is present, names its predecessor's hash, and (with [`Check::Content`]) hashes to
/// what is stored.
pub async fn extends(
    store: &Store,
    anchor: Anchor,
    head: ChainHead,
    check: Check,
) -> Result<(), AnchorError> {
    // Record 1 is the first there is (an empty log has head 0).
    let (from, to) = (anchor.seq.min(head.seq).max(1), anchor.seq.max(head.seq));
    let mismatch = |first_bad: u64| AnchorError::Mismatch {
        anchor,
        head: head.seq,
        first_bad,
    };
    let mut next = from;
    let mut prev: Option<[u8; 32]> = None;
    while next <= to {
        // (sequence number, previous hash, stored hash, whether the content hashes to it)
        let page: Vec<(u64, [u8; 32], [u8; 32], bool)> = match check {
            Check::Content => store
                .audit_records(next, to, 1000)
                .await?
                .into_iter()
                .map(|(r, stored)| (r.seq, r.prev_hash, stored, r.hash() == stored))
                .collect(),
            Check::Links => store
                .audit_links(next, to, 10_000)
                .await?
                .into_iter()
                .map(|(seq, prev_hash, stored)| (seq, prev_hash, stored, true))
                .collect(),
        };
        if page.is_empty() {
            return Err(mismatch(next));
        }
        for (seq, prev_hash, stored, content_matches) in page {
            if seq != next
                || !content_matches
                || prev.is_some_and(|p| p != prev_hash)
                || (seq == anchor.seq && stored != anchor.hash)
                || (seq == head.seq && stored != head.hash)
            {
                return Err(mismatch(next));
            }
            prev = Some(stored);
            next += 1;
        }
    }
    Ok(())
}

/// Why the anchor could not be read, or the database does not extend it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The database's chain does not contain the anchor, or does not link it to the head.
    #[error(
        "the audit chain in the database does not extend the HSM's audit anchor {anchor} (database head {head}, first missing or altered record {first_bad}): records were removed or rewritten in the database; restore them (the node refuses to sign or append over a shortened history)"
    )]
    Mismatch {
        /// The anchor.
        anchor: Anchor,
        /// The database head that was checked.
        head: u64,
        /// The first sequence number that is missing or does not match.
        first_bad: u64,
    },
    /// Two anchors of one sequence number disagree.
    #[error("two audit anchors in the HSM disagree: {0} and {1}")]
    Conflicting(Anchor, Anchor),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_round_trip_and_odd_lengths_are_refused() {
        let a = Anchor {
            seq: 1000,
            hash: [9; 32],
        };
        let bytes = encode(&a);
        assert_eq!(parse(&bytes), Some(a));
        assert_eq!(parse(&bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(parse(&longer), None);
        assert_eq!(parse(b"something else"), None);
    }
}
