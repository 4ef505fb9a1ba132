//! A client's hold on a listener is bounded: connections per source address, the TLS handshake,
//! an idle connection. Each bound is set small in the configuration, pushed past by a client
//! playing the attacker, and then an allowed caller still gets in.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Waits until the server closes `tcp` (EOF or an error), at most `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A TLS alert or handshake bytes: keep reading until the close.
            Ok(Ok(_)) => {}
        }
    }
}

async fn wrap_works(server: &TestServer) -> bool {
    let service = server.client(SERVICE_A).await;
    service
        .keys()
        .wrap(tresor::proto::WrapRequest {
            justification: None,
            key: "tenants/a/keys/k".into(),
            plaintext: b"dek".to_vec(),
            aad: Vec::new(),
        })
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_more_connections_than_its_bound() {
    let server = TestServer::start_with(
        "limits = { max_connections_per_source = 3, handshake_timeout_secs = 30 }",
    )
    .await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, "tenants/a/keys/k").await;
    drop(officer);
    // Give the server a moment to see the officer's connection closed.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Three silent TCP connections from 127.0.0.1 take the source's places...
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... so a fourth is closed at once, without waiting for its handshake.
    let mut fourth = TcpStream::connect(server.addr).await.unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_secs(2)).await,
        "a connection over the per-source bound was kept open"
    );
    // Once they are gone, the source gets in again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        wrap_works(&server).await,
        "an allowed caller could not get in afterwards"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_idle_connection_is_closed() {
    let server =
        TestServer::start_with("limits = { handshake_timeout_secs = 1, idle_timeout_secs = 2 }")
            .await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, "tenants/a/keys/k").await;

    // A client that never starts its TLS handshake.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(4)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before its handshake time"
    );

    // A client that completes TLS and then says nothing.
    let mut roots = rustls::RootCertStore::empty();
    for ca in tresor::pki::load_certs(&server.deployment.dir().join("ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle TLS connection was kept open");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed before its idle time"
    );

    // The allowed caller, active, is served.
    assert!(wrap_works(&server).await);
    server.stop().await;
}

#[test]
fn limits_out_of_range_are_configuration_errors() {
    for (limits, key) in [
        ("max_connections = 0", "server.limits.max_connections"),
        ("idle_timeout_secs = 0", "server.limits.idle_timeout_secs"),
        (
            "max_connections = 10, max_connections_per_source = 11",
            "server.limits.max_connections_per_source",
        ),
        (
            "max_streams_per_connection = 0",
            "server.limits.max_streams_per_connection",
        ),
    ] {
        let d = Deployment::new(&format!("limits = {{ {limits} }}"));
        let e = tresor::config::Config::load(&d.config_path).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
    let d = Deployment::new("limits = { max_conections = 5 }");
    assert!(
        tresor::config::Config::load(&d.config_path).is_err(),
        "a misspelt limit is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_reconnecting_as_fast_as_it_can_is_cut_off_at_accept() {
    let server = TestServer::start_with("limits = { handshakes_per_source_per_sec = 5 }").await;
    // Twenty connections at once: the first five may start a handshake, the others are closed
    // at accept, before the server does any TLS work for them.
    let mut connections = Vec::new();
    for _ in 0..20 {
        connections.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let mut closed = 0;
    for c in &mut connections {
        if closed_within(c, Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    assert!(closed >= 15, "only {closed} of 20 connections were cut off");
    drop(connections);
    // A second later the source may start handshakes again.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, "tenants/a/keys/k").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_certificate_are_few_per_source() {
    let server = TestServer::start_with("limits = { anonymous_connections_per_source = 2 }").await;
    let profile = tresor::client::Profile::load(&server.deployment.profile(
        server.addr,
        None,
        tresor::pki::Validity::default(),
    ))
    .unwrap();
    let health = |client: tresor::client::Client| async move {
        tonic_health::pb::health_client::HealthClient::new(client.channel())
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
    };
    let first = tresor::client::Client::connect(&profile).await.unwrap();
    let second = tresor::client::Client::connect(&profile).await.unwrap();
    assert!(
        health(first.clone()).await.is_ok(),
        "health without a certificate"
    );
    assert!(health(second.clone()).await.is_ok());
    // A third certificate-less connection from the same address is closed after its
    // handshake; a caller with a certificate still gets in.
    let third = match tresor::client::Client::connect(&profile).await {
        Ok(c) => health(c).await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !third,
        "a third connection without a certificate was served"
    );
    let officer = server.client(OFFICER_A).await;
    create_key(&officer, "tenants/a/keys/k").await;
    drop((first, second));
    server.stop().await;
}

/// A silent TCP connection from `source` (another loopback address: another host to the server).
async fn silent_from(source: [u8; 4], server: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind((std::net::Ipv4Addr::from(source), 0).into())
        .unwrap();
    socket.connect(server).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_from_many_addresses_cannot_keep_an_allowed_caller_out() {
    // Eight slots, one per source: eight attacker addresses that never send a byte take all of
    // them for the whole handshake time.
    let server =
        TestServer::start_with("limits = { max_handshakes = 8, handshake_timeout_secs = 60 }")
            .await;
    let mut stalled = Vec::new();
    for host in 2..10 {
        stalled.push(silent_from([127, 0, 0, host], server.addr).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The allowed caller gets a slot within moments, not after the attackers' handshake time:
    // the oldest stalled handshake gave its slot up.
    let started = Instant::now();
    let officer = tokio::time::timeout(Duration::from_secs(10), server.client(OFFICER_A))
        .await
        .expect("an allowed caller could not connect while stalled handshakes held every slot");
    create_key(&officer, "tenants/a/keys/k").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        closed_within(&mut stalled[0], Duration::from_secs(2)).await,
        "the oldest stalled handshake was not the one abandoned"
    );
    // The others keep their slots: nothing is abandoned while slots are free or handshakes young.
    for s in &mut stalled[2..] {
        assert!(
            !closed_within(s, Duration::from_millis(50)).await,
            "a stalled handshake was abandoned without need"
        );
    }
    server.stop().await;
}
