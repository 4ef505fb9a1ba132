//! Test support: a fresh SoftHSM2 token and SQLite database per test.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once per process, at `C_Initialize`, and a process may hold
//! one PKCS#11 context; so tests run one per process (cargo-nextest, as `scripts/test` does),
//! each in its own token directory (`scripts/with-test-hsm`, removed when the process ends),
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

/// Which PKCS#11 module a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Debian's SoftHSM 2.6.1.
    SoftHsm,
    /// Tresor's own simulator, built in this workspace (Wrap and Unwrap on its PKCS#11 3.0
    /// message-based AES-GCM, one call each).
    HsmSim,
    /// hsm-sim with `hsm.message_aead = false`: the two-call path (`C_EncryptInit`,
    /// `C_Encrypt`) that every PKCS#11 2.40 token gets.
    HsmSimTwoCalls,
}

/// The hsm-sim module built next to the test binaries.
pub fn hsm_sim_module() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    tresor::cli::dev::hsm_sim_module(&exe)
        .expect("libhsm_sim.so is built next to the test binaries")
}

/// One token (SoftHSM2 or hsm-sim) and a scratch directory.
pub struct TestToken {
    pub dir: tempfile::TempDir,
    pub label: String,
    pub config: HsmConfig,
    pub backend: Backend,
    /// hsm-sim's fault-injection control file (hsm-sim only).
    pub control: Option<PathBuf>,
}

pub fn module_path() -> PathBuf {
    std::env::var_os("TRESOR_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
}

impl TestToken {
    pub fn new() -> Self {
        Self::with(Backend::SoftHsm)
    }

    pub fn with(backend: Backend) -> Self {
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
        match backend {
            Backend::HsmSim => return Self::hsm_sim(label),
            Backend::HsmSimTwoCalls => {
                let mut token = Self::hsm_sim(label);
                token.config.message_aead = false;
                return token;
            }
            Backend::SoftHsm => {}
        }
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
            call_timeout: tresor::hsm::DEFAULT_CALL_TIMEOUT,
            dispatch: tresor::hsm::Dispatch::Auto,
            message_aead: true,
        };
        Self {
            dir,
            label,
            config,
            backend,
            control: None,
        }
    }

    /// An hsm-sim token: its configuration goes where `HSM_SIM_CONF` (set per test process by
    /// scripts/with-test-hsm) points, its state and control file into the scratch directory.
    fn hsm_sim(label: String) -> Self {
        let conf = PathBuf::from(
            std::env::var_os(hsm_sim::CONF_ENV)
                .expect("HSM_SIM_CONF is set by scripts/with-test-hsm"),
        );
        let dir = tempfile::tempdir().unwrap();
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, PIN).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(dir.path().join("so-pin"), SO_PIN).unwrap();
        let control = dir.path().join("control.toml");
        hsm_sim::SimConfig {
            state_file: dir.path().join("hsm-sim-state.json"),
            control_file: Some(control.clone()),
            tokens: vec![hsm_sim::TokenDecl {
                label: label.clone(),
                so_pin_file: dir.path().join("so-pin"),
                user_pin_file: pin_file.clone(),
            }],
        }
        .write(&conf)
        .unwrap();
        let config = HsmConfig {
            module: hsm_sim_module(),
            token_label: label.clone(),
            token_serial: None,
            pin: PinSource::File(pin_file),
            sessions: DEFAULT_SESSIONS,
            call_timeout: tresor::hsm::DEFAULT_CALL_TIMEOUT,
            dispatch: tresor::hsm::Dispatch::Auto,
            message_aead: true,
        };
        Self {
            dir,
            label,
            config,
            backend: Backend::HsmSim,
            control: Some(control),
        }
    }

    /// Sets hsm-sim's faults (hsm-sim only).
    pub fn faults(&self, faults: &hsm_sim::Faults) {
        faults
            .write(self.control.as_ref().expect("faults need hsm-sim"))
            .unwrap();
    }

    pub fn open(&self) -> Hsm {
        Hsm::open(&self.config).expect("open test token")
    }

    /// The same token with hot HSM calls dispatched as `dispatch` says.
    pub fn dispatching(mut self, dispatch: tresor::hsm::Dispatch) -> Self {
        self.config.dispatch = dispatch;
        self
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
        Self::with(CustodyOptions::default()).await
    }

    pub async fn with(options: CustodyOptions) -> Self {
        let token = TestToken::new();
        let hsm = token.open();
        let store = Store::open(&token.db_url()).await.unwrap();
        let (custody, report) = Custody::open(hsm.clone(), store.clone(), options)
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

/// An officer grant for `tenant` held by identity `who`.
pub fn officer_named(tenant: &str, who: &str) -> tresor::auth::Grant {
    let policy = tresor::auth::Policy::from_toml(
        &format!("[[identity]]\nname = \"{who}\"\ntenant = \"{tenant}\"\nroles = [\"officer\"]\n"),
        "test policy",
    )
    .unwrap();
    let who = tresor::auth::Identity {
        name: who.into(),
        fingerprint: String::new(),
    };
    policy.grant(&who, tresor::auth::Role::Officer).unwrap()
}

/// Schedules the destruction of a version the only way there is: one officer of the tenant
/// asks, a second one approves (the HSM then holds a destruction order).
pub async fn schedule_by_two_officers(
    custody: &Custody,
    key: &tresor::model::KeyName,
    number: u32,
) -> Result<tresor::custody::ApprovalInfo, tresor::custody::CustodyError> {
    let tenant = key.tenant().as_str();
    let asked = custody
        .request_destruction(&officer_named(tenant, "officer-one"), key, number)
        .await?;
    custody
        .approve(&officer_named(tenant, "officer-two"), &asked.id)
        .await
}

/// What step zero of a version's creation leaves in the token (SECURITY.md "Crash safety"):
/// its creation journal, so that a crash before the row commits leaves a removable object.
pub async fn write_creation_journal(hsm: &Hsm, installation: &str, id: tresor::hsm::ObjectId) {
    let mut value = b"tresor/creation-journal/v1\0".to_vec();
    value.extend_from_slice(&id.0);
    hsm.create_data_object(format!("tresor/{installation}/creating/{id}"), value)
        .await
        .unwrap();
}

/// The version objects in the token (this installation's label prefix).
pub async fn version_objects(hsm: &Hsm, installation: &str) -> Vec<tresor::hsm::TokenObject> {
    let prefix = format!("tresor/{installation}/");
    let mut objects: Vec<_> = hsm
        .list_secret_keys()
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.label.starts_with(&prefix))
        .collect();
    objects.sort_by(|a, b| a.label.cmp(&b.label));
    objects
}

/// Later than any grace period a test uses: pass it to `destroy_due` to run due destructions.
pub fn after_grace() -> tresor::model::Millis {
    tresor::model::now_millis() + 8 * tresor::custody::DAY_MS
}

/// A service grant for the key's tenant.
pub fn service(key: &tresor::model::KeyName) -> tresor::auth::Grant {
    grant(key.tenant().as_str(), tresor::auth::Role::Service)
}

/// Identities in the test policy.
pub const SERVICE_A: &str = "spiffe://a.example/ehr-archive";
pub const OFFICER_A: &str = "officer-anna";
pub const OFFICER_A2: &str = "officer-ben";
pub const AUDITOR_A: &str = "auditor-alex";
pub const SERVICE_B: &str = "spiffe://b.example/lab";
pub const OFFICER_B: &str = "officer-bea";
pub const AUDITOR_B: &str = "auditor-bo";

pub const POLICY: &str = r#"
[[identity]]
name = "spiffe://a.example/ehr-archive"
tenant = "a"
roles = ["service"]

[[identity]]
name = "officer-anna"
tenant = "a"
roles = ["officer"]

[[identity]]
name = "officer-ben"
tenant = "a"
roles = ["officer"]

[[identity]]
name = "auditor-alex"
tenant = "a"
roles = ["auditor"]

[[identity]]
name = "spiffe://b.example/lab"
tenant = "b"
roles = ["service"]

[[identity]]
name = "officer-bea"
tenant = "b"
roles = ["officer"]

[[identity]]
name = "auditor-bo"
tenant = "b"
roles = ["auditor"]
"#;

/// Everything `tresor serve` needs, written to a scratch directory: a SoftHSM2 token, a CA
/// that issued the server certificate and issues client certificates, the policy and the
/// configuration file.
pub struct Deployment {
    pub token: TestToken,
    pub ca: tresor::pki::DevCa,
    pub config_path: PathBuf,
    pub policy_path: PathBuf,
}

impl Deployment {
    pub fn new(extra_server_config: &str) -> Self {
        Self::with(Backend::SoftHsm, extra_server_config, "")
    }

    /// A deployment on `backend`, with extra lines for the `[server]` and `[hsm]` sections.
    pub fn with(backend: Backend, extra_server_config: &str, extra_hsm_config: &str) -> Self {
        let token = TestToken::with(backend);
        let dir = token.dir.path();
        let ca = tresor::pki::DevCa::new("Tresor test CA").unwrap();
        ca.write(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        ca.issue_server(&["localhost", "127.0.0.1"])
            .unwrap()
            .write(&dir.join("server.pem"), &dir.join("server.key"))
            .unwrap();
        let policy_path = dir.join("policy.toml");
        std::fs::write(&policy_path, POLICY).unwrap();
        let PinSource::File(pin_file) = &token.config.pin else {
            unreachable!()
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{extra_server_config}\n\
             [tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\
             [hsm]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\n{extra_hsm_config}\n\
             [database]\nurl = \"sqlite://tresor.db\"\n\
             [policy]\nfile = \"policy.toml\"\n",
            token.config.module.display(),
            token.label,
            pin_file.display()
        );
        let config_path = dir.join("tresor.toml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            token,
            ca,
            config_path,
            policy_path,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.token.dir.path()
    }

    /// A connection profile for `identity` (no client certificate when `None`).
    pub fn profile(
        &self,
        addr: std::net::SocketAddr,
        identity: Option<&str>,
        validity: tresor::pki::Validity,
    ) -> PathBuf {
        self.profile_from(&self.ca, addr, identity, validity)
    }

    /// A profile whose client certificate comes from `issuer` (another CA, for tests).
    pub fn profile_from(
        &self,
        issuer: &tresor::pki::DevCa,
        addr: std::net::SocketAddr,
        identity: Option<&str>,
        validity: tresor::pki::Validity,
    ) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = self.dir();
        let mut profile = format!(
            "endpoint = \"https://{addr}\"\nca = \"ca.pem\"\nserver_name = \"localhost\"\n"
        );
        if let Some(identity) = identity {
            issuer
                .issue_client(identity, validity)
                .unwrap()
                .write(
                    &dir.join(format!("client{n}.pem")),
                    &dir.join(format!("client{n}.key")),
                )
                .unwrap();
            profile.push_str(&format!(
                "cert = \"client{n}.pem\"\nkey = \"client{n}.key\"\n"
            ));
        }
        let path = dir.join(format!("profile{n}.toml"));
        std::fs::write(&path, profile).unwrap();
        path
    }
}

/// The real server, in this process, on a loopback port.
pub struct TestServer {
    pub deployment: Deployment,
    pub addr: std::net::SocketAddr,
    pub policy: std::sync::Arc<tresor::auth::SharedPolicy>,
    /// The metrics endpoint, when `server.metrics_listen` is configured.
    #[allow(dead_code)]
    pub metrics: Option<std::net::SocketAddr>,
    /// The XKS proxy's HTTPS and ping addresses, when `[xks]` is configured.
    #[allow(dead_code)]
    pub xks: (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>),
    /// The KMIP server's address, when `[kmip]` is configured.
    #[allow(dead_code)]
    pub kmip: Option<std::net::SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tresor::server::StartError>>>,
    /// For [`TestServer::reload`]; dropped before stopping, so the HSM context is released.
    server: Option<std::sync::Arc<tresor::server::Server>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    pub async fn start_with(extra_server_config: &str) -> Self {
        Self::start_on(Deployment::new(extra_server_config)).await
    }

    pub async fn start_on(deployment: Deployment) -> Self {
        Self::start_with_clock(
            deployment,
            std::sync::Arc::new(tresor::custody::SystemClock),
        )
        .await
    }

    pub async fn start_with_clock(
        deployment: Deployment,
        clock: std::sync::Arc<dyn tresor::custody::Clock>,
    ) -> Self {
        // A server stopped in this process releases its HSM context once its background tasks
        // (the audit writer, connection tasks) have noticed; a restart may have to wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let server = loop {
            let config = tresor::config::Config::load(&deployment.config_path).unwrap();
            match tresor::server::Server::prepare_with_clock(config, clock.clone()).await {
                Err(tresor::server::StartError::Hsm(tresor::hsm::HsmError::AlreadyOpen))
                    if std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                started => break started.unwrap(),
            }
        };
        let listener = server.bind().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = server.metrics_addr();
        let policy = server.policy();
        let xks = server.xks_addrs();
        let kmip = server.kmip_addr();
        let server = std::sync::Arc::new(server);
        let serving = std::sync::Arc::clone(&server);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            serving
                .serve(listener, async move {
                    let _ = rx.await;
                })
                .await
        });
        Self {
            deployment,
            addr,
            policy,
            metrics,
            xks,
            kmip,
            shutdown: Some(tx),
            task: Some(task),
            server: Some(server),
        }
    }

    /// What SIGHUP does: re-reads the policy and the XKS credentials.
    pub fn reload(&self) {
        if let Some(server) = &self.server {
            server.reload();
        }
    }

    /// A client connected as `identity`.
    pub async fn client(&self, identity: &str) -> tresor::client::Client {
        self.client_with(Some(identity), tresor::pki::Validity::default())
            .await
    }

    pub async fn client_with(
        &self,
        identity: Option<&str>,
        validity: tresor::pki::Validity,
    ) -> tresor::client::Client {
        let profile =
            tresor::client::Profile::load(&self.deployment.profile(self.addr, identity, validity))
                .unwrap();
        tresor::client::Client::connect(&profile).await.unwrap()
    }

    /// Stops the server and hands back its deployment (token, database, certificates), so a
    /// test can start it again.
    #[allow(dead_code)]
    pub async fn stop_keeping(mut self) -> Deployment {
        self.server = None;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.deployment
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        self.server = None;
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// The admin URL of the throwaway PostgreSQL server that `scripts/test` starts
/// (`scripts/with-postgres`). PostgreSQL tests fail, never skip, without it.
pub fn postgres_admin_url() -> String {
    std::env::var("TRESOR_TEST_POSTGRES").expect(
        "TRESOR_TEST_POSTGRES is not set: run PostgreSQL tests under scripts/test or scripts/with-postgres",
    )
}

/// A new, empty database on the test PostgreSQL server; returns its URL.
pub async fn postgres_database() -> String {
    use sqlx::Connection;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let admin = postgres_admin_url();
    let name = format!(
        "tresor_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    with_database(&admin, &name)
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (server, _) = base.rsplit_once('/').unwrap();
    if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    }
}

/// `tresor serve` in a process of its own, its log in a file; killed when dropped.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

impl ServerProcess {
    pub fn start(config: &std::path::Path, log: &std::path::Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tresor"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line.strip_prefix("tresor: serving on ") {
                    let _ = tx.send(addr.parse::<std::net::SocketAddr>().unwrap());
                }
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "server did not start; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        Self { child, addr }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "server did not exit");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Deployment {
    /// The same deployment on a PostgreSQL database instead of its SQLite file.
    pub fn on_postgres(self, url: &str) -> Self {
        let config = std::fs::read_to_string(&self.config_path).unwrap();
        let config = config.replace("url = \"sqlite://tresor.db\"", &format!("url = \"{url}\""));
        std::fs::write(&self.config_path, config).unwrap();
        self
    }

    /// A configuration file for one more node of this deployment: the same token, database,
    /// certificates and policy, with `server.node_id = node` and `extra_server_config`.
    pub fn node_config(&self, node: &str, extra_server_config: &str) -> PathBuf {
        let config = std::fs::read_to_string(&self.config_path).unwrap();
        let config = config.replacen(
            "[server]\n",
            &format!("[server]\nnode_id = \"{node}\"\n{extra_server_config}\n"),
            1,
        );
        let path = self.dir().join(format!("{node}.toml"));
        std::fs::write(&path, config).unwrap();
        path
    }

    /// A client of the server at `addr`, connected as `identity`.
    pub async fn client(
        &self,
        addr: std::net::SocketAddr,
        identity: &str,
    ) -> tresor::client::Client {
        let profile = tresor::client::Profile::load(&self.profile(
            addr,
            Some(identity),
            tresor::pki::Validity::default(),
        ))
        .unwrap();
        tresor::client::Client::connect(&profile).await.unwrap()
    }
}

/// A PostgreSQL server of a test's own (for tests that stop and restart it), in a temporary
/// directory, on a Unix socket there; run as `TRESOR_TEST_PG_USER` when set (as root).
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: String,
}

impl PgServer {
    pub fn start() -> Self {
        let bin = PathBuf::from(std::env::var("TRESOR_TEST_PG_BIN").expect(
            "TRESOR_TEST_PG_BIN is not set: run PostgreSQL tests under scripts/test or scripts/with-postgres",
        ));
        let user = std::env::var("TRESOR_TEST_PG_USER").unwrap_or_default();
        let dir = tempfile::tempdir().unwrap();
        if !user.is_empty() {
            assert!(
                Command::new("chown")
                    .arg(&user)
                    .arg(dir.path())
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let server = Self { dir, bin, user };
        let data = server.dir.path().join("data");
        let out = server
            .pg("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "tresor", "-A", "trust", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.resume();
        server
    }

    fn pg(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.user.is_empty() {
            Command::new(program)
        } else {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.user, "--"]).arg(program);
            c
        }
    }

    /// The URL of database `postgres` on this server.
    pub fn url(&self) -> String {
        format!(
            "postgres://tresor@localhost/postgres?host={}",
            self.dir.path().display()
        )
    }

    /// Stops the server (fast shutdown: connections are closed, committed work is kept).
    pub fn stop(&self) {
        let out = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the (stopped) server again.
    pub fn resume(&self) {
        let dir = self.dir.path();
        let out = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("data/server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses='' -c unix_socket_directories='{}'",
                dir.display()
            ))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .pg("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// Creates `key` with default settings, as `officer`.
pub async fn create_key(officer: &tresor::client::Client, key: &str) {
    officer
        .admin()
        .create_key(tresor::proto::CreateKeyRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// The audit checkpoint public key (uncompressed P-256 point), as an auditor fetches it.
pub async fn public_point(auditor: &tresor::client::Client) -> Vec<u8> {
    let pem = auditor
        .audit()
        .get_audit_public_key(tresor::proto::GetAuditPublicKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .pem;
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map(|d: rustls::pki_types::SubjectPublicKeyInfoDer| d.as_ref().to_vec())
        .unwrap();
    tresor::audit_record::p256_point_from_spki(&der).unwrap()
}

/// The whole audit log, verified against the checkpoint key.
pub async fn verified_export(
    auditor: &tresor::client::Client,
) -> Vec<tresor::audit_record::ExportItem> {
    auditor
        .audit()
        .get_audit_checkpoint(tresor::proto::GetAuditCheckpointRequest {})
        .await
        .unwrap();
    let later = tresor::model::now_millis() + 3_600_000;
    let mut stream = auditor
        .audit()
        .export_audit_log(tresor::proto::ExportAuditLogRequest {
            to: Some(prost_types::Timestamp {
                seconds: later / 1000,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut items = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        items.push(tresor::client::audit_item(m).unwrap());
    }
    let point = public_point(auditor).await;
    tresor::audit_record::verify(
        &items.iter().map(|i| (i.clone(), None)).collect::<Vec<_>>(),
        &point,
    )
    .unwrap();
    items
}

/// Seals a key's rows as they are in the database now, computed independently of Tresor's
/// code from the format SECURITY.md "Metadata integrity" documents (so a test that needs it is
/// also a check that the documentation is exact). Needs the HSM: this is what only a holder of
/// the PIN can do; tests use it to stand in for time passing, where moving a due time in the
/// database is the only way.
pub async fn reseal_key(hsm: &Hsm, store: &Store, tenant: &str, name: &str) {
    fn str_(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn opt(out: &mut Vec<u8>, v: Option<i64>) {
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
    let installation = store.installation_id().to_owned();
    let (key, mut versions) = store.load_key(tenant, name).await.unwrap().unwrap();
    versions.sort_by_key(|v| v.version);
    let mut m = b"tresor/metadata/key/v1\0".to_vec();
    for s in [&installation, &key.tenant, &key.name, &key.description] {
        str_(&mut m, s);
    }
    m.extend_from_slice(&(key.labels.len() as u32).to_be_bytes());
    for (k, v) in &key.labels {
        str_(&mut m, k);
        str_(&mut m, v);
    }
    m.extend_from_slice(&key.primary_version.to_be_bytes());
    m.extend_from_slice(&key.created_at.to_be_bytes());
    m.extend_from_slice(&key.updated_at.to_be_bytes());
    opt(&mut m, key.rotation_period_ms);
    opt(&mut m, key.next_rotation_at);
    m.extend_from_slice(&key.min_decryption_version.to_be_bytes());
    str_(&mut m, key.usage.as_str());
    m.extend_from_slice(&(versions.len() as u32).to_be_bytes());
    for v in &versions {
        m.extend_from_slice(&v.id.0);
        m.extend_from_slice(&v.version.to_be_bytes());
        str_(&mut m, v.state.as_str());
        m.extend_from_slice(&v.created_at.to_be_bytes());
        m.extend_from_slice(&v.state_changed_at.to_be_bytes());
        opt(&mut m, v.destroy_at);
        opt(&mut m, v.destroyed_at);
    }
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("tresor metadata integrity key v1\0{installation}").as_bytes(),
    );
    let id = tresor::hsm::ObjectId(digest.as_ref()[..16].try_into().unwrap());
    let seal = tresor::model::to_hex(&hsm.hmac_sha256(id, m).await.unwrap());
    store
        .reseal_key(
            tenant,
            name,
            &tresor::store::Reseal {
                before: &key.integrity,
                after: &seal,
            },
        )
        .await
        .unwrap();
}

/// Where a suite case keeps its metadata: the token's SQLite file, or a fresh PostgreSQL
/// database.
pub enum Db {
    Sqlite,
    Postgres(String),
}

impl Db {
    /// The database URL for a case using `token`.
    pub fn url(self, token: &TestToken) -> String {
        match self {
            Db::Sqlite => token.db_url(),
            Db::Postgres(url) => url,
        }
    }
}

/// Runs each suite case (an `async fn(Db)`) on both back-ends: `name::sqlite`, `name::postgres`.
#[macro_export]
macro_rules! on_sqlite_and_postgres {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$case($crate::common::Db::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$case($crate::common::Db::Postgres(
                    $crate::common::postgres_database().await,
                ))
                .await;
            }
        }
    )*};
}
