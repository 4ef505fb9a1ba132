//! `tresor serve`'s configuration: one TOML file, validated completely before anything starts.
//!
//! Owns parsing, defaults and validation, and the error that names the offending key. It does
//! not open the HSM, the database or sockets; it only checks that what they need is present and
//! well-formed. Secrets (the PIN, the TLS private key) are only ever *locations* here.

mod kmip;
mod limits;
mod xks;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::custody::OrphanPolicy;
use crate::hsm::{DEFAULT_CALL_TIMEOUT, DEFAULT_SESSIONS, Dispatch, HsmConfig, PinSource};
pub use kmip::KmipConfig;
use kmip::{KmipSection, TlsDefaults, parse_kmip};
pub use xks::{XksConfig, XksPrefix};
use xks::{XksSection, parse_xks};

/// Default cap on requests being served at once; beyond it callers get `RESOURCE_EXHAUSTED`.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration {file}: {key}: {problem}")]
pub struct ConfigError {
    /// The configuration file.
    pub file: String,
    /// The TOML key, dotted (`hsm.pin_file`), or `-` for the file as a whole.
    pub key: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: ServerSection,
    tls: TlsSection,
    hsm: HsmSection,
    database: DatabaseSection,
    policy: PolicySection,
    #[serde(default)]
    custody: CustodySection,
    xks: Option<XksSection>,
    kmip: Option<KmipSection>,
}
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: String,
    metrics_listen: Option<String>,
    node_id: Option<String>,
    log_format: Option<String>,
    max_concurrent_requests: Option<usize>,
    request_timeout_secs: Option<u64>,
    health_check_interval_secs: Option<u64>,
    limits: Option<limits::LimitsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HsmSection {
    module: PathBuf,
    token_label: String,
    token_serial: Option<String>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    sessions: Option<usize>,
    call_timeout_ms: Option<u64>,
    dispatch: Option<String>,
    message_aead: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatabaseSection {
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustodySection {
    orphans: Option<String>,
    destruction_grace_hours: Option<u64>,
    approval_ttl_hours: Option<u64>,
    max_access_window_hours: Option<u64>,
    scheduler_interval_secs: Option<u64>,
}

/// A validated configuration, with relative paths resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub source: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP Prometheus endpoint (`GET /metrics`), if any.
    pub metrics_listen: Option<SocketAddr>,
    /// This node's name in every log line: `server.node_id`, else the host name.
    pub node_id: String,
    /// Text for people or JSON lines for log collectors.
    pub log_format: LogFormat,
    /// Cap on requests served at once.
    pub max_concurrent_requests: usize,
    /// Longest a request may run.
    pub request_timeout: Duration,
    /// The gRPC listener's bounds (`[server.limits]`).
    pub limits: crate::listener::ListenerLimits,
    /// How often the HSM and database are checked for the health service.
    pub health_check_interval: Duration,
    /// Server certificate chain (PEM).
    pub tls_cert: PathBuf,
    /// Server private key (PEM).
    pub tls_key: PathBuf,
    /// CA certificates that issue client certificates (PEM).
    pub client_ca: PathBuf,
    /// The HSM.
    pub hsm: HsmConfig,
    /// Database URL: a PostgreSQL URL may carry a password, so it is kept out of `Debug`.
    pub database_url: secrecy::SecretString,
    /// Access policy file.
    pub policy_file: PathBuf,
    /// What reconciliation does with orphan HSM objects.
    pub orphans: OrphanPolicy,
    /// Wait between an approved destruction and the HSM object's destruction.
    pub destruction_grace: Duration,
    /// How long a destruction request waits for its second officer.
    pub approval_ttl: Duration,
    /// The longest break-glass access window an officer may request.
    pub max_access_window: Duration,
    /// How often due rotations, destructions and expiries run.
    pub scheduler_interval: Duration,
    /// The AWS KMS external key store proxy, if configured.
    pub xks: Option<XksConfig>,
    /// The KMIP server, if configured.
    pub kmip: Option<KmipConfig>,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            key: "-".into(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration text; `path` names it and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file_name = path.display().to_string();
        let err = |key: &str, problem: String| ConfigError {
            file: file_name.clone(),
            key: key.to_owned(),
            problem,
        };
        let raw: File = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|s| format!("at byte {}", s.start))
                .unwrap_or_else(|| "-".into());
            err(&key, e.message().to_owned())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        let readable = |key: &str, p: &Path| -> Result<PathBuf, ConfigError> {
            let full = resolve(p);
            std::fs::File::open(&full)
                .map(|_| full.clone())
                .map_err(|e| err(key, format!("cannot read {}: {e}", full.display())))
        };

        let listen: SocketAddr = raw.server.listen.parse().map_err(|_| {
            err(
                "server.listen",
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:8443",
                    raw.server.listen
                ),
            )
        })?;
        let metrics_listen = match raw.server.metrics_listen.as_deref() {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                err(
                    "server.metrics_listen",
                    format!("{a:?} is not an address:port such as 127.0.0.1:9464"),
                )
            })?),
        };
        let node_id = match raw.server.node_id {
            Some(id) if valid_node_id(&id) => id,
            Some(id) => {
                return Err(err(
                    "server.node_id",
                    format!("{id:?}: use 1-64 letters, digits, '.', '_' or '-'"),
                ));
            }
            None => host_name(),
        };
        let log_format = match raw.server.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(err(
                    "server.log_format",
                    format!("{other:?}: use \"text\" or \"json\""),
                ));
            }
        };
        let max_concurrent_requests = raw
            .server
            .max_concurrent_requests
            .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS);
        if !(1..=100_000).contains(&max_concurrent_requests) {
            return Err(err(
                "server.max_concurrent_requests",
                "must be 1 to 100000".into(),
            ));
        }
        let request_timeout = raw.server.request_timeout_secs.unwrap_or(30);
        if !(1..=3600).contains(&request_timeout) {
            return Err(err(
                "server.request_timeout_secs",
                "must be 1 to 3600".into(),
            ));
        }
        let health = raw.server.health_check_interval_secs.unwrap_or(1);
        if !(1..=3600).contains(&health) {
            return Err(err(
                "server.health_check_interval_secs",
                "must be 1 to 3600".into(),
            ));
        }

        let tls_cert = readable("tls.cert", &raw.tls.cert)?;
        let tls_key = readable("tls.key", &raw.tls.key)?;
        let client_ca = readable("tls.client_ca", &raw.tls.client_ca)?;

        let module = readable("hsm.module", &raw.hsm.module)?;
        if raw.hsm.token_label.is_empty() || raw.hsm.token_label.len() > 32 {
            return Err(err(
                "hsm.token_label",
                "must be 1 to 32 bytes (a PKCS#11 token label)".into(),
            ));
        }
        let pin = match (raw.hsm.pin_file, raw.hsm.pin_env) {
            (Some(f), None) => PinSource::File(readable("hsm.pin_file", &f)?),
            (None, Some(v)) if !v.is_empty() => PinSource::Env(v),
            (None, Some(_)) => {
                return Err(err(
                    "hsm.pin_env",
                    "is empty; name the environment variable".into(),
                ));
            }
            (None, None) => {
                return Err(err(
                    "hsm.pin_file",
                    "give the PIN's location: hsm.pin_file or hsm.pin_env (never the PIN itself)"
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(err(
                    "hsm.pin_env",
                    "give hsm.pin_file or hsm.pin_env, not both".into(),
                ));
            }
        };
        let call_timeout = raw
            .hsm
            .call_timeout_ms
            .map_or(DEFAULT_CALL_TIMEOUT, Duration::from_millis);
        if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&call_timeout) {
            return Err(err("hsm.call_timeout_ms", "must be 10 to 600000".into()));
        }
        let sessions = raw.hsm.sessions.unwrap_or(DEFAULT_SESSIONS);
        if !(1..=1024).contains(&sessions) {
            return Err(err("hsm.sessions", "must be 1 to 1024".into()));
        }
        let dispatch = match raw.hsm.dispatch.as_deref() {
            None => Dispatch::default(),
            Some(s) => Dispatch::parse(s).ok_or_else(|| {
                err(
                    "hsm.dispatch",
                    format!("{s:?}: use \"auto\", \"inline\" or \"threads\""),
                )
            })?,
        };

        let url = &raw.database.url;
        let database_url = match url.strip_prefix("sqlite://") {
            Some(p) if !p.is_empty() => format!("sqlite://{}", resolve(Path::new(p)).display()),
            _ if postgres_url(url).is_some() => {
                if postgres_url(url).is_some_and(|authority| authority.contains(':')) {
                    // Not refused (it works), but the config file is then a secret.
                    tracing::warn!(
                        "database.url carries a password; prefer PGPASSFILE or PGPASSWORD (README, \"Several nodes on PostgreSQL\")"
                    );
                }
                url.clone()
            }
            _ => {
                // Only the scheme is shown: a URL may carry a password.
                let scheme = url.split_once("://").map_or("no scheme", |(s, _)| s);
                return Err(err(
                    "database.url",
                    format!(
                        "unsupported URL ({scheme}): use sqlite://PATH or postgres://USER@HOST/DATABASE"
                    ),
                ));
            }
        };
        let policy_file = readable("policy.file", &raw.policy.file)?;
        let orphans = match raw.custody.orphans.as_deref() {
            None | Some("remove") => OrphanPolicy::Remove,
            Some("report") => OrphanPolicy::Report,
            Some(other) => {
                return Err(err(
                    "custody.orphans",
                    format!("{other:?}: use \"remove\" or \"report\""),
                ));
            }
        };

        let grace = raw.custody.destruction_grace_hours.unwrap_or(7 * 24);
        if grace < 24 {
            return Err(err(
                "custody.destruction_grace_hours",
                "must be at least 24".into(),
            ));
        }
        let ttl = raw.custody.approval_ttl_hours.unwrap_or(24);
        if !(1..=24 * 30).contains(&ttl) {
            return Err(err("custody.approval_ttl_hours", "must be 1 to 720".into()));
        }
        let window = raw.custody.max_access_window_hours.unwrap_or(8);
        if !(1..=24 * 7).contains(&window) {
            return Err(err(
                "custody.max_access_window_hours",
                "must be 1 to 168".into(),
            ));
        }
        let tick = raw.custody.scheduler_interval_secs.unwrap_or(30);
        if !(1..=3600).contains(&tick) {
            return Err(err(
                "custody.scheduler_interval_secs",
                "must be 1 to 3600".into(),
            ));
        }
        let xks = match raw.xks {
            None => None,
            Some(x) => Some(parse_xks(x, &err, &readable)?),
        };
        let kmip = match raw.kmip {
            None => None,
            Some(k) => Some(parse_kmip(
                k,
                TlsDefaults {
                    cert: &tls_cert,
                    key: &tls_key,
                    client_ca: &client_ca,
                },
                &err,
                &readable,
            )?),
        };
        Ok(Self {
            xks,
            kmip,
            destruction_grace: Duration::from_secs(grace * 3600),
            approval_ttl: Duration::from_secs(ttl * 3600),
            max_access_window: Duration::from_secs(window * 3600),
            scheduler_interval: Duration::from_secs(tick),
            source: path.to_owned(),
            listen,
            metrics_listen,
            node_id,
            log_format,
            max_concurrent_requests,
            request_timeout: Duration::from_secs(request_timeout),
            limits: limits::parse_limits(
                raw.server.limits,
                crate::listener::ListenerLimits {
                    request_timeout: Duration::from_secs(request_timeout),
                    ..Default::default()
                },
                "server.limits",
                &err,
            )?,
            health_check_interval: Duration::from_secs(health),
            tls_cert,
            tls_key,
            client_ca,
            hsm: HsmConfig {
                module,
                token_label: raw.hsm.token_label,
                token_serial: raw.hsm.token_serial,
                pin,
                sessions,
                call_timeout,
                dispatch,
                message_aead: raw.hsm.message_aead.unwrap_or(true),
            },
            database_url: secrecy::SecretString::from(database_url),
            policy_file,
            orphans,
        })
    }
}
/// How the server writes its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Aligned text for people.
    Text,
    /// One JSON object per line.
    Json,
}

fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The kernel's host name when it is a valid node id, else "tresor".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| valid_node_id(h))
        .unwrap_or_else(|| "tresor".to_owned())
}

/// The `user[:password]@host` part of a `postgres://` or `postgresql://` URL, if it is one.
fn postgres_url(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    Some(rest.split_once('@').map_or("", |(authority, _)| authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "server.pem",
            "server.key",
            "clients.pem",
            "module.so",
            "pin",
            "policy.toml",
        ] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let text = r#"
            [server]
            listen = "127.0.0.1:8443"
            [tls]
            cert = "server.pem"
            key = "server.key"
            client_ca = "clients.pem"
            [hsm]
            module = "module.so"
            token_label = "tresor"
            pin_file = "pin"
            [database]
            url = "sqlite://tresor.db"
            [policy]
            file = "policy.toml"
        "#;
        (dir, text.to_owned())
    }

    #[test]
    fn xks_sections_are_checked_and_name_the_key() {
        let (dir, text) = setup();
        let path = dir.path().join("tresor.toml");
        std::fs::write(dir.path().join("creds.toml"), "x").unwrap();
        let xks = "\n[xks]\nlisten = \"127.0.0.1:8444\"\ncert = \"server.pem\"\nkey = \"server.key\"\nregion = \"eu-central-1\"\n[[xks.prefix]]\npath = \"/uksh/\"\nidentity = \"kms\"\ncredentials = \"creds.toml\"\n";
        let c = Config::parse(&format!("{text}{xks}"), &path).unwrap();
        let x = c.xks.unwrap();
        assert_eq!(x.prefixes[0].path, "/uksh");
        assert_eq!(x.max_concurrent_requests, 256);
        for (from, to, key) in [
            ("eu-central-1", "EU Central", "xks.region"),
            ("\"/uksh/\"", "\"uksh\"", "xks.prefix.path"),
            ("\"/uksh/\"", "\"/a b\"", "xks.prefix.path"),
            ("creds.toml", "missing.toml", "xks.prefix.credentials"),
            (
                "region = ",
                "client_subject = \"cks\"\nregion = ",
                "xks.client_subject",
            ),
        ] {
            let e = Config::parse(&format!("{text}{}", xks.replace(from, to)), &path).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn kmip_sections_default_to_the_tls_files_and_name_the_key_of_a_problem() {
        let (dir, text) = setup();
        let path = dir.path().join("tresor.toml");
        let kmip =
            "\n[kmip]\nlisten = \"127.0.0.1:5696\"\ntenant_destroy_grace_hours = { lab = 0 }\n";
        let c = Config::parse(&format!("{text}{kmip}"), &path).unwrap();
        let k = c.kmip.unwrap();
        assert_eq!(
            (k.cert, k.key, k.client_ca),
            (c.tls_cert, c.tls_key, c.client_ca)
        );
        assert_eq!(k.wrapping_key, "kmip");
        assert_eq!(k.destroy_grace, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(k.tenant_destroy_grace["lab"], Duration::ZERO);
        assert!(k.officer_destroy_approval);
        for (from, to, key) in [
            ("127.0.0.1:5696", "localhost", "kmip.listen"),
            (
                "{ lab = 0 }",
                "{ Lab = 0 }",
                "kmip.tenant_destroy_grace_hours",
            ),
            (
                "{ lab = 0 }",
                "{ lab = 9000 }",
                "kmip.tenant_destroy_grace_hours",
            ),
            (
                "listen = ",
                "wrapping_key = \"Kmip Key\"\nlisten = ",
                "kmip.wrapping_key",
            ),
            (
                "listen = ",
                "cert = \"missing.pem\"\nlisten = ",
                "kmip.cert",
            ),
        ] {
            let e = Config::parse(&format!("{text}{}", kmip.replace(from, to)), &path).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
    }

    #[test]
    fn a_postgres_url_is_taken_as_given_and_its_password_is_never_printed() {
        let (dir, text) = setup();
        let path = dir.path().join("tresor.toml");
        let url = "postgres://tresor:s3cret-pw@db.example/tresor?sslmode=verify-full";
        let c = Config::parse(&text.replace("sqlite://tresor.db", url), &path).unwrap();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&c.database_url), url);
        assert!(!format!("{c:?}").contains("s3cret"));
        let bad = Config::parse(
            &text.replace("sqlite://tresor.db", "mysql://tresor:s3cret-pw@db/tresor"),
            &path,
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("database.url") && bad.contains("mysql"),
            "{bad}"
        );
        assert!(!bad.contains("s3cret"), "{bad}");
    }

    #[test]
    fn a_minimal_file_gets_defaults_and_resolved_paths() {
        let (dir, text) = setup();
        let path = dir.path().join("tresor.toml");
        let c = Config::parse(&text, &path).unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.hsm.sessions, DEFAULT_SESSIONS);
        assert_eq!(c.hsm.dispatch, Dispatch::Auto);
        assert_eq!(c.log_format, LogFormat::Text);
        assert!(valid_node_id(&c.node_id), "{}", c.node_id);
        let named = Config::parse(
            &text.replace(
                "[tls]",
                "node_id = \"tresor-fra-1\"\nlog_format = \"json\"\n[tls]",
            ),
            &path,
        )
        .unwrap();
        assert_eq!(named.node_id, "tresor-fra-1");
        assert_eq!(named.log_format, LogFormat::Json);
        let threads = Config::parse(
            &text.replace("[hsm]", "[hsm]\ndispatch = \"threads\""),
            &path,
        )
        .unwrap();
        assert_eq!(threads.hsm.dispatch, Dispatch::Threads);
        assert!(c.hsm.message_aead, "message-based AES-GCM is on by default");
        let two_calls =
            Config::parse(&text.replace("[hsm]", "[hsm]\nmessage_aead = false"), &path).unwrap();
        assert!(!two_calls.hsm.message_aead);
        assert_eq!(c.max_concurrent_requests, DEFAULT_MAX_CONCURRENT_REQUESTS);
        assert_eq!(c.tls_cert, dir.path().join("server.pem"));
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&c.database_url),
            format!("sqlite://{}", dir.path().join("tresor.db").display())
        );
        assert_eq!(c.hsm.pin, PinSource::File(dir.path().join("pin")));
        assert_eq!(c.orphans, OrphanPolicy::Remove);
    }

    #[test]
    fn every_problem_names_its_key() {
        let (dir, text) = setup();
        let path = dir.path().join("tresor.toml");
        for (from, to, key) in [
            (
                "listen = \"127.0.0.1:8443\"",
                "listen = \"localhost\"",
                "server.listen",
            ),
            (
                "cert = \"server.pem\"",
                "cert = \"missing.pem\"",
                "tls.cert",
            ),
            ("pin_file = \"pin\"", "", "hsm.pin_file"),
            (
                "pin_file = \"pin\"",
                "pin_file = \"pin\"\npin_env = \"PIN\"",
                "hsm.pin_env",
            ),
            (
                "token_label = \"tresor\"",
                "token_label = \"\"",
                "hsm.token_label",
            ),
            (
                "url = \"sqlite://tresor.db\"",
                "url = \"mysql://db\"",
                "database.url",
            ),
            (
                "[policy]",
                "[custody]\norphans = \"keep\"\n[policy]",
                "custody.orphans",
            ),
            ("[hsm]", "[hsm]\nsessions = 0", "hsm.sessions"),
            ("[hsm]", "[hsm]\ndispatch = \"fast\"", "hsm.dispatch"),
            ("[tls]", "node_id = \"a b\"\n[tls]", "server.node_id"),
            ("[tls]", "log_format = \"xml\"\n[tls]", "server.log_format"),
            (
                "listen = \"127.0.0.1:8443\"",
                "listen = \"127.0.0.1:8443\"\nmetrics_listen = \"9464\"",
                "server.metrics_listen",
            ),
        ] {
            let changed = text.replace(from, to);
            let e = Config::parse(&changed, &path).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(e.to_string().contains(&path.display().to_string()));
        }
        // Unknown keys are refused, not ignored, and a PIN given inline is one of them.
        let e = Config::parse(&text.replace("[hsm]", "[hsm]\npin = \"1234\""), &path).unwrap_err();
        assert!(e.problem.contains("pin"), "{e}");
        assert!(!e.to_string().contains("1234"), "the PIN was echoed: {e}");
    }

    #[test]
    fn the_reference_configuration_in_deploy_parses_and_states_the_defaults() {
        let (dir, minimal) = setup();
        std::fs::write(dir.path().join("clients-ca.pem"), "x").unwrap();
        let path = dir.path().join("tresor.toml");
        let reference = include_str!("../../deploy/tresor.toml")
            .replace("/etc/tresor/pin", "pin")
            .replace("/usr/lib/softhsm/libsofthsm2.so", "module.so")
            .replace("sqlite:///var/lib/tresor/", "sqlite://");
        let r = Config::parse(&reference, &path).unwrap();
        let d = Config::parse(&minimal, &path).unwrap();
        assert_eq!(r.node_id, "tresor-fra-1");
        assert_eq!(r.log_format, LogFormat::Json);
        assert_eq!(r.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        // Where the reference shows a default, it is the default.
        assert_eq!(r.max_concurrent_requests, d.max_concurrent_requests);
        assert_eq!(r.request_timeout, d.request_timeout);
        assert_eq!(r.limits, d.limits);
        assert_eq!(r.health_check_interval, d.health_check_interval);
        assert_eq!(r.hsm.sessions, d.hsm.sessions);
        assert_eq!(r.hsm.call_timeout, d.hsm.call_timeout);
        assert_eq!(r.hsm.dispatch, d.hsm.dispatch);
        assert_eq!(r.orphans, d.orphans);
        assert_eq!(r.destruction_grace, d.destruction_grace);
        assert_eq!(r.approval_ttl, d.approval_ttl);
        assert_eq!(r.scheduler_interval, d.scheduler_interval);
    }
}
