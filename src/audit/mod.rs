//! The tamper-evident audit log: records, hash chain, group-commit writer, checkpoints, export.
//!
//! Owns appending records durably and in order, signing checkpoints with the HSM's audit key,
//! computing AAD HMACs under a key derived from the HSM's audit HMAC key ([`AAD_KEY_LABEL`]),
//! and assembling verifiable exports. It talks to the HSM and the store only through their
//! interfaces and knows nothing of gRPC.
//! [`record`] is the pure part (encodings, hashes, the offline verifier), which the store
//! persists and `tresor audit verify` uses without a server.
//!
//! One writer task owns the chain head. Callers hand it a record and wait: it takes every
//! record queued at that moment (up to [`MAX_BATCH`]), chains them, commits them in one
//! transaction, and only then answers each caller. So concurrent requests share one commit
//! (group commit) without any added delay, and no caller learns of success before its record
//! is durable (fail closed). Checkpoints are signed by a task of their own, so a batch never
//! waits for the HSM. Before each signature the database's chain must extend the HSM's audit
//! anchor ([`anchor`]); a node whose database does not refuses to sign and to append (every
//! call then fails `UNAVAILABLE` and health is `NOT_SERVING`) until the records are restored.

pub mod anchor;
pub mod continuity;
pub mod file;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::audit_record::{
    self as record, Checkpoint, ExportItem, Record, RecordBody, checkpoint_message,
};
use crate::hsm::{Hsm, HsmError, ObjectId};
use crate::model::{from_hex_array, now_millis, to_hex};
use crate::store::{ChainHead, Store, StoreError};

/// Most records committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Records queued for the writer at most; callers beyond wait (back-pressure).
const QUEUE: usize = 8192;

/// Checkpoint policy.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Sign the chain head after this many records.
    pub checkpoint_every: u64,
    /// ... and at least this often while records arrive.
    pub checkpoint_interval: Duration,
    /// This node's id, written into every record it appends.
    pub node_id: String,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            node_id: String::new(),
        }
    }
}

/// Audit failures. Every one of them means the caller's operation must not report success.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The record could not be made durable.
    #[error("the audit log is unavailable: {0}")]
    Unavailable(String),
    /// The HSM failed.
    #[error("audit HSM operation failed: {0}")]
    Hsm(#[from] HsmError),
    /// The database failed.
    #[error("audit store failed: {0}")]
    Store(#[from] StoreError),
    /// An audit key is recorded in the database but missing from the HSM.
    #[error("the audit {0} key is recorded but missing from the HSM; restore it before starting")]
    KeyMissing(&'static str),
    /// The HSM's audit anchor could not be read, or the database's chain does not extend it.
    #[error("{0}")]
    Anchor(#[from] anchor::AnchorError),
}

struct Pending {
    tenant: String,
    body: RecordBody,
    done: oneshot::Sender<Result<u64, String>>,
}

// Appends are the common case on the hot path; boxing them would add an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Command {
    Append(Pending),
    /// Sign the current head now (if not yet signed) and answer with the latest checkpoint.
    Checkpoint(CheckpointReply),
}

/// The audit log handle: cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    store: Store,
    /// Why the writer refuses to append and sign (the chain does not extend the anchor);
    /// `None` while it works. Written by the writer, read by health checks.
    refused: Arc<std::sync::RwLock<Option<String>>>,
    /// The AAD HMAC key, derived in the HSM at start-up (see [`AAD_KEY_LABEL`]).
    aad_key: ring::hmac::Key,
    public_point: Vec<u8>,
    /// A build for measuring the cost of auditing; never in production builds.
    #[cfg(feature = "bench-unaudited")]
    noop: bool,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

const SIGNING: &str = "signing";
const HMAC: &str = "hmac";

/// What the HSM's audit HMAC key signs to give the AAD HMAC key: `aad_hmac` of a record is
/// HMAC-SHA256(HMAC-SHA256(K_audit, AAD_KEY_LABEL), aad). The derived key lives in memory so
/// that a request costs one HSM call (its crypto), not two; SoftHSM spends most of a call on
/// `C_SignInit`, and the second call halved what a Wrap could do (SECURITY.md, BENCHMARKS.md).
/// Every node and every restart derives the same key, so one `tresor audit hmac` value finds a
/// given AAD in the whole log.
pub const AAD_KEY_LABEL: &[u8] = b"tresor audit AAD HMAC key v1";

fn object_id(hex: &str) -> Option<ObjectId> {
    from_hex_array(hex).map(ObjectId)
}

fn random_id() -> Result<ObjectId, AuditError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| AuditError::Unavailable("no system randomness".into()))?;
    Ok(ObjectId(id))
}

impl AuditLog {
    /// Loads (or, at first start, creates in the HSM) the audit keys, continues the chain from
    /// the database, and starts the writer.
    pub async fn open(hsm: Hsm, store: Store, options: AuditOptions) -> Result<Self, AuditError> {
        let labels = format!("tresor-audit/{}", store.installation_id());
        let (signing, public_point) = match store.audit_key(SIGNING).await? {
            Some((id, point)) => {
                let id = object_id(&id).ok_or(AuditError::KeyMissing(SIGNING))?;
                let in_hsm = match hsm.signing_public_key(id).await {
                    Ok(p) => p,
                    Err(HsmError::ObjectNotFound(_)) => {
                        return Err(AuditError::KeyMissing(SIGNING));
                    }
                    Err(e) => return Err(e.into()),
                };
                if to_hex(&in_hsm) != point {
                    return Err(AuditError::KeyMissing(SIGNING));
                }
                (id, in_hsm)
            }
            None => {
                let id = random_id()?;
                let point = hsm
                    .generate_signing_key(id, format!("{labels}/signing"))
                    .await?;
                if let Err(e) = store
                    .insert_audit_key(SIGNING, &id.to_string(), &to_hex(&point))
                    .await
                {
                    let _ = hsm.destroy_signing_key(id).await;
                    return Err(e.into());
                }
                tracing::info!("audit signing key created in the HSM");
                (id, point)
            }
        };
        let hmac_key = match store.audit_key(HMAC).await? {
            Some((id, _)) => {
                let id = object_id(&id).ok_or(AuditError::KeyMissing(HMAC))?;
                if !hsm.secret_key_exists(id).await? {
                    return Err(AuditError::KeyMissing(HMAC));
                }
                id
            }
            None => {
                let id = random_id()?;
                hsm.generate_hmac_key(id, format!("{labels}/hmac")).await?;
                if let Err(e) = store.insert_audit_key(HMAC, &id.to_string(), "").await {
                    let _ = hsm.destroy_secret_key(id).await;
                    return Err(e.into());
                }
                id
            }
        };
        let aad_key = {
            let derived = Zeroizing::new(hsm.hmac_sha256(hmac_key, AAD_KEY_LABEL.to_vec()).await?);
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derived)
        };
        let head = store.audit_head().await?;
        let anchors =
            check_anchor(&hsm, &store, signing, head.unwrap_or(ChainHead::GENESIS)).await?;
        // One node (SQLite): only this writer moves the anchor, so it keeps it in memory instead
        // of listing the token before every signature.
        let anchors = (store.backend() == crate::store::Backend::Sqlite).then_some(anchors);
        let refused = Arc::new(std::sync::RwLock::new(None));
        let checkpointed = store
            .audit_latest_checkpoint()
            .await?
            .map(|c| c.seq)
            .unwrap_or(0);
        let (commands, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            store: store.clone(),
            hsm: hsm.clone(),
            signing_key: signing,
            options,
            head: head.unwrap_or(ChainHead::GENESIS),
            checkpointed,
            last_checkpoint: tokio::time::Instant::now(),
            verified: head.map(|h| (h.seq, h.hash)),
            anchored_at: None,
            signing: None,
            waiting: Vec::new(),
            retry_at: None,
            refused: Arc::clone(&refused),
            anchors,
        };
        tokio::spawn(writer.run(rx));
        Ok(Self {
            inner: Arc::new(Inner {
                commands,
                store,
                refused,
                aad_key,
                public_point,
                #[cfg(feature = "bench-unaudited")]
                noop: false,
            }),
        })
    }

    /// The same log with appends replaced by a no-op, to measure what auditing costs.
    /// Exists only in builds with the `bench-unaudited` feature, which production never uses.
    #[cfg(feature = "bench-unaudited")]
    pub fn unaudited_for_benchmarks(&self) -> Self {
        Self {
            inner: Arc::new(Inner {
                commands: self.inner.commands.clone(),
                store: self.inner.store.clone(),
                refused: Arc::clone(&self.inner.refused),
                aad_key: self.inner.aad_key.clone(),
                public_point: self.inner.public_point.clone(),
                noop: true,
            }),
        }
    }

    /// `Err` with the reason while the writer refuses to append and sign because the
    /// database's chain does not extend the HSM's audit anchor (for the health service).
    pub fn check_chain(&self) -> Result<(), String> {
        match crate::sync::read(&self.inner.refused).as_ref() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Appends a record and waits until it is durable; returns its sequence number.
    pub async fn append(&self, tenant: &str, body: RecordBody) -> Result<u64, AuditError> {
        #[cfg(feature = "bench-unaudited")]
        if self.inner.noop {
            return Ok(0);
        }
        let (done, wait) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Append(Pending {
                tenant: tenant.to_owned(),
                body,
                done,
            }))
            .await
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?
            .map_err(AuditError::Unavailable)
    }

    /// The AAD's HMAC for its audit record (see [`AAD_KEY_LABEL`]), hex; empty for empty AAD.
    pub fn hmac_aad(&self, aad: &[u8]) -> String {
        if aad.is_empty() {
            return String::new();
        }
        #[cfg(feature = "bench-unaudited")]
        if self.inner.noop {
            return String::new();
        }
        to_hex(ring::hmac::sign(&self.inner.aad_key, aad).as_ref())
    }

    /// The checkpoint public key, SubjectPublicKeyInfo PEM.
    pub fn public_key_pem(&self) -> String {
        crate::pki::pem("PUBLIC KEY", &record::p256_spki(&self.inner.public_point))
    }

    /// Signs the chain head now unless it already is, and returns the latest checkpoint.
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (reply, wait) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Checkpoint(reply))
            .await
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))?
            .map_err(AuditError::Unavailable)
    }

    /// Streams a verifiable export (see [`ExportFilter`]) into `sink`, in chain order: the
    /// checkpoint before the range as anchor, every record from there to a checkpoint at or
    /// after the range's end (shown if it matches, withheld otherwise), and the checkpoints in
    /// between. Returns how many records were shown.
    pub async fn export(
        &self,
        filter: &ExportFilter,
        sink: &mpsc::Sender<ExportItem>,
    ) -> Result<u64, AuditError> {
        let store = &self.inner.store;
        let Some((lo, hi)) = store.audit_seq_range(filter.from_ms, filter.to_ms).await? else {
            return Ok(0);
        };
        let anchor = store.audit_checkpoint_before(lo).await?;
        let start = anchor.as_ref().map_or(1, |c| c.seq + 1);
        let closing = match store.audit_checkpoint_from(hi).await? {
            Some(c) => c,
            None => self
                .checkpoint_now()
                .await?
                .filter(|c| c.seq >= hi)
                .ok_or_else(|| {
                    AuditError::Unavailable("could not sign a closing checkpoint".into())
                })?,
        };
        let end = closing.seq;
        let send = |item| async {
            sink.send(item)
                .await
                .map_err(|_| AuditError::Unavailable("export receiver went away".into()))
        };
        if let Some(a) = anchor {
            send(ExportItem::Checkpoint(a)).await?;
        }
        let mut checkpoints = store
            .audit_checkpoints(start, end)
            .await?
            .into_iter()
            .peekable();
        let mut shown = 0;
        let mut next = start;
        while next <= end {
            let page = store.audit_records(next, end, 1000).await?;
            if page.is_empty() {
                return Err(AuditError::Unavailable(format!(
                    "audit record {next} is missing from the database"
                )));
            }
            for (r, _) in page {
                next = r.seq + 1;
                let seq = r.seq;
                if filter.shows(&r) {
                    shown += 1;
                    send(ExportItem::Record(r)).await?;
                } else {
                    let body_digest = r.body.digest();
                    send(ExportItem::Withheld {
                        seq: r.seq,
                        prev_hash: r.prev_hash,
                        time_ms: r.time_ms,
                        tenant: r.tenant,
                        body_digest,
                    })
                    .await?;
                }
                while checkpoints.peek().is_some_and(|c| c.seq == seq) {
                    if let Some(c) = checkpoints.next() {
                        send(ExportItem::Checkpoint(c)).await?;
                    }
                }
            }
        }
        Ok(shown)
    }
}

/// Which records an export shows; all others in its span are withheld (header and digest only).
#[derive(Debug, Clone)]
pub struct ExportFilter {
    /// Only this tenant's records (and records of no tenant) are shown.
    pub tenant: String,
    /// First millisecond of the range (UTC).
    pub from_ms: i64,
    /// Last millisecond of the range (UTC).
    pub to_ms: i64,
    /// Only records of this key.
    pub key: Option<String>,
    /// Only records of this caller.
    pub caller: Option<String>,
}

impl ExportFilter {
    /// A record without a tenant (an unauthenticated call, an identity the policy does not
    /// know) belongs to no tenant and is shown to every auditor: it is evidence of probing.
    fn shows(&self, r: &Record) -> bool {
        (r.tenant == self.tenant || r.tenant.is_empty())
            && (self.from_ms..=self.to_ms).contains(&r.time_ms)
            && self.key.as_ref().is_none_or(|k| &r.body.key == k)
            && self.caller.as_ref().is_none_or(|c| &r.body.caller == c)
    }
}

/// The task that owns the chain head.
struct Writer {
    store: Store,
    hsm: Hsm,
    signing_key: ObjectId,
    options: AuditOptions,
    /// The chain head as this writer last committed it. Another node may have extended the
    /// chain since (PostgreSQL); the store then continues from the database's head instead.
    head: ChainHead,
    /// Highest sequence number covered by a checkpoint.
    checkpointed: u64,
    last_checkpoint: tokio::time::Instant,
    /// The last chain head (sequence number, hash) this writer found extending the anchor: the
    /// next check links from here, not from the anchor again.
    verified: Option<(u64, [u8; 32])>,
    /// When this writer last moved the anchor: at most once per [`ANCHOR_EVERY`].
    anchored_at: Option<tokio::time::Instant>,
    /// The checkpoint being signed and stored, at most one at a time.
    signing: Option<SignatureTask>,
    /// `checkpoint_now` callers and the sequence number their checkpoint must cover.
    waiting: Vec<(u64, CheckpointReply)>,
    /// After a failed signature, the next due one waits until then.
    retry_at: Option<tokio::time::Instant>,
    /// Set when the database's chain does not extend the HSM anchor: appends are refused
    /// and checkpoints retried until it does again.
    refused: Arc<std::sync::RwLock<Option<String>>>,
    /// The HSM's anchors as this writer last left them; `Some` only on SQLite, where no other
    /// node moves them (on PostgreSQL they are read from the HSM before every signature).
    anchors: Option<anchor::Anchors>,
}

/// A stored checkpoint and the anchors after it.
type Signed = (Checkpoint, anchor::Anchors);

/// Why a checkpoint was not made.
#[derive(Debug, Clone)]
enum CheckpointFailure {
    /// The HSM or the database failed: try again later.
    Transient(String),
    /// The database's chain does not extend the HSM anchor: refuse to go on.
    Refused(String),
}

impl std::fmt::Display for CheckpointFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient(e) | Self::Refused(e) => f.write_str(e),
        }
    }
}

fn failure(e: anchor::AnchorError) -> CheckpointFailure {
    match e {
        e @ (anchor::AnchorError::Mismatch { .. } | anchor::AnchorError::Conflicting(..)) => {
            CheckpointFailure::Refused(e.to_string())
        }
        e => CheckpointFailure::Transient(e.to_string()),
    }
}

/// At open: the database's chain must extend the HSM anchor. Without an anchor (the first start
/// of a build that keeps one, or a fresh log), the latest stored checkpoint becomes the anchor.
async fn check_anchor(
    hsm: &Hsm,
    store: &Store,
    signing: ObjectId,
    head: ChainHead,
) -> Result<anchor::Anchors, AuditError> {
    let anchors = anchor::read(hsm, signing).await?;
    match anchors.latest {
        Some(a) => anchor::extends(store, a, head, anchor::Check::Content).await?,
        None => {
            if let Some(c) = store.audit_latest_checkpoint().await? {
                let a = anchor::Anchor {
                    seq: c.seq,
                    hash: c.hash,
                };
                anchor::extends(store, a, head, anchor::Check::Content).await?;
                tracing::warn!(anchor = %a, "no audit anchor in the HSM yet: the latest stored checkpoint becomes the anchor");
                return Ok(anchor::advance(hsm, signing, &anchors, a).await?);
            }
        }
    }
    Ok(anchors)
}

type CheckpointReply = oneshot::Sender<Result<Option<Checkpoint>, String>>;
type SignatureTask = tokio::task::JoinHandle<Result<Signed, CheckpointFailure>>;

/// Periodic checkpoints move the anchor forward at most this often (each move creates and
/// destroys token objects, which slowed every other HSM call on SoftHSM by about a tenth at 18
/// checkpoints a second), so it trails the latest checkpoint by at most this long; one that a
/// caller waits for always moves it.
const ANCHOR_EVERY: Duration = Duration::from_secs(1);

/// A failed checkpoint is tried again after this long (or at once for a waiting caller).
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// The outcome of the signature in progress; never ready while there is none.
async fn signature_finished(task: &mut Option<SignatureTask>) -> Result<Signed, CheckpointFailure> {
    let Some(running) = task else {
        return std::future::pending().await;
    };
    let result = running.await.unwrap_or_else(|e| {
        Err(CheckpointFailure::Transient(format!(
            "checkpoint task failed: {e}"
        )))
    });
    *task = None;
    result
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(
            self.options
                .checkpoint_interval
                .min(Duration::from_secs(60)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = rx.recv() => {
                    let Some(command) = command else { break };
                    let mut batch = Vec::new();
                    let mut checkpoint_requests = Vec::new();
                    let mut next = Some(command);
                    while let Some(c) = next.take() {
                        match c {
                            Command::Append(p) => batch.push(p),
                            Command::Checkpoint(reply) => checkpoint_requests.push(reply),
                        }
                        if batch.len() < MAX_BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    if !batch.is_empty() {
                        self.commit(batch).await;
                    }
                    for reply in checkpoint_requests {
                        self.checkpoint_wanted(reply).await;
                    }
                }
                result = signature_finished(&mut self.signing) => self.checkpoint_signed(result),
                _ = tick.tick() => {}
            }
            self.start_checkpoint_if_due();
        }
        // The HSM stays in use until an unfinished signature is done.
        if let Some(task) = self.signing.take() {
            let result = task.await.unwrap_or_else(|e| {
                Err(CheckpointFailure::Transient(format!(
                    "checkpoint task failed: {e}"
                )))
            });
            self.checkpoint_signed(result);
        }
    }

    /// Answers a `checkpoint_now` caller at once if the head is signed, or once it is.
    async fn checkpoint_wanted(&mut self, reply: CheckpointReply) {
        if let Some(why) = crate::sync::read(&self.refused).clone() {
            let _ = reply.send(Err(why));
        } else if self.head.seq == 0 {
            let _ = reply.send(Ok(None));
        } else if self.head.seq == self.checkpointed {
            let latest = self.store.audit_latest_checkpoint().await;
            let _ = reply.send(latest.map_err(|e| e.to_string()));
        } else {
            self.waiting.push((self.head.seq, reply));
        }
    }

    /// Starts signing the head, off the commit path, when it is due: every
    /// `checkpoint_every` records, after `checkpoint_interval`, or when a caller waits. In the
    /// writer itself, the signature (an HSM call, seconds on a slow HSM) and the checkpoint's
    /// own commit held up every batch queued behind them.
    fn start_checkpoint_if_due(&mut self) {
        if self.signing.is_some() || self.head.seq <= self.checkpointed {
            return;
        }
        let caller_waits = !self.waiting.is_empty();
        let retry_allowed = self
            .retry_at
            .is_none_or(|at| tokio::time::Instant::now() >= at);
        let due = self.head.seq >= self.checkpointed + self.options.checkpoint_every
            || self.last_checkpoint.elapsed() >= self.options.checkpoint_interval
            || crate::sync::read(&self.refused).is_some();
        if !(caller_waits || (due && retry_allowed)) {
            return;
        }
        let (hsm, store, key, head, cached, verified) = (
            self.hsm.clone(),
            self.store.clone(),
            self.signing_key,
            self.head,
            self.anchors.clone(),
            self.verified,
        );
        // A checkpoint someone waits for (an export, GetAuditCheckpoint) always moves it.
        let move_anchor = caller_waits
            || self
                .anchored_at
                .is_none_or(|at| at.elapsed() >= ANCHOR_EVERY);
        self.signing = Some(tokio::spawn(async move {
            let transient = |e: &dyn std::fmt::Display| CheckpointFailure::Transient(e.to_string());
            // Never sign a head that does not extend what the HSM last anchored.
            let anchored = match cached {
                Some(anchors) => anchors,
                None => anchor::read(&hsm, key).await.map_err(failure)?,
            };
            if let Some(a) = anchored.latest {
                // The anchor's record is unchanged, and the chain links from the last head this
                // writer verified (a later point of the same chain) to the head to sign.
                let anchor_record = ChainHead {
                    seq: a.seq,
                    hash: a.hash,
                    time_ms: 0,
                };
                anchor::extends(&store, a, anchor_record, anchor::Check::Links)
                    .await
                    .map_err(failure)?;
                let from = verified
                    .filter(|(seq, _)| *seq > a.seq && *seq <= head.seq)
                    .map_or(a, |(seq, hash)| anchor::Anchor { seq, hash });
                anchor::extends(&store, from, head, anchor::Check::Links)
                    .await
                    .map_err(failure)?;
            }
            let time_ms = now_millis().max(head.time_ms);
            let message = checkpoint_message(head.seq, &head.hash, time_ms);
            let signature = hsm
                .sign_p256(key, message)
                .await
                .map_err(|e| transient(&e))?;
            let c = Checkpoint {
                seq: head.seq,
                hash: head.hash,
                time_ms,
                signature,
            };
            store
                .insert_checkpoint(&c)
                .await
                .map_err(|e| transient(&e))?;
            let a = anchor::Anchor {
                seq: head.seq,
                hash: head.hash,
            };
            let anchors = if move_anchor {
                anchor::advance(&hsm, key, &anchored, a)
                    .await
                    .map_err(failure)?
            } else {
                anchored
            };
            Ok((c, anchors))
        }));
    }

    /// Takes the outcome of a signature: answers the callers it covers (all of them on failure).
    fn checkpoint_signed(&mut self, result: Result<Signed, CheckpointFailure>) {
        match result {
            Ok((c, anchors)) => {
                if anchors.latest.is_some_and(|a| a.seq == c.seq) {
                    self.anchored_at = Some(tokio::time::Instant::now());
                }
                self.verified = Some((c.seq, c.hash));
                if self.anchors.is_some() {
                    self.anchors = Some(anchors);
                }
                if crate::sync::write(&self.refused).take().is_some() {
                    tracing::warn!(
                        seq = c.seq,
                        "the audit chain extends the HSM anchor again; appending resumes"
                    );
                }
                self.checkpointed = self.checkpointed.max(c.seq);
                self.last_checkpoint = tokio::time::Instant::now();
                self.retry_at = None;
                let waiting = std::mem::take(&mut self.waiting);
                for (seq, reply) in waiting {
                    if seq <= c.seq {
                        let _ = reply.send(Ok(Some(c.clone())));
                    } else {
                        self.waiting.push((seq, reply));
                    }
                }
            }
            Err(e) => {
                if let CheckpointFailure::Refused(why) = &e {
                    self.refuse(why.clone());
                } else {
                    // The records are durable; a later checkpoint will cover them.
                    tracing::error!(error = %e, seq = self.head.seq, "audit checkpoint could not be signed; retrying later");
                }
                self.retry_at = Some(tokio::time::Instant::now() + CHECKPOINT_RETRY);
                for (_, reply) in self.waiting.drain(..) {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }

    /// From now on appends and signatures are refused, for `why`, until a checkpoint succeeds
    /// again (the records were restored).
    fn refuse(&self, why: String) {
        crate::metrics::global().audit_anchor_failures.inc();
        tracing::error!(error = %why, "audit log refuses to sign and append: health is NOT_SERVING");
        *crate::sync::write(&self.refused) = Some(why);
    }

    /// Chains and commits one batch; answers every caller only after the commit.
    async fn commit(&mut self, batch: Vec<Pending>) {
        if let Some(why) = crate::sync::read(&self.refused).clone() {
            for p in batch {
                let _ = p.done.send(Err(why.clone()));
            }
            return;
        }
        let count = batch.len();
        let mut entries = Vec::with_capacity(count);
        let mut waiting = Vec::with_capacity(count);
        for mut p in batch {
            p.body.node.clone_from(&self.options.node_id);
            entries.push((p.tenant, p.body));
            waiting.push(p.done);
        }
        let now = now_millis();
        let chain = move |head: ChainHead| {
            // Never earlier than the record before, whichever node wrote it.
            let time_ms = now.max(head.time_ms);
            let mut prev = head.hash;
            let mut rows = Vec::with_capacity(entries.len());
            for (seq, (tenant, body)) in (head.seq + 1..).zip(entries) {
                let r = Record {
                    seq,
                    prev_hash: prev,
                    time_ms,
                    tenant,
                    body,
                };
                prev = r.hash();
                rows.push((r, prev));
            }
            rows
        };
        let started = std::time::Instant::now();
        let committed = self.store.append_audit(self.head, chain).await;
        let metrics = crate::metrics::global();
        metrics.audit_commit.observe_duration(started.elapsed());
        metrics.audit_batch.observe(count as f64);
        match committed {
            Ok(rows) if rows.first().is_some_and(|(r, _)| r.seq <= self.head.seq) => {
                // The database's head was behind what this writer had committed: records were
                // removed underneath it (PostgreSQL continues from the database's head). These
                // records are on a shortened chain; their callers get no success.
                let why = format!(
                    "the audit chain in the database went back from record {} to record {}: records were removed in the database; restore them",
                    self.head.seq,
                    rows.first().map_or(0, |(r, _)| r.seq - 1)
                );
                self.refuse(why.clone());
                for done in waiting {
                    let _ = done.send(Err(why.clone()));
                }
            }
            Ok(rows) => {
                if let Some((last, hash)) = rows.last() {
                    self.head = ChainHead {
                        seq: last.seq,
                        hash: *hash,
                        time_ms: last.time_ms,
                    };
                }
                for ((r, _), done) in rows.iter().zip(waiting) {
                    let _ = done.send(Ok(r.seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = count, "audit records could not be committed; their operations fail");
                for done in waiting {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// A fresh request id for an audit record: 16 hex digits.
pub fn new_request_id() -> String {
    let mut raw = [0u8; 8];
    // A request id needs uniqueness, not secrecy; fall back to the clock if the RNG fails.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
        raw = crate::model::now_millis().to_be_bytes();
    }
    crate::model::to_hex(&raw)
}
