//! Continuity between two exports: does a new export extend an old one?
//!
//! Pure, like [`super::record`]; `tresor audit verify NEW --since OLD` (or
//! `--since-checkpoint SEQ:HASH`) uses it after both files verified on their own. An export
//! proves its own span; this proves that the log the new one came from still contains the history
//! the old one showed: the old export's last checkpoint (sequence number and chain hash) is in
//! the new export, with the same hash, and every record both exports show hashes the same.
//! A database whose tail was cut and written anew differs from the first rewritten record on.

use std::collections::BTreeMap;

use crate::audit_record::ExportItem;

/// An export's items, each with the hash its file stated (as [`crate::audit_record::verify`] takes).
pub type Export = [(ExportItem, Option<[u8; 32]>)];

/// A checkpoint as the auditor kept it: the last record it covered and that record's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// Sequence number.
    pub seq: u64,
    /// Chain hash at `seq`.
    pub hash: [u8; 32],
}

impl std::str::FromStr for Since {
    type Err = String;

    /// `SEQ:HASH`, the hash as 64 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or_else(|| "expected SEQ:HASH".to_owned())?;
        Ok(Self {
            seq: seq
                .parse()
                .map_err(|_| format!("{seq:?} is not a sequence number"))?,
            hash: crate::model::from_hex_array(hash)
                .ok_or_else(|| "the hash must be 64 hex digits".to_owned())?,
        })
    }
}

/// Why the new export does not extend the old history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContinuityError {
    /// The old export has no checkpoint to continue from.
    #[error("the old export holds no checkpoint")]
    NoCheckpoint,
    /// A record both exports cover hashes differently in the new one.
    #[error(
        "record {seq} differs from the old export: the history after it was removed or rewritten"
    )]
    Altered {
        /// The first record that differs.
        seq: u64,
    },
    /// The new export ends before the old checkpoint.
    #[error(
        "the new export ends at record {last}, before the old checkpoint at record {since}: records {} to {since} are missing",
        last + 1
    )]
    Missing {
        /// The new export's last record.
        last: u64,
        /// The old checkpoint.
        since: u64,
    },
    /// The new export starts after the old checkpoint, so it cannot show continuity.
    #[error(
        "the new export starts after record {since} (the old checkpoint); export it from a time before the old export's end"
    )]
    NotCovered {
        /// The old checkpoint.
        since: u64,
    },
}

/// The last checkpoint of an export.
pub fn last_checkpoint(items: &Export) -> Option<Since> {
    items.iter().rev().find_map(|(item, _)| match item {
        ExportItem::Checkpoint(c) => Some(Since {
            seq: c.seq,
            hash: c.hash,
        }),
        _ => None,
    })
}

fn chain_hashes(items: &Export) -> BTreeMap<u64, [u8; 32]> {
    items
        .iter()
        .filter_map(|(item, _)| item.link().map(|(seq, _, hash)| (seq, hash)))
        .collect()
}

/// Checks that `new` extends `since` (and, given the old export, agrees with every record of
/// it that it also covers). Both exports must have verified on their own first.
pub fn extends(new: &Export, old: Option<&Export>, since: Since) -> Result<(), ContinuityError> {
    let hashes = chain_hashes(new);
    if let Some(old) = old {
        for (seq, hash) in chain_hashes(old) {
            if hashes.get(&seq).is_some_and(|h| *h != hash) {
                return Err(ContinuityError::Altered { seq });
            }
        }
    }
    if let Some(hash) = hashes.get(&since.seq) {
        return if *hash == since.hash {
            Ok(())
        } else {
            Err(ContinuityError::Altered { seq: since.seq })
        };
    }
    // The new export may start right at the old checkpoint (its anchor), signed again.
    for (item, _) in new {
        if let ExportItem::Checkpoint(c) = item
            && c.seq == since.seq
        {
            return if c.hash == since.hash {
                Ok(())
            } else {
                Err(ContinuityError::Altered { seq: since.seq })
            };
        }
    }
    match hashes.last_key_value() {
        Some((&last, _)) if last < since.seq => Err(ContinuityError::Missing {
            last,
            since: since.seq,
        }),
        _ => Err(ContinuityError::NotCovered { since: since.seq }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_record::{Checkpoint, GENESIS, Record, RecordBody};

    /// Records `from..=to` continuing after `prev`, their bodies tagged `tag`.
    fn chain(prev: (u64, [u8; 32]), to: u64, tag: &str) -> Vec<(ExportItem, Option<[u8; 32]>)> {
        let (mut seq, mut hash) = prev;
        let mut items = Vec::new();
        while seq < to {
            seq += 1;
            let r = Record {
                seq,
                prev_hash: hash,
                time_ms: 1,
                tenant: "t".into(),
                body: RecordBody {
                    request_id: format!("{tag}{seq}"),
                    ..RecordBody::default()
                },
            };
            hash = r.hash();
            items.push((ExportItem::Record(r), None));
        }
        items
    }

    fn head(items: &Export) -> (u64, [u8; 32]) {
        let hashes = chain_hashes(items);
        let (seq, hash) = hashes.last_key_value().unwrap();
        (*seq, *hash)
    }

    fn checkpoint(at: (u64, [u8; 32])) -> (ExportItem, Option<[u8; 32]>) {
        (
            ExportItem::Checkpoint(Checkpoint {
                seq: at.0,
                hash: at.1,
                time_ms: 1,
                signature: Vec::new(),
            }),
            None,
        )
    }

    #[test]
    fn a_tail_cut_and_written_anew_is_named_at_its_first_record() {
        let mut old = chain((0, GENESIS), 120, "a");
        old.push(checkpoint(head(&old)));
        let since = last_checkpoint(&old).unwrap();
        assert_eq!(since.seq, 120);

        // The database kept records 1 to 100 and went on from there.
        let mut cut: Vec<_> = old[..100].to_vec();
        let tail = chain(head(&cut), 103, "b");
        cut.extend(tail);
        cut.push(checkpoint(head(&cut)));
        assert_eq!(
            extends(&cut, Some(&old), since),
            Err(ContinuityError::Altered { seq: 101 })
        );
        // With only the checkpoint kept, the new export ends before it.
        assert_eq!(
            extends(&cut, None, since),
            Err(ContinuityError::Missing {
                last: 103,
                since: 120
            })
        );
        // Written anew beyond 120 as well: the checkpoint's own record differs.
        let mut long: Vec<_> = old[..100].to_vec();
        let tail = chain(head(&long), 130, "b");
        long.extend(tail);
        assert_eq!(
            extends(&long, None, since),
            Err(ContinuityError::Altered { seq: 120 })
        );
    }

    #[test]
    fn a_genuine_continuation_passes_whether_it_overlaps_or_starts_at_the_checkpoint() {
        let mut old = chain((0, GENESIS), 120, "a");
        let at = head(&old);
        old.push(checkpoint(at));
        let since = last_checkpoint(&old).unwrap();
        let mut new = old.clone();
        new.extend(chain(at, 130, "a"));
        new.push(checkpoint(head(&new)));
        assert_eq!(extends(&new, Some(&old), since), Ok(()));
        // An export that starts at the old checkpoint as its anchor.
        let mut anchored = vec![checkpoint(at)];
        anchored.extend(chain(at, 130, "a"));
        assert_eq!(extends(&anchored, Some(&old), since), Ok(()));
        // One that starts later cannot show continuity.
        let later = new[125..].to_vec();
        assert_eq!(
            extends(&later, None, since),
            Err(ContinuityError::NotCovered { since: 120 })
        );
    }

    #[test]
    fn checkpoints_are_given_as_seq_and_hash() {
        let s: Since = format!("42:{}", "ab".repeat(32)).parse().unwrap();
        assert_eq!((s.seq, s.hash), (42, [0xab; 32]));
        assert!("42".parse::<Since>().is_err());
        assert!("x:00".parse::<Since>().is_err());
        assert!("42:abcd".parse::<Since>().is_err());
    }
}
