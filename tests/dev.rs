//! `tresor dev` as a newcomer runs it: the built binary in an empty directory, then the README's
//! walkthrough through the CLI, then a restart that keeps everything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tresor");

struct Dev {
    child: Child,
    banner: Vec<String>,
}

impl Dev {
    fn start(dir: &Path, listen: &str) -> Self {
        let mut child = Command::new(BIN)
            .current_dir(dir)
            .args(["dev", "--listen", listen])
            .args(["--kmip-listen", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("dev.log")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut banner = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let ready = line.starts_with("tresor: serving on ");
                banner.push(line);
                if ready {
                    let _ = tx.send(banner.clone());
                }
            }
        });
        let banner = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "tresor dev did not start:\n{}",
                    std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default()
                )
            });
        Self { child, banner }
    }

    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(self.child.wait().unwrap().code(), Some(0));
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env_remove("TRESOR_PROFILE")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn field<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
}

#[test]
fn a_newcomer_runs_tresor_dev_and_the_walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let dev = Dev::start(d, &listen);
    let banner = dev.banner.join("\n");
    assert!(
        banner.contains("tresor-dev/officer.profile.toml")
            && banner.contains("key create tenants/demo/keys/first"),
        "{banner}"
    );
    for f in [
        "ca.pem",
        "officer.pem",
        "officer.key",
        "officer.profile.toml",
        "service.pem",
        "service.key",
        "service.profile.toml",
        "auditor.pem",
        "auditor.key",
        "auditor.profile.toml",
    ] {
        assert!(d.join("tresor-dev").join(f).is_file(), "{f} missing");
    }

    // The README walkthrough: the three printed commands, then rotate.
    let officer = "tresor-dev/officer.profile.toml";
    let service = "tresor-dev/service.profile.toml";
    let created = ok(run(
        d,
        &[
            "--profile",
            officer,
            "key",
            "create",
            "tenants/demo/keys/first",
        ],
    ));
    assert!(
        created.contains("tenants/demo/keys/first") && created.contains("ENABLED"),
        "{created}"
    );
    let wrapped = ok(run(
        d,
        &[
            "--profile",
            service,
            "wrap",
            "--key",
            "tenants/demo/keys/first",
            "--plaintext-base64",
            "aGVsbG8gVHJlc29y",
            "--aad",
            "record-1",
        ],
    ));
    let blob = field(&wrapped, "ciphertext").to_owned();
    assert_eq!(
        field(&wrapped, "key_version"),
        "tenants/demo/keys/first/versions/1"
    );
    let unwrapped = ok(run(
        d,
        &[
            "--profile",
            service,
            "unwrap",
            "--aad",
            "record-1",
            "--ciphertext-base64",
            &blob,
        ],
    ));
    assert_eq!(field(&unwrapped, "plaintext"), "aGVsbG8gVHJlc29y");
    let rotated = ok(run(
        d,
        &[
            "--profile",
            officer,
            "key",
            "rotate",
            "tenants/demo/keys/first",
        ],
    ));
    assert!(rotated.contains("primary version: 2"), "{rotated}");
    // The auditor exports the log and verifies it offline.
    let auditor = "tresor-dev/auditor.profile.toml";
    ok(run(
        d,
        &[
            "--profile",
            auditor,
            "audit",
            "public-key",
            "-o",
            "audit.pem",
        ],
    ));
    ok(run(
        d,
        &["--profile", auditor, "audit", "export", "-o", "audit.jsonl"],
    ));
    let verified = ok(run(
        d,
        &[
            "audit",
            "verify",
            "audit.jsonl",
            "--public-key",
            "audit.pem",
        ],
    ));
    assert!(verified.starts_with("verified: "), "{verified}");
    let log = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    for op in ["CreateKey", "Wrap", "Unwrap", "RotateKey"] {
        assert!(
            log.contains(&format!("\"operation\":\"{op}\"")),
            "{op} missing from the audit export"
        );
    }
    assert_eq!(
        run(d, &["--profile", auditor, "key", "list"]).status.code(),
        Some(4),
        "an auditor is not an officer"
    );
    dev.stop();

    // A restart keeps keys, versions and the CA: the old blob still unwraps.
    let dev = Dev::start(d, &listen);
    let unwrapped = ok(run(
        d,
        &[
            "--profile",
            service,
            "unwrap",
            "--aad",
            "record-1",
            "--ciphertext-base64",
            &blob,
        ],
    ));
    assert_eq!(field(&unwrapped, "plaintext"), "aGVsbG8gVHJlc29y");
    let key = ok(run(
        d,
        &[
            "--profile",
            officer,
            "key",
            "get",
            "tenants/demo/keys/first",
        ],
    ));
    assert!(key.contains("primary version: 2"), "{key}");
    dev.stop();
}
