//! `tresor bench`: a load generator for sizing a deployment, through the real client and mTLS,
//! or against the XKS proxy's HTTPS API with requests it signs itself (SigV4), as AWS KMS does.
//!
//! Owns load shapes and their measurement: `connections` HTTP/2 connections, each carrying
//! `in_flight` concurrent requests; a duration or a request count; closed loop by default, or
//! open loop at a target rate, where a request that is late because earlier answers were
//! slow has its latency measured from its *scheduled* start, so that a slow server cannot hide
//! its queueing (coordinated omission); a request sent on time is measured from when it was
//! sent, so the timer's own lateness (tokio's has millisecond resolution) is not counted. Latencies go
//! into HDR histograms (microseconds, 3 significant digits).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use std::path::{Path, PathBuf};

use clap::Args;

use super::output::Output;
use super::{Exit, Failure};
use crate::client::{Client, Profile};
use crate::proto;
use crate::xks::client::{HttpVersion, XksClient};
use crate::xks::sigv4::Credential;

/// The XKS proxy as a bench target: each worker opens its own connection (HTTP/1.1 carries one
/// request at a time; AWS KMS itself spreads its calls over many connections).
#[derive(Debug, Clone)]
pub struct XksTarget {
    /// Where the proxy listens.
    pub addr: std::net::SocketAddr,
    /// The name its certificate is checked against (and the `Host`).
    pub server_name: String,
    /// Trust anchors for its certificate.
    pub roots: rustls::RootCertStore,
    /// The prefix's path (before `/kms/xks/v1`).
    pub path: String,
    /// The external key id.
    pub external_key: String,
    /// The SigV4 credential to sign with.
    pub credential: Credential,
    /// The SigV4 region.
    pub region: String,
    /// HTTP/1.1 or HTTP/2.
    pub http: HttpVersion,
}

/// One worker's connection.
enum Conn {
    Grpc(Client),
    Xks(XksClient, Arc<XksTarget>),
}

impl Conn {
    /// Sends one request of kind `op`; `blob` gives a ciphertext to unwrap (gRPC blob or the
    /// XKS Encrypt answer). Returns the error name on failure.
    async fn call(
        &mut self,
        op: BenchOp,
        key: &str,
        payload: &[u8],
        aad: &[u8],
        blob: &[u8],
    ) -> Result<(), String> {
        let client = match self {
            Conn::Grpc(client) => client,
            Conn::Xks(client, target) => {
                return xks_call(client, target, op, payload, aad, blob).await;
            }
        };
        let mut keys = client.keys();
        let result = match op {
            BenchOp::Wrap | BenchOp::Mixed => keys
                .wrap(proto::WrapRequest {
                    key: key.to_owned(),
                    plaintext: payload.to_vec(),
                    aad: aad.to_vec(),
                })
                .await
                .map(|_| ()),
            BenchOp::Unwrap => keys
                .unwrap(proto::UnwrapRequest {
                    ciphertext: blob.to_vec(),
                    aad: aad.to_vec(),
                    key: String::new(),
                })
                .await
                .map(|_| ()),
            BenchOp::Datakey => keys
                .generate_data_key(proto::GenerateDataKeyRequest {
                    key: key.to_owned(),
                    aad: aad.to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            BenchOp::Rewrap => keys
                .rewrap(proto::RewrapRequest {
                    ciphertext: blob.to_vec(),
                    aad: aad.to_vec(),
                    key: String::new(),
                })
                .await
                .map(|_| ()),
        };
        result.map_err(|s| super::exit::code_name(s.code()).to_owned())
    }
}

/// One XKS Encrypt (wrap, datakey) or Decrypt (unwrap; `blob` is an Encrypt answer).
async fn xks_call(
    client: &mut XksClient,
    target: &XksTarget,
    op: BenchOp,
    payload: &[u8],
    aad: &[u8],
    blob: &[u8],
) -> Result<(), String> {
    let (operation, body) = xks_body(op, payload, aad, blob)?;
    let path = format!(
        "{}/kms/xks/v1/keys/{}/{operation}",
        target.path, target.external_key
    );
    let body = bytes::Bytes::from(body.to_string());
    let (status, answer) = client
        .send(xks_request(client, target, &path, body))
        .await
        .map_err(|_| "CONNECTION".to_owned())?;
    if status == http::StatusCode::OK {
        return Ok(());
    }
    let name = serde_json::from_slice::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v["errorName"].as_str().map(str::to_owned));
    Err(name.unwrap_or_else(|| format!("HTTP {}", status.as_u16())))
}

/// The operation and JSON body of an XKS Encrypt (wrap, datakey) or Decrypt (unwrap, rewrap;
/// `blob` is an Encrypt answer).
fn xks_body(
    op: BenchOp,
    payload: &[u8],
    aad: &[u8],
    blob: &[u8],
) -> Result<(&'static str, serde_json::Value), String> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let meta = json!({
        "awsPrincipalArn": "arn:aws:iam::000000000000:user/tresor-bench",
        "kmsKeyArn": "arn:aws:kms:bench:000000000000:key/tresor-bench",
        "kmsOperation": "Encrypt",
        "kmsRequestId": "tresor-bench",
    });
    Ok(match op {
        BenchOp::Unwrap | BenchOp::Rewrap => {
            let encrypted: serde_json::Value =
                serde_json::from_slice(blob).map_err(|_| "no ciphertext to decrypt".to_owned())?;
            (
                "decrypt",
                json!({
                    "requestMetadata": meta,
                    "ciphertext": encrypted["ciphertext"],
                    "ciphertextMetadata": encrypted["ciphertextMetadata"],
                    "initializationVector": encrypted["initializationVector"],
                    "authenticationTag": encrypted["authenticationTag"],
                    "additionalAuthenticatedData": b64(aad),
                    "encryptionAlgorithm": "AES_GCM",
                }),
            )
        }
        _ => (
            "encrypt",
            json!({
                "requestMetadata": meta,
                "plaintext": b64(payload),
                "additionalAuthenticatedData": b64(aad),
                "encryptionAlgorithm": "AES_GCM",
            }),
        ),
    })
}

/// A request signed as AWS KMS signs it (SigV4, `host;x-amz-date`).
fn xks_request(
    client: &XksClient,
    target: &XksTarget,
    path: &str,
    body: bytes::Bytes,
) -> http::Request<bytes::Bytes> {
    let (authorization, date) = crate::xks::sigv4::sign(
        &target.credential,
        &target.region,
        &client.authority,
        path,
        &body,
        std::time::SystemTime::now(),
    );
    let mut request = client.request(http::Method::POST, path, body);
    for (name, value) in [("authorization", authorization), ("x-amz-date", date)] {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            request.headers_mut().insert(name, v);
        }
    }
    request
}

/// Where the load goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// The gRPC API, with a connection profile.
    Grpc(Profile),
    /// The XKS proxy.
    Xks(XksTarget),
}

/// Operations the benchmark can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOp {
    /// `Wrap` of a random payload.
    Wrap,
    /// `Unwrap` of blobs wrapped before the measurement.
    Unwrap,
    /// `GenerateDataKey` (32 bytes).
    Datakey,
    /// `Rewrap` of blobs wrapped before the measurement.
    Rewrap,
    /// Half `Wrap`, half `Unwrap`.
    Mixed,
}

/// What to send, how much, how fast.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// The key to use.
    pub key: String,
    /// The operation.
    pub op: BenchOp,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Requests in flight per connection.
    pub in_flight: usize,
    /// Stop after this long...
    pub duration: Duration,
    /// ...or after this many requests, if set.
    pub requests: Option<u64>,
    /// Plaintext size in bytes.
    pub payload: usize,
    /// AAD size in bytes.
    pub aad: usize,
    /// Open loop at this many requests per second, if set.
    pub rate: Option<f64>,
}

/// The measurement.
#[derive(Debug)]
pub struct BenchReport {
    /// Requests that succeeded.
    pub ok: u64,
    /// Failed requests by gRPC code name.
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the measurement.
    pub elapsed: Duration,
    /// Latencies of successful requests, microseconds.
    pub latency: Histogram<u64>,
}

fn histogram() -> Result<Histogram<u64>, Failure> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| Failure::new(Exit::Other, format!("histogram: {e}"), "report this"))
}

/// A ciphertext to unwrap: a Tresor blob, or an XKS Encrypt answer (JSON).
async fn make_blob(
    conn: &mut Conn,
    key: &str,
    payload: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, Failure> {
    match conn {
        Conn::Grpc(client) => Ok(client
            .keys()
            .wrap(proto::WrapRequest {
                key: key.to_owned(),
                plaintext: payload.to_vec(),
                aad: aad.to_vec(),
            })
            .await
            .map_err(|s| super::exit::from_status(&s))?
            .into_inner()
            .ciphertext),
        Conn::Xks(client, target) => {
            let (_, body) = xks_body(BenchOp::Wrap, payload, aad, &[])
                .map_err(|e| Failure::new(Exit::Other, e, "report this"))?;
            let path = format!(
                "{}/kms/xks/v1/keys/{}/encrypt",
                target.path, target.external_key
            );
            let request = xks_request(client, target, &path, bytes::Bytes::from(body.to_string()));
            let (status, answer) = client.send(request).await.map_err(|e| {
                Failure::new(
                    Exit::Dependency,
                    format!("XKS proxy: {e}"),
                    "check --xks and --xks-ca",
                )
            })?;
            if status != http::StatusCode::OK {
                return Err(Failure::new(
                    Exit::Other,
                    format!(
                        "XKS Encrypt failed ({status}): {}",
                        String::from_utf8_lossy(&answer)
                    ),
                    "check --xks-key, the credentials and the key's usage",
                ));
            }
            Ok(answer.to_vec())
        }
    }
}

/// Runs the plan against `target`.
pub async fn run(target: &Target, plan: &BenchPlan) -> Result<BenchReport, Failure> {
    let workers = plan.connections.max(1) * plan.in_flight.max(1);
    let mut conns = Vec::with_capacity(workers);
    match target {
        Target::Grpc(profile) => {
            let mut clients = Vec::with_capacity(plan.connections);
            for _ in 0..plan.connections.max(1) {
                clients.push(Client::connect(profile).await?);
            }
            for w in 0..workers {
                conns.push(Conn::Grpc(clients[w % clients.len()].clone()));
            }
        }
        Target::Xks(x) => {
            let x = Arc::new(x.clone());
            for _ in 0..workers {
                let client =
                    XksClient::connect(x.addr, &x.server_name, x.roots.clone(), x.http, None)
                        .await
                        .map_err(|e| {
                            Failure::new(
                                Exit::Dependency,
                                format!("XKS proxy: {e}"),
                                "check --xks and --xks-ca",
                            )
                        })?;
                conns.push(Conn::Xks(client, Arc::clone(&x)));
            }
        }
    }
    let payload = vec![0x5a; plan.payload.max(1)];
    let aad = vec![0xa5; plan.aad];

    // Blobs to unwrap or rewrap, made before the clock starts.
    let needs_blobs = matches!(plan.op, BenchOp::Unwrap | BenchOp::Rewrap | BenchOp::Mixed);
    let mut blobs = Vec::new();
    if needs_blobs {
        for _ in 0..64 {
            blobs.push(make_blob(&mut conns[0], &plan.key, &payload, &aad).await?);
        }
    }
    let blobs = Arc::new(blobs);
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + plan.duration;
    // Open loop: worker w sends request k at start + (k * workers + w) / rate.
    let interval = plan
        .rate
        .map(|r| Duration::from_secs_f64(workers as f64 / r.max(0.001)));

    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos} requests, {per_sec} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );

    let mut tasks = Vec::with_capacity(workers);
    for (w, mut conn) in conns.into_iter().enumerate() {
        let (blobs, issued, done, progress) = (
            Arc::clone(&blobs),
            Arc::clone(&issued),
            Arc::clone(&done),
            progress.clone(),
        );
        let (key, payload, aad, op, limit) = (
            plan.key.clone(),
            payload.clone(),
            aad.clone(),
            plan.op,
            plan.requests,
        );
        let offset = plan
            .rate
            .map(|r| Duration::from_secs_f64(w as f64 / r.max(0.001)));
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram()?;
            let mut ok = 0u64;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut k = 0u32;
            loop {
                let (scheduled, sent) = match (interval, offset) {
                    (Some(i), Some(o)) => {
                        let at = start + o + i * k;
                        if at >= deadline {
                            break;
                        }
                        if Instant::now() < at {
                            // Ahead of schedule: the server is keeping up. Tokio's timer wakes
                            // up to a millisecond late; that lateness is the load generator's,
                            // so latency counts from the actual send.
                            tokio::time::sleep_until(at.into()).await;
                            let sent = Instant::now();
                            (sent, sent)
                        } else {
                            // Behind schedule because earlier answers were slow: latency
                            // counts from the scheduled start (no coordinated omission).
                            (at, Instant::now())
                        }
                    }
                    _ => {
                        let now = Instant::now();
                        (now, now)
                    }
                };
                k += 1;
                if sent >= deadline {
                    break;
                }
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|l| n >= l) {
                    break;
                }
                let this = match op {
                    BenchOp::Mixed if n % 2 == 0 => BenchOp::Wrap,
                    BenchOp::Mixed => BenchOp::Unwrap,
                    other => other,
                };
                let blob: &[u8] = blobs
                    .get((n as usize) % blobs.len().max(1))
                    .map_or(&[], |b| b.as_slice());
                let result = conn.call(this, &key, &payload, &aad, blob).await;
                match result {
                    Ok(()) => {
                        ok += 1;
                        let micros =
                            u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
                        latency.saturating_record(micros.max(1));
                    }
                    Err(name) => *errors.entry(name).or_default() += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
                progress.inc(1);
            }
            Ok::<_, Failure>((ok, errors, latency))
        }));
    }
    let mut report = BenchReport {
        ok: 0,
        errors: BTreeMap::new(),
        elapsed: Duration::ZERO,
        latency: histogram()?,
    };
    for t in tasks {
        let (ok, errors, latency) = t.await.map_err(|e| {
            Failure::new(
                Exit::Other,
                format!("bench worker failed: {e}"),
                "report this",
            )
        })??;
        report.ok += ok;
        for (code, n) in errors {
            *report.errors.entry(code).or_default() += n;
        }
        report
            .latency
            .add(&latency)
            .map_err(|e| Failure::new(Exit::Other, format!("histogram: {e}"), "report this"))?;
    }
    report.elapsed = start.elapsed();
    progress.finish_and_clear();
    Ok(report)
}

impl BenchReport {
    /// Successful requests per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    fn micros(&self, q: f64) -> u64 {
        if self.latency.is_empty() {
            0
        } else {
            self.latency.value_at_quantile(q)
        }
    }

    /// The report as JSON.
    pub fn to_json(&self, plan: &BenchPlan) -> serde_json::Value {
        json!({
            "op": format!("{:?}", plan.op).to_lowercase(),
            "connections": plan.connections,
            "in_flight_per_connection": plan.in_flight,
            "payload_bytes": plan.payload,
            "aad_bytes": plan.aad,
            "target_rate": plan.rate,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "ok": self.ok,
            "throughput_per_second": self.throughput(),
            "latency_micros": {
                "p50": self.micros(0.50),
                "p90": self.micros(0.90),
                "p99": self.micros(0.99),
                "p99_9": self.micros(0.999),
                "max": self.latency.max(),
            },
            "errors": self.errors,
        })
    }

    /// The report for people.
    pub fn to_text(&self, plan: &BenchPlan) -> String {
        let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
        let mut s = format!(
            "{:?}: {} requests in {:.1} s = {:.0}/s ({} connections x {} in flight, {} B payload, {} B AAD{})\n",
            plan.op,
            self.ok,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            plan.connections,
            plan.in_flight,
            plan.payload,
            plan.aad,
            plan.rate
                .map(|r| format!(", open loop at {r}/s"))
                .unwrap_or_default(),
        );
        s.push_str(&format!(
            "latency: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}\n",
            ms(self.micros(0.5)),
            ms(self.micros(0.9)),
            ms(self.micros(0.99)),
            ms(self.micros(0.999)),
            ms(self.latency.max())
        ));
        if self.errors.is_empty() {
            s.push_str("errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            s.push_str(&format!("errors: {}", list.join(", ")));
        }
        s
    }
}

#[derive(Debug, Args)]
pub(super) struct BenchArgs {
    /// The key to use (tenants/{tenant}/keys/{key}); not needed with --raw-hsm or --xks.
    #[arg(long, required_unless_present_any = ["raw_hsm", "xks"])]
    pub(super) key: Option<String>,
    /// Load the XKS proxy instead of the gRPC API: its base URL up to the path prefix, e.g.
    /// https://xks.example.org:443/uksh (requests go to {URL}/kms/xks/v1/...). wrap = Encrypt,
    /// unwrap = Decrypt, mixed = both; one connection per request in flight.
    #[arg(long, requires_all = ["xks_key", "xks_credentials", "xks_region", "xks_ca"], conflicts_with_all = ["raw_hsm", "compare_raw"])]
    pub(super) xks: Option<String>,
    /// The external key id to use with --xks.
    #[arg(long)]
    pub(super) xks_key: Option<String>,
    /// A credentials file as the proxy reads it (its first pair signs).
    #[arg(long)]
    pub(super) xks_credentials: Option<PathBuf>,
    /// The SigV4 region the proxy expects.
    #[arg(long)]
    pub(super) xks_region: Option<String>,
    /// CA certificate(s) (PEM) that issued the proxy's certificate.
    #[arg(long)]
    pub(super) xks_ca: Option<PathBuf>,
    /// Speak HTTP/1.1 to the proxy (default HTTP/2).
    #[arg(long)]
    xks_http1: bool,
    /// Measure the ceiling instead: the same AES-GCM encryptions directly on the server's
    /// PKCS#11 module and token (from --config), no gRPC, no audit.
    #[arg(long, requires = "config", conflicts_with = "compare_raw")]
    pub(super) raw_hsm: bool,
    /// Measure the service, then the raw HSM, and print service/raw.
    #[arg(long, requires = "config")]
    pub(super) compare_raw: bool,
    /// The server's configuration (for --raw-hsm and --compare-raw: module, token, PIN).
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// Threads of the raw loop (default: the server's hsm.sessions).
    #[arg(long)]
    pub(super) threads: Option<usize>,
    /// What to send.
    #[arg(long, value_enum, default_value_t = BenchOp::Wrap)]
    pub(super) op: BenchOp,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(super) connections: u16,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(super) in_flight: u16,
    /// How long to run: 30s, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) duration: std::time::Duration,
    /// Stop after this many requests instead.
    #[arg(long)]
    pub(super) requests: Option<u64>,
    /// Plaintext bytes per request.
    #[arg(long, default_value_t = 32)]
    pub(super) payload: usize,
    /// AAD bytes per request.
    #[arg(long, default_value_t = 16)]
    pub(super) aad: usize,
    /// Open loop at this many requests per second (latency then counts from each request's
    /// scheduled start).
    #[arg(long)]
    pub(super) rate: Option<f64>,
}

/// The bench's XKS target from `--xks URL` and its companions.
pub(super) async fn xks_target(url: &str, a: &BenchArgs) -> Result<XksTarget, Failure> {
    let usage = |what: String| {
        Failure::new(
            Exit::Config,
            what,
            "write --xks https://HOST[:PORT][/PREFIX], e.g. https://xks.example.org/uksh",
        )
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| usage(format!("{url:?} is not an https:// URL")))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| usage(format!("{p:?} is not a port")))?,
        ),
        None => (authority, 443),
    };
    let addr = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| usage(format!("cannot resolve {host}")))?;
    let missing = |flag: &str| {
        Failure::new(
            Exit::Config,
            format!("{flag} is missing"),
            "--xks needs --xks-key, --xks-credentials, --xks-region and --xks-ca",
        )
    };
    let credentials_path = a
        .xks_credentials
        .as_deref()
        .ok_or_else(|| missing("--xks-credentials"))?;
    let credential = crate::xks::SharedCredentials::load(credentials_path)
        .map_err(|e| {
            Failure::new(
                Exit::Config,
                e.to_string(),
                "give the proxy's credentials file (mode 0600)",
            )
        })?
        .current()
        .first()
        .cloned()
        .ok_or_else(|| missing("a credential"))?;
    let mut roots = rustls::RootCertStore::empty();
    let ca = a.xks_ca.as_deref().ok_or_else(|| missing("--xks-ca"))?;
    for cert in crate::pki::load_certs(ca).map_err(|e| {
        Failure::new(
            Exit::Config,
            e.to_string(),
            "give the CA that issued the proxy's certificate",
        )
    })? {
        roots.add(cert).map_err(|e| {
            Failure::new(Exit::Config, e.to_string(), "give a CA certificate in PEM")
        })?;
    }
    Ok(XksTarget {
        addr,
        server_name: host.to_owned(),
        roots,
        path: path.trim_end_matches('/').to_owned(),
        external_key: a.xks_key.clone().ok_or_else(|| missing("--xks-key"))?,
        credential,
        region: a
            .xks_region
            .clone()
            .ok_or_else(|| missing("--xks-region"))?,
        http: if a.xks_http1 {
            crate::xks::client::HttpVersion::Http1
        } else {
            crate::xks::client::HttpVersion::Http2
        },
    })
}

pub(super) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: write a number and a unit, e.g. 30s, 2m"))?;
    match unit {
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(std::time::Duration::from_secs)
            .ok_or_else(|| format!("{s:?}: too long")),
        "ms" => Ok(std::time::Duration::from_millis(n)),
        _ => Err(format!("{s:?}: units are ms, s, m")),
    }
}

/// `tresor bench`: against a server (gRPC or XKS), optionally compared with the raw PKCS#11
/// loop in the same run, or the raw loop alone.
pub(super) async fn command(
    a: BenchArgs,
    profile: Option<&Path>,
    out: &Output,
) -> Result<(), Failure> {
    let (threads_arg, payload, aad_len) = (a.threads, a.payload, a.aad);
    let raw = move |config: &Path, duration| {
        let config = crate::config::Config::load(config).map_err(|e| {
            Failure::new(
                Exit::Config,
                e.to_string(),
                "give the server's configuration with --config",
            )
        })?;
        let threads = threads_arg.unwrap_or(config.hsm.sessions);
        crate::hsm::raw_gcm_encrypt(&config.hsm, threads, duration, payload, aad_len)
            .map(|r| (r, threads))
            .map_err(|e| {
                Failure::new(
                    Exit::Dependency,
                    format!("raw HSM loop: {e}"),
                    "check the module, token label and PIN in the configuration",
                )
            })
    };
    if a.raw_hsm {
        let config = a.config.clone().unwrap_or_default();
        let (r, threads) = tokio::task::spawn_blocking(move || raw(&config, a.duration))
            .await
            .map_err(|e| Failure::new(Exit::Other, e.to_string(), "report this"))??;
        out.raw(&r, threads, None);
        return Ok(());
    }
    let target = match &a.xks {
        Some(url) => Target::Xks(xks_target(url, &a).await?),
        None => {
            let path = profile.ok_or_else(|| {
                Failure::new(Exit::Config, "no connection profile", "pass --profile FILE or set TRESOR_PROFILE (see README \"Connection profiles\")")
            })?;
            Target::Grpc(Profile::load(path)?)
        }
    };
    let plan = BenchPlan {
        key: a.key.clone().unwrap_or_default(),
        op: a.op,
        connections: usize::from(a.connections),
        in_flight: usize::from(a.in_flight),
        duration: a.duration,
        requests: a.requests,
        payload: a.payload,
        aad: a.aad,
        rate: a.rate,
    };
    let report = run(&target, &plan).await?;
    let raw_report = if a.compare_raw {
        let config = a.config.clone().unwrap_or_default();
        let duration = plan.duration;
        Some(
            tokio::task::spawn_blocking(move || raw(&config, duration))
                .await
                .map_err(|e| Failure::new(Exit::Other, e.to_string(), "report this"))??,
        )
    } else {
        None
    };
    out.bench(&report, &plan, raw_report.as_ref().map(|(r, t)| (r, *t)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_refuse_overflow_instead_of_wrapping() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("999999999999999999m").is_err());
    }
}
