//! What it costs in CPU to hand a blocking call to another thread and get its answer back, on
//! this machine and outside Tresor: the floor under `hsm.dispatch`'s slow path
//! (BENCHMARKS.md, issue 20, "Call threads"). 64 tasks on a two-worker runtime each make
//! blocking calls of `LATENCY_US` (a `thread::sleep`, as hsm-sim charges its latency) for 5 s,
//! handed over in one of these ways:
//!
//! - `spawn-blocking`: tokio's blocking pool (one queue behind one mutex, idle threads on one
//!   condition variable with a timeout);
//! - `own-channel`: an idle thread taken from a list and woken through a channel of its own,
//!   its answer sent back on a oneshot, as `src/hsm/threads.rs` does;
//! - `no-handoff`: 64 plain threads making the calls themselves, for the cost of the sleep.
//!
//! Prints calls per second and the process's CPU time per call. `scripts/bench-call-handoff`
//! runs every way, with the machine otherwise idle and with two busy processes beside it.
//!
//! ```text
//! cargo run --release --example call_handoff -- own-channel 1000
//! ```

// A measuring tool, not the service: it stops at the first thing that goes wrong.
#![allow(clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

const CALLERS: usize = 64;
const RUN: Duration = Duration::from_secs(5);

/// The process's user + system CPU time so far (`/proc/self/stat`, in clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The command name may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

fn call(latency: Duration) {
    if !latency.is_zero() {
        std::thread::sleep(latency);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(way), Some(latency)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: call_handoff spawn-blocking|own-channel|no-handoff LATENCY_US");
        std::process::exit(2);
    };
    let latency = Duration::from_micros(latency.parse().expect("LATENCY_US is a number"));
    let calls = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_time();
    let start = Instant::now();
    match way.as_str() {
        "no-handoff" => {
            let threads: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let calls = Arc::clone(&calls);
                    std::thread::spawn(move || {
                        while start.elapsed() < RUN {
                            call(latency);
                            calls.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("caller thread");
            }
        }
        "spawn-blocking" | "own-channel" => {
            let own_channel = way == "own-channel";
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            // Each call thread is woken with the sender of its call's answer, and is idle again
            // before it answers, so the caller's next call always finds a thread.
            let idle: Arc<Mutex<Vec<mpsc::Sender<oneshot::Sender<()>>>>> = Arc::default();
            for _ in 0..if own_channel { CALLERS } else { 0 } {
                let (sender, calls_in) = mpsc::channel::<oneshot::Sender<()>>();
                let idle_again = Arc::clone(&idle);
                let me = sender.clone();
                std::thread::spawn(move || {
                    while let Ok(answer) = calls_in.recv() {
                        call(latency);
                        idle_again.lock().expect("idle list").push(me.clone());
                        let _ = answer.send(());
                    }
                });
                idle.lock().expect("idle list").push(sender);
            }
            runtime.block_on(async {
                let callers: Vec<_> = (0..CALLERS)
                    .map(|_| {
                        let calls = Arc::clone(&calls);
                        let idle = Arc::clone(&idle);
                        tokio::spawn(async move {
                            while start.elapsed() < RUN {
                                if own_channel {
                                    let (answer, answered) = oneshot::channel();
                                    let thread = idle
                                        .lock()
                                        .expect("idle list")
                                        .pop()
                                        .expect("a thread per caller");
                                    thread.send(answer).expect("thread alive");
                                    answered.await.expect("answer");
                                } else {
                                    tokio::task::spawn_blocking(move || call(latency))
                                        .await
                                        .expect("blocking call");
                                }
                                calls.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                for c in callers {
                    c.await.expect("caller task");
                }
            });
        }
        other => {
            eprintln!("unknown way {other:?}: spawn-blocking, own-channel or no-handoff");
            std::process::exit(2);
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time() - cpu_before;
    let n = calls.load(Ordering::Relaxed).max(1);
    println!(
        "{way:14} latency {:>5} us  calls/s {:>8.0}  cpu/call {:>5.1} us",
        latency.as_micros(),
        n as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64
    );
}
