//! The benchmark ceiling: AES-GCM encryptions straight on the PKCS#11 module, no Tresor layers.
//!
//! Owns `tresor bench --raw-hsm`: the same operation the server performs for a Wrap (a token
//! AES-256 key, 96-bit IV, 128-bit tag, the same payload and AAD sizes), in a tight loop on
//! `threads` threads, each with its own session, through cryptoki only. No pool, no async
//! runtime, no gRPC, no audit. The key is a temporary token key, destroyed afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;

use super::session::{find_token, initialise, unavailable};
use super::{CONTEXT_OPEN, HsmConfig, HsmError};

/// What the raw loop did.
#[derive(Debug, Clone)]
pub struct RawReport {
    /// Encryptions done.
    pub operations: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per-encryption latencies in microseconds, all threads, sorted ascending.
    pub latencies_micros: Vec<u64>,
}

/// Runs `threads` tight loops of AES-GCM encryptions for `duration`.
pub fn raw_gcm_encrypt(
    config: &HsmConfig,
    threads: usize,
    duration: Duration,
    payload: usize,
    aad: usize,
) -> Result<RawReport, HsmError> {
    if CONTEXT_OPEN.swap(true, Ordering::SeqCst) {
        return Err(HsmError::AlreadyOpen);
    }
    let result = run(config, threads.max(1), duration, payload.max(1), aad);
    CONTEXT_OPEN.store(false, Ordering::SeqCst);
    result
}

fn run(
    config: &HsmConfig,
    threads: usize,
    duration: Duration,
    payload: usize,
    aad: usize,
) -> Result<RawReport, HsmError> {
    let pin = config.pin.read()?;
    let pkcs11 = Pkcs11::new(&config.module).map_err(|e| HsmError::ModuleLoad {
        path: config.module.clone(),
        reason: e.to_string(),
    })?;
    initialise(&pkcs11).map_err(unavailable)?;
    let slot = find_token(
        &pkcs11,
        &config.module,
        &config.token_label,
        config.token_serial.as_deref(),
    )?;
    let login = pkcs11.open_rw_session(slot).map_err(unavailable)?;
    match login.login(UserType::User, Some(pin.auth())) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => return Err(unavailable(e)),
    }
    let mut label = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut label)
        .map_err(|_| unavailable("no randomness"))?;
    let key = login
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32u64.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(
                    format!("tresor-bench/{}", crate::model::to_hex(&label)).into_bytes(),
                ),
            ],
        )
        .map_err(unavailable)?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (pkcs11, stop) = (pkcs11.clone(), Arc::clone(&stop));
            std::thread::spawn(move || -> Result<Vec<u64>, String> {
                let session = pkcs11.open_rw_session(slot).map_err(|e| e.to_string())?;
                let (plaintext, aad) = (vec![0x5a; payload], vec![0xa5; aad.max(1)]);
                let mut latencies = Vec::new();
                let mut iv = [0u8; 12];
                while !stop.load(Ordering::Relaxed) {
                    iv[..8].copy_from_slice(&(latencies.len() as u64).to_be_bytes());
                    let t = Instant::now();
                    let mut this_iv = iv;
                    let params = GcmParams::new(&mut this_iv, &aad, 128u64.into())
                        .map_err(|e| e.to_string())?;
                    session
                        .encrypt(&Mechanism::AesGcm(params), key, &plaintext)
                        .map_err(|e| e.to_string())?;
                    latencies.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                Ok(latencies)
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut latencies_micros = Vec::new();
    let mut failure = None;
    for w in workers {
        match w.join() {
            Ok(Ok(l)) => latencies_micros.extend(l),
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a benchmark thread panicked".into()),
        }
    }
    let elapsed = start.elapsed();
    if let Err(e) = login.destroy_object(key) {
        tracing::warn!(error = %e, "could not destroy the raw benchmark's session key (a session object: it goes with the session)");
    }
    drop(login);
    if let Err(e) = pkcs11.finalize() {
        tracing::debug!(error = %e, "C_Finalize after the raw benchmark failed");
    }
    if let Some(e) = failure {
        return Err(unavailable(e));
    }
    latencies_micros.sort_unstable();
    Ok(RawReport {
        operations: latencies_micros.len() as u64,
        elapsed,
        latencies_micros,
    })
}
