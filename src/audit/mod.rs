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
mod bursts;
pub mod continuity;
pub mod file;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::audit_record::{self as record, Checkpoint, ExportItem, Record, RecordBody};
use crate::hsm::{Hsm, HsmError, ObjectId};
use crate::model::{from_hex_array, to_hex};
use crate::store::{ChainHead, Store, StoreError};
use writer::check_anchor;
use writer::{CheckpointReply, Writer};

/// Most records committed in one transaction.
pub const MAX_BATCH: usize = 1024;

// A batch is one INSERT; SQLite takes at most 32,766 parameters in a statement.
const _: () = assert!(MAX_BATCH * crate::store::RECORD_COLUMN_COUNT <= 32_766);
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
    /// The record (or the checkpoint asked for) could not be made durable.
    #[error("the audit log is unavailable: {0}")]
    NotDurable(#[from] NotDurable),
    /// The writer task is gone (the server is stopping).
    #[error("the audit log is unavailable: the audit writer stopped")]
    WriterStopped,
    /// The system's random number generator failed.
    #[error("the audit log is unavailable: no system randomness")]
    NoRandomness,
    /// An export's range could not be closed by a checkpoint.
    #[error("the audit log is unavailable: could not sign a closing checkpoint")]
    NoClosingCheckpoint,
    /// The receiver of an export went away.
    #[error("the export's receiver went away")]
    ExportClosed,
    /// A record inside a checkpointed range is missing from the database.
    #[error("audit record {0} is missing from the database")]
    RecordMissing(u64),
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

/// Why records or a checkpoint were not made durable. One value answers every caller of a
/// batch, so it is cheap to clone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotDurable {
    /// The writer refuses to go on ([`AuditLog::check_chain`]).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The batch's commit failed.
    #[error("audit records could not be committed: {0}")]
    Commit(Arc<StoreError>),
    /// The checkpoint could not be signed or stored.
    #[error("audit checkpoint failed: {0}")]
    Checkpoint(String),
}

/// Why the writer refuses to append and sign: the database's chain does not extend the HSM's
/// audit anchor, or went back (records were removed in the database).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

struct Pending {
    tenant: String,
    body: RecordBody,
    done: oneshot::Sender<Result<u64, NotDurable>>,
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
    /// Open bursts of identical refusals ([`bursts`]).
    bursts: bursts::Bursts,
    store: Store,
    /// Why the writer refuses to append and sign (the chain does not extend the anchor);
    /// `None` while it works. Written by the writer, read by health checks.
    refused: Arc<std::sync::RwLock<Option<Refusal>>>,
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

/// Logs a failure to destroy an audit key that was created but could not be recorded: it
/// protects nothing yet and can be removed by hand; the start fails either way.
fn discard_unrecorded(destroyed: Result<bool, HsmError>, id: ObjectId) {
    if let Err(e) = destroyed {
        tracing::warn!(object = %id, error = %e, "could not destroy an unrecorded audit key; remove it from the token by hand");
    }
}

fn random_id() -> Result<ObjectId, AuditError> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| AuditError::NoRandomness)?;
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
                    discard_unrecorded(hsm.destroy_signing_key(id).await, id);
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
                    discard_unrecorded(hsm.destroy_secret_key(id).await, id);
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
        let inner = Arc::new(Inner {
            commands,
            bursts: bursts::Bursts::default(),
            store,
            refused,
            aad_key,
            public_point,
            #[cfg(feature = "bench-unaudited")]
            noop: false,
        });
        tokio::spawn(bursts::flush(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The same log with appends replaced by a no-op, to measure what auditing costs.
    /// Exists only in builds with the `bench-unaudited` feature, which production never uses.
    #[cfg(feature = "bench-unaudited")]
    pub fn unaudited_for_benchmarks(&self) -> Self {
        Self {
            inner: Arc::new(Inner {
                commands: self.inner.commands.clone(),
                bursts: bursts::Bursts::default(),
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
    pub fn check_chain(&self) -> Result<(), Refusal> {
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
            .map_err(|_| AuditError::WriterStopped)?;
        Ok(wait.await.map_err(|_| AuditError::WriterStopped)??)
    }

    /// Records a refused call: the first of a burst of identical refusals is appended and
    /// waited for like [`AuditLog::append`]; the ones that follow within a second are counted
    /// into one burst record, appended when the second is over, and answered at once
    /// (SECURITY.md "Audit log", bursts). Allowed calls never wait behind a flood of refusals.
    pub async fn append_refusal(&self, tenant: &str, body: RecordBody) -> Result<(), AuditError> {
        let key = bursts::BurstKey::of(tenant, &body);
        match self
            .inner
            .bursts
            .note(key, &body, crate::model::now_millis())
        {
            bursts::Noted::First(expired) => {
                if let Some(expired) = expired {
                    let (burst_tenant, burst) = *expired;
                    self.append(&burst_tenant, burst).await?;
                }
                self.append(tenant, body).await.map(|_| ())
            }
            bursts::Noted::Folded => Ok(()),
        }
    }

    /// Appends every open burst's record now (at shutdown, so no count is lost).
    pub async fn flush_bursts(&self) {
        for (tenant, body) in self.inner.bursts.close(crate::model::now_millis(), true) {
            if let Err(e) = self.append(&tenant, body).await {
                tracing::error!(error = %e, "a burst record of refused calls could not be appended");
            }
        }
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
            .map_err(|_| AuditError::WriterStopped)?;
        Ok(wait.await.map_err(|_| AuditError::WriterStopped)??)
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
                .ok_or(AuditError::NoClosingCheckpoint)?,
        };
        let end = closing.seq;
        let send = |item| async { sink.send(item).await.map_err(|_| AuditError::ExportClosed) };
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
                return Err(AuditError::RecordMissing(next));
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
    /// Only records with this justification code.
    pub justification: Option<String>,
    /// Only records with this outcome (`OK`, `DENIED`, `RULE_DENIED`, …).
    pub outcome: Option<String>,
}

impl ExportFilter {
    /// A record without a tenant (an unauthenticated call, an identity the policy does not
    /// know) belongs to no tenant and is shown to every auditor: it is evidence of probing.
    fn shows(&self, r: &Record) -> bool {
        (r.tenant == self.tenant || r.tenant.is_empty())
            && (self.from_ms..=self.to_ms).contains(&r.time_ms)
            && self.key.as_ref().is_none_or(|k| &r.body.key == k)
            && self.caller.as_ref().is_none_or(|c| &r.body.caller == c)
            && self
                .justification
                .as_ref()
                .is_none_or(|j| &r.body.justification == j)
            && self.outcome.as_ref().is_none_or(|o| &r.body.outcome == o)
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
