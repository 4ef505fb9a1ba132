//! What real network HSMs do — go away, drop sessions, slow down — done by hsm-sim to a real
//! server, observed through the real client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use tresor::client::Client;
use tresor::hsm::ObjectId;
use tresor::proto;
use zeroize::Zeroizing;

const KEY: &str = "tenants/a/keys/ehr";

async fn server(extra_server: &str, extra_hsm: &str) -> TestServer {
    let server =
        TestServer::start_on(Deployment::with(Backend::HsmSim, extra_server, extra_hsm)).await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, KEY).await;
    server
}

fn faults(server: &TestServer, f: hsm_sim::Faults) {
    server.deployment.token.faults(&f);
}

async fn wrap(c: &Client, plaintext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    c.keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: plaintext.to_vec(),
            aad: b"r".to_vec(),
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

async fn unwrap(c: &Client, blob: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    c.keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: blob.to_vec(),
            aad: b"r".to_vec(),
            key: String::new(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

/// The threads of this process (the server runs in it; nextest runs each test in a process of
/// its own) that make slow PKCS#11 calls.
fn hsm_call_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|task| {
            std::fs::read_to_string(task.as_ref().unwrap().path().join("comm"))
                .is_ok_and(|name| name.trim_end() == "tresor-hsm-call")
        })
        .count()
}

async fn serving(c: &Client) -> bool {
    let status = c
        .health()
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or_default();
    status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
}

/// Polls until `want` or the deadline; returns how long it took.
async fn health_becomes(c: &Client, want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    while serving(c).await != want {
        assert!(
            start.elapsed() < within,
            "health did not become {} within {within:?}",
            if want { "SERVING" } else { "NOT_SERVING" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_sessions_are_reopened_without_the_caller_noticing() {
    let server = server("", "").await;
    let service = server.client(SERVICE_A).await;
    let blob = wrap(&service, b"before").await.unwrap();
    for round in 1..=3 {
        faults(
            &server,
            hsm_sim::Faults {
                lose_sessions: round,
                ..Default::default()
            },
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
        let fresh = wrap(&service, b"after")
            .await
            .unwrap_or_else(|s| panic!("round {round}: {s:?}"));
        assert_eq!(unwrap(&service, &blob).await.unwrap(), b"before");
        assert_eq!(unwrap(&service, &fresh).await.unwrap(), b"after");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unplugged_hsm_fails_fast_and_tresor_recovers_on_its_own() {
    let server = server("", "call_timeout_ms = 2000").await;
    let service = server.client(SERVICE_A).await;
    let blob = wrap(&service, b"kept").await.unwrap();
    assert!(serving(&service).await);

    faults(
        &server,
        hsm_sim::Faults {
            unplugged: true,
            ..Default::default()
        },
    );
    let took = health_becomes(&service, false, Duration::from_secs(2)).await;
    println!("health NOT_SERVING {took:?} after unplugging");
    for _ in 0..20 {
        let t = Instant::now();
        let s = wrap(&service, b"x").await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
        // Far below the 2 s deadline: the call does not wait for the HSM that is gone.
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "a call took {:?} to fail",
            t.elapsed()
        );
        assert_eq!(
            unwrap(&service, &blob).await.unwrap_err().code(),
            Code::Unavailable
        );
    }

    faults(&server, hsm_sim::Faults::default());
    let took = health_becomes(&service, true, Duration::from_secs(5)).await;
    println!("health SERVING {took:?} after plugging back in");
    assert_eq!(unwrap(&service, &blob).await.unwrap(), b"kept");
    let fresh = wrap(&service, b"new").await.unwrap();
    assert_eq!(unwrap(&service, &fresh).await.unwrap(), b"new");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_hsm_gets_back_pressure_not_a_pile_up() {
    let server = server(
        "max_concurrent_requests = 16",
        "sessions = 2\ncall_timeout_ms = 1000",
    )
    .await;
    let service = server.client(SERVICE_A).await;
    faults(
        &server,
        hsm_sim::Faults {
            latency_ms: 50,
            ..Default::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(40)).await;

    let start = Instant::now();
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move { wrap(&service, format!("dek {i}").as_bytes()).await })
        })
        .collect();
    let (mut ok, mut refused) = (0u32, 0u32);
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Unavailable | Code::ResourceExhausted),
                    "{s:?}"
                );
                refused += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    println!("slow HSM: {ok} wrapped, {refused} refused in {elapsed:?}");
    assert!(ok > 0);
    assert!(
        refused > 0,
        "16 admitted requests on 2 sessions at 50 ms each cannot all fit in 1 s"
    );
    // Two sessions at 50 ms per call: never more than two calls in the HSM at once.
    assert!(
        elapsed >= Duration::from_millis(u64::from(ok) * 50 / 2),
        "{ok} calls in {elapsed:?}"
    );
    // ...and so never more than two threads making them, however many requests wait.
    let threads = hsm_call_threads();
    assert!(
        (1..=2).contains(&threads),
        "{threads} HSM call threads for 2 sessions"
    );
    faults(&server, hsm_sim::Faults::default());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_hsm_moves_hot_calls_off_the_async_workers_and_back() {
    // hsm.dispatch = "auto": calls that take microseconds run on the async worker; once most
    // take milliseconds (a network HSM), they go to blocking threads, where a pool of sessions
    // hides the latency instead of stalling a worker per call.
    let token = TestToken::with(Backend::HsmSim);
    let hsm = token.open();
    let id = ObjectId([7; 16]);
    hsm.generate_version_key(id, "test/dispatch".into())
        .await
        .unwrap();
    let encrypt = || {
        hsm.encrypt_gcm(
            id,
            [1; 12],
            b"aad".to_vec(),
            Zeroizing::new(b"dek".to_vec()),
        )
    };
    for _ in 0..20 {
        encrypt().await.unwrap();
    }
    assert!(hsm.hot_calls_inline());

    token.faults(&hsm_sim::Faults {
        latency_ms: 2,
        ..Default::default()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..15 {
        encrypt().await.unwrap();
    }
    assert!(!hsm.hot_calls_inline(), "2 ms per call is not fast");

    token.faults(&hsm_sim::Faults::default());
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..80 {
        encrypt().await.unwrap();
    }
    assert!(hsm.hot_calls_inline(), "fast again");
}
