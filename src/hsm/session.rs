//! The session pool and how every call runs: a permit per session, inline, on a call thread
//! ([`super::dispatch`], [`super::threads`]) or on tokio's blocking pool (key management), the
//! deadline, classification of failures and recovery (a lost session replaced, the module
//! re-initialised, a stale handle looked up again), and bringing the module up and down.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use tokio::sync::Semaphore;

use super::ckr::{Call, Recovery, classify, login_succeeded};
use super::direct::Direction;
use super::{
    BRING_UP_BACKOFF, CONTEXT_OPEN, Hsm, HsmError, Kind, MAX_RECOVERIES, ObjectId, Pin, dispatch,
};
use crate::sync::{lock, read, write};

pub(super) struct Inner {
    pub(super) pkcs11: Pkcs11,
    /// `C_Encrypt` and `C_Decrypt` without the length query (`direct.rs`); `None` if the
    /// module's function list could not be read, and cryptoki's calls are used instead.
    pub(super) direct: Option<super::direct::DirectCalls>,
    /// Whether to use message-based AES-GCM where the token offers it (`hsm.message_aead`).
    pub(super) message_aead: bool,
    pub(super) module: PathBuf,
    pub(super) token_label: String,
    pub(super) token_serial: Option<String>,
    pub(super) pin: Pin,
    /// Set once the token refused the PIN; every later call fails without trying again.
    pub(super) pin_refused: AtomicBool,
    /// The initialised module and its logged-in session; `None` while it is down.
    /// Written only by `reinitialise`, which holds every permit, so no call is in flight then.
    pub(super) live: RwLock<Option<Arc<Live>>>,
    pub(super) next_generation: AtomicU64,
    pub(super) last_bring_up: Mutex<Option<Instant>>,
    /// Idle sessions, each tagged with the generation of the module that opened it.
    pub(super) idle: Mutex<Vec<Pooled>>,
    /// One permit per pooled session: bounds the calls in flight; `reinitialise` takes all.
    pub(super) permits: Arc<Semaphore>,
    pub(super) pool_size: u32,
    /// One permit for calls run on the async worker, so at most one worker is ever inside the
    /// module that way (SoftHSM serialises internally; more only contend) and the others stay
    /// free for TLS, health checks and deadlines.
    pub(super) inline_slot: Semaphore,
    pub(super) pace: dispatch::Pace,
    pub(super) call_timeout: Duration,
    /// Serialises token-object creation and destruction (SoftHSM issue 573).
    pub(super) object_lock: Mutex<()>,
    /// `CKA_ID` → handle, so the hot path skips `C_FindObjects`. Cleared on re-initialisation
    /// and whenever the token reports a stale handle.
    pub(super) handles: RwLock<HashMap<(ObjectId, Kind), ObjectHandle>>,
    /// Where hot calls run when they are not inline: at most one thread per session permit.
    pub(super) call_threads: Arc<super::threads::CallThreads>,
}

pub(super) struct Live {
    pub(super) generation: u64,
    pub(super) slot: Slot,
    /// The token offers hash-and-sign `CKM_ECDSA_SHA256` (hsm-sim); otherwise Tresor hashes and
    /// uses raw `CKM_ECDSA` (SoftHSM 2.6.1 offers only that). Both give ECDSA over SHA-256.
    pub(super) ecdsa_sha256: bool,
    /// Wrap and Unwrap use message-based AES-GCM, one call each (`direct.rs`): the module has
    /// the 3.0 functions, the token lists `CKF_MESSAGE_ENCRYPT` and `CKF_MESSAGE_DECRYPT` for
    /// `CKM_AES_GCM`, and the configuration allows it.
    pub(super) message_gcm: bool,
    /// Kept open so the application stays logged in; probed when sessions are lost.
    pub(super) login: Mutex<Session>,
}

pub(super) struct Pooled {
    pub(super) session: Session,
    pub(super) generation: u64,
    /// The session's message-based AES-GCM contexts (`direct.rs`): gone with the session.
    pub(super) message: MessageState,
}

/// Which key a session's message-based encryption and decryption contexts are open for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct MessageState {
    pub(super) encrypt: Option<cryptoki_sys::CK_OBJECT_HANDLE>,
    pub(super) decrypt: Option<cryptoki_sys::CK_OBJECT_HANDLE>,
}

impl MessageState {
    /// The context of `direction`: the key it is open for, if any.
    pub(super) fn slot(
        &mut self,
        direction: Direction,
    ) -> &mut Option<cryptoki_sys::CK_OBJECT_HANDLE> {
        match direction {
            Direction::Encrypt => &mut self.encrypt,
            Direction::Decrypt => &mut self.decrypt,
        }
    }

    fn open_for(mut self, direction: Direction) -> Option<cryptoki_sys::CK_OBJECT_HANDLE> {
        *self.slot(direction)
    }
}

/// Which idle session a call would rather have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prefer {
    /// The one used last.
    Any,
    /// On the message path: one whose context of this direction is open for this key (the
    /// call is then one PKCS#11 call); else one without such a context; else a new session
    /// while the pool has room. Only when every session holds another key's context does the
    /// one used longest ago close it (`C_Message*Final`) and open one for this key
    /// (`C_Message*Init`): three calls for that Wrap or Unwrap.
    Context(Direction, ObjectId),
}

/// What an operation closure can fail with.
pub(super) enum OpError {
    Pkcs11(CkError),
    NotFound(ObjectId),
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        Self::Pkcs11(e)
    }
}

/// What a failed attempt asks the caller to do.
pub(super) enum Failure {
    /// The module is down (no live context).
    Down,
    NotFound(ObjectId),
    Pkcs11 {
        err: CkError,
        recovery: Recovery,
        generation: u64,
    },
}

/// Whether a call is on the request path (crypto with existing keys) and may run inline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Hot {
    Yes,
    No,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// Safe to run twice: retried once after recovery.
    Once,
    /// Could leave a second object behind: never retried.
    Never,
}

/// What an operation closure sees: a session of the live module, and object lookup.
pub(super) struct OpCtx<'a> {
    pub(super) session: &'a Session,
    pub(super) inner: &'a Inner,
    pub(super) live: &'a Live,
    /// The session's message-based contexts; what the operation leaves here goes back to the
    /// pool with the session.
    pub(super) message: &'a std::cell::Cell<MessageState>,
}

impl OpCtx<'_> {
    pub(super) fn object(&self, id: ObjectId, kind: Kind) -> Result<ObjectHandle, OpError> {
        if let Some(h) = read(&self.inner.handles).get(&(id, kind)) {
            return Ok(*h);
        }
        let found = self.session.find_objects(&[
            Attribute::Class(kind.class()),
            Attribute::Token(true),
            Attribute::Id(id.0.to_vec()),
        ])?;
        let Some(&handle) = found.first() else {
            // Private objects are invisible to a session that is not logged in: a lost login
            // must not look like a lost key.
            if !logged_in(self.session) {
                return Err(OpError::Pkcs11(CkError::Pkcs11(
                    RvError::UserNotLoggedIn,
                    cryptoki::context::Function::FindObjects,
                )));
            }
            return Err(OpError::NotFound(id));
        };
        if found.len() > 1 {
            tracing::error!(id = %id, count = found.len(), "several token objects share one CKA_ID; using the first");
        }
        self.remember(id, kind, handle);
        Ok(handle)
    }

    pub(super) fn remember(&self, id: ObjectId, kind: Kind, handle: ObjectHandle) {
        write(&self.inner.handles).insert((id, kind), handle);
    }

    pub(super) fn forget(&self, id: ObjectId, kind: Kind) {
        write(&self.inner.handles).remove(&(id, kind));
    }

    /// Held while creating or destroying token objects.
    pub(super) fn object_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.object_lock)
    }
}

pub(super) fn logged_in(session: &Session) -> bool {
    use cryptoki::session::SessionState;
    session.get_session_info().is_ok_and(|i| {
        matches!(
            i.session_state(),
            SessionState::RoUser | SessionState::RwUser
        )
    })
}

pub(super) fn unavailable(e: impl fmt::Display) -> HsmError {
    HsmError::Unavailable(e.to_string())
}

impl Hsm {
    /// Runs a key-management `op` on a pooled session off the async runtime, recovering as
    /// [`ckr::classify`] says and retrying once when `retry` allows.
    pub(super) async fn run<T, F>(&self, call: Call, retry: Retry, op: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync + 'static,
    {
        self.run_in(Hot::No, Prefer::Any, call, retry, op).await
    }

    /// Like [`Hsm::run`] for a call on the request path, which runs where [`dispatch`] says,
    /// on the idle session `prefer` picks.
    pub(super) async fn run_hot<T, F>(
        &self,
        prefer: Prefer,
        call: Call,
        retry: Retry,
        op: F,
    ) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync + 'static,
    {
        self.run_in(Hot::Yes, prefer, call, retry, op).await
    }

    pub(super) async fn run_in<T, F>(
        &self,
        hot: Hot,
        prefer: Prefer,
        call: Call,
        retry: Retry,
        op: F,
    ) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync + 'static,
    {
        let permits = &self.inner.permits;
        let op = Arc::new(op);
        let deadline = tokio::time::Instant::now() + self.inner.call_timeout;
        let mut recoveries = 0;
        loop {
            if self.inner.pin_refused.load(Ordering::Relaxed) {
                return Err(HsmError::PinRefused(RvError::PinIncorrect));
            }
            let outcome = 'dispatched: {
                if hot == Hot::Yes && self.inner.pace.inline() {
                    // The slot before the session permit: a re-initialisation takes every
                    // session permit and never the slot, so neither waits for the other.
                    let _slot = tokio::time::timeout_at(deadline, self.inner.inline_slot.acquire())
                        .await
                        .map_err(|_| HsmError::Deadline("the HSM did not answer"))?
                        .map_err(|_| unavailable("session pool closed"))?;
                    // Asked again: calls queued for the slot while the module turned slow
                    // must not each take their turn on the worker.
                    if self.inner.pace.inline() {
                        let _permit = acquire(permits, deadline).await?;
                        break 'dispatched self.inner.with_session(call, hot, prefer, &*op);
                    }
                }
                let permit = acquire(permits, deadline).await?;
                let inner = Arc::clone(&self.inner);
                let attempt_op = Arc::clone(&op);
                if hot == Hot::Yes {
                    // The permit comes back with the answer: the thread is idle again by
                    // then, so a caller holding a permit always finds an idle thread.
                    let answer = self
                        .inner
                        .call_threads
                        .run(move || (inner.with_session(call, hot, prefer, &*attempt_op), permit));
                    break 'dispatched tokio::time::timeout_at(deadline, answer)
                        .await
                        .map_err(|_| HsmError::Deadline("the HSM did not answer"))?
                        .map_err(|_| unavailable("PKCS#11 call thread failed"))?
                        .0;
                }
                let worker = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    inner.with_session(call, hot, prefer, &*attempt_op)
                });
                tokio::time::timeout_at(deadline, worker)
                    .await
                    .map_err(|_| HsmError::Deadline("the HSM did not answer"))?
                    .map_err(|e| unavailable(format_args!("PKCS#11 worker failed: {e}")))?
            };

            let may_retry = recoveries < MAX_RECOVERIES && retry == Retry::Once;
            recoveries += 1;
            let why = match outcome {
                Ok(value) => return Ok(value),
                Err(Failure::NotFound(id)) => return Err(HsmError::ObjectNotFound(id)),
                Err(Failure::Down) => {
                    self.recover(None, deadline).await?;
                    "module was down".to_owned()
                }
                Err(Failure::Pkcs11 {
                    err,
                    recovery,
                    generation,
                }) => match recovery {
                    Recovery::BadCiphertext => return Err(HsmError::BadCiphertext),
                    Recovery::PinRefused => return Err(pin_refused(&err)),
                    Recovery::Fail => return Err(HsmError::Pkcs11(err)),
                    Recovery::DropSession | Recovery::ForgetHandle => err.to_string(),
                    Recovery::Reinitialise => {
                        tracing::warn!(error = %err, "PKCS#11 device or login lost; re-initialising the module");
                        self.recover(Some(generation), deadline).await?;
                        err.to_string()
                    }
                },
            };
            if !may_retry {
                return Err(HsmError::Unavailable(why));
            }
        }
    }

    /// Re-initialises the module once every in-flight call has finished.
    pub(super) async fn recover(
        &self,
        observed: Option<u64>,
        deadline: tokio::time::Instant,
    ) -> Result<(), HsmError> {
        let all = Arc::clone(&self.inner.permits).acquire_many_owned(self.inner.pool_size);
        let all = tokio::time::timeout_at(deadline, all)
            .await
            .map_err(|_| {
                unavailable(
                    "HSM calls still in flight at the call's deadline; not re-initialising yet",
                )
            })?
            .map_err(|_| unavailable("session pool closed"))?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let _all = all;
            inner.reinitialise(observed)
        })
        .await
        .map_err(|e| unavailable(format_args!("PKCS#11 worker failed: {e}")))?
    }
}

pub(super) async fn acquire(
    permits: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
) -> Result<tokio::sync::OwnedSemaphorePermit, HsmError> {
    tokio::time::timeout_at(deadline, Arc::clone(permits).acquire_owned())
        .await
        .map_err(|_| HsmError::Deadline("no HSM session became free"))?
        .map_err(|_| unavailable("session pool closed"))
}

pub(super) fn initialise(pkcs11: &Pkcs11) -> Result<(), CkError> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The one slot whose token has this label (and serial, when given); none or several is an
/// error, so Tresor never guesses which token holds the keys.
pub(super) fn find_token(
    pkcs11: &Pkcs11,
    module: &std::path::Path,
    label: &str,
    serial: Option<&str>,
) -> Result<Slot, HsmError> {
    let mut matching = Vec::new();
    for slot in pkcs11
        .get_slots_with_initialized_token()
        .map_err(unavailable)?
    {
        let info = pkcs11.get_token_info(slot).map_err(unavailable)?;
        if info.label() == label && serial.is_none_or(|s| info.serial_number() == s) {
            matching.push(slot);
        }
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(HsmError::TokenNotFound {
            label: label.to_owned(),
            serial: serial.map(str::to_owned),
            module: module.to_path_buf(),
        }),
        many => Err(HsmError::AmbiguousToken {
            label: label.to_owned(),
            count: many.len(),
        }),
    }
}

pub(super) fn pin_refused(err: &CkError) -> HsmError {
    match err {
        CkError::Pkcs11(rv, _) => HsmError::PinRefused(*rv),
        _ => HsmError::PinRefused(RvError::PinIncorrect),
    }
}

impl Inner {
    /// Finds the token and logs in on a session kept for the life of this generation.
    pub(super) fn bring_up(&self) -> Result<Live, HsmError> {
        *lock(&self.last_bring_up) = Some(Instant::now());
        let slot = find_token(
            &self.pkcs11,
            &self.module,
            &self.token_label,
            self.token_serial.as_deref(),
        )?;
        let session = self
            .pkcs11
            .open_rw_session_no_drop(slot)
            .map_err(unavailable)?;
        let login = session.login(UserType::User, Some(self.pin.auth()));
        if !login_succeeded(&login) {
            let _ = session.close();
            let err = match login {
                Err(e) => e,
                Ok(()) => return Err(unavailable("login failed")),
            };
            if classify(&err, Call::Other) == Recovery::PinRefused {
                self.pin_refused.store(true, Ordering::SeqCst);
                tracing::error!(error = %err, "the token refused the PIN; not retrying");
                return Err(pin_refused(&err));
            }
            return Err(unavailable(err));
        }
        let generation = self.next_generation.fetch_add(1, Ordering::SeqCst);
        let ecdsa_sha256 = self
            .pkcs11
            .get_mechanism_list(slot)
            .is_ok_and(|m| m.contains(&cryptoki::mechanism::MechanismType::ECDSA_SHA256));
        let message_gcm = self.message_aead
            && self.direct.as_ref().is_some_and(|d| d.message.is_some())
            && self
                .pkcs11
                .get_mechanism_info(slot, cryptoki::mechanism::MechanismType::AES_GCM)
                .is_ok_and(|m| m.message_encrypt() && m.message_decrypt());
        Ok(Live {
            generation,
            slot,
            ecdsa_sha256,
            message_gcm,
            login: Mutex::new(session),
        })
    }

    /// Replaces the live module, unless someone else already replaced the one that failed.
    /// The caller holds every permit, so no other call is in the module.
    pub(super) fn reinitialise(&self, observed: Option<u64>) -> Result<(), HsmError> {
        let mut live = write(&self.live);
        let current = live.as_ref().map(|l| l.generation);
        if current.is_some() && current != observed {
            return Ok(());
        }
        if current.is_none()
            && lock(&self.last_bring_up).is_some_and(|t| t.elapsed() < BRING_UP_BACKOFF)
        {
            return Err(unavailable(
                "the HSM is down; the next reconnection attempt is at most a second away",
            ));
        }
        // Sessions of the failed generation are dropped without C_CloseSession: after
        // C_Finalize their handle numbers may name the new generation's sessions.
        *live = None;
        lock(&self.idle).clear();
        write(&self.handles).clear();
        if current.is_some()
            && let Err(e) = self.pkcs11.clone().finalize()
        {
            tracing::warn!(error = %e, "C_Finalize failed while recovering; initialising anyway");
        }
        *lock(&self.last_bring_up) = Some(Instant::now());
        initialise(&self.pkcs11).map_err(unavailable)?;
        let fresh = self.bring_up()?;
        tracing::warn!(
            generation = fresh.generation,
            "PKCS#11 module re-initialised and logged in"
        );
        *live = Some(Arc::new(fresh));
        Ok(())
    }

    /// Runs one attempt of `op` on a session of the live module (blocking).
    pub(super) fn with_session<T>(
        &self,
        call: Call,
        hot: Hot,
        prefer: Prefer,
        op: &(dyn Fn(&OpCtx<'_>) -> Result<T, OpError> + Send + Sync),
    ) -> Result<T, Failure> {
        let Some(live) = read(&self.live).clone() else {
            return Err(Failure::Down);
        };
        let (session, message) = match self.take_session(&live, prefer) {
            Ok(s) => s,
            Err(err) => {
                let recovery = match classify(&err, Call::Other) {
                    Recovery::DropSession | Recovery::Reinitialise => Recovery::Reinitialise,
                    other => other,
                };
                return Err(Failure::Pkcs11 {
                    err,
                    recovery,
                    generation: live.generation,
                });
            }
        };
        let started = Instant::now();
        let message = std::cell::Cell::new(message);
        let result = op(&OpCtx {
            session: &session,
            inner: self,
            live: &live,
            message: &message,
        });
        let message = message.get();
        let took = started.elapsed();
        if hot == Hot::Yes {
            self.pace.record(took);
        }
        crate::metrics::global().hsm_calls.observe_duration(took);
        let err = match result {
            Ok(value) => {
                self.give_back(session, live.generation, message);
                return Ok(value);
            }
            Err(OpError::NotFound(id)) => {
                self.give_back(session, live.generation, message);
                return Err(Failure::NotFound(id));
            }
            Err(OpError::Pkcs11(err)) => err,
        };
        let mut recovery = classify(&err, call);
        crate::metrics::global().hsm_error(recovery.label());
        match recovery {
            Recovery::DropSession => {
                if let Err(e) = session.close() {
                    tracing::debug!(error = %e, "closing a lost session failed");
                }
                // A lost session rarely comes alone (a network HSM drops the connection): forget
                // the idle ones too, and if the login went with them, re-initialise.
                for pooled in lock(&self.idle).drain(..) {
                    if pooled.generation == live.generation {
                        let _ = pooled.session.close();
                    }
                }
                if !logged_in(&lock(&live.login)) {
                    recovery = Recovery::Reinitialise;
                }
            }
            // Dropped without closing: the module is about to be finalised.
            Recovery::Reinitialise => drop(session),
            Recovery::ForgetHandle => {
                write(&self.handles).clear();
                self.give_back(session, live.generation, message);
            }
            Recovery::BadCiphertext | Recovery::PinRefused | Recovery::Fail => {
                self.give_back(session, live.generation, message);
            }
        }
        Err(Failure::Pkcs11 {
            err,
            recovery,
            generation: live.generation,
        })
    }

    pub(super) fn take_session(
        &self,
        live: &Live,
        prefer: Prefer,
    ) -> Result<(Session, MessageState), CkError> {
        // Contexts are opened on handles. A key whose handle is not cached yet is looked up on
        // whichever session it gets.
        let wanted = match prefer {
            Prefer::Context(direction, id) if live.message_gcm => read(&self.handles)
                .get(&(id, Kind::Secret))
                .map(|handle| (direction, handle.handle())),
            _ => None,
        };
        {
            let mut idle = lock(&self.idle);
            let newest_will_do = match wanted {
                None => true,
                Some((direction, key)) => {
                    // Sessions in use are at most the permits held, this caller's own not yet
                    // among them, so idle + held - 1 < pool size leaves room for one more.
                    let room = idle.len() <= self.permits.available_permits();
                    match pick_for_context(&idle, live.generation, direction, key, room) {
                        Some(i) => {
                            let pooled = idle.remove(i);
                            return Ok((pooled.session, pooled.message));
                        }
                        None => false,
                    }
                }
            };
            while newest_will_do && let Some(pooled) = idle.pop() {
                if pooled.generation == live.generation {
                    return Ok((pooled.session, pooled.message));
                }
            }
        }
        Ok((
            self.pkcs11.open_rw_session_no_drop(live.slot)?,
            MessageState::default(),
        ))
    }

    pub(super) fn give_back(&self, session: Session, generation: u64, message: MessageState) {
        lock(&self.idle).push(Pooled {
            session,
            generation,
            message,
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let current = read(&self.live).as_ref().map(|l| l.generation);
        for pooled in lock(&self.idle).drain(..) {
            if Some(pooled.generation) == current {
                let _ = pooled.session.close();
            }
        }
        write(&self.live).take();
        if let Err(e) = self.pkcs11.clone().finalize() {
            tracing::debug!(error = %e, "C_Finalize at shutdown failed");
        }
        CONTEXT_OPEN.store(false, Ordering::SeqCst);
    }
}

/// Which idle session (an index into `idle`, which is in the order sessions came back) a
/// message-based call with `key` takes, per [`Prefer::Context`]: `None` to open a new one.
fn pick_for_context(
    idle: &[Pooled],
    generation: u64,
    direction: Direction,
    key: cryptoki_sys::CK_OBJECT_HANDLE,
    room: bool,
) -> Option<usize> {
    let current = |p: &Pooled| p.generation == generation;
    idle.iter()
        .rposition(|p| current(p) && p.message.open_for(direction) == Some(key))
        .or_else(|| {
            idle.iter()
                .rposition(|p| current(p) && p.message.open_for(direction).is_none())
        })
        // Every idle session has another key's context open: a new session while the pool
        // has room, else the one whose context was used longest ago closes it.
        .or_else(|| {
            if room {
                None
            } else {
                idle.iter().position(current)
            }
        })
}
