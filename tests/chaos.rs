//! A steady wrap/unwrap load for 60 s while hsm-sim is unplugged twice, loses every session
//! twice and runs at 20 ms latency for 10 s. Afterwards nothing is wrong: no wrong plaintext,
//! every blob Wrap returned unwraps, every failure was UNAVAILABLE or RESOURCE_EXHAUSTED, and
//! health went NOT_SERVING and back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::sync::Mutex;
use tonic::Code;
use tresor::proto;

const KEY: &str = "tenants/a/keys/chaos";
const WORKERS: usize = 4;

/// (blob, AAD, plaintext) of one successful Wrap.
type Wrapped = (Vec<u8>, Vec<u8>, Vec<u8>);

#[derive(Default)]
struct Counts {
    wrapped: AtomicU64,
    unwrapped: AtomicU64,
    wrong_plaintext: AtomicU64,
    unavailable: AtomicU64,
    exhausted: AtomicU64,
    other_failures: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_seconds_of_chaos_lose_nothing() {
    let server = TestServer::start_on(Deployment::with(
        Backend::HsmSim,
        "max_concurrent_requests = 64",
        "call_timeout_ms = 2000",
    ))
    .await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, KEY).await;
    let service = server.client(SERVICE_A).await;

    let counts = Arc::new(Counts::default());
    let blobs: Arc<Mutex<Vec<Wrapped>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (service, counts, blobs, stop) = (
            service.clone(),
            Arc::clone(&counts),
            Arc::clone(&blobs),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            let note = |s: &tonic::Status| match s.code() {
                Code::Unavailable => counts.unavailable.fetch_add(1, Ordering::Relaxed),
                Code::ResourceExhausted => counts.exhausted.fetch_add(1, Ordering::Relaxed),
                _ => {
                    eprintln!("unexpected failure: {s:?}");
                    counts.other_failures.fetch_add(1, Ordering::Relaxed)
                }
            };
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let plaintext = format!("worker {w} dek {i}").into_bytes();
                let aad = format!("object {w}/{i}").into_bytes();
                match service
                    .keys()
                    .wrap(proto::WrapRequest {
                        justification: None,
                        key: KEY.into(),
                        plaintext: plaintext.clone(),
                        aad: aad.clone(),
                    })
                    .await
                {
                    Ok(r) => {
                        counts.wrapped.fetch_add(1, Ordering::Relaxed);
                        blobs
                            .lock()
                            .await
                            .push((r.into_inner().ciphertext, aad, plaintext));
                    }
                    Err(s) => {
                        note(&s);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                // Unwrap an earlier blob of this run.
                let earlier = {
                    let b = blobs.lock().await;
                    (!b.is_empty()).then(|| b[(i as usize * 7919) % b.len()].clone())
                };
                if let Some((blob, aad, plaintext)) = earlier {
                    match service
                        .keys()
                        .unwrap(proto::UnwrapRequest {
                            justification: None,
                            ciphertext: blob,
                            aad,
                            key: String::new(),
                        })
                        .await
                    {
                        Ok(r) if r.get_ref().plaintext == plaintext => {
                            counts.unwrapped.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            counts.wrong_plaintext.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(s) => {
                            note(&s);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            }
        }));
    }

    // Health, watched throughout.
    let health_log: Arc<Mutex<Vec<bool>>> = Arc::default();
    let watcher = {
        let (client, log, stop) = (
            server.client(SERVICE_A).await,
            Arc::clone(&health_log),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let serving = client
                    .health()
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| {
                        r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32
                    })
                    .unwrap_or(false);
                let mut l = log.lock().await;
                if l.last() != Some(&serving) {
                    l.push(serving);
                }
                drop(l);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The script of the 60 seconds.
    let start = Instant::now();
    let at = |s: u64| start + Duration::from_secs(s);
    let token = &server.deployment.token;
    let script: [(u64, hsm_sim::Faults, &str); 8] = [
        (
            5,
            hsm_sim::Faults {
                unplugged: true,
                ..Default::default()
            },
            "unplugged",
        ),
        (9, hsm_sim::Faults::default(), "plugged in"),
        (
            15,
            hsm_sim::Faults {
                lose_sessions: 1,
                ..Default::default()
            },
            "all sessions lost",
        ),
        (
            20,
            hsm_sim::Faults {
                lose_sessions: 1,
                latency_ms: 20,
                ..Default::default()
            },
            "20 ms latency",
        ),
        (
            30,
            hsm_sim::Faults {
                lose_sessions: 1,
                ..Default::default()
            },
            "latency back to 0",
        ),
        (
            36,
            hsm_sim::Faults {
                lose_sessions: 1,
                unplugged: true,
                ..Default::default()
            },
            "unplugged",
        ),
        (
            40,
            hsm_sim::Faults {
                lose_sessions: 1,
                ..Default::default()
            },
            "plugged in",
        ),
        (
            46,
            hsm_sim::Faults {
                lose_sessions: 2,
                ..Default::default()
            },
            "all sessions lost",
        ),
    ];
    for (second, faults, what) in script {
        tokio::time::sleep_until(at(second).into()).await;
        token.faults(&faults);
        println!("t={second:>2}s {what}");
    }
    tokio::time::sleep_until(at(60).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    watcher.await.unwrap();

    // Every blob Wrap returned unwraps to its plaintext (checked by 8 callers at once).
    let all = std::mem::take(&mut *blobs.lock().await);
    let verified = all.len();
    let checkers: Vec<_> = all
        .chunks(all.len().div_ceil(8).max(1))
        .map(|chunk| {
            let (service, chunk) = (service.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for (blob, aad, plaintext) in chunk {
                    let r = service
                        .keys()
                        .unwrap(proto::UnwrapRequest {
                            justification: None,
                            ciphertext: blob,
                            aad,
                            key: String::new(),
                        })
                        .await
                        .unwrap_or_else(|s| {
                            panic!("a blob wrapped during the test does not unwrap: {s:?}")
                        });
                    assert_eq!(r.into_inner().plaintext, plaintext);
                }
            })
        })
        .collect();
    for c in checkers {
        c.await.unwrap();
    }
    let c = &counts;
    let health = health_log.lock().await.clone();
    println!(
        "chaos: wrapped {}, unwrapped during the run {}, verified afterwards {verified}, wrong plaintexts {}, \
         failed UNAVAILABLE {}, failed RESOURCE_EXHAUSTED {}, other failures {}, health transitions {health:?}",
        c.wrapped.load(Ordering::Relaxed),
        c.unwrapped.load(Ordering::Relaxed),
        c.wrong_plaintext.load(Ordering::Relaxed),
        c.unavailable.load(Ordering::Relaxed),
        c.exhausted.load(Ordering::Relaxed),
        c.other_failures.load(Ordering::Relaxed),
    );
    assert_eq!(c.wrong_plaintext.load(Ordering::Relaxed), 0);
    assert_eq!(c.other_failures.load(Ordering::Relaxed), 0);
    assert!(
        c.wrapped.load(Ordering::Relaxed) > 100,
        "too little load to mean anything"
    );
    assert!(
        c.unavailable.load(Ordering::Relaxed) > 0,
        "the outages were not noticed at all"
    );
    // SERVING, NOT_SERVING, SERVING, NOT_SERVING, SERVING: both outages seen and recovered.
    assert_eq!(health.first(), Some(&true));
    assert_eq!(health.last(), Some(&true));
    assert!(
        health.iter().filter(|s| !**s).count() >= 2,
        "health transitions: {health:?}"
    );

    // The audit chain written through all of it verifies, and holds a record for every call.
    let auditor = server.client(AUDITOR_A).await;
    let pem = auditor
        .audit()
        .get_audit_public_key(proto::GetAuditPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .pem;
    let spki: rustls::pki_types::SubjectPublicKeyInfoDer =
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap();
    let point = tresor::audit_record::p256_point_from_spki(spki.as_ref()).unwrap();
    let mut stream = auditor
        .audit()
        .export_audit_log(proto::ExportAuditLogRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut rows = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        rows.push(m);
    }
    let mut file = Vec::new();
    {
        let mut w = tresor::audit::file::Writer::new(tresor::audit::file::Format::Jsonl, &mut file);
        for m in rows {
            let item = tresor::client::audit_item(m).unwrap();
            w.write(&tresor::audit::file::Row::from_item(&item))
                .unwrap();
        }
        w.finish().unwrap();
    }
    let items: Vec<_> = tresor::audit::file::read(std::str::from_utf8(&file).unwrap())
        .unwrap()
        .iter()
        .map(|r| r.to_item().unwrap())
        .collect();
    let v = tresor::audit_record::verify(&items, &point).unwrap();
    println!(
        "chaos audit: {} records, {} checkpoints verified",
        v.records, v.checkpoints
    );
    assert!(v.checkpoints >= 2, "{v:?}");
    server.stop().await;
}
