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

const RULES: &str = r#"
[justifications]
codes = ["treatment", "emergency", "research-pseudonymised", "support"]

[[access_rule]]
id = "support-needs-two-officers"
tenant = "a"
keys = ["ehr"]
justifications = ["support"]
decision = "require-approval"

[[access_rule]]
id = "care"
tenant = "a"
keys = ["ehr"]
justifications = ["treatment", "emergency"]
decision = "allow"
"#;

fn verified(auditor: &Path, d: &Deployment, args: &[&str], name: &str) -> Vec<serde_json::Value> {
    let file = d.dir().join(name);
    let key = d.dir().join("audit-public.pem");
    ok(&tresor(
        auditor,
        &["audit", "public-key", "-o", key.to_str().unwrap()],
    ));
    let mut all = vec!["audit", "export", "-o", file.to_str().unwrap()];
    all.extend_from_slice(args);
    ok(&tresor(auditor, &all));
    let out = Command::new(BIN)
        .args(["audit", "verify", file.to_str().unwrap(), "--public-key"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["type"] == "record")
        .collect()
}

/// A hospital's day under access rules: care is declared, support needs a window two officers
/// opened, and the auditor can list every use under `support` and who approved its window.
#[test]
fn justifications_and_a_break_glass_window_from_the_command_line() {
    let d = Deployment::new("");
    std::fs::write(&d.policy_path, format!("{POLICY}{RULES}")).unwrap();
    let server = ServerProcess::start(&d.config_path, &d.dir().join("server.log"));
    let anna = d.profile(server.addr, Some(OFFICER_A), Validity::default());
    let ben = d.profile(server.addr, Some(OFFICER_A2), Validity::default());
    let service = d.profile(server.addr, Some(SERVICE_A), Validity::default());
    let auditor = d.profile(server.addr, Some(AUDITOR_A), Validity::default());
    ok(&tresor(&anna, &["key", "create", "tenants/a/keys/ehr"]));
    let wrap = |extra: &[&str]| {
        let mut args = vec![
            "--output",
            "json",
            "wrap",
            "--key",
            "tenants/a/keys/ehr",
            "--plaintext-base64",
            "ZGVr",
        ];
        args.extend_from_slice(extra);
        tresor(&service, &args)
    };
    // No reason: refused by default, naming the rule set's default and saying what to do.
    let e = failed(&wrap(&[]), 4);
    assert!(
        e.contains("default-deny") && e.contains("--justification"),
        "{e}"
    );
    let e = failed(&wrap(&["--justification", "curiosity"]), 5);
    assert!(e.contains("curiosity"), "{e}");
    let blob = json(&wrap(&[
        "--justification",
        "treatment",
        "--reference",
        "case 4711",
    ]))["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let unwrap = |code: &str| {
        tresor(
            &service,
            &[
                "unwrap",
                "--ciphertext-base64",
                &blob,
                "--justification",
                code,
                "--reference",
                "INC-9",
            ],
        )
    };
    ok(&unwrap("emergency"));
    let e = failed(&unwrap("support"), 4);
    assert!(
        e.contains("support-needs-two-officers") && e.contains("tresor access request"),
        "{e}"
    );

    // Anna asks for a window; she cannot approve it herself; Ben does.
    let w = json(&tresor(
        &anna,
        &[
            "--output",
            "json",
            "access",
            "request",
            "--identity",
            SERVICE_A,
            "--keys",
            "ehr",
            "--reason",
            "support",
            "--reference",
            "INC-9",
            "--hours",
            "1",
        ],
    ));
    assert_eq!(w["state"], "PENDING");
    let id = w["id"].as_str().unwrap().to_owned();
    failed(&unwrap("support"), 4);
    let e = failed(&tresor(&anna, &["access", "approve", &id, "--yes"]), 4);
    assert!(e.contains("different officer"), "{e}");
    let opened = json(&tresor(
        &ben,
        &["--output", "json", "access", "approve", &id, "--yes"],
    ));
    assert_eq!(
        (opened["state"].as_str(), opened["approved_by"].as_str()),
        (Some("OPEN"), Some(OFFICER_A2))
    );
    ok(&unwrap("support"));
    let listed = ok(&tresor(&anna, &["access", "list"]));
    assert!(listed.contains(&id) && listed.contains("OPEN"), "{listed}");
    // Closed early, it opens nothing more.
    let closed = json(&tresor(
        &anna,
        &["--output", "json", "access", "close", &id],
    ));
    assert_eq!(closed["state"], "CLOSED");
    failed(&unwrap("support"), 4);

    // The auditor's questions: every use under `support`, and its window; every refusal by rule.
    let support = verified(
        &auditor,
        &d,
        &["--justification", "support", "--outcome", "ok"],
        "support.jsonl",
    );
    assert_eq!(support.len(), 1, "{support:#?}");
    assert_eq!(support[0]["access_window"], id.as_str());
    assert_eq!(support[0]["access_rule"], "support-needs-two-officers");
    assert_eq!(support[0]["justification_reference"], "INC-9");
    let refused = verified(&auditor, &d, &["--outcome", "RULE_DENIED"], "refused.jsonl");
    assert_eq!(refused.len(), 4, "{refused:#?}");
    assert!(
        refused
            .iter()
            .all(|r| r["status_code"] == 7 && !r["access_rule"].as_str().unwrap().is_empty())
    );
    // The window's approval is in the log too: who approved it.
    let approvals = verified(&auditor, &d, &["--caller", OFFICER_A2], "ben.jsonl");
    assert!(
        approvals.iter().any(|r| r["operation"] == "Approve"
            && r["key"] == format!("tenants/a/windows/{id}")
            && r["outcome"] == "OK"),
        "{approvals:#?}"
    );

    // SIGHUP: a broken rule set is refused and the rules in force stay ...
    std::fs::write(
        &d.policy_path,
        format!(
            "{POLICY}{RULES}[[access_rule]]\nid = \"care\"\ntenant = \"a\"\ndecision = \"allow\"\n"
        ),
    )
    .unwrap();
    server.signal("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    failed(&wrap(&[]), 4);
    // ... and a good one takes effect without a restart.
    std::fs::write(&d.policy_path, POLICY).unwrap();
    server.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !wrap(&[]).status.success() {
        assert!(Instant::now() < deadline, "the reload never took effect");
        std::thread::sleep(Duration::from_millis(100));
    }
}
