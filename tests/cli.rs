//! The `tresor` binary as a user runs it: `tresor serve` in its own process, the CLI against it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use tresor::pki::Validity;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");

fn tresor(profile: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn failed(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("\nhint: "),
        "errors say what and what to do: {stderr}"
    );
    stderr
}

#[test]
fn a_user_creates_rotates_wraps_and_unwraps_with_the_cli() {
    let d = Deployment::new("");
    let server = ServerProcess::start(&d.config_path, &d.dir().join("server.log"));
    let officer = d.profile(server.addr, Some(OFFICER_A), Validity::default());
    let service = d.profile(server.addr, Some(SERVICE_A), Validity::default());

    let table = ok(&tresor(
        &officer,
        &[
            "key",
            "create",
            "tenants/a/keys/ehr",
            "--description",
            "EHR archive",
            "--label",
            "owner=radiology",
        ],
    ));
    assert!(
        table.contains("tenants/a/keys/ehr")
            && table.contains("ENABLED")
            && table.contains("owner=radiology"),
        "{table}"
    );
    let rotated = json(&tresor(
        &officer,
        &["--output", "json", "key", "rotate", "tenants/a/keys/ehr"],
    ));
    assert_eq!(rotated["primary_version"], 2);
    assert_eq!(rotated["versions"][1]["state"], "ENABLED");
    let listed = json(&tresor(&officer, &["key", "list", "--output", "json"]));
    assert_eq!(listed[0]["name"], "tenants/a/keys/ehr");
    assert!(
        ok(&tresor(&officer, &["key", "list"]))
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("tenants/a/keys/ehr")
    );

    // Base64 in and out.
    let wrapped = json(&tresor(
        &service,
        &[
            "--output",
            "json",
            "wrap",
            "--key",
            "tenants/a/keys/ehr",
            "--plaintext-base64",
            "c2VjcmV0LWRlaw==",
            "--aad",
            "patient 4711",
        ],
    ));
    assert_eq!(wrapped["key_version"], "tenants/a/keys/ehr/versions/2");
    let blob = wrapped["ciphertext"].as_str().unwrap();
    let opened = json(&tresor(
        &service,
        &[
            "--output",
            "json",
            "unwrap",
            "--ciphertext-base64",
            blob,
            "--aad",
            "patient 4711",
        ],
    ));
    assert_eq!(opened["plaintext"], "c2VjcmV0LWRlaw==");
    let human = ok(&tresor(
        &service,
        &[
            "unwrap",
            "--ciphertext-base64",
            blob,
            "--aad",
            "patient 4711",
        ],
    ));
    assert!(human.contains("plaintext: c2VjcmV0LWRlaw=="), "{human}");

    // Files in and out; a plaintext file is private.
    let dir = d.dir();
    std::fs::write(dir.join("dek.bin"), [1u8, 2, 3, 250]).unwrap();
    ok(&tresor(
        &service,
        &[
            "wrap",
            "--key",
            "tenants/a/keys/ehr",
            "--in",
            dir.join("dek.bin").to_str().unwrap(),
            "--out",
            dir.join("dek.wrapped").to_str().unwrap(),
        ],
    ));
    ok(&tresor(
        &service,
        &[
            "unwrap",
            "--in",
            dir.join("dek.wrapped").to_str().unwrap(),
            "--out",
            dir.join("dek.out").to_str().unwrap(),
        ],
    ));
    assert_eq!(std::fs::read(dir.join("dek.out")).unwrap(), [1, 2, 3, 250]);
    assert_eq!(
        std::fs::metadata(dir.join("dek.out"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let wrapped_b64 = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(dir.join("dek.wrapped")).unwrap(),
    );
    let rewrapped = json(&tresor(
        &service,
        &[
            "--output",
            "json",
            "rewrap",
            "--ciphertext-base64",
            &wrapped_b64,
        ],
    ));
    assert_eq!(rewrapped["rewrapped"], false);
    let dk = json(&tresor(
        &service,
        &[
            "--output",
            "json",
            "datakey",
            "--key",
            "tenants/a/keys/ehr",
            "--length",
            "16",
        ],
    ));
    assert_eq!(
        dk["plaintext"].as_str().unwrap().len(),
        24,
        "16 bytes in base64"
    );

    // Exit codes scripts can rely on, and errors that say what to do.
    failed(&tresor(&officer, &["key", "get", "tenants/a/keys/nope"]), 3);
    failed(&tresor(&service, &["key", "create", "tenants/a/keys/x"]), 4);
    let e = failed(
        &tresor(
            &service,
            &[
                "unwrap",
                "--ciphertext-base64",
                blob,
                "--aad",
                "patient 4712",
            ],
        ),
        5,
    );
    assert!(e.contains("AAD"), "{e}");
    failed(
        &tresor(&service, &["unwrap", "--ciphertext-base64", "not base64!"]),
        5,
    );
    failed(
        &tresor(&officer, &["key", "disable", "tenants/a/keys/ehr", "2"]),
        6,
    );
    // Key usage: a decrypt-only key shows it and refuses new wraps (exit 6, naming the usage).
    let shown = ok(&tresor(
        &officer,
        &["key", "update", "tenants/a/keys/ehr", "--usage", "decrypt"],
    ));
    assert!(shown.contains("usage:           decrypt"), "{shown}");
    let e = failed(
        &tresor(
            &service,
            &[
                "wrap",
                "--key",
                "tenants/a/keys/ehr",
                "--plaintext-base64",
                "aGk=",
            ],
        ),
        6,
    );
    assert!(e.contains("DECRYPT") && e.contains("encrypt"), "{e}");
    ok(&tresor(
        &officer,
        &[
            "key",
            "update",
            "tenants/a/keys/ehr",
            "--usage",
            "encrypt-decrypt",
        ],
    ));
    let e = failed(
        &Command::new(BIN)
            .args(["key", "list"])
            .env_remove("TRESOR_PROFILE")
            .output()
            .unwrap(),
        64,
    );
    assert!(e.contains("--profile"), "{e}");
    let nowhere = d.profile(
        "127.0.0.1:1".parse().unwrap(),
        Some(OFFICER_A),
        Validity::default(),
    );
    failed(&tresor(&nowhere, &["key", "list"]), 7);
    // The profile can come from the environment.
    let out = Command::new(BIN)
        .args(["key", "get", "tenants/a/keys/ehr"])
        .env("TRESOR_PROFILE", &officer)
        .output()
        .unwrap();
    assert!(ok(&out).contains("primary version: 2"));
}

#[test]
fn sighup_reloads_the_policy_and_sigterm_exits_cleanly() {
    let d = Deployment::new("");
    let server = ServerProcess::start(&d.config_path, &d.dir().join("server.log"));
    let newcomer = d.profile(server.addr, Some("officer-newcomer"), Validity::default());
    failed(&tresor(&newcomer, &["key", "list"]), 4);

    // A broken file is refused and the old policy stays.
    std::fs::write(
        &d.policy_path,
        "[[identity]]\nname = \"x\"\nroles = \"wrong\"\n",
    )
    .unwrap();
    server.signal("-HUP");
    let officer = d.profile(server.addr, Some(OFFICER_A), Validity::default());
    std::thread::sleep(Duration::from_millis(300));
    ok(&tresor(&officer, &["key", "list"]));

    std::fs::write(&d.policy_path, format!("{POLICY}\n[[identity]]\nname = \"officer-newcomer\"\ntenant = \"a\"\nroles = [\"officer\"]\n")).unwrap();
    server.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tresor(&newcomer, &["key", "list"]).status.success() {
        assert!(Instant::now() < deadline, "the reload never took effect");
        std::thread::sleep(Duration::from_millis(100));
    }

    server.signal("-TERM");
    let status = server.wait();
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(d.dir().join("server.log")).unwrap();
    assert!(
        log.contains("NOT reloaded"),
        "a broken policy is logged: {log}"
    );
    assert!(log.contains("access policy reloaded"), "{log}");
    assert!(!log.contains(PIN), "the PIN reached the log");
}

#[test]
fn bad_configuration_exits_64_and_names_the_key() {
    let d = Deployment::new("");
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    for (from, to, key) in [
        (
            "listen = \"127.0.0.1:0\"",
            "listen = \"nowhere\"",
            "server.listen",
        ),
        (
            "cert = \"server.pem\"",
            "cert = \"missing.pem\"",
            "tls.cert",
        ),
        ("file = \"policy.toml\"", "file = \"ca.pem\"", "policy.file"),
        (
            "cert = \"server.pem\"",
            "cert = \"policy.toml\"",
            "tls.cert",
        ),
    ] {
        let path: PathBuf = d.dir().join("bad.toml");
        std::fs::write(&path, text.replace(from, to)).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = failed(&out, 64);
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    // A wrong token label is not a configuration syntax error: the HSM is unreachable (69).
    let path = d.dir().join("bad.toml");
    std::fs::write(
        &path,
        text.replace(
            &format!("token_label = \"{}\"", d.token.label),
            "token_label = \"no-such-token\"",
        ),
    )
    .unwrap();
    let stderr = failed(
        &Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap(),
        69,
    );
    assert!(stderr.contains("no-such-token"), "{stderr}");
}

#[test]
fn json_logs_carry_the_node_id_on_every_line() {
    let d = Deployment::new("node_id = \"tresor-fra-1\"\nlog_format = \"json\"");
    let log = d.dir().join("server.log");
    let server = ServerProcess::start(&d.config_path, &log);
    let officer = d.profile(server.addr, Some(OFFICER_A), Validity::default());
    ok(&tresor(&officer, &["key", "list"]));
    server.signal("-TERM");
    assert!(server.wait().success());

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert_eq!(line["node"], "tresor-fra-1", "{line}");
        assert!(
            line["level"].is_string() && line["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "serving"),
        "{text}"
    );
}
