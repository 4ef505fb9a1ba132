//! Several `tresor serve` processes on one PostgreSQL database and one HSM token, and the
//! database restarting under load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use tresor::audit_record::{self as record, ExportItem};
use tresor::client::Client;
use tresor::proto;

const KEY: &str = "tenants/a/keys/ehr";

async fn create(officer: &Client) {
    officer
        .admin()
        .create_key(proto::CreateKeyRequest {
            key: KEY.into(),
            description: "shared by both nodes".into(),
            labels: Default::default(),
        })
        .await
        .unwrap();
}

async fn wrap(
    service: &Client,
    plaintext: &[u8],
) -> Result<(proto::WrapResponse, String), tonic::Status> {
    service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: plaintext.to_vec(),
            aad: b"patient-4711".to_vec(),
        })
        .await
        .map(|r| {
            let id = r
                .metadata()
                .get("x-request-id")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            (r.into_inner(), id)
        })
}

async fn unwrap(service: &Client, ciphertext: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: ciphertext.to_vec(),
            aad: b"patient-4711".to_vec(),
            key: String::new(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

async fn rotate(officer: &Client) -> Result<proto::Key, tonic::Status> {
    officer
        .admin()
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .map(|r| r.into_inner())
}

async fn get(officer: &Client) -> proto::Key {
    officer
        .admin()
        .get_key(proto::GetKeyRequest { key: KEY.into() })
        .await
        .unwrap()
        .into_inner()
}

fn records(items: &[ExportItem]) -> impl Iterator<Item = &record::Record> {
    items.iter().filter_map(|i| match i {
        ExportItem::Record(r) => Some(r),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_each_others_changes_at_once_and_extend_one_audit_chain() {
    let url = postgres_database().await;
    let d = Deployment::new("").on_postgres(&url);
    let a = ServerProcess::start(&d.node_config("node-a", ""), &d.dir().join("a.log"));
    let b = ServerProcess::start(&d.node_config("node-b", ""), &d.dir().join("b.log"));
    let officer_a = d.client(a.addr, OFFICER_A).await;
    let officer_b = d.client(b.addr, OFFICER_A).await;
    let service_a = d.client(a.addr, SERVICE_A).await;
    let service_b = d.client(b.addr, SERVICE_A).await;

    // A key created on node A wraps on node B at once.
    create(&officer_a).await;
    let (first, _) = wrap(&service_b, b"record v1").await.unwrap();
    assert_eq!(first.key_version, format!("{KEY}/versions/1"));

    // A rotation through one node is what the other node wraps with on the very next call.
    for n in 2..=11u32 {
        let (officer, service) = if n % 2 == 0 {
            (&officer_a, &service_b)
        } else {
            (&officer_b, &service_a)
        };
        assert_eq!(rotate(officer).await.unwrap().primary_version, n);
        let (wrapped, _) = wrap(service, b"record").await.unwrap();
        assert_eq!(
            wrapped.key_version,
            format!("{KEY}/versions/{n}"),
            "rotation {n}"
        );
    }

    // Disabling a version on node A stops node B from unwrapping under it on the next call.
    assert_eq!(
        unwrap(&service_b, &first.ciphertext).await.unwrap(),
        b"record v1"
    );
    officer_a
        .admin()
        .disable_key_version(proto::KeyVersionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap();
    let refused = unwrap(&service_b, &first.ciphertext).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // 2 x 8 officers rotating the same key at the same moment on both nodes: each rotation is
    // clean or a clear conflict, and the key ends with consecutive versions and one primary.
    let before = get(&officer_a).await.versions.len() as u32;
    let mut rotations = Vec::new();
    for i in 0..16 {
        let officer = if i % 2 == 0 {
            officer_a.clone()
        } else {
            officer_b.clone()
        };
        rotations.push(tokio::spawn(async move { rotate(&officer).await }));
    }
    let mut done = 0u32;
    for r in rotations {
        match r.await.unwrap() {
            Ok(_) => done += 1,
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert!(done >= 1, "no rotation succeeded");
    for officer in [&officer_a, &officer_b] {
        let key = get(officer).await;
        let numbers: Vec<u32> = key.versions.iter().map(|v| v.version).collect();
        assert_eq!(numbers, (1..=before + done).collect::<Vec<_>>());
        assert_eq!(key.primary_version, before + done);
        let primaries: Vec<u32> = key
            .versions
            .iter()
            .filter(|v| v.primary)
            .map(|v| v.version)
            .collect();
        assert_eq!(primaries, vec![before + done]);
    }

    // One audit chain, written by both nodes, verifies; each record names its node.
    let items = verified_export(&d.client(b.addr, AUDITOR_A).await).await;
    let nodes: std::collections::BTreeSet<&str> =
        records(&items).map(|r| r.body.node.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b"].into_iter().collect());
    let rotated_ok = records(&items)
        .filter(|r| r.body.operation == "RotateKey" && r.body.outcome == "OK")
        .count() as u32;
    assert_eq!(rotated_ok, 10 + done);
}

/// The node holding the scheduler lock, from the nodes' logs.
fn lock_holder(logs: &[std::path::PathBuf]) -> Option<usize> {
    let holders: Vec<usize> = logs
        .iter()
        .enumerate()
        .filter(|(_, log)| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("took the scheduler lock")
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        holders.len() <= 1,
        "two nodes took the scheduler lock: {holders:?}"
    );
    holders.first().copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_node_runs_due_rotations_when_the_scheduler_lock_holder_dies() {
    let url = postgres_database().await;
    let d = Deployment::new("").on_postgres(&url);
    let cfg = "[custody]\nscheduler_interval_secs = 1";
    let logs = [d.dir().join("a.log"), d.dir().join("b.log")];
    let config_a = d.node_config("node-a", "");
    let config_b = d.node_config("node-b", "");
    for config in [&config_a, &config_b] {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(
            config,
            text.replace("[policy]", &format!("{cfg}\n[policy]")),
        )
        .unwrap();
    }
    let mut nodes = [
        Some(ServerProcess::start(&config_a, &logs[0])),
        Some(ServerProcess::start(&config_b, &logs[1])),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let holder = loop {
        if let Some(h) = lock_holder(&logs) {
            break h;
        }
        assert!(Instant::now() < deadline, "no node took the scheduler lock");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let survivor = 1 - holder;
    let addr = nodes[survivor].as_ref().unwrap().addr;
    let officer = d.client(addr, OFFICER_A).await;
    create(&officer).await;
    officer
        .admin()
        .update_key(proto::UpdateKeyRequest {
            key: KEY.into(),
            rotation_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();

    // The holder dies without a word (no shutdown, its connections simply drop).
    nodes[holder].as_mut().unwrap().child.kill().unwrap();
    nodes[holder].as_mut().unwrap().child.wait().unwrap();
    nodes[holder] = None;

    // The hour passes: the due time is moved into the past in the database, as the period
    // elapsing would, sealed as Tresor seals key state (which takes the HSM: a database
    // administrator alone cannot do this), and the nodes are told as after any change.
    {
        let hsm = d.token.open();
        let store = tresor::store::Store::open(&url).await.unwrap();
        store
            .execute_raw_for_tests(
                "UPDATE keys SET next_rotation_at = 0 WHERE tenant = 'a' AND name = 'ehr'",
            )
            .await
            .unwrap();
        reseal_key(&hsm, &store, "a", "ehr").await;
        store
            .execute_raw_for_tests("SELECT pg_notify('tresor_keys', 'a/ehr')")
            .await
            .unwrap();
        store.close().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if get(&officer).await.primary_version == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the surviving node never ran the due rotation; its log:\n{}",
            std::fs::read_to_string(&logs[survivor]).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(lock_holder(&logs[survivor..=survivor]), Some(0));
    let key = get(&officer).await;
    assert_eq!(key.versions.len(), 2, "rotated once, not once per node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgresql_under_load_fails_calls_cleanly_and_loses_nothing_acknowledged() {
    let pg = PgServer::start();
    let d = Deployment::new("").on_postgres(&pg.url());
    let server = TestServer::start_on(d).await;
    let officer = server.client(OFFICER_A).await;
    create(&officer).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for c in 0..4 {
        let service = server.client(SERVICE_A).await;
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut refused = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let plaintext = format!("caller {c} record {n}").into_bytes();
                match wrap(&service, &plaintext).await {
                    Ok((w, request_id)) => acknowledged.push((plaintext, w.ciphertext, request_id)),
                    Err(s) => {
                        refused.push(s.code());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acknowledged, refused)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.resume();
    // Calls succeed again without restarting Tresor.
    let service = server.client(SERVICE_A).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while wrap(&service, b"after the restart").await.is_err() {
        assert!(Instant::now() < deadline, "calls never succeeded again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    for c in callers {
        let (a, r) = c.await.unwrap();
        acknowledged.extend(a);
        refused.extend(r);
    }
    assert!(
        !refused.is_empty(),
        "no call failed while PostgreSQL was down"
    );
    assert!(
        refused.iter().all(|c| *c == Code::Unavailable),
        "calls failed with other codes than UNAVAILABLE: {refused:?}"
    );
    assert!(
        acknowledged.len() > 10,
        "too little load: {}",
        acknowledged.len()
    );

    // Every acknowledged blob unwraps; every acknowledged call's record is in the verified log.
    for (plaintext, ciphertext, _) in &acknowledged {
        assert_eq!(&unwrap(&service, ciphertext).await.unwrap(), plaintext);
    }
    let items = verified_export(&server.client(AUDITOR_A).await).await;
    let logged: std::collections::HashSet<&str> = records(&items)
        .filter(|r| r.body.operation == "Wrap" && r.body.outcome == "OK")
        .map(|r| r.body.request_id.as_str())
        .collect();
    for (_, _, request_id) in &acknowledged {
        assert!(
            logged.contains(request_id.as_str()),
            "acknowledged call {request_id} is not in the audit log"
        );
    }
    server.stop().await;
}

/// Two custody nodes on one PostgreSQL database and one token; node B follows changes. Returns
/// both, B's store, and a blob of version 1 of the key (version 2 is the primary).
async fn two_custody_nodes(
    url: &str,
    hsm: &tresor::hsm::Hsm,
) -> (
    tresor::custody::Custody,
    tresor::custody::Custody,
    tresor::store::Store,
    Vec<u8>,
) {
    use tresor::custody::{Custody, CustodyOptions};
    use tresor::store::Store;
    let key: tresor::model::KeyName = KEY.parse().unwrap();
    let (a, _) = Custody::open(
        hsm.clone(),
        Store::open(url).await.unwrap(),
        CustodyOptions::default(),
    )
    .await
    .unwrap();
    a.create_key(&officer(&key), &key, "", Default::default())
        .await
        .unwrap();
    let blob = a
        .wrap(
            &service(&key),
            &key,
            zeroize::Zeroizing::new(b"v1".to_vec()),
            b"",
        )
        .await
        .unwrap()
        .ciphertext;
    a.rotate_key(&officer(&key), &key).await.unwrap();
    let store_b = Store::open(url).await.unwrap();
    let (b, _) = Custody::open(hsm.clone(), store_b.clone(), CustodyOptions::default())
        .await
        .unwrap();
    for node in [&a, &b] {
        node.follow_changes();
    }
    (a, b, store_b, blob)
}

/// A node whose notification listener goes quiet without closing (a NAT or load balancer
/// dropping the idle flow) still obeys a revocation made on another node within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_silent_listener_obeys_a_revocation_within_the_bound() {
    use tresor::custody::{CHANGE_BOUND_MS, CustodyError};
    let url = postgres_database().await;
    let token = TestToken::new();
    let hsm = token.open();
    let (a, b, store_b, blob) = two_custody_nodes(&url, &hsm).await;
    let key: tresor::model::KeyName = KEY.parse().unwrap();
    b.unwrap(&service(&key), &blob, b"", None).await.unwrap();

    store_b.silence_change_notifications_for_tests(true);
    let revoked = Instant::now();
    a.disable_version(&officer(&key), &key, 1).await.unwrap();
    loop {
        match b.unwrap(&service(&key), &blob, b"", None).await {
            Err(CustodyError::VersionDisabled(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            revoked.elapsed() < Duration::from_millis(CHANGE_BOUND_MS as u64),
            "node B still unwraps with the revoked version after {:?}",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And the other way round: an enable is seen as well, without a notification.
    a.enable_version(&officer(&key), &key, 1).await.unwrap();
    let enabled = Instant::now();
    while b.unwrap(&service(&key), &blob, b"", None).await.is_err() {
        assert!(enabled.elapsed() < Duration::from_millis(CHANGE_BOUND_MS as u64));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node that cannot reach the database cannot learn of revocations: it stops serving keys
/// once the bound passes (it would otherwise go on unwrapping from its cache), and serves
/// again when the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_database_stops_serving_keys_after_the_bound() {
    use tresor::custody::{CHANGE_BOUND_MS, CustodyError};
    let pg = PgServer::start();
    let token = TestToken::new();
    let hsm = token.open();
    let (_a, b, _store_b, blob) = two_custody_nodes(&pg.url(), &hsm).await;
    let key: tresor::model::KeyName = KEY.parse().unwrap();
    b.unwrap(&service(&key), &blob, b"", None).await.unwrap();

    pg.stop();
    let cut = Instant::now();
    loop {
        match b.unwrap(&service(&key), &blob, b"", None).await {
            Err(CustodyError::NotCurrent) => break,
            Ok(_) => {}
            Err(e) => panic!("{e:?}"),
        }
        assert!(
            cut.elapsed() < Duration::from_millis(CHANGE_BOUND_MS as u64 + 1_000),
            "node B still serves from its cache after {:?} without the database",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cut.elapsed() >= Duration::from_millis(CHANGE_BOUND_MS as u64 - 600));

    pg.resume();
    let back = Instant::now();
    while b.unwrap(&service(&key), &blob, b"", None).await.is_err() {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "node B did not serve again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
