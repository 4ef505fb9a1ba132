//! The `tresor` command: `serve`, and the client commands for officers and services.
//!
//! Owns argument parsing and the dispatch to one file per command group; reading and writing
//! user files ([`files`]), output (tables or `--output json`, [`output`]) and the one table of
//! exit codes ([`exit`]). Talks to a server only through [`crate::client`]; `serve` runs the
//! composition root, [`crate::server`].

mod access;
mod approvals;
mod audit;
mod bench;
mod bulk;
mod data;
pub mod dev;
mod exit;
mod files;
mod key;
mod kmip;
mod logging;
mod output;
mod serve;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{Client, Profile};
use access::AccessCommand;
use approvals::ApprovalCommand;
use audit::AuditCommand;
use bench::BenchArgs;
use data::{DatakeyArgs, RewrapArgs, UnwrapArgs, WrapArgs};
pub use exit::{Exit, Failure};
use key::KeyCommand;
use kmip::KmipCommand;
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
        /// Address of the KMIP server.
        #[arg(long, default_value = "127.0.0.1:5696")]
        kmip_listen: std::net::SocketAddr,
        /// hsm-sim's module (default: found next to this executable).
        #[arg(long)]
        hsm_module: Option<PathBuf>,
    },
    /// Break-glass access windows: request, approve (a second officer), list, close (role
    /// officer).
    #[command(subcommand)]
    Access(AccessCommand),
    /// List, approve or reject destruction requests (role officer, a second officer approves).
    #[command(subcommand)]
    Approvals(ApprovalCommand),
    /// Create, inspect, rotate and manage keys (role officer).
    #[command(subcommand)]
    Key(KeyCommand),
    /// See, revoke and destroy the keys KMIP clients hold (role officer).
    #[command(subcommand)]
    Kmip(KmipCommand),
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

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if let Command::Dev {
        dir,
        listen,
        kmip_listen,
        hsm_module,
    } = cli.command
    {
        // Returns only if it could not become `tresor serve`.
        return report(dev::run(&dir, listen, kmip_listen, hsm_module));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Exit::Software.code();
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => Exit::Ok.code(),
        Err(f) => report(f),
    }
}

fn report(f: Failure) -> i32 {
    eprintln!("error: {}", f.message);
    if let Some(h) = f.hint {
        eprintln!("hint: {h}");
    }
    f.code.code()
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = Output::new(cli.output);
    match cli.command {
        Command::Serve { config } => serve::serve(&config).await,
        Command::Audit(AuditCommand::Verify {
            file,
            public_key,
            since,
            since_checkpoint,
        }) => audit::verify_export(&file, &public_key, since.as_deref(), since_checkpoint, &out),
        Command::Bench(a) => bench::command(a, cli.profile.as_deref(), &out).await,
        command => {
            let client = connect(cli.profile.as_deref()).await?;
            match command {
                Command::Key(k) => key::key_command(&client, k, &out).await,
                Command::Kmip(k) => kmip::kmip_command(&client, k, &out).await,
                Command::Audit(a) => audit::audit_command(&client, a, &out).await,
                Command::Approvals(a) => approvals::approvals_command(&client, a, &out).await,
                Command::Access(a) => access::access_command(&client, a, &out).await,
                Command::Wrap(a) => data::wrap(&client, a, &out).await,
                Command::Unwrap(a) => data::unwrap(&client, a, &out).await,
                Command::Datakey(a) => data::datakey(&client, a, &out).await,
                Command::Rewrap(a) => data::rewrap(&client, a, &out).await,
                Command::Serve { .. } | Command::Dev { .. } | Command::Bench(_) => Ok(()),
            }
        }
    }
}

async fn connect(profile: Option<&Path>) -> Result<Client, Failure> {
    let path = profile.ok_or_else(|| {
        Failure::new(
            Exit::Config,
            "no connection profile",
            "pass --profile FILE or set TRESOR_PROFILE (see README \"Connection profiles\")",
        )
    })?;
    let profile = Profile::load(path)?;
    Ok(Client::connect(&profile).await?)
}
