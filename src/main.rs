//! The `tresor` binary. Subcommands (`serve`, `dev`, the officer/service/auditor CLI) arrive
//! with the gRPC issue; today it prints its version and what is built (see README).

use clap::Parser;

/// Tresor: sovereign key custody in front of PKCS#11 HSMs.
///
/// This build contains the custody library (HSM back-end, metadata store, blob format). The
/// server and the command-line client are not built yet.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "tresor {}: no subcommands yet; the server and CLI are not built yet (see README.md)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(64);
}
