//! Refusals in bursts: a flood of identical refused calls must not take the audit log's
//! capacity (and the disk) from the callers who are allowed in, and none may vanish.
//!
//! The first refusal of a burst is appended like any record and its caller waits for it. The
//! identical refusals that follow within [`BURST_WINDOW`] (same tenant, caller, certificate,
//! source address, operation and outcome) are only counted, and their callers answered at once;
//! when the window closes, one *burst record* with their count and the time of the first and
//! the last is appended to the hash chain. A crash loses at most one window's count; the
//! burst's first record is already durable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::audit_record::RecordBody;
use crate::model::now_millis;
use crate::sync::lock;

/// How long identical refusals fold into one burst record.
pub const BURST_WINDOW: Duration = Duration::from_secs(1);

/// What makes refusals identical. The source is the peer's address without its port, so a
/// client cannot start a new burst by opening another connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct BurstKey {
    tenant: String,
    caller: String,
    fingerprint: String,
    source: String,
    operation: String,
    outcome: String,
    status_code: i32,
}

impl BurstKey {
    pub(super) fn of(tenant: &str, body: &RecordBody) -> Self {
        Self {
            tenant: tenant.to_owned(),
            caller: body.caller.clone(),
            fingerprint: body.fingerprint.clone(),
            source: source_of(&body.peer),
            operation: body.operation.clone(),
            outcome: body.outcome.clone(),
            status_code: body.status_code,
        }
    }
}

/// The address part of `ip:port` or `[v6]:port`; anything else unchanged.
fn source_of(peer: &str) -> String {
    peer.parse::<std::net::SocketAddr>()
        .map_or_else(|_| peer.to_owned(), |a| a.ip().to_string())
}

/// An open burst: when its window opened, and the calls folded into it so far.
struct Burst {
    opened_ms: i64,
    /// The first folded call's body (its request id and node), and the count and times.
    folded: Option<(RecordBody, u64, i64, i64)>,
}

/// The open bursts of one audit log.
#[derive(Default)]
pub(super) struct Bursts {
    open: Mutex<HashMap<BurstKey, Burst>>,
}

/// What [`Bursts::note`] decided for a refusal.
pub(super) enum Noted {
    /// The first of a burst: append it and wait. If it replaced an expired burst that the
    /// flusher had not closed yet, that burst's record comes along, to be appended first.
    First(Option<Box<(String, RecordBody)>>),
    /// Folded into the open burst: answer at once.
    Folded,
}

impl Bursts {
    /// Notes a refusal at `now_ms`.
    pub(super) fn note(&self, key: BurstKey, body: &RecordBody, now_ms: i64) -> Noted {
        let mut open = lock(&self.open);
        match open.get_mut(&key) {
            Some(burst) if now_ms - burst.opened_ms < window_ms() => {
                match &mut burst.folded {
                    Some((_, count, _, last)) => {
                        *count += 1;
                        *last = now_ms;
                    }
                    None => burst.folded = Some((body.clone(), 1, now_ms, now_ms)),
                }
                Noted::Folded
            }
            _ => {
                let expired = open.insert(
                    key.clone(),
                    Burst {
                        opened_ms: now_ms,
                        folded: None,
                    },
                );
                Noted::First(expired.and_then(|b| burst_record(&key, b)).map(Box::new))
            }
        }
    }

    /// Closes the bursts whose window ended before `now_ms` (all of them with `all`), and
    /// returns the burst records to append: (tenant, body).
    pub(super) fn close(&self, now_ms: i64, all: bool) -> Vec<(String, RecordBody)> {
        let mut open = lock(&self.open);
        let due: Vec<BurstKey> = open
            .iter()
            .filter(|(_, b)| all || now_ms - b.opened_ms >= window_ms())
            .map(|(k, _)| k.clone())
            .collect();
        let mut records = Vec::new();
        for key in due {
            if let Some(record) = open.remove(&key).and_then(|b| burst_record(&key, b)) {
                records.push(record);
            }
        }
        records
    }
}

/// The record of a closed burst, if calls were folded into it.
fn burst_record(key: &BurstKey, burst: Burst) -> Option<(String, RecordBody)> {
    let (mut body, count, first, last) = burst.folded?;
    body.repeated = count;
    body.first_ms = first;
    body.last_ms = last;
    body.peer = key.source.clone();
    Some((key.tenant.clone(), body))
}

fn window_ms() -> i64 {
    i64::try_from(BURST_WINDOW.as_millis()).unwrap_or(1000)
}

/// Appends the burst records of closed windows until the audit log is dropped; then the last
/// open bursts are appended too, as far as the writer still takes them.
pub(super) async fn flush(log: Weak<super::Inner>) {
    loop {
        tokio::time::sleep(BURST_WINDOW).await;
        let Some(inner) = log.upgrade() else {
            return;
        };
        let records = inner.bursts.close(now_millis(), false);
        let log = super::AuditLog {
            inner: Arc::clone(&inner),
        };
        drop(inner);
        for (tenant, body) in records {
            if let Err(e) = log.append(&tenant, body).await {
                tracing::error!(error = %e, "a burst record of refused calls could not be appended");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(peer: &str) -> RecordBody {
        RecordBody {
            operation: "Wrap".into(),
            outcome: "UNAUTHENTICATED".into(),
            status_code: 16,
            peer: peer.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_burst_is_one_record_for_the_first_and_one_for_the_rest() {
        let bursts = Bursts::default();
        let b = refused("10.0.0.7:40000");
        assert!(matches!(
            bursts.note(BurstKey::of("", &b), &b, 1_000),
            Noted::First(None)
        ));
        // Other connections from the same address fold in.
        for (i, port) in (0..5).zip(40_001..) {
            let b = refused(&format!("10.0.0.7:{port}"));
            assert!(matches!(
                bursts.note(BurstKey::of("", &b), &b, 1_100 + i),
                Noted::Folded
            ));
        }
        // Another source is a burst of its own.
        let other = refused("10.0.0.8:1");
        assert!(matches!(
            bursts.note(BurstKey::of("", &other), &other, 1_200),
            Noted::First(None)
        ));
        assert!(
            bursts.close(1_500, false).is_empty(),
            "the window is still open"
        );
        let closed = bursts.close(2_000, false);
        assert_eq!(
            closed.len(),
            1,
            "only bursts with folded calls become a record"
        );
        let (tenant, body) = &closed[0];
        assert_eq!(tenant, "");
        assert_eq!(
            (body.repeated, body.first_ms, body.last_ms),
            (5, 1_100, 1_104)
        );
        assert_eq!(body.peer, "10.0.0.7");
        assert_ne!(
            body.digest(),
            refused("10.0.0.7").digest(),
            "the count is hashed"
        );
        // After the window, the next refusal starts a new burst.
        assert!(matches!(
            bursts.note(BurstKey::of("", &b), &b, 2_100),
            Noted::First(None)
        ));
    }

    #[test]
    fn a_burst_the_flusher_has_not_closed_yet_is_not_lost_when_the_next_one_starts() {
        let bursts = Bursts::default();
        let b = refused("10.0.0.7:1");
        let key = || BurstKey::of("", &b);
        assert!(matches!(bursts.note(key(), &b, 1_000), Noted::First(None)));
        assert!(matches!(bursts.note(key(), &b, 1_500), Noted::Folded));
        assert!(matches!(bursts.note(key(), &b, 1_600), Noted::Folded));
        // The window is over but the flusher did not run: the next refusal hands it over.
        let Noted::First(Some(expired)) = bursts.note(key(), &b, 2_200) else {
            panic!("the expired burst was dropped");
        };
        let closed = &expired.1;
        assert_eq!(
            (closed.repeated, closed.first_ms, closed.last_ms),
            (2, 1_500, 1_600)
        );
    }
}
