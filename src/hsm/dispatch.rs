//! Where a PKCS#11 call runs: on the async worker that serves the request, or on a blocking
//! thread.
//!
//! Owns the choice and the measurement it is based on; it does not touch sessions, objects or
//! recovery (the rest of `crate::hsm` does).
//!
//! Why: handing a call to tokio's blocking pool and back costs two thread wake-ups. On an
//! in-process software token such as SoftHSM, whose AES-GCM encryption takes 10–25 µs, those
//! wake-ups cost more than the call: the same server did 0.13x the raw PKCS#11 loop with every
//! call on the blocking pool, 0.18x with up to four calls on the async workers and 0.24x with
//! one at a time (`tresor bench --compare-raw`, BENCHMARKS.md). On a network HSM, whose calls take a millisecond, a call on
//! the async worker would stall that worker for the whole round trip, and only a pool of
//! sessions on blocking threads hides the latency.
//!
//! So in [`Dispatch::Auto`] (the default), the hot calls (encrypt, decrypt, random) run
//! on the async worker while the module answers fast, with at most one such call at a
//! time, so a runtime with two or more workers always keeps one free for TLS, health checks and
//! deadlines; they move to call threads ([`super::threads`]) once most recent calls took
//! longer than [`FAST_CALL`], and come back once most are fast again. Key management (generation,
//! destruction, listing) always uses the blocking pool: it is rare and may take milliseconds.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// How hot PKCS#11 calls reach the module (`hsm.dispatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// On the async worker while calls are fast, on blocking threads while they are slow.
    #[default]
    Auto,
    /// Always on the async worker, one call at a time. For in-process or PCIe modules
    /// only: a call that hangs stalls a worker thread for as long as it hangs.
    Inline,
    /// Always on call threads ([`super::threads`]), up to `hsm.sessions` at once: network HSMs.
    Threads,
}

impl Dispatch {
    /// Parses the configuration value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "inline" => Some(Self::Inline),
            "threads" => Some(Self::Threads),
            _ => None,
        }
    }
}

/// A hot call that returns within this is "fast". Judged per call and not by an average,
/// because on a busy machine a fast call is sometimes descheduled for milliseconds; a network
/// HSM is slow on every call.
pub const FAST_CALL: Duration = Duration::from_micros(100);

/// Scale of the fast-call share (fixed point: `SHARE_ONE` = every recent call was fast).
const SHARE_ONE: u32 = 1 << 16;
/// `Auto` leaves the async worker when fewer than half of the recent calls were fast...
const LEAVE_BELOW: u32 = SHARE_ONE / 2;
/// ...and comes back when more than three quarters were, so it does not flap near the edge.
const RETURN_ABOVE: u32 = SHARE_ONE / 4 * 3;

/// The share of recent hot calls that were fast, and the current choice.
#[derive(Debug)]
pub struct Pace {
    mode: Dispatch,
    /// Exponentially weighted (1/16 per call) share of fast calls, in `SHARE_ONE` units.
    fast_share: AtomicU32,
    inline_now: AtomicBool,
}

impl Pace {
    /// A new measurement; `Auto` starts on the async worker and learns.
    pub fn new(mode: Dispatch) -> Self {
        Self {
            mode,
            fast_share: AtomicU32::new(SHARE_ONE),
            inline_now: AtomicBool::new(mode != Dispatch::Threads),
        }
    }

    /// Whether the next hot call runs on the async worker. `Auto` also requires a
    /// multi-threaded runtime with at least two workers, so a call never blocks the only one.
    pub fn inline(&self) -> bool {
        match self.mode {
            Dispatch::Inline => true,
            Dispatch::Threads => false,
            Dispatch::Auto => self.inline_now.load(Ordering::Relaxed) && spare_worker(),
        }
    }

    /// Records how long one hot call spent in the module.
    pub fn record(&self, took: Duration) {
        let sample = if took <= FAST_CALL { SHARE_ONE } else { 0 };
        // Racing updates may lose a sample; the share only steers a heuristic.
        let old = self.fast_share.load(Ordering::Relaxed);
        let new = if sample >= old {
            old + (sample - old) / 16
        } else {
            old - (old - sample) / 16
        };
        self.fast_share.store(new, Ordering::Relaxed);
        if self.mode != Dispatch::Auto {
            return;
        }
        let percent = u64::from(new) * 100 / u64::from(SHARE_ONE);
        if new < LEAVE_BELOW && self.inline_now.swap(false, Ordering::Relaxed) {
            tracing::info!(
                fast_percent = percent,
                "most HSM calls take longer than {FAST_CALL:?}; running them on blocking threads"
            );
        } else if new > RETURN_ABOVE && !self.inline_now.swap(true, Ordering::Relaxed) {
            tracing::info!(
                fast_percent = percent,
                "HSM calls are fast again; running them on the async workers"
            );
        }
    }
}

fn spare_worker() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|h| {
        h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && h.metrics().num_workers() >= 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(pace: &Pace, micros: u64, times: usize) {
        for _ in 0..times {
            pace.record(Duration::from_micros(micros));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_moves_to_threads_when_calls_are_slow_and_back_when_fast() {
        let pace = Pace::new(Dispatch::Auto);
        assert!(pace.inline(), "starts on the async worker");
        feed(&pace, 20, 50);
        assert!(pace.inline());
        // A busy machine: one call in five descheduled for milliseconds stays inline.
        for _ in 0..40 {
            feed(&pace, 20, 4);
            feed(&pace, 3000, 1);
        }
        assert!(pace.inline());
        // A network HSM: 1 ms per call. A dozen calls are enough to leave the worker.
        feed(&pace, 1000, 12);
        assert!(!pace.inline());
        // Back and forth near the edge does not bring it back...
        for _ in 0..40 {
            feed(&pace, 20, 2);
            feed(&pace, 1000, 1);
        }
        assert!(!pace.inline());
        // ...mostly fast calls do.
        feed(&pace, 20, 40);
        assert!(pace.inline());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn auto_never_blocks_the_only_worker() {
        let pace = Pace::new(Dispatch::Auto);
        feed(&pace, 5, 10);
        assert!(!pace.inline());
        assert!(
            Pace::new(Dispatch::Inline).inline(),
            "explicit inline is obeyed"
        );
    }

    #[test]
    fn fixed_modes_ignore_the_measurement() {
        let threads = Pace::new(Dispatch::Threads);
        feed(&threads, 5, 100);
        assert!(!threads.inline());
        let inline = Pace::new(Dispatch::Inline);
        feed(&inline, 5000, 100);
        assert!(inline.inline());
        assert_eq!(Dispatch::parse("auto"), Some(Dispatch::Auto));
        assert_eq!(Dispatch::parse("threads"), Some(Dispatch::Threads));
        assert_eq!(Dispatch::parse("inline"), Some(Dispatch::Inline));
        assert_eq!(Dispatch::parse("fast"), None);
    }
}
