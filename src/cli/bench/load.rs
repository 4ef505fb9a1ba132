//! `tresor bench`: a load generator for sizing a deployment, through the real client and mTLS,
//! or against the XKS proxy's HTTPS API with requests it signs itself (SigV4), as AWS KMS does,
//! or against the KMIP server (Encrypt, Decrypt, Get over TTLV, one connection per worker).
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

use crate::cli::{Exit, Failure};
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

/// The KMIP server as a bench target: each worker holds its own mutually authenticated
/// connection (a KMIP client waits for each answer) and uses one managed object. `Debug`
/// leaves out the TLS configuration (it holds the client's private key).
#[derive(Clone)]
pub struct KmipTarget {
    /// Where the server listens.
    pub addr: std::net::SocketAddr,
    /// The name its certificate is checked against.
    pub server_name: String,
    /// The TLS client configuration (trust anchors and the client certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// The managed object's Unique Identifier.
    pub object: String,
}

impl std::fmt::Debug for KmipTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipTarget")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("object", &self.object)
            .finish_non_exhaustive()
    }
}

type KmipStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// One worker's connection.
enum Conn {
    Grpc(Client),
    Xks(XksClient, Arc<XksTarget>),
    Kmip(Box<KmipStream>, Arc<KmipTarget>),
}

/// A KMIP 1.4 request message of one batch item.
fn kmip_request(
    operation: u32,
    payload: Vec<crate::kmip::ttlv::Ttlv>,
) -> zeroize::Zeroizing<Vec<u8>> {
    crate::kmip::ttlv::encode(&crate::kmip::message::request((1, 4), operation, payload))
}

/// Sends one KMIP request and returns the batch item's response payload, or the result
/// reason's number as the error name.
async fn kmip_exchange(
    stream: &mut KmipStream,
    request: &[u8],
) -> Result<crate::kmip::ttlv::Ttlv, String> {
    use crate::kmip::ttlv::{self, Ttlv, tag};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request)
        .await
        .map_err(|_| "CONNECTION".to_owned())?;
    let mut header = [0u8; 8];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|_| "CONNECTION".to_owned())?;
    let length = ttlv::announced_length(&header) as usize;
    if length > crate::kmip::MAX_MESSAGE {
        return Err("RESPONSE_TOO_LARGE".into());
    }
    let mut message = zeroize::Zeroizing::new(vec![0u8; 8 + length]);
    message[..8].copy_from_slice(&header);
    stream
        .read_exact(&mut message[8..])
        .await
        .map_err(|_| "CONNECTION".to_owned())?;
    let response = ttlv::decode(&message).map_err(|_| "INVALID_RESPONSE".to_owned())?;
    let item = response
        .child(tag::BATCH_ITEM)
        .ok_or_else(|| "INVALID_RESPONSE".to_owned())?;
    if item.child(tag::RESULT_STATUS).and_then(Ttlv::as_enum) != Some(0) {
        let reason = item
            .child(tag::RESULT_REASON)
            .and_then(Ttlv::as_enum)
            .unwrap_or(0);
        return Err(format!("KMIP_REASON_{reason:#x}"));
    }
    item.child(tag::RESPONSE_PAYLOAD)
        .cloned()
        .ok_or_else(|| "INVALID_RESPONSE".to_owned())
}

/// One KMIP Encrypt (wrap), Decrypt (unwrap; `blob` is an encoded Encrypt answer) or Get.
async fn kmip_call(
    stream: &mut KmipStream,
    target: &KmipTarget,
    op: BenchOp,
    payload: &[u8],
    aad: &[u8],
    blob: &[u8],
) -> Result<crate::kmip::ttlv::Ttlv, String> {
    use crate::kmip::message::operation;
    use crate::kmip::ttlv::{Ttlv, tag};
    let id = Ttlv::text(tag::UNIQUE_IDENTIFIER, target.object.clone());
    let bytes = |t, b: &[u8]| Ttlv::bytes(t, zeroize::Zeroizing::new(b.to_vec()));
    let request = match op {
        BenchOp::Get => kmip_request(operation::GET, vec![id]),
        BenchOp::Wrap | BenchOp::Mixed | BenchOp::Datakey => kmip_request(
            operation::ENCRYPT,
            vec![
                id,
                bytes(tag::DATA, payload),
                bytes(tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA, aad),
            ],
        ),
        BenchOp::Unwrap | BenchOp::Rewrap => {
            let sealed = crate::kmip::ttlv::decode(blob).map_err(|_| "BAD_BLOB".to_owned())?;
            let field = |t| {
                sealed
                    .child(t)
                    .and_then(Ttlv::as_bytes)
                    .map(|b| bytes(t, b))
                    .ok_or_else(|| "BAD_BLOB".to_owned())
            };
            kmip_request(
                operation::DECRYPT,
                vec![
                    id,
                    field(tag::DATA)?,
                    field(tag::IV_COUNTER_NONCE)?,
                    field(tag::AUTHENTICATED_ENCRYPTION_TAG)?,
                    bytes(tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA, aad),
                ],
            )
        }
    };
    kmip_exchange(stream, &request).await
}

/// A worker's KMIP connection. The listener lets one address start only so many handshakes
/// per second (`[kmip.limits]`), so a connection it closed at accept is retried for a while
/// (before the clock starts).
async fn kmip_connect(target: &KmipTarget) -> Result<KmipStream, Failure> {
    let mut attempt = 0;
    loop {
        match kmip_connect_once(target).await {
            Ok(stream) => return Ok(stream),
            Err(_) if attempt < 50 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn kmip_connect_once(target: &KmipTarget) -> Result<KmipStream, Failure> {
    let unreachable = |e: String| {
        Failure::new(
            Exit::Dependency,
            format!("KMIP server: {e}"),
            "check --kmip, --kmip-ca and the client certificate",
        )
    };
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(target.server_name.clone())
        .map_err(|e| unreachable(e.to_string()))?;
    tokio_rustls::TlsConnector::from(Arc::clone(&target.tls))
        .connect(name, tcp)
        .await
        .map_err(|e| unreachable(e.to_string()))
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
            Conn::Kmip(stream, target) => {
                return kmip_call(stream, target, op, payload, aad, blob)
                    .await
                    .map(|_| ());
            }
        };
        let mut keys = client.keys();
        let result = match op {
            BenchOp::Wrap | BenchOp::Mixed => keys
                .wrap(proto::WrapRequest {
                    justification: None,
                    key: key.to_owned(),
                    plaintext: payload.to_vec(),
                    aad: aad.to_vec(),
                })
                .await
                .map(|_| ()),
            BenchOp::Unwrap => keys
                .unwrap(proto::UnwrapRequest {
                    justification: None,
                    ciphertext: blob.to_vec(),
                    aad: aad.to_vec(),
                    key: String::new(),
                })
                .await
                .map(|_| ()),
            BenchOp::Datakey => keys
                .generate_data_key(proto::GenerateDataKeyRequest {
                    justification: None,
                    key: key.to_owned(),
                    aad: aad.to_vec(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            BenchOp::Rewrap => keys
                .rewrap(proto::RewrapRequest {
                    justification: None,
                    ciphertext: blob.to_vec(),
                    aad: aad.to_vec(),
                    key: String::new(),
                })
                .await
                .map(|_| ()),
            BenchOp::Get => return Err("GET_IS_KMIP_ONLY".into()),
        };
        result.map_err(|s| crate::cli::exit::code_name(s.code()).to_owned())
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
    /// The KMIP server.
    Kmip(KmipTarget),
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
    /// KMIP `Get` of the object (with `--kmip` only).
    Get,
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
                justification: None,
                key: key.to_owned(),
                plaintext: payload.to_vec(),
                aad: aad.to_vec(),
            })
            .await
            .map_err(|s| crate::cli::exit::from_status(&s))?
            .into_inner()
            .ciphertext),
        Conn::Kmip(stream, target) => {
            let sealed = kmip_call(stream, target, BenchOp::Wrap, payload, aad, &[])
                .await
                .map_err(|e| {
                    Failure::new(
                        Exit::Other,
                        format!("KMIP Encrypt failed: {e}"),
                        "check --kmip-object: an Active AES-128 or AES-256 object your certificate may use",
                    )
                })?;
            Ok(crate::kmip::ttlv::encode(&sealed).to_vec())
        }
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
        Target::Kmip(k) => {
            let k = Arc::new(k.clone());
            for _ in 0..workers {
                conns.push(Conn::Kmip(
                    Box::new(kmip_connect(&k).await?),
                    Arc::clone(&k),
                ));
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
