//! Test support: a fresh SoftHSM2 token and SQLite database per test.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once per process, at `C_Initialize`, and a process may hold
//! one PKCS#11 context; so tests run one per process (cargo-nextest, as `scripts/test` does),
//! each in its own token directory (`scripts/with-softhsm`, removed when the process ends),
//! and each test creates its own token there.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tresor::custody::{Custody, CustodyOptions, ReconcileReport};
use tresor::hsm::{DEFAULT_SESSIONS, Hsm, HsmConfig, PinSource};
use tresor::store::Store;

pub const PIN: &str = "test-user-pin-4711";
const SO_PIN: &str = "test-so-pin-0815";

/// One SoftHSM2 token and a scratch directory.
pub struct TestToken {
    pub dir: tempfile::TempDir,
    pub label: String,
    pub config: HsmConfig,
}

pub fn module_path() -> PathBuf {
    std::env::var_os("TRESOR_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
}

impl TestToken {
    pub fn new() -> Self {
        assert!(
            std::env::var_os("SOFTHSM2_CONF").is_some()
                && std::env::var_os("NEXTEST_RUN_ID").is_some(),
            "HSM tests need one process per test and a scratch SoftHSM2 configuration: run them with scripts/test \
             (which sets SOFTHSM2_CONF and uses cargo nextest), e.g. `scripts/test custody`"
        );
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let label = format!(
            "t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                &label,
                "--so-pin",
                SO_PIN,
                "--pin",
                PIN,
            ])
            .output()
            .expect("softhsm2-util runs (apt-get install softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = tempfile::tempdir().unwrap();
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = HsmConfig {
            module: module_path(),
            token_label: label.clone(),
            token_serial: None,
            pin: PinSource::File(pin_file),
            sessions: DEFAULT_SESSIONS,
        };
        Self { dir, label, config }
    }

    pub fn open(&self) -> Hsm {
        Hsm::open(&self.config).expect("open test token")
    }

    pub fn db_url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("tresor.db").display())
    }
}

impl Drop for TestToken {
    fn drop(&mut self) {
        let _ = Command::new("softhsm2-util")
            .args(["--delete-token", "--token", &self.label])
            .output();
    }
}

/// A token, its HSM context, a store and a custody service over them.
pub struct Fixture {
    pub token: TestToken,
    pub hsm: Hsm,
    pub store: Store,
    pub custody: Custody,
}

impl Fixture {
    pub async fn new() -> Self {
        let token = TestToken::new();
        let hsm = token.open();
        let store = Store::open(&token.db_url()).await.unwrap();
        let (custody, report) =
            Custody::open(hsm.clone(), store.clone(), CustodyOptions::default())
                .await
                .unwrap();
        assert_eq!(report, ReconcileReport::default());
        Self {
            token,
            hsm,
            store,
            custody,
        }
    }

    /// A new custody service over the same token and database, as after a restart.
    pub async fn restart(&self, options: CustodyOptions) -> (Custody, ReconcileReport) {
        let store = Store::open(&self.token.db_url()).await.unwrap();
        Custody::open(self.hsm.clone(), store, options)
            .await
            .unwrap()
    }
}

/// A grant for `role` in `tenant`, made the only way grants are made: by a policy.
pub fn grant(tenant: &str, role: tresor::auth::Role) -> tresor::auth::Grant {
    let policy = tresor::auth::Policy::from_toml(
        &format!("[[identity]]\nname = \"test\"\ntenant = \"{tenant}\"\nroles = [\"service\", \"officer\", \"auditor\"]\n"),
        "test policy",
    )
    .unwrap();
    let who = tresor::auth::Identity {
        name: "test".into(),
        fingerprint: String::new(),
    };
    policy.grant(&who, role).unwrap()
}

/// An officer grant for the key's tenant.
pub fn officer(key: &tresor::model::KeyName) -> tresor::auth::Grant {
    grant(key.tenant().as_str(), tresor::auth::Role::Officer)
}

/// A service grant for the key's tenant.
pub fn service(key: &tresor::model::KeyName) -> tresor::auth::Grant {
    grant(key.tenant().as_str(), tresor::auth::Role::Service)
}
