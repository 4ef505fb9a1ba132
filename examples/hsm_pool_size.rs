//! Measures AES-GCM encryptions per second through Tresor's HSM back-end for several session
//! pool sizes, to choose `hsm.sessions` for a module. Until `tresor bench --raw-hsm` exists,
//! this is how the default was chosen.
//!
//! With hsm-sim and 1 ms per PKCS#11 call (an HSM in another data centre), the sizes
//! issue 6 asks about:
//!
//! ```text
//! cargo build --release --examples
//! d=$(mktemp -d) && printf 1234 > $d/pin && chmod 600 $d/pin && printf 'latency_ms = 1\n' > $d/control.toml &&
//! printf 'state_file = "state.json"\ncontrol_file = "control.toml"\n[[token]]\nlabel = "bench"\nso_pin_file = "pin"\nuser_pin_file = "pin"\n' > $d/sim.toml &&
//! HSM_SIM_CONF=$d/sim.toml target/release/examples/hsm_pool_size target/release/deps/libhsm_sim.so bench $d/pin 1 8 64
//! ```
//!
//! With SoftHSM2:
//!
//! ```text
//! scripts/with-test-hsm sh -c 'softhsm2-util --init-token --free --label bench --so-pin 1234 --pin 1234 >/dev/null &&
//!   printf 1234 > $SOFTHSM2_CONF.pin && chmod 600 $SOFTHSM2_CONF.pin &&
//!   cargo run --release --example hsm_pool_size -- /usr/lib/softhsm/libsofthsm2.so bench $SOFTHSM2_CONF.pin'
//! ```

use std::time::{Duration, Instant};

use tresor::hsm::{Hsm, HsmConfig, ObjectId, PinSource};
use zeroize::Zeroizing;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, module, label, pin_file, sizes @ ..] = args.as_slice() else {
        return Err("usage: hsm_pool_size MODULE TOKEN_LABEL PIN_FILE [SESSIONS...]".into());
    };
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![1, 2, 4, 8]
    } else {
        sizes.iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    };
    let seconds = 3;
    println!("sessions  callers  encryptions/s  (32-byte plaintext, {seconds} s each)");
    let mut baseline = None;
    for sessions in sizes {
        let config = HsmConfig {
            module: module.into(),
            token_label: label.clone(),
            token_serial: None,
            pin: PinSource::File(pin_file.into()),
            sessions,
            call_timeout: tresor::hsm::DEFAULT_CALL_TIMEOUT,
            dispatch: tresor::hsm::Dispatch::Threads,
            message_aead: true,
        };
        let hsm = Hsm::open(&config)?;
        let key = ObjectId([(sessions % 251) as u8; 16]);
        if !hsm.secret_key_exists(key).await? {
            hsm.generate_version_key(key, format!("bench/{sessions}"))
                .await?;
        }
        let callers = sessions * 4;
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let hsm = hsm.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    hsm.encrypt_gcm(key, [0; 12], vec![0; 40], Zeroizing::new(vec![7; 32]))
                        .await?;
                    n += 1;
                }
                Ok::<u64, tresor::hsm::HsmError>(n)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let rate = total as f64 / seconds as f64;
        let base = *baseline.get_or_insert(rate);
        println!(
            "{sessions:>8}  {callers:>7}  {rate:>13.0}  ({:.2}x of 1 session)",
            rate / base
        );
        drop(hsm);
    }
    Ok(())
}
