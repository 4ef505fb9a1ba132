//! The threads that make slow PKCS#11 calls (a network HSM): at most one per session permit,
//! each woken through a channel of its own.
//!
//! Owns the threads and the hand-off of a call to one of them and of its answer back. It does
//! not touch sessions, permits, deadlines or recovery (`session.rs` holds a permit for every
//! call it hands over, so there are never more busy threads than sessions).
//!
//! Why not tokio's blocking pool, which key management still uses: its threads wait on one
//! condition variable behind one mutex, with a timeout, so every call wakes a thread through
//! that mutex and arms a timer for the thread's next wait. Here the caller takes an idle
//! thread and wakes exactly that one. On this project's two-core VM, with two other processes
//! busy on both cores, a 1 ms call handed over and back cost 17–27 µs of CPU this way against
//! 30–49 µs through `spawn_blocking` (`scripts/bench-call-handoff`), and a Wrap through
//! hsm-sim at 1 ms one context switch fewer (BENCHMARKS.md, issue 20, "Call threads").

use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;

use crate::sync::lock;

/// A call; what it returns runs once its thread is idle again (it sends the answer).
type Job = Box<dyn FnOnce() -> Box<dyn FnOnce() + Send> + Send>;

/// A job and the way back to the thread that runs it. A thread holds no sender of its own
/// while it waits, so it ends once the pool and every job for it are gone.
struct Hand {
    job: Job,
    thread: Sender<Hand>,
}

/// The call threads of one module; idle ones wait in `idle`.
#[derive(Default)]
pub(super) struct CallThreads {
    idle: Mutex<Vec<Sender<Hand>>>,
}

impl CallThreads {
    /// Runs `call` on an idle call thread, or on a new one if none is idle. The answer is
    /// sent once that thread is idle again, so whoever the caller lets in next (by releasing a
    /// session permit it moved into `call` and gets back with the answer) finds it idle. The
    /// receiver fails if the call panicked or no thread could be started.
    pub(super) fn run<T, F>(self: &Arc<Self>, call: F) -> oneshot::Receiver<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (answer, receiver) = oneshot::channel();
        let mut job: Job = Box::new(move || {
            let value = call();
            Box::new(move || {
                // The caller may have given up at its deadline; then nobody wants the answer.
                let _ = answer.send(value);
            })
        });
        loop {
            let Some(thread) = lock(&self.idle).pop() else {
                self.spawn(job);
                return receiver;
            };
            let hand = Hand {
                job,
                thread: thread.clone(),
            };
            match thread.send(hand) {
                Ok(()) => return receiver,
                // Cannot happen while the thread waits (it keeps its receiver until it ends),
                // but if it does, the next idle thread or a new one takes the call.
                Err(returned) => job = returned.0.job,
            }
        }
    }

    fn spawn(self: &Arc<Self>, first: Job) {
        let (thread, hands) = channel::<Hand>();
        let pool: Weak<Self> = Arc::downgrade(self);
        let mut hand = Hand { job: first, thread };
        let spawned = std::thread::Builder::new()
            .name("tresor-hsm-call".into())
            .spawn(move || {
                loop {
                    let Hand { job, thread: me } = hand;
                    let send_answer = job();
                    if let Some(pool) = pool.upgrade() {
                        lock(&pool.idle).push(me);
                    }
                    send_answer();
                    match hands.recv() {
                        Ok(next) => hand = next,
                        Err(_) => return,
                    }
                }
            });
        // The job, and with it the answer's sender, is dropped: the caller sees the failure.
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start a thread for an HSM call");
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        lock(&self.idle).len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Barrier;
    use std::thread::ThreadId;
    use std::time::Duration;

    use super::*;

    async fn on_thread(pool: &Arc<CallThreads>) -> ThreadId {
        pool.run(|| std::thread::current().id()).await.unwrap()
    }

    #[tokio::test]
    async fn a_call_runs_off_the_caller_and_its_thread_is_used_again() {
        let pool = Arc::new(CallThreads::default());
        let first = on_thread(&pool).await;
        assert_ne!(first, std::thread::current().id());
        assert_eq!(pool.idle(), 1, "idle again before the answer arrived");
        for _ in 0..20 {
            assert_eq!(
                on_thread(&pool).await,
                first,
                "one call at a time needs one thread"
            );
        }
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn calls_in_flight_together_each_get_a_thread() {
        let pool = Arc::new(CallThreads::default());
        // Each call waits until all four are inside: this ends only if they run at once.
        let all_inside = Arc::new(Barrier::new(4));
        let answers: Vec<_> = (0..4)
            .map(|i| {
                let all_inside = Arc::clone(&all_inside);
                pool.run(move || {
                    all_inside.wait();
                    i
                })
            })
            .collect();
        let mut got = Vec::new();
        for answer in answers {
            got.push(
                tokio::time::timeout(Duration::from_secs(10), answer)
                    .await
                    .expect("the four calls did not run at the same time")
                    .unwrap(),
            );
        }
        assert_eq!(got, [0, 1, 2, 3]);
        assert_eq!(pool.idle(), 4);
        // Later calls reuse those four; none are started.
        for _ in 0..10 {
            on_thread(&pool).await;
        }
        assert_eq!(pool.idle(), 4);
    }

    #[tokio::test]
    async fn the_threads_end_with_their_pool() {
        thread_local! {
            /// Dropped, and so disconnected, when the thread that set it ends.
            static ENDS_WITH_THREAD: std::cell::RefCell<Option<std::sync::mpsc::Sender<()>>> =
                const { std::cell::RefCell::new(None) };
        }
        let (alive, ended) = std::sync::mpsc::channel::<()>();
        let pool = Arc::new(CallThreads::default());
        let all_inside = Arc::new(Barrier::new(3));
        let answers: Vec<_> = (0..3)
            .map(|_| {
                let all_inside = Arc::clone(&all_inside);
                let alive = alive.clone();
                pool.run(move || {
                    ENDS_WITH_THREAD.with(|slot| *slot.borrow_mut() = Some(alive));
                    all_inside.wait();
                })
            })
            .collect();
        for answer in answers {
            answer.await.unwrap();
        }
        drop(alive);
        assert_eq!(pool.idle(), 3);
        assert_eq!(
            ended.recv_timeout(Duration::from_millis(100)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout),
            "idle threads wait while their pool lives"
        );
        drop(pool);
        assert_eq!(
            ended.recv_timeout(Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "every call thread ends once its pool is gone"
        );
    }

    #[tokio::test]
    async fn a_call_that_panics_fails_its_caller_and_the_next_call_still_runs() {
        let pool = Arc::new(CallThreads::default());
        let before = on_thread(&pool).await;
        let failed = pool.run(|| -> u32 { panic!("a module crashed inside a call") });
        assert!(failed.await.is_err(), "the caller learns the call failed");
        assert_eq!(pool.idle(), 0, "the thread the call took is gone");
        let after = on_thread(&pool).await;
        assert_ne!(after, before, "a new thread took the next call");
        assert_eq!(pool.idle(), 1);
    }
}
