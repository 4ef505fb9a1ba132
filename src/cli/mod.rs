//! The `tresor` command: `serve`, and the client commands for officers and services.
//!
//! Owns argument parsing, reading and writing user files, output (tables or `--output json`)
//! and exit codes. Talks to a server only through [`crate::client`]; `serve` only through
//! [`crate::grpc::server`].
//!
//! Exit codes (stable, for scripts): 0 success; 1 other failure; 2 usage; 3 not found;
//! 4 not authenticated or not allowed; 5 invalid input (including a ciphertext that does not
//! open); 6 refused in the key's current state (or a conflict); 7 unavailable (server, HSM or
//! database unreachable, overloaded, timed out: retry later); 8 an audit export does not
//! verify; 64 bad configuration; 69 a dependency of `serve` is unreachable.

mod bench;
mod bulk;
pub mod dev;
mod logging;
mod output;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use rustls::pki_types::pem::PemObject;
use tonic::Code;
use zeroize::Zeroizing;

use crate::client::{Client, ClientError, Profile};
use crate::proto;
use output::Output;

/// Tresor: sovereign key custody in front of PKCS#11 HSMs.
#[derive(Debug, Parser)]
#[command(name = "tresor", version, about, long_about = None)]
pub struct Cli {
    /// Connection profile (endpoint, CA, client certificate and key), a TOML file.
    #[arg(long, global = true, env = "TRESOR_PROFILE")]
    profile: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server with a configuration file.
    Serve {
        /// The TOML configuration (see README "Configuration reference").
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a development server: hsm-sim, SQLite and a development CA under ./tresor-dev/.
    Dev {
        /// Where keys, database, certificates and profiles live.
        #[arg(long, default_value = "tresor-dev")]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// hsm-sim's module (default: found next to this executable).
        #[arg(long)]
        hsm_module: Option<PathBuf>,
    },
    /// List, approve or reject destruction requests (role officer, a second officer approves).
    #[command(subcommand)]
    Approvals(ApprovalCommand),
    /// Create, inspect, rotate and manage keys (role officer).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Export and verify the audit log (role auditor; `verify` works offline).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Wrap a data key or small secret under a key's primary version (role service).
    Wrap(WrapArgs),
    /// Unwrap a blob made by `wrap` or `datakey` (role service).
    Unwrap(UnwrapArgs),
    /// Load-test a server as a service: throughput, latency percentiles, errors by status.
    Bench(BenchArgs),
    /// Generate a data key in the HSM and return it wrapped (role service).
    Datakey(DatakeyArgs),
    /// Re-wrap blobs under their key's primary version (role service): one blob given as
    /// --ciphertext-base64, or a whole file of them with --in/--out (resumable).
    Rewrap(RewrapArgs),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Create a key; version 1 becomes primary.
    Create {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// A label NAME=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Show a key and its versions.
    Get {
        /// tenants/{tenant}/keys/{key}
        name: String,
    },
    /// List the keys of your tenant.
    List {
        /// Your tenant (optional: the policy knows it).
        #[arg(long)]
        tenant: Option<String>,
        /// Keys per request.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Create a new primary version; old versions keep unwrapping their blobs.
    Rotate {
        /// tenants/{tenant}/keys/{key}
        name: String,
    },
    /// Change a key's description or labels.
    Update {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Replace all labels with these NAME=VALUE pairs; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Remove all labels.
        #[arg(long, conflicts_with = "labels")]
        clear_labels: bool,
        /// Rotate automatically this often: 90d, 12h, 3600s (at least 1h).
        #[arg(long, value_parser = parse_period)]
        rotation_period: Option<i64>,
        /// Stop rotating automatically.
        #[arg(long, conflicts_with = "rotation_period")]
        no_rotation: bool,
        /// Refuse unwrap for versions below this number (to force re-wrapping before destruction).
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// What the key may be used for: encrypt-decrypt, encrypt (no unwrap), decrypt (no new
        /// wraps) or none; applies to the gRPC API and the XKS proxy.
        #[arg(long, value_parser = ["encrypt-decrypt", "encrypt", "decrypt", "none"])]
        usage: Option<String>,
    },
    /// Show a key's versions: state, created, destroy time, wrap count.
    Versions {
        /// tenants/{tenant}/keys/{key}
        name: String,
    },
    /// Ask for a version's destruction; a second officer must approve (`tresor approvals`).
    Destroy {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        #[arg(long)]
        version: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Show what would be asked, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cancel a scheduled destruction; the version becomes DISABLED.
    CancelDestroy {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        #[arg(long)]
        version: u32,
    },
    /// Enable a disabled version.
    Enable {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        version: u32,
    },
    /// Disable a version (not the primary one): its blobs are refused until enabled again.
    Disable {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        version: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ApprovalCommand {
    /// Your tenant's destruction requests, newest first.
    List,
    /// Approve another officer's request: the version is destroyed after the grace period.
    Approve {
        /// The approval id (`tresor approvals list`).
        id: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Reject a request (or withdraw your own).
    Reject {
        /// The approval id.
        id: String,
    },
}

fn parse_period(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?}: write a number and a unit, e.g. 90d, 12h, 3600s"))?;
    let unit_seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(format!("{s:?}: units are d, h, m, s")),
    };
    // The server enforces the longest period; here only overflow must not panic or wrap.
    let seconds = n
        .checked_mul(unit_seconds)
        .ok_or_else(|| format!("{s:?}: too long; the longest rotation period is 100 years"))?;
    if seconds < 3_600 {
        return Err(format!("{s:?}: the shortest rotation period is 1h"));
    }
    Ok(seconds)
}

/// Asks the user to type `expected` before a destructive step; refuses without a terminal.
fn confirm(what: &str, expected: &str) -> Result<(), Failure> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            2,
            format!("{what} needs confirmation"),
            "run it in a terminal, or pass --yes",
        ));
    }
    eprint!("{what}\nType {expected} to confirm: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(|e| {
        Failure::new(
            1,
            format!("cannot read the confirmation: {e}"),
            "pass --yes",
        )
    })?;
    if answer.trim() == expected {
        Ok(())
    } else {
        Err(Failure::new(
            1,
            "not confirmed; nothing was changed",
            "type the exact text, or pass --yes",
        ))
    }
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Export your tenant's audit log, verifiable offline, to a file.
    Export {
        /// Start of the range: RFC 3339 (2026-11-21T00:00:00Z) or Unix milliseconds.
        #[arg(long)]
        from: Option<String>,
        /// End of the range (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Only records of this key.
        #[arg(long)]
        key: Option<String>,
        /// Only records of this caller identity.
        #[arg(long)]
        caller: Option<String>,
        /// File format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// The file to write.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
    /// Verify an export offline: every hash link and checkpoint signature; with `--since`,
    /// also that it extends an earlier export (no record of it removed or rewritten).
    Verify {
        /// The export (JSON Lines or CSV).
        file: PathBuf,
        /// The checkpoint public key, PEM (`tresor audit public-key`).
        #[arg(long)]
        public_key: PathBuf,
        /// An earlier export (verified too) that this one must extend.
        #[arg(long, conflicts_with = "since_checkpoint")]
        since: Option<PathBuf>,
        /// A checkpoint kept from earlier, `SEQ:HASH`, that this export must extend.
        #[arg(long)]
        since_checkpoint: Option<crate::audit::continuity::Since>,
    },
    /// Print the checkpoint public key (PEM), or write it to a file.
    PublicKey {
        /// Write the PEM to this file.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Sign the chain head now and show the latest checkpoint.
    Checkpoint,
    /// The HMAC the audit log records for an AAD value, to search exports for it.
    Hmac(AadArgs),
}

/// Audit export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// Additional authenticated data, given one way at most.
#[derive(Debug, Args)]
#[group(multiple = false)]
struct AadArgs {
    /// AAD as UTF-8 text.
    #[arg(long)]
    aad: Option<String>,
    /// AAD as standard base64.
    #[arg(long)]
    aad_base64: Option<String>,
    /// AAD from a file (raw bytes).
    #[arg(long)]
    aad_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct WrapArgs {
    /// tenants/{tenant}/keys/{key}
    #[arg(long)]
    key: String,
    /// Plaintext from a file (raw bytes; `-` for standard input).
    #[arg(long = "in", conflicts_with = "plaintext_base64")]
    input: Option<PathBuf>,
    /// Plaintext as standard base64.
    #[arg(long)]
    plaintext_base64: Option<String>,
    #[command(flatten)]
    aad: AadArgs,
    /// Write the blob (raw bytes) to this file instead of printing it as base64.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UnwrapArgs {
    /// Blob from a file (raw bytes; `-` for standard input).
    #[arg(long = "in", conflicts_with = "ciphertext_base64")]
    input: Option<PathBuf>,
    /// Blob as standard base64.
    #[arg(long)]
    ciphertext_base64: Option<String>,
    /// Refuse blobs of any other key.
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    aad: AadArgs,
    /// Write the result (raw bytes; plaintext files get mode 0600) to this file instead of
    /// printing it as base64.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RewrapArgs {
    /// One blob, standard base64.
    #[arg(long, conflicts_with_all = ["input", "out"])]
    ciphertext_base64: Option<String>,
    /// A file of blobs: one JSON object per line, `{"ciphertext": base64, "aad": base64?, ...}`.
    #[arg(long = "in", requires = "out")]
    input: Option<PathBuf>,
    /// Where re-wrapped lines go (appended to on resume).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where failed lines go, with the reason (default: OUT.failed.jsonl).
    #[arg(long)]
    failures: Option<PathBuf>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: u16,
    /// Refuse blobs of any other key.
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    aad: AadArgs,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// The key to use (tenants/{tenant}/keys/{key}); not needed with --raw-hsm or --xks.
    #[arg(long, required_unless_present_any = ["raw_hsm", "xks"])]
    key: Option<String>,
    /// Load the XKS proxy instead of the gRPC API: its base URL up to the path prefix, e.g.
    /// https://xks.example.org:443/uksh (requests go to {URL}/kms/xks/v1/...). wrap = Encrypt,
    /// unwrap = Decrypt, mixed = both; one connection per request in flight.
    #[arg(long, requires_all = ["xks_key", "xks_credentials", "xks_region", "xks_ca"], conflicts_with_all = ["raw_hsm", "compare_raw"])]
    xks: Option<String>,
    /// The external key id to use with --xks.
    #[arg(long)]
    xks_key: Option<String>,
    /// A credentials file as the proxy reads it (its first pair signs).
    #[arg(long)]
    xks_credentials: Option<PathBuf>,
    /// The SigV4 region the proxy expects.
    #[arg(long)]
    xks_region: Option<String>,
    /// CA certificate(s) (PEM) that issued the proxy's certificate.
    #[arg(long)]
    xks_ca: Option<PathBuf>,
    /// Speak HTTP/1.1 to the proxy (default HTTP/2).
    #[arg(long)]
    xks_http1: bool,
    /// Measure the ceiling instead: the same AES-GCM encryptions directly on the server's
    /// PKCS#11 module and token (from --config), no gRPC, no audit.
    #[arg(long, requires = "config", conflicts_with = "compare_raw")]
    raw_hsm: bool,
    /// Measure the service, then the raw HSM, and print service/raw.
    #[arg(long, requires = "config")]
    compare_raw: bool,
    /// The server's configuration (for --raw-hsm and --compare-raw: module, token, PIN).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Threads of the raw loop (default: the server's hsm.sessions).
    #[arg(long)]
    threads: Option<usize>,
    /// What to send.
    #[arg(long, value_enum, default_value_t = bench::BenchOp::Wrap)]
    op: bench::BenchOp,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    connections: u16,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    in_flight: u16,
    /// How long to run: 30s, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Stop after this many requests instead.
    #[arg(long)]
    requests: Option<u64>,
    /// Plaintext bytes per request.
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// AAD bytes per request.
    #[arg(long, default_value_t = 16)]
    aad: usize,
    /// Open loop at this many requests per second (latency then counts from each request's
    /// scheduled start).
    #[arg(long)]
    rate: Option<f64>,
}

/// The bench's XKS target from `--xks URL` and its companions.
async fn xks_target(url: &str, a: &BenchArgs) -> Result<bench::XksTarget, Failure> {
    let usage = |what: String| {
        Failure::new(
            64,
            what,
            "write --xks https://HOST[:PORT][/PREFIX], e.g. https://xks.example.org/uksh",
        )
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| usage(format!("{url:?} is not an https:// URL")))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| usage(format!("{p:?} is not a port")))?,
        ),
        None => (authority, 443),
    };
    let addr = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| usage(format!("cannot resolve {host}")))?;
    let missing = |flag: &str| {
        Failure::new(
            64,
            format!("{flag} is missing"),
            "--xks needs --xks-key, --xks-credentials, --xks-region and --xks-ca",
        )
    };
    let credentials_path = a
        .xks_credentials
        .as_deref()
        .ok_or_else(|| missing("--xks-credentials"))?;
    let credential = crate::xks::SharedCredentials::load(credentials_path)
        .map_err(|e| {
            Failure::new(
                64,
                e.to_string(),
                "give the proxy's credentials file (mode 0600)",
            )
        })?
        .current()
        .first()
        .cloned()
        .ok_or_else(|| missing("a credential"))?;
    let mut roots = rustls::RootCertStore::empty();
    let ca = a.xks_ca.as_deref().ok_or_else(|| missing("--xks-ca"))?;
    for cert in crate::pki::load_certs(ca).map_err(|e| {
        Failure::new(
            64,
            e.to_string(),
            "give the CA that issued the proxy's certificate",
        )
    })? {
        roots
            .add(cert)
            .map_err(|e| Failure::new(64, e.to_string(), "give a CA certificate in PEM"))?;
    }
    Ok(bench::XksTarget {
        addr,
        server_name: host.to_owned(),
        roots,
        path: path.trim_end_matches('/').to_owned(),
        external_key: a.xks_key.clone().ok_or_else(|| missing("--xks-key"))?,
        credential,
        region: a
            .xks_region
            .clone()
            .ok_or_else(|| missing("--xks-region"))?,
        http: if a.xks_http1 {
            crate::xks::client::HttpVersion::Http1
        } else {
            crate::xks::client::HttpVersion::Http2
        },
    })
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: write a number and a unit, e.g. 30s, 2m"))?;
    match unit {
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(std::time::Duration::from_secs)
            .ok_or_else(|| format!("{s:?}: too long")),
        "ms" => Ok(std::time::Duration::from_millis(n)),
        _ => Err(format!("{s:?}: units are ms, s, m")),
    }
}

#[derive(Debug, Args)]
struct DatakeyArgs {
    /// tenants/{tenant}/keys/{key}
    #[arg(long)]
    key: String,
    /// Data key length in bytes (16 to 1024).
    #[arg(long, default_value_t = 32)]
    length: u32,
    /// Return only the wrapped data key.
    #[arg(long)]
    without_plaintext: bool,
    #[command(flatten)]
    aad: AadArgs,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: write labels as NAME=VALUE"))
}

/// A failure with what to do about it, and the exit code.
#[derive(Debug)]
pub struct Failure {
    code: i32,
    message: String,
    hint: Option<String>,
}

impl Failure {
    fn new(code: i32, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    fn input(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(5, message, hint)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Status(s) => from_status(&s),
            ClientError::Connect { .. } => Self::new(
                7,
                e.to_string(),
                "check the profile's endpoint and that `tresor serve` runs there; a certificate error means the profile's `ca` did not issue the server certificate",
            ),
            ClientError::Profile { .. } => Self::new(
                64,
                e.to_string(),
                "fix the profile file (see README \"Connection profiles\")",
            ),
            ClientError::Envelope(_) => Self::new(
                5,
                e.to_string(),
                "the data was not made by `Client::seal`, or was altered",
            ),
            ClientError::AuditItem(_) => {
                Self::new(1, e.to_string(), "report this with the request id")
            }
        }
    }
}

/// Explains a server refusal: the code's meaning for a user, and what to try.
fn from_status(s: &tonic::Status) -> Failure {
    let (code, hint) = match s.code() {
        Code::NotFound => (3, "check the name: `tresor key list` shows your keys"),
        Code::Unauthenticated => (
            4,
            "the server did not accept your certificate: check the profile's cert and key, that they are not expired, and that the server's client CA issued them",
        ),
        Code::PermissionDenied => (
            4,
            "your identity lacks the role or key in the server's access policy; ask the operator to grant it",
        ),
        Code::InvalidArgument | Code::OutOfRange => (
            5,
            "check the input; for unwrap, the AAD must be exactly the one given at wrap time",
        ),
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => (
            6,
            "the key or version is not in a state that allows this: `tresor key get NAME` shows it",
        ),
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => (
            7,
            "the server or its HSM or database is unavailable or busy; retry later, and give the operator the request id",
        ),
        Code::Unimplemented => (1, "this server does not offer that yet"),
        Code::DataLoss => (
            1,
            "the key version's HSM object is missing; tell the operator (request id above)",
        ),
        _ => (1, "tell the operator, with the request id above"),
    };
    Failure::new(
        code,
        format!("{}: {}", code_name(s.code()), s.message()),
        hint,
    )
}

fn code_name(c: Code) -> &'static str {
    match c {
        Code::NotFound => "not found",
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::InvalidArgument => "invalid argument",
        Code::OutOfRange => "out of range",
        Code::FailedPrecondition => "failed precondition",
        Code::AlreadyExists => "already exists",
        Code::Aborted => "conflict",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "overloaded",
        Code::DeadlineExceeded => "timed out",
        Code::Unimplemented => "not implemented",
        Code::DataLoss => "data loss",
        _ => "error",
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if let Command::Dev {
        dir,
        listen,
        hsm_module,
    } = cli.command
    {
        // Returns only if it could not become `tresor serve`.
        return report(dev::run(&dir, listen, hsm_module));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 70;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => 0,
        Err(f) => report(f),
    }
}

fn report(f: Failure) -> i32 {
    eprintln!("error: {}", f.message);
    if let Some(h) = f.hint {
        eprintln!("hint: {h}");
    }
    f.code
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Output::new(cli.output);
    match cli.command {
        Command::Serve { config } => serve(&config).await,
        Command::Audit(AuditCommand::Verify {
            file,
            public_key,
            since,
            since_checkpoint,
        }) => verify_export(&file, &public_key, since.as_deref(), since_checkpoint, &out),
        Command::Bench(a) => {
            let (threads_arg, payload, aad_len) = (a.threads, a.payload, a.aad);
            let raw = move |config: &Path, duration| {
                let config = crate::config::Config::load(config).map_err(|e| {
                    Failure::new(
                        64,
                        e.to_string(),
                        "give the server's configuration with --config",
                    )
                })?;
                let threads = threads_arg.unwrap_or(config.hsm.sessions);
                crate::hsm::raw_gcm_encrypt(&config.hsm, threads, duration, payload, aad_len)
                    .map(|r| (r, threads))
                    .map_err(|e| {
                        Failure::new(
                            69,
                            format!("raw HSM loop: {e}"),
                            "check the module, token label and PIN in the configuration",
                        )
                    })
            };
            if a.raw_hsm {
                let config = a.config.clone().unwrap_or_default();
                let (r, threads) = tokio::task::spawn_blocking(move || raw(&config, a.duration))
                    .await
                    .map_err(|e| Failure::new(1, e.to_string(), "report this"))??;
                out.raw(&r, threads, None);
                return Ok(());
            }
            let target = match &a.xks {
                Some(url) => bench::Target::Xks(xks_target(url, &a).await?),
                None => {
                    let path = cli.profile.as_deref().ok_or_else(|| {
                        Failure::new(64, "no connection profile", "pass --profile FILE or set TRESOR_PROFILE (see README \"Connection profiles\")")
                    })?;
                    bench::Target::Grpc(Profile::load(path)?)
                }
            };
            let plan = bench::BenchPlan {
                key: a.key.clone().unwrap_or_default(),
                op: a.op,
                connections: usize::from(a.connections),
                in_flight: usize::from(a.in_flight),
                duration: a.duration,
                requests: a.requests,
                payload: a.payload,
                aad: a.aad,
                rate: a.rate,
            };
            let report = bench::run(&target, &plan).await?;
            let raw_report = if a.compare_raw {
                let config = a.config.clone().unwrap_or_default();
                let duration = plan.duration;
                Some(
                    tokio::task::spawn_blocking(move || raw(&config, duration))
                        .await
                        .map_err(|e| Failure::new(1, e.to_string(), "report this"))??,
                )
            } else {
                None
            };
            out.bench(&report, &plan, raw_report.as_ref().map(|(r, t)| (r, *t)));
            Ok(())
        }
        command => {
            let client = connect(cli.profile.as_deref()).await?;
            match command {
                Command::Key(k) => key_command(&client, k, &out).await,
                Command::Audit(a) => audit_command(&client, a, &out).await,
                Command::Approvals(a) => approvals_command(&client, a, &out).await,
                Command::Wrap(a) => wrap(&client, a, &out).await,
                Command::Unwrap(a) => unwrap(&client, a, &out).await,
                Command::Datakey(a) => datakey(&client, a, &out).await,
                Command::Rewrap(a) => rewrap(&client, a, &out).await,
                Command::Serve { .. } | Command::Dev { .. } | Command::Bench(_) => Ok(()),
            }
        }
    }
}

async fn connect(profile: Option<&Path>) -> Result<Client, Failure> {
    let path = profile.ok_or_else(|| {
        Failure::new(
            64,
            "no connection profile",
            "pass --profile FILE or set TRESOR_PROFILE (see README \"Connection profiles\")",
        )
    })?;
    let profile = Profile::load(path)?;
    Ok(Client::connect(&profile).await?)
}

async fn serve(config_path: &Path) -> Result<(), Failure> {
    use crate::grpc::server::Server;
    let config = crate::config::Config::load(config_path).map_err(|e| {
        Failure::new(
            64,
            e.to_string(),
            "fix the configuration (README \"Configuration reference\")",
        )
    })?;
    logging::init(config.log_format, &config.node_id);
    let start_failed = |e: crate::grpc::server::StartError| {
        let hint = match e.exit_code() {
            64 => "fix the configuration (README \"Configuration reference\")",
            _ => {
                "check that the HSM, the database and the listen address are reachable, then start again"
            }
        };
        Failure::new(e.exit_code(), e.to_string(), hint)
    };
    let server = Server::prepare(config).await.map_err(start_failed)?;
    // Signal handlers are installed before the port is bound, so a signal that arrives once
    // clients can connect is never the default action (terminate).
    let signals = Signals::install().map_err(|e| {
        Failure::new(
            70,
            format!("cannot install signal handlers: {e}"),
            "report this",
        )
    })?;
    let listener = server.bind().await.map_err(start_failed)?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::new(70, e.to_string(), "report this"))?;
    tracing::info!(%addr, "serving");
    println!("tresor: serving on {addr}");
    if let Some(metrics) = server.metrics_addr() {
        tracing::info!(%metrics, "metrics endpoint");
        println!("tresor: metrics on http://{metrics}/metrics");
    }
    let (xks, ping) = server.xks_addrs();
    if let Some(xks) = xks {
        tracing::info!(%xks, "AWS KMS external key store proxy");
        println!("tresor: xks on {xks}");
    }
    if let Some(ping) = ping {
        println!("tresor: xks ping on http://{ping}/ping");
    }
    let _ = std::io::stdout().flush();

    let server = std::sync::Arc::new(server);
    let reloader = std::sync::Arc::clone(&server);
    let Signals {
        mut hangup,
        mut terminate,
        mut interrupt,
    } = signals;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            reloader.reload();
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
            _ = interrupt.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
        }
    };
    server.serve(listener, shutdown).await.map_err(start_failed)
}

struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

async fn key_command(client: &Client, command: KeyCommand, out: &Output) -> Result<(), Failure> {
    let mut admin = client.admin();
    let key = match command {
        KeyCommand::Create {
            name,
            description,
            labels,
        } => {
            admin
                .create_key(proto::CreateKeyRequest {
                    key: name,
                    description,
                    labels: labels.into_iter().collect(),
                })
                .await
        }
        KeyCommand::Get { name } => admin.get_key(proto::GetKeyRequest { key: name }).await,
        KeyCommand::List { tenant, page_size } => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_keys(proto::ListKeysRequest {
                        tenant: tenant.clone().unwrap_or_default(),
                        page_size,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(|s| from_status(&s))?
                    .into_inner();
                keys.extend(page.keys);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            out.keys(&keys);
            return Ok(());
        }
        KeyCommand::Rotate { name } => {
            admin
                .rotate_key(proto::RotateKeyRequest { key: name })
                .await
        }
        KeyCommand::Update { name, description, labels, clear_labels, rotation_period, no_rotation, min_decryption_version, usage } => {
            let usage = match usage.as_deref() {
                None => proto::KeyUsage::Unspecified,
                Some("encrypt") => proto::KeyUsage::EncryptOnly,
                Some("decrypt") => proto::KeyUsage::DecryptOnly,
                Some("none") => proto::KeyUsage::NoUse,
                Some(_) => proto::KeyUsage::EncryptDecrypt,
            };
            let update_labels = clear_labels || !labels.is_empty();
            admin
                .update_key(proto::UpdateKeyRequest {
                    key: name,
                    description,
                    labels: labels.into_iter().collect::<HashMap<_, _>>(),
                    update_labels,
                    rotation_period: rotation_period.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
                    clear_rotation_period: no_rotation,
                    min_decryption_version: min_decryption_version.unwrap_or(0),
                    usage: usage.into(),
                })
                .await
        }
        KeyCommand::Versions { name } => {
            let key = admin.get_key(proto::GetKeyRequest { key: name }).await.map_err(|s| from_status(&s))?.into_inner();
            out.versions(&key);
            return Ok(());
        }
        KeyCommand::Destroy { name, version, yes, dry_run } => {
            if dry_run {
                let key = admin.get_key(proto::GetKeyRequest { key: name.clone() }).await.map_err(|s| from_status(&s))?.into_inner();
                let v = key
                    .versions
                    .iter()
                    .find(|v| v.version == version)
                    .ok_or_else(|| Failure::new(3, format!("{name} has no version {version}"), "`tresor key versions NAME` lists them"))?;
                let state = proto::KeyVersionState::try_from(v.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
                let verdict = if v.primary {
                    "refused: it is the primary version (rotate first)"
                } else if matches!(state, "ENABLED" | "DISABLED") {
                    "a destruction request would wait for a second officer's approval"
                } else {
                    "refused: only ENABLED or DISABLED versions can be destroyed"
                };
                out.summary(&format!("dry run: {} is {state}, wraps at most {}; {verdict}; nothing was changed", v.name, v.wraps_at_most));
                return Ok(());
            }
            if !yes {confirm(
                    &format!("This asks for the destruction of {name}/versions/{version}: once a second officer approves and the grace period ends, its blobs can never be unwrapped again."),
                    &format!("{name}/versions/{version}"),
                )?;
            }
            let a = admin
                .schedule_key_version_destruction(proto::ScheduleKeyVersionDestructionRequest { key: name, version })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approval(&a);
            return Ok(());
        }
        KeyCommand::CancelDestroy { name, version } => {
            admin.cancel_key_version_destruction(proto::KeyVersionRequest { key: name, version }).await
        }
        KeyCommand::Enable { name, version } => {
            admin
                .enable_key_version(proto::KeyVersionRequest { key: name, version })
                .await
        }
        KeyCommand::Disable { name, version } => {
            admin
                .disable_key_version(proto::KeyVersionRequest { key: name, version })
                .await
        }
    }
    .map_err(|s| from_status(&s))?
    .into_inner();
    out.key(&key);
    Ok(())
}

fn read_input(path: &Path) -> Result<Vec<u8>, Failure> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| {
            Failure::input(
                format!("cannot read standard input: {e}"),
                "pipe the data in, or use --in FILE",
            )
        })?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| {
        Failure::input(
            format!("cannot read {}: {e}", path.display()),
            "check the path given to --in",
        )
    })
}

fn decode_base64(what: &str, text: &str) -> Result<Vec<u8>, Failure> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| {
            Failure::input(
                format!("{what} is not standard base64: {e}"),
                "encode with `base64 -w0`, or pass a file with --in",
            )
        })
}

fn input(file: Option<&Path>, b64: Option<&str>, what: &str) -> Result<Vec<u8>, Failure> {
    match (file, b64) {
        (Some(p), _) => read_input(p),
        (None, Some(t)) => decode_base64(what, t),
        (None, None) => Err(Failure::new(
            2,
            format!("no {what} given"),
            format!("use --in FILE (or - for standard input) or --{what}-base64"),
        )),
    }
}

fn aad(args: &AadArgs) -> Result<Vec<u8>, Failure> {
    match (&args.aad, &args.aad_base64, &args.aad_file) {
        (Some(t), _, _) => Ok(t.as_bytes().to_vec()),
        (_, Some(b), _) => decode_base64("--aad-base64", b),
        (_, _, Some(p)) => std::fs::read(p).map_err(|e| {
            Failure::input(
                format!("cannot read {}: {e}", p.display()),
                "check the path given to --aad-file",
            )
        }),
        _ => Ok(Vec::new()),
    }
}

/// Writes a result file; `secret` files are mode 0600, also when the file already existed
/// (`mode` applies only to files the call creates).
fn write_output(path: &Path, data: &[u8], secret: bool) -> Result<(), Failure> {
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| {
            if secret {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(data)
        })
        .map_err(|e| {
            Failure::new(
                1,
                format!("cannot write {}: {e}", path.display()),
                "check the path given to --out",
            )
        })
}

async fn wrap(client: &Client, a: WrapArgs, out: &Output) -> Result<(), Failure> {
    let plaintext = Zeroizing::new(input(
        a.input.as_deref(),
        a.plaintext_base64.as_deref(),
        "plaintext",
    )?);
    let r = client
        .keys()
        .wrap(proto::WrapRequest {
            key: a.key,
            plaintext: plaintext.to_vec(),
            aad: aad(&a.aad)?,
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    if let Some(path) = &a.out {
        write_output(path, &r.ciphertext, false)?;
    }
    out.blob(
        "ciphertext",
        &r.ciphertext,
        a.out.is_none(),
        &r.key_version,
        None,
    );
    Ok(())
}

async fn unwrap(client: &Client, a: UnwrapArgs, out: &Output) -> Result<(), Failure> {
    let ciphertext = input(
        a.input.as_deref(),
        a.ciphertext_base64.as_deref(),
        "ciphertext",
    )?;
    let r = client
        .keys()
        .unwrap(proto::UnwrapRequest {
            ciphertext,
            aad: aad(&a.aad)?,
            key: a.key.unwrap_or_default(),
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    let plaintext = Zeroizing::new(r.plaintext);
    if let Some(path) = &a.out {
        write_output(path, &plaintext, true)?;
    }
    out.blob(
        "plaintext",
        &plaintext,
        a.out.is_none(),
        &r.key_version,
        None,
    );
    Ok(())
}

async fn rewrap(client: &Client, a: RewrapArgs, out: &Output) -> Result<(), Failure> {
    if let (Some(input), Some(output)) = (&a.input, &a.out) {
        let failures = a
            .failures
            .clone()
            .unwrap_or_else(|| bulk::default_failures(output));
        let s = bulk::run(
            client,
            input,
            output,
            &failures,
            usize::from(a.parallel),
            a.key.clone(),
        )
        .await?;
        out.summary(&format!(
            "re-wrapped {}, already current {}, failed {}{}{}",
            s.rewrapped,
            s.current,
            s.failed,
            if s.failed > 0 {
                format!(" (see {})", failures.display())
            } else {
                String::new()
            },
            if s.resumed > 0 {
                format!("; resumed after {} lines done earlier", s.resumed)
            } else {
                String::new()
            },
        ));
        return if s.failed > 0 {
            Err(Failure::new(
                5,
                format!("{} lines could not be re-wrapped", s.failed),
                format!("see {}", failures.display()),
            ))
        } else {
            Ok(())
        };
    }
    let ciphertext = input(None, a.ciphertext_base64.as_deref(), "ciphertext")?;
    let r = client
        .keys()
        .rewrap(proto::RewrapRequest {
            ciphertext,
            aad: aad(&a.aad)?,
            key: a.key.unwrap_or_default(),
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    out.blob(
        "ciphertext",
        &r.ciphertext,
        true,
        &r.key_version,
        Some(r.rewrapped),
    );
    Ok(())
}

async fn datakey(client: &Client, a: DatakeyArgs, out: &Output) -> Result<(), Failure> {
    let r = client
        .keys()
        .generate_data_key(proto::GenerateDataKeyRequest {
            key: a.key,
            aad: aad(&a.aad)?,
            length_bytes: a.length,
            without_plaintext: a.without_plaintext,
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    let plaintext = Zeroizing::new(r.plaintext);
    out.data_key(
        &plaintext,
        &r.ciphertext,
        &r.key_version,
        !a.without_plaintext,
    );
    Ok(())
}

/// Parses RFC 3339 or Unix milliseconds into a protobuf timestamp.
fn parse_time(flag: &str, text: &str) -> Result<prost_types::Timestamp, Failure> {
    let ms = match text.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => {
            let t =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                    Failure::new(
                        2,
                        format!("{flag} {text:?}: {e}"),
                        "give RFC 3339 (2026-11-21T00:00:00Z) or Unix milliseconds",
                    )
                })?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
        }
    };
    Ok(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

async fn audit_command(
    client: &Client,
    command: AuditCommand,
    out: &Output,
) -> Result<(), Failure> {
    use crate::audit::file::{Format as FileFormat, Row, Writer};
    use crate::audit_record::ExportItem;
    let mut audit = client.audit();
    match command {
        AuditCommand::Export {
            from,
            to,
            key,
            caller,
            format,
            out: path,
        } => {
            let request = proto::ExportAuditLogRequest {
                from: from
                    .as_deref()
                    .map(|t| parse_time("--from", t))
                    .transpose()?,
                to: to.as_deref().map(|t| parse_time("--to", t)).transpose()?,
                key: key.unwrap_or_default(),
                caller: caller.unwrap_or_default(),
            };
            let mut stream = audit
                .export_audit_log(request)
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            let file = std::fs::File::create(&path).map_err(|e| {
                Failure::new(
                    1,
                    format!("cannot write {}: {e}", path.display()),
                    "check the path given to -o",
                )
            })?;
            let format = match format {
                ExportFormat::Jsonl => FileFormat::Jsonl,
                ExportFormat::Csv => FileFormat::Csv,
            };
            let mut writer = Writer::new(format, std::io::BufWriter::new(file));
            let progress = indicatif::ProgressBar::new_spinner();
            progress.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos} items exported ({per_sec}) {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let (mut shown, mut withheld, mut checkpoints) = (0u64, 0u64, 0u64);
            while let Some(message) = stream.message().await.map_err(|s| from_status(&s))? {
                let item = crate::client::audit_item(message).map_err(|e| {
                    Failure::new(1, e.to_string(), "report this with the request id")
                })?;
                match &item {
                    ExportItem::Record(_) => shown += 1,
                    ExportItem::Withheld { .. } => withheld += 1,
                    ExportItem::Checkpoint(_) => checkpoints += 1,
                }
                writer.write(&Row::from_item(&item)).map_err(|e| {
                    Failure::new(
                        1,
                        format!("cannot write {}: {e}", path.display()),
                        "check free space",
                    )
                })?;
                progress.inc(1);
            }
            progress.finish_and_clear();
            writer.finish().map_err(|e| {
                Failure::new(
                    1,
                    format!("cannot write {}: {e}", path.display()),
                    "check free space",
                )
            })?;
            out.summary(&format!(
                "exported {shown} records ({withheld} withheld by tenant, range or filter) and {checkpoints} checkpoints to {}",
                path.display()
            ));
            Ok(())
        }
        AuditCommand::PublicKey { out: path } => {
            let pem = audit
                .get_audit_public_key(proto::GetAuditPublicKeyRequest {})
                .await
                .map_err(|s| from_status(&s))?
                .into_inner()
                .pem;
            match path {
                Some(p) => write_output(&p, pem.as_bytes(), false),
                None => {
                    out.text(&pem);
                    Ok(())
                }
            }
        }
        AuditCommand::Checkpoint => {
            let c = audit
                .get_audit_checkpoint(proto::GetAuditCheckpointRequest {})
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.checkpoint(&c);
            Ok(())
        }
        AuditCommand::Hmac(a) => {
            let aad = aad(&a)?;
            let r = audit
                .compute_aad_hmac(proto::ComputeAadHmacRequest { aad })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.hmac(&r.aad_hmac);
            Ok(())
        }
        AuditCommand::Verify { .. } => Ok(()),
    }
}

/// `tresor audit verify`: offline, no server.
fn verify_export(
    path: &Path,
    public_key: &Path,
    since: Option<&Path>,
    since_checkpoint: Option<crate::audit::continuity::Since>,
    out: &Output,
) -> Result<(), Failure> {
    use crate::audit::continuity;
    use crate::audit_record as record;
    let pem = std::fs::read(public_key).map_err(|e| {
        Failure::new(
            64,
            format!("cannot read {}: {e}", public_key.display()),
            "save it with `tresor audit public-key -o FILE`",
        )
    })?;
    let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(&pem).map_err(|e| {
        Failure::new(
            64,
            format!("{}: not a PEM public key: {e}", public_key.display()),
            "save it with `tresor audit public-key -o FILE`",
        )
    })?;
    let point = record::p256_point_from_spki(spki.as_ref()).ok_or_else(|| {
        Failure::new(
            64,
            format!("{}: not a P-256 public key", public_key.display()),
            "use the key `tresor audit public-key` prints",
        )
    })?;
    let (items, verified) = verified_items(path, &point)?;
    let old = since.map(|p| verified_items(p, &point)).transpose()?;
    let anchor = match (&old, since_checkpoint) {
        (Some((old_items, _)), _) => {
            Some(continuity::last_checkpoint(old_items).ok_or_else(|| {
                Failure::new(
                    8,
                    format!(
                        "{}: {}",
                        since.unwrap_or(path).display(),
                        continuity::ContinuityError::NoCheckpoint
                    ),
                    "give an export that `tresor audit verify` accepted",
                )
            })?)
        }
        (None, given) => given,
    };
    if let Some(anchor) = anchor {
        continuity::extends(&items, old.as_ref().map(|(o, _)| o.as_slice()), anchor).map_err(
            |e| {
                Failure::new(
                    8,
                    format!(
                        "{} does not extend the earlier history (checkpoint {}): {e}",
                        path.display(),
                        anchor.seq
                    ),
                    "records the earlier export showed were removed or rewritten in the log; keep both files as evidence",
                )
            },
        )?;
    }
    out.verified(&verified, anchor.map(|a| a.seq));
    Ok(())
}

/// An export's items with their stated hashes, and what verifying it found.
type VerifiedExport = (
    Vec<(crate::audit_record::ExportItem, Option<[u8; 32]>)>,
    crate::audit_record::Verified,
);

/// Reads an export and verifies it on its own (exit code 8 naming the first failure).
fn verified_items(path: &Path, point: &[u8]) -> Result<VerifiedExport, Failure> {
    use crate::audit::file;
    use crate::audit_record as record;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            5,
            format!("cannot read {}: {e}", path.display()),
            "check the path of the export",
        )
    })?;
    let rows = file::read(&text).map_err(|e| {
        Failure::new(
            8,
            format!("{}: {e}", path.display()),
            "the file is not a Tresor audit export, or was damaged",
        )
    })?;
    let items = rows
        .iter()
        .map(file::Row::to_item)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Failure::new(
                8,
                format!("{}: {e}", path.display()),
                "the file is not a Tresor audit export, or was damaged",
            )
        })?;
    match record::verify(&items, point) {
        Ok(v) => Ok((items, v)),
        Err(e) => Err(Failure::new(
            8,
            format!("{} does not verify: {e}", path.display()),
            "the export or the log it came from was altered, truncated or signed by another key; keep the file as evidence",
        )),
    }
}

async fn approvals_command(
    client: &Client,
    command: ApprovalCommand,
    out: &Output,
) -> Result<(), Failure> {
    let mut admin = client.admin();
    match command {
        ApprovalCommand::List => {
            let list = admin
                .list_approvals(proto::ListApprovalsRequest::default())
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approvals(&list.approvals);
        }
        ApprovalCommand::Approve { id, yes } => {
            if !yes {
                confirm(
                    &format!("Approving {id} schedules a key version's destruction."),
                    &id,
                )?;
            }
            let a = admin
                .approve(proto::ApprovalRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approval(&a);
        }
        ApprovalCommand::Reject { id } => {
            let a = admin
                .reject(proto::ApprovalRequest { id })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approval(&a);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_durations_refuse_overflow_instead_of_wrapping() {
        assert_eq!(parse_period("90d"), Ok(90 * 86_400));
        assert!(parse_period("30m").unwrap_err().contains("shortest"));
        assert!(
            parse_period("999999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert!(parse_duration("999999999999999999m").is_err());
    }

    #[test]
    fn secret_output_is_private_even_over_an_existing_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.bin");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_output(&path, b"secret", true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }
}
