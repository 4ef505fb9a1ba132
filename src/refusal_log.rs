//! The process log's share of refused calls: at most [`LINES_PER_WINDOW`] lines per
//! [`WINDOW`] for every refusal together, whichever front-end, caller or source address it
//! comes from. The refusals left out are counted, and their number is logged when the window
//! is over.
//!
//! Why: a flood of calls without a certificate or a valid signature would otherwise write a
//! line per call, thousands a second, filling the disk or making journald's rate limit drop the
//! lines an operator needs (an HSM that fails, a database that is gone). The audit log records
//! every refusal ([`crate::audit::bursts`] folds floods into burst records); the process log only
//! has to show that calls are refused and why, and a sample of each second does.
//!
//! Owns the count only: what a refusal's line says, and its level, is each front-end's business.
//! Errors of the service itself (a failed HSM or database call) are not refusals and are always
//! logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// How long a window of refusals lasts.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Refusals logged per window; the rest are only counted.
pub const LINES_PER_WINDOW: u32 = 20;

/// Whether the refusal about to be logged gets its line. Call it right before the line, and
/// log only if it says yes.
pub fn admit() -> bool {
    let (log_this, closed) = REFUSALS.admit_at(Instant::now());
    if let Some(left_out) = closed {
        report(left_out);
    }
    log_this
}

/// Closes each window once it is over, so the count of a flood's last window is logged even
/// when no refusal follows it. Runs until the task is dropped.
pub async fn report_windows() {
    loop {
        tokio::time::sleep(WINDOW).await;
        if let Some(left_out) = REFUSALS.close_at(Instant::now()) {
            report(left_out);
        }
    }
}

fn report(left_out: u64) {
    tracing::warn!(
        left_out,
        lines_per_second = LINES_PER_WINDOW,
        "refused calls over the log's rate were not logged; the audit log records every one"
    );
}

/// One process, one log: the count is shared by every front-end and server in it.
static REFUSALS: RefusalLog = RefusalLog::new();

struct RefusalLog {
    window: Mutex<Window>,
}

struct Window {
    opened: Option<Instant>,
    logged: u32,
    left_out: u64,
}

impl RefusalLog {
    const fn new() -> Self {
        Self {
            window: Mutex::new(Window::NONE),
        }
    }

    /// Whether a refusal at `now` is logged, and the count left out of a window this call
    /// closed (only when there was one).
    fn admit_at(&self, now: Instant) -> (bool, Option<u64>) {
        let mut w = lock(&self.window);
        let closed = w.close_if_over(now);
        w.opened.get_or_insert(now);
        if w.logged < LINES_PER_WINDOW {
            w.logged += 1;
            (true, closed)
        } else {
            w.left_out += 1;
            (false, closed)
        }
    }

    /// The count left out of the window, if it is over and left any out.
    fn close_at(&self, now: Instant) -> Option<u64> {
        lock(&self.window).close_if_over(now)
    }
}

impl Window {
    /// No refusal yet: the next one opens a window.
    const NONE: Self = Self {
        opened: None,
        logged: 0,
        left_out: 0,
    };

    fn close_if_over(&mut self, now: Instant) -> Option<u64> {
        let opened = self.opened?;
        if now.saturating_duration_since(opened) < WINDOW {
            return None;
        }
        let left_out = std::mem::replace(self, Self::NONE).left_out;
        (left_out > 0).then_some(left_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_logs_its_first_refusals_and_counts_the_rest() {
        let log = RefusalLog::new();
        let t0 = Instant::now();
        let logged = (0..100)
            .filter(|i| {
                let (yes, closed) = log.admit_at(t0 + Duration::from_millis(*i));
                assert_eq!(closed, None, "the first window is still open");
                yes
            })
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        assert_eq!(log.close_at(t0 + WINDOW / 2), None, "not over yet");
        assert_eq!(
            log.close_at(t0 + WINDOW),
            Some(100 - u64::from(LINES_PER_WINDOW))
        );
        assert_eq!(log.close_at(t0 + WINDOW * 3), None, "counted once");
    }

    #[test]
    fn the_next_refusal_closes_an_expired_window_and_opens_a_new_one() {
        let log = RefusalLog::new();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_WINDOW + 5 {
            log.admit_at(t0);
        }
        let later = t0 + WINDOW + Duration::from_millis(1);
        assert_eq!(log.admit_at(later), (true, Some(5)));
        // The new window opened at `later`: a full share again, then counting.
        for _ in 1..LINES_PER_WINDOW {
            assert!(log.admit_at(later).0);
        }
        assert!(!log.admit_at(later + WINDOW / 2).0);
        assert_eq!(log.close_at(later + WINDOW / 2), None);
        assert_eq!(log.close_at(later + WINDOW), Some(1));
    }

    #[test]
    fn a_quiet_window_reports_nothing() {
        let log = RefusalLog::new();
        let t0 = Instant::now();
        assert_eq!(log.close_at(t0 + WINDOW * 2), None, "no window at all");
        for _ in 0..3 {
            assert!(log.admit_at(t0).0);
        }
        assert_eq!(log.close_at(t0 + WINDOW), None, "nothing left out");
        assert!(log.admit_at(t0 + WINDOW * 2).0);
    }
}
