//! Wrap throughput through the real server and client, with the audit log and with its writer
//! replaced by a no-op, alternating in one run so the ratio holds on a noisy machine.
//!
//! Needs the `bench-unaudited` feature (never in production builds) and an installation to
//! run against, e.g. the one `tresor dev` made (stop `tresor dev` first):
//!
//! ```text
//! cargo run --release -- --profile tresor-dev/officer.profile.toml key create tenants/demo/keys/bench  # with tresor dev running
//! cargo build --release --features bench-unaudited --example audit_overhead
//! HSM_SIM_CONF=tresor-dev/hsm-sim.toml target/release/examples/audit_overhead \
//!     tresor-dev/tresor.toml tresor-dev/service.profile.toml tenants/demo/keys/bench [AAD]
//! ```
//!
//! The AAD defaults to `object` (6 bytes); pass `""` to measure without the AAD's HMAC.
//! `TRESOR_BENCH_CALLERS` sets the number of concurrent callers (default 32).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tresor::client::{Client, Profile};
use tresor::config::Config;
use tresor::proto;
use tresor::server::Server;

const SECONDS: u64 = 5;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (config, profile, key, aad) = match args.as_slice() {
        [_, c, p, k] => (c, p, k, b"object".to_vec()),
        [_, c, p, k, aad] => (c, p, k, aad.as_bytes().to_vec()),
        _ => return Err("usage: audit_overhead CONFIG SERVICE_PROFILE KEY [AAD]".into()),
    };
    // Concurrent callers; TRESOR_BENCH_CALLERS overrides the default of 32.
    let callers: usize = std::env::var("TRESOR_BENCH_CALLERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut results = Vec::new();
    for audited in [true, false, true, false] {
        let mut config = Config::load(config.as_ref())?;
        config.listen = "127.0.0.1:0".parse()?;
        // The previous round's audit writer lets go of the HSM context a moment after its
        // server stopped; wait for that rather than fail.
        let mut attempts = 0;
        let mut server = loop {
            match Server::prepare(config.clone()).await {
                Err(tresor::server::StartError::Hsm(tresor::hsm::HsmError::AlreadyOpen))
                    if attempts < 50 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        if !audited {
            server = server.unaudited_for_benchmarks();
        }
        let listener = server.bind().await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            server
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
        });
        let mut p = Profile::load(profile.as_ref())?;
        p.endpoint = format!("https://{addr}");
        let clients: Vec<Client> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(Client::connect(&p).await?);
            }
            v
        };
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(SECONDS);
        let tasks: Vec<_> = (0..callers)
            .map(|i| {
                let (client, done, key, aad) = (
                    clients[i % clients.len()].clone(),
                    Arc::clone(&done),
                    key.clone(),
                    aad.clone(),
                );
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let r = client
                            .keys()
                            .wrap(proto::WrapRequest {
                                justification: None,
                                key: key.clone(),
                                plaintext: vec![7; 32],
                                aad: aad.clone(),
                            })
                            .await;
                        if r.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / SECONDS as f64;
        println!(
            "{:<10} {rate:>8.0} wraps/s ({callers} callers, 32-byte DEK, {}-byte AAD)",
            if audited { "audited" } else { "no-op" },
            aad.len()
        );
        results.push((audited, rate));
        let _ = stop.send(());
        serving.await??;
    }
    let mean = |a: bool| {
        let v: Vec<f64> = results.iter().filter(|r| r.0 == a).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!("audited / no-op = {:.2}", mean(true) / mean(false));
    Ok(())
}
