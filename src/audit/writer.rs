//! The writer task that owns the chain head: group commit of appended records, checkpoints signed
//! off the commit path, the HSM anchor moved forward, and the refusal to go on when the database's
//! chain does not extend the anchor.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{AuditError, AuditOptions, Command, MAX_BATCH, NotDurable, Pending, Refusal, anchor};
use crate::audit_record::{Checkpoint, Record, checkpoint_message};
use crate::hsm::{Hsm, ObjectId};
use crate::model::now_millis;
use crate::store::{ChainHead, Store};

/// The task that owns the chain head.
pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) hsm: Hsm,
    pub(super) signing_key: ObjectId,
    pub(super) options: AuditOptions,
    /// The chain head as this writer last committed it. Another node may have extended the
    /// chain since (PostgreSQL); the store then continues from the database's head instead.
    pub(super) head: ChainHead,
    /// Highest sequence number covered by a checkpoint.
    pub(super) checkpointed: u64,
    pub(super) last_checkpoint: tokio::time::Instant,
    /// The last chain head (sequence number, hash) this writer found extending the anchor: the
    /// next check links from here, not from the anchor again.
    pub(super) verified: Option<(u64, [u8; 32])>,
    /// When this writer last moved the anchor: at most once per [`ANCHOR_EVERY`].
    pub(super) anchored_at: Option<tokio::time::Instant>,
    /// The checkpoint being signed and stored, at most one at a time.
    pub(super) signing: Option<SignatureTask>,
    /// `checkpoint_now` callers and the sequence number their checkpoint must cover.
    pub(super) waiting: Vec<(u64, CheckpointReply)>,
    /// After a failed signature, the next due one waits until then.
    pub(super) retry_at: Option<tokio::time::Instant>,
    /// Set when the database's chain does not extend the HSM anchor: appends are refused
    /// and checkpoints retried until it does again.
    pub(super) refused: Arc<std::sync::RwLock<Option<Refusal>>>,
    /// The HSM's anchors as this writer last left them; `Some` only on SQLite, where no other
    /// node moves them (on PostgreSQL they are read from the HSM before every signature).
    pub(super) anchors: Option<anchor::Anchors>,
}

/// A stored checkpoint and the anchors after it.
pub(super) type Signed = (Checkpoint, anchor::Anchors);

/// Why a checkpoint was not made.
#[derive(Debug, Clone)]
pub(super) enum CheckpointFailure {
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

pub(super) fn failure(e: anchor::AnchorError) -> CheckpointFailure {
    match e {
        e @ (anchor::AnchorError::Mismatch { .. } | anchor::AnchorError::Conflicting(..)) => {
            CheckpointFailure::Refused(e.to_string())
        }
        e => CheckpointFailure::Transient(e.to_string()),
    }
}

/// At open: the database's chain must extend the HSM anchor. Without an anchor (the first start
/// of a build that keeps one, or a fresh log), the latest stored checkpoint becomes the anchor.
pub(super) async fn check_anchor(
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

pub(super) type CheckpointReply = oneshot::Sender<Result<Option<Checkpoint>, NotDurable>>;
pub(super) type SignatureTask = tokio::task::JoinHandle<Result<Signed, CheckpointFailure>>;

/// Periodic checkpoints move the anchor forward at most this often (each move creates and
/// destroys token objects, which slowed every other HSM call on SoftHSM by about a tenth at 18
/// checkpoints a second), so it trails the latest checkpoint by at most this long; one that a
/// caller waits for always moves it.
pub(super) const ANCHOR_EVERY: Duration = Duration::from_secs(1);

/// A failed checkpoint is tried again after this long (or at once for a waiting caller).
pub(super) const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// The outcome of the signature in progress; never ready while there is none.
pub(super) async fn signature_finished(
    task: &mut Option<SignatureTask>,
) -> Result<Signed, CheckpointFailure> {
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
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
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
    pub(super) async fn checkpoint_wanted(&mut self, reply: CheckpointReply) {
        if let Some(why) = crate::sync::read(&self.refused).clone() {
            let _ = reply.send(Err(why.into()));
        } else if self.head.seq == 0 {
            let _ = reply.send(Ok(None));
        } else if self.head.seq == self.checkpointed {
            let latest = self.store.audit_latest_checkpoint().await;
            let _ = reply.send(latest.map_err(|e| NotDurable::Commit(Arc::new(e))));
        } else {
            self.waiting.push((self.head.seq, reply));
        }
    }

    /// Starts signing the head, off the commit path, when it is due: every
    /// `checkpoint_every` records, after `checkpoint_interval`, or when a caller waits. In the
    /// writer itself, the signature (an HSM call, seconds on a slow HSM) and the checkpoint's
    /// own commit held up every batch queued behind them.
    pub(super) fn start_checkpoint_if_due(&mut self) {
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
    pub(super) fn checkpoint_signed(&mut self, result: Result<Signed, CheckpointFailure>) {
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
                    self.refuse(Refusal(why.clone()));
                } else {
                    // The records are durable; a later checkpoint will cover them.
                    tracing::error!(error = %e, seq = self.head.seq, "audit checkpoint could not be signed; retrying later");
                }
                self.retry_at = Some(tokio::time::Instant::now() + CHECKPOINT_RETRY);
                for (_, reply) in self.waiting.drain(..) {
                    let _ = reply.send(Err(NotDurable::Checkpoint(e.to_string())));
                }
            }
        }
    }

    /// From now on appends and signatures are refused, for `why`, until a checkpoint succeeds
    /// again (the records were restored).
    pub(super) fn refuse(&self, why: Refusal) {
        crate::metrics::global().audit_anchor_failures.inc();
        tracing::error!(error = %why, "audit log refuses to sign and append: health is NOT_SERVING");
        *crate::sync::write(&self.refused) = Some(why);
    }

    /// Chains and commits one batch; answers every caller only after the commit.
    pub(super) async fn commit(&mut self, batch: Vec<Pending>) {
        if let Some(why) = crate::sync::read(&self.refused).clone() {
            for p in batch {
                let _ = p.done.send(Err(why.clone().into()));
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
                let why = Refusal(format!(
                    "the audit chain in the database went back from record {} to record {}: records were removed in the database; restore them",
                    self.head.seq,
                    rows.first().map_or(0, |(r, _)| r.seq - 1)
                ));
                self.refuse(why.clone());
                for done in waiting {
                    let _ = done.send(Err(why.clone().into()));
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
                let e = NotDurable::Commit(Arc::new(e));
                for done in waiting {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}
