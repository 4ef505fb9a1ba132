//! `tresor dev`: a complete development installation in one command.
//!
//! Owns the layout of `./tresor-dev/`: a development CA, a server certificate for `localhost`,
//! client certificates and CLI profiles for `officer`, `service` and `auditor` of tenant
//! `demo`, an access policy granting them, random PINs, hsm-sim's configuration and the
//! server's. Files that exist are kept, so a restart keeps keys, database and certificates.
//! Then it replaces itself (`exec`) with the ordinary `tresor serve`, with `HSM_SIM_CONF` set
//! for hsm-sim: the same PKCS#11 path through cryptoki as production, no in-process shortcut.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::{Exit, Failure};
use crate::pki::{DevCa, Validity};

/// The tenant of the development identities.
pub const DEV_TENANT: &str = "demo";
/// The token hsm-sim creates for `tresor dev`.
pub const DEV_TOKEN: &str = "tresor-dev";
const ROLES: [&str; 4] = ["officer", "service", "auditor", "kmip"];

/// Finds hsm-sim's module next to an executable, where cargo builds it (`target/<profile>/` or
/// its `deps/`).
pub fn hsm_sim_module(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    [
        dir.join(hsm_sim::MODULE_FILE_NAME),
        dir.join("deps").join(hsm_sim::MODULE_FILE_NAME),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The identity (certificate CN) of a development role.
pub fn dev_identity(role: &str) -> String {
    format!("demo-{role}")
}

fn io_failure(what: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::new(
        Exit::CantCreate,
        format!("{}: {e}", what.display()),
        "check that the current directory is writable",
    )
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Failure> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io_failure(path, e))?;
    f.write_all(contents).map_err(|e| io_failure(path, e))
}

fn random_pin() -> Result<String, Failure> {
    let mut raw = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| Failure::new(Exit::Software, "no system randomness", "report this"))?;
    Ok(crate::model::to_hex(&raw))
}

/// Creates what is missing under `dir` and returns the server configuration file.
pub fn prepare(
    dir: &Path,
    listen: SocketAddr,
    kmip_listen: SocketAddr,
    module: &Path,
) -> Result<PathBuf, Failure> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir.join("hsm-sim"))
        .map_err(|e| io_failure(dir, e))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let pki = |e: crate::pki::PkiError| {
        Failure::new(
            Exit::CantCreate,
            e.to_string(),
            "remove the tresor-dev directory to start afresh",
        )
    };

    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca = if ca_cert.exists() && ca_key.exists() {
        DevCa::load(&ca_cert, &ca_key).map_err(pki)?
    } else {
        let ca = DevCa::new("Tresor development CA").map_err(pki)?;
        ca.write(&ca_cert, &ca_key).map_err(pki)?;
        ca
    };
    if !dir.join("server.pem").exists() || !dir.join("server.key").exists() {
        ca.issue_server(&["localhost", "127.0.0.1", "::1"])
            .map_err(pki)?
            .write(&dir.join("server.pem"), &dir.join("server.key"))
            .map_err(pki)?;
    }
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    let endpoint = if listen.is_ipv6() {
        format!("https://[{host}]:{}", listen.port())
    } else {
        format!("https://{host}:{}", listen.port())
    };
    let mut policy = String::from("# Development policy: written by `tresor dev`.\n");
    for role in ROLES {
        let (cert, key) = (
            dir.join(format!("{role}.pem")),
            dir.join(format!("{role}.key")),
        );
        if !cert.exists() || !key.exists() {
            ca.issue_client(&dev_identity(role), Validity::default())
                .map_err(pki)?
                .write(&cert, &key)
                .map_err(pki)?;
        }
        let profile = format!(
            "# CLI profile for the development {role}, written by `tresor dev`.\nendpoint = \"{endpoint}\"\nserver_name = \"localhost\"\nca = \"ca.pem\"\ncert = \"{role}.pem\"\nkey = \"{role}.key\"\n"
        );
        write_new(
            &dir.join(format!("{role}.profile.toml")),
            profile.as_bytes(),
            0o644,
        )?;
        policy.push_str(&format!(
            "\n[[identity]]\nname = \"{}\"\ntenant = \"{DEV_TENANT}\"\nroles = [\"{role}\"]\n",
            dev_identity(role)
        ));
    }
    write_new(&dir.join("policy.toml"), policy.as_bytes(), 0o644)?;
    for pin in ["user.pin", "so.pin"] {
        if !dir.join(pin).exists() {
            write_new(&dir.join(pin), random_pin()?.as_bytes(), 0o600)?;
        }
    }
    hsm_sim::SimConfig {
        state_file: PathBuf::from("hsm-sim/state.json"),
        control_file: Some(PathBuf::from("hsm-sim/control.toml")),
        tokens: vec![hsm_sim::TokenDecl {
            label: DEV_TOKEN.into(),
            so_pin_file: PathBuf::from("so.pin"),
            user_pin_file: PathBuf::from("user.pin"),
        }],
    }
    .write(&dir.join("hsm-sim.toml"))
    .map_err(|e| {
        Failure::new(
            Exit::CantCreate,
            e,
            "check that the current directory is writable",
        )
    })?;
    let config = format!(
        "# Development server configuration, written by `tresor dev` at every start.\n\
         [server]\nlisten = \"{listen}\"\n\n\
         [tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\n\
         [hsm]\nmodule = \"{}\"\ntoken_label = \"{DEV_TOKEN}\"\npin_file = \"user.pin\"\n\n\
         [database]\nurl = \"sqlite://tresor.db\"\n\n\
         [policy]\nfile = \"policy.toml\"\n\n\
         [kmip]\nlisten = \"{kmip_listen}\"\n",
        module.display()
    );
    let config_path = dir.join("tresor.toml");
    write_new(&config_path, config.as_bytes(), 0o644)?;
    Ok(config_path)
}

/// Prepares `./tresor-dev/`, prints how to use it, and becomes `tresor serve`.
pub fn run(
    dir: &Path,
    listen: SocketAddr,
    kmip_listen: SocketAddr,
    module: Option<PathBuf>,
) -> Failure {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return Failure::new(
                Exit::Software,
                format!("cannot find this executable: {e}"),
                "run tresor from its build directory",
            );
        }
    };
    let Some(module) = module.or_else(|| hsm_sim_module(&exe)) else {
        return Failure::new(
            Exit::Dependency,
            format!(
                "hsm-sim's module ({}) is not next to {}",
                hsm_sim::MODULE_FILE_NAME,
                exe.display()
            ),
            "run `cargo run --release -- dev` from the source tree, or pass --hsm-module PATH",
        );
    };
    let config = match prepare(dir, listen, kmip_listen, &module) {
        Ok(c) => c,
        Err(f) => return f,
    };
    let cwd = std::env::current_dir().unwrap_or_default();
    let shown = exe
        .strip_prefix(&cwd)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| exe.clone());
    let tresor = shown.display();
    let d = dir.display();
    println!("Tresor development server (hsm-sim, SQLite, development CA) in {d}/");
    println!(
        "  endpoint:   https://localhost:{} (tenant \"{DEV_TENANT}\"; keys and certificates survive restarts)",
        listen.port()
    );
    println!(
        "  KMIP:       {kmip_listen} (client certificate {d}/kmip.pem, key {d}/kmip.key, CA {d}/ca.pem)"
    );
    println!(
        "  profiles:   {d}/officer.profile.toml, {d}/service.profile.toml, {d}/auditor.profile.toml, {d}/kmip.profile.toml"
    );
    println!();
    println!("Try, in another terminal:");
    println!(
        "  {tresor} --profile {d}/officer.profile.toml key create tenants/{DEV_TENANT}/keys/first"
    );
    println!(
        "  {tresor} --profile {d}/service.profile.toml wrap --key tenants/{DEV_TENANT}/keys/first --plaintext-base64 aGVsbG8gVHJlc29y --aad record-1"
    );
    println!(
        "  {tresor} --profile {d}/service.profile.toml unwrap --aad record-1 --ciphertext-base64 <ciphertext printed by wrap>"
    );
    println!(
        "  {tresor} --profile {d}/officer.profile.toml key create tenants/{DEV_TENANT}/keys/kmip   # before KMIP clients create keys"
    );
    println!();
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let err = std::process::Command::new(&exe)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env(hsm_sim::CONF_ENV, dir.join("hsm-sim.toml"))
        .exec();
    Failure::new(
        Exit::Software,
        format!("cannot start `tresor serve`: {err}"),
        "run the printed `tresor serve` command yourself",
    )
}
