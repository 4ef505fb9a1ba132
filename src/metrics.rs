//! Operational metrics in the Prometheus text format, served on their own listener.
//!
//! Owns the counters and histograms and their exposition; the layers that observe something
//! (API, HSM, audit writer, scheduler) call [`global`] and record it. Nothing here carries a
//! key, a plaintext, an AAD, a caller's name or a request id: labels are operation names,
//! status codes and failure classes only, so the endpoint reveals load, not content.
//!
//! One registry per process: a server runs one of each layer, and tests that run several
//! servers in one process only compare increments.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::sync::lock;

/// Upper bounds (seconds) of latency buckets: 50 µs to 10 s.
const LATENCY_BUCKETS: [f64; 15] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
    10.0,
];

/// Upper bounds of audit batch-size buckets (records).
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A Prometheus histogram with fixed buckets; lock-free to record.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of observations, in millionths of the unit, so it fits an atomic integer.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        // Float to integer: saturating, and a negative or NaN value records as 0.
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    /// Requests by (operation, gRPC code name): count and latency from admission to answer.
    requests: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    /// Time each PKCS#11 operation spent in the module.
    pub hsm_calls: Histogram,
    /// Failed PKCS#11 operations by class (what the back-end concluded from the CKR code).
    hsm_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// PKCS#11 sessions in use and in the pool, as last reported by the back-end.
    hsm_sessions: Mutex<Option<SessionGauge>>,
    /// Records per audit commit.
    pub audit_batch: Histogram,
    /// Time of one audit commit (the INSERT and its fsync).
    pub audit_commit: Histogram,
    /// Scheduler passes, by outcome.
    scheduler_runs: Mutex<BTreeMap<&'static str, u64>>,
    /// Connections closed at accept because their listener or source was at its bound.
    connections_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Keys whose rows failed their integrity check (each load or re-read that found it).
    pub metadata_integrity_failures: Counter,
    /// Destructions the database called due that the HSM's evidence did not back.
    pub destructions_refused: Counter,
    /// Audit checkpoints refused because the database's chain does not extend the HSM anchor.
    pub audit_anchor_failures: Counter,
}

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(std::sync::atomic::AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Reads (sessions in use, pool size) from the back-end.
struct SessionGauge(Box<dyn Fn() -> (u64, u64) + Send + Sync>);

impl std::fmt::Debug for SessionGauge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionGauge")
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        requests: Mutex::new(BTreeMap::new()),
        hsm_calls: Histogram::new(&LATENCY_BUCKETS),
        hsm_errors: Mutex::new(BTreeMap::new()),
        hsm_sessions: Mutex::new(None),
        audit_batch: Histogram::new(&BATCH_BUCKETS),
        audit_commit: Histogram::new(&LATENCY_BUCKETS),
        scheduler_runs: Mutex::new(BTreeMap::new()),
        connections_refused: Mutex::new(BTreeMap::new()),
        metadata_integrity_failures: Counter::default(),
        destructions_refused: Counter::default(),
        audit_anchor_failures: Counter::default(),
    })
}

impl Metrics {
    /// Records one answered request.
    pub fn request(&self, operation: &'static str, code: &'static str, took: Duration) {
        lock(&self.requests)
            .entry((operation, code))
            .or_insert_with(|| Histogram::new(&LATENCY_BUCKETS))
            .observe_duration(took);
    }

    /// Records a failed PKCS#11 operation.
    pub fn hsm_error(&self, class: &'static str) {
        *lock(&self.hsm_errors).entry(class).or_default() += 1;
    }

    /// Where to read the session gauge from (the back-end registers itself when it opens).
    pub fn hsm_sessions_from(&self, gauge: impl Fn() -> (u64, u64) + Send + Sync + 'static) {
        *lock(&self.hsm_sessions) = Some(SessionGauge(Box::new(gauge)));
    }

    /// Records a connection closed at accept (its listener or source at its bound).
    pub fn connection_refused(&self, listener: &'static str) {
        *lock(&self.connections_refused).entry(listener).or_default() += 1;
    }

    /// Records a scheduler pass.
    pub fn scheduler_run(&self, outcome: &'static str) {
        *lock(&self.scheduler_runs).entry(outcome).or_default() += 1;
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP tresor_requests_seconds gRPC requests by operation and status: latency from admission to answer, audit record included.\n# TYPE tresor_requests_seconds histogram\n");
        for ((operation, code), h) in lock(&self.requests).iter() {
            h.write(
                &mut out,
                "tresor_requests_seconds",
                &format!("operation=\"{operation}\",code=\"{code}\""),
            );
        }
        out.push_str("# HELP tresor_hsm_call_seconds Time one PKCS#11 operation spent in the module.\n# TYPE tresor_hsm_call_seconds histogram\n");
        self.hsm_calls
            .write(&mut out, "tresor_hsm_call_seconds", "");
        out.push_str("# HELP tresor_hsm_errors_total Failed PKCS#11 operations by class.\n# TYPE tresor_hsm_errors_total counter\n");
        for (class, n) in lock(&self.hsm_errors).iter() {
            let _ = writeln!(out, "tresor_hsm_errors_total{{class=\"{class}\"}} {n}");
        }
        if let Some(gauge) = lock(&self.hsm_sessions).as_ref() {
            let (in_use, pool) = (gauge.0)();
            out.push_str("# HELP tresor_hsm_sessions_in_use PKCS#11 sessions busy with a call.\n# TYPE tresor_hsm_sessions_in_use gauge\n");
            let _ = writeln!(out, "tresor_hsm_sessions_in_use {in_use}");
            out.push_str("# HELP tresor_hsm_sessions Size of the session pool (hsm.sessions).\n# TYPE tresor_hsm_sessions gauge\n");
            let _ = writeln!(out, "tresor_hsm_sessions {pool}");
        }
        out.push_str("# HELP tresor_audit_batch_records Audit records per commit.\n# TYPE tresor_audit_batch_records histogram\n");
        self.audit_batch
            .write(&mut out, "tresor_audit_batch_records", "");
        out.push_str("# HELP tresor_audit_commit_seconds Time of one audit commit.\n# TYPE tresor_audit_commit_seconds histogram\n");
        self.audit_commit
            .write(&mut out, "tresor_audit_commit_seconds", "");
        out.push_str("# HELP tresor_connections_refused_total Connections closed at accept because their listener or source address was at its connection bound.\n# TYPE tresor_connections_refused_total counter\n");
        for (listener, n) in lock(&self.connections_refused).iter() {
            let _ = writeln!(
                out,
                "tresor_connections_refused_total{{listener=\"{listener}\"}} {n}"
            );
        }
        out.push_str("# HELP tresor_scheduler_runs_total Scheduler passes by outcome.\n# TYPE tresor_scheduler_runs_total counter\n");
        for (outcome, n) in lock(&self.scheduler_runs).iter() {
            let _ = writeln!(
                out,
                "tresor_scheduler_runs_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        for (name, help, counter) in [
            (
                "tresor_metadata_integrity_failures_total",
                "Keys found with database rows that fail their integrity check.",
                &self.metadata_integrity_failures,
            ),
            (
                "tresor_destructions_refused_total",
                "Destructions the database called due without a destruction order in the HSM.",
                &self.destructions_refused,
            ),
            (
                "tresor_audit_anchor_failures_total",
                "Audit checkpoints refused: the database's chain does not extend the HSM anchor.",
                &self.audit_anchor_failures,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        out
    }
}

/// Most scrapes answered at once; further connections are closed unanswered, so a flood of
/// connections to this port cannot take file descriptors or memory from the gRPC service.
const MAX_SCRAPES: usize = 8;

/// How long a scraper may take to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` (and nothing else) on `listener` until the process ends. Plain HTTP:
/// bind it to loopback or a management network (README).
pub async fn serve(listener: tokio::net::TcpListener) {
    let scrapes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = std::sync::Arc::clone(&scrapes).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_DEADLINE, answer(stream)).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Only the request line matters; what does not fit in 1 KiB is not read.
    let mut request = [0u8; 1024];
    let mut read = 0;
    loop {
        let n = stream.read(&mut request[read..]).await?;
        if n == 0 {
            return Ok(());
        }
        read += n;
        let seen = &request[..read];
        if seen.windows(4).any(|w| w == b"\r\n\r\n") || read == request.len() {
            break;
        }
    }
    stream
        .write_all(response_to(&request[..read]).as_bytes())
        .await?;
    stream.shutdown().await
}

fn response_to(request: &[u8]) -> String {
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = match line {
        b"GET /metrics HTTP/1.1" | b"GET /metrics HTTP/1.0" => ("200 OK", global().render()),
        _ if line.starts_with(b"GET ") => ("404 Not Found", "only /metrics is served\n".into()),
        _ => ("405 Method Not Allowed", "only GET /metrics\n".into()),
    };
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_complete() {
        let h = Histogram::new(&BATCH_BUCKETS);
        for v in [1.0, 3.0, 3.0, 2000.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.write(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"2\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1024\"} 3\n"), "{out}");
        // Above the last bound: only in +Inf and the count.
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 2007\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 4\n"), "{out}");
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert!(
            response_to(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").starts_with("HTTP/1.1 200")
        );
        assert!(response_to(b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(response_to(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn idle_connections_cannot_pile_up() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener));
        let mut idle = Vec::new();
        for _ in 0..MAX_SCRAPES {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept and park all of them.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut refused = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        refused.read_to_end(&mut buf).await.unwrap();
        assert!(buf.is_empty(), "answered beyond the cap");
        // Once they go, scrapes are answered again.
        drop(idle);
        let mut answer = String::new();
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
            scrape
                .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            answer.clear();
            let _ = scrape.read_to_string(&mut answer).await;
            if !answer.is_empty() {
                break;
            }
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
