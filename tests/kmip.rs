//! The KMIP server end to end: a real `tresor serve` (in process, on a loopback port) driven
//! by PyKMIP, a third-party KMIP client (`tests/kmip/pykmip_scenario.py`, in the virtual
//! environment `scripts/test` installs), and by raw TTLV for what no well-behaved client sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tresor::audit_record::ExportItem;
use tresor::kmip::ttlv::{self, Ttlv, tag};
use zeroize::Zeroizing;

const KMIP_A: &str = "kmip-vsphere-a";
const KMIP_NARROW: &str = "kmip-vsan-only-a";
const KMIP_B: &str = "kmip-b";

/// A deployment with `[kmip]` and three KMIP identities: one of tenant `a`, one of `a` limited
/// to names `vsan-*`, one of `b`. Tenant `a` destroys at once, `b` keeps a day.
fn deployment() -> Deployment {
    let d = Deployment::new("");
    let mut policy = std::fs::read_to_string(&d.policy_path).unwrap();
    policy.push_str(&format!(
        "\n[[identity]]\nname = \"{KMIP_A}\"\ntenant = \"a\"\nroles = [\"kmip\"]\n\
         \n[[identity]]\nname = \"{KMIP_NARROW}\"\ntenant = \"a\"\nroles = [\"kmip\"]\nkeys = [\"vsan-*\"]\n\
         \n[[identity]]\nname = \"{KMIP_B}\"\ntenant = \"b\"\nroles = [\"kmip\"]\n"
    ));
    std::fs::write(&d.policy_path, policy).unwrap();
    let mut config = std::fs::read_to_string(&d.config_path).unwrap();
    config.push_str("\n[kmip]\nlisten = \"127.0.0.1:0\"\ntenant_destroy_grace_hours = { a = 0 }\n");
    std::fs::write(&d.config_path, config).unwrap();
    d
}

async fn start() -> TestServer {
    let server = TestServer::start_on(deployment()).await;
    create_key(&server.client(OFFICER_A).await, "tenants/a/keys/kmip").await;
    create_key(&server.client(OFFICER_B).await, "tenants/b/keys/kmip").await;
    server
}

/// The client certificate and key of `identity`, as PEM files.
fn client_files(server: &TestServer, identity: &str) -> (PathBuf, PathBuf) {
    let dir = server.deployment.dir();
    let cert = dir.join(format!("{identity}.pem"));
    let key = dir.join(format!("{identity}.key"));
    server
        .deployment
        .ca
        .issue_client(identity, tresor::pki::Validity::default())
        .unwrap()
        .write(&cert, &key)
        .unwrap();
    (cert, key)
}

fn python() -> PathBuf {
    let python = std::env::var_os("TRESOR_PYKMIP_PYTHON").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pykmip/bin/python"),
        PathBuf::from,
    );
    assert!(
        python.exists(),
        "PyKMIP's virtual environment is missing at {}: scripts/test installs it (python3 -m venv target/pykmip && target/pykmip/bin/pip install pykmip)",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pykmip_creates_registers_gets_locates_and_retires_keys() {
    let server = start().await;
    let addr = server.kmip.unwrap();
    let (cert_a, key_a) = client_files(&server, KMIP_A);
    let (cert_b, key_b) = client_files(&server, KMIP_B);
    let (cert_n, key_n) = client_files(&server, KMIP_NARROW);
    let ca = server.deployment.dir().join("ca.pem");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kmip/pykmip_scenario.py");
    let mut args: Vec<String> = vec![
        script.display().to_string(),
        addr.ip().to_string(),
        addr.port().to_string(),
    ];
    for p in [&ca, &cert_a, &key_a, &cert_b, &key_b, &cert_n, &key_n] {
        args.push(p.display().to_string());
    }
    let python = python();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python).args(&args).output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "the PyKMIP scenario failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    let s = |k: &str| seen[k].as_str().unwrap_or_default().to_owned();
    let uid = s("created");
    let uid2 = s("registered");

    // Create and Get: 32 bytes, the same on every Get.
    assert_eq!(seen["created_key_length"], 32);
    assert_eq!(seen["created_key_hex"], seen["created_key_again_hex"]);
    assert_eq!(seen["register_roundtrip"], true, "{seen}");
    assert_eq!(
        seen["attributes"],
        serde_json::json!({"State": "PRE_ACTIVE", "Cryptographic Length": 256, "Name": "vsan-disk-1"})
    );
    for name in [
        "Unique Identifier",
        "State",
        "Cryptographic Algorithm",
        "Initial Date",
    ] {
        assert!(
            seen["attribute_list"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == name),
            "{name} missing from {}",
            seen["attribute_list"]
        );
    }
    // Locate by name, by state, with Maximum Items and (KMIP 1.4) Offset Items.
    assert_eq!(seen["locate_by_name"], serde_json::json!([uid]));
    assert_eq!(seen["locate_pre_active"], serde_json::json!([uid, uid2]));
    assert_eq!(seen["locate_max_one"], serde_json::json!([uid]));
    assert_eq!(seen["locate_active"], serde_json::json!([uid]));
    assert_eq!(seen["locate_by_name_1_4"], serde_json::json!([uid2]));
    assert_eq!(seen["locate_offset_1_4"].as_array().unwrap()[0], uid2);
    assert_eq!(seen["locate_offset_1_4"].as_array().unwrap().len(), 2);
    // Life cycle and its refusals.
    assert_eq!(s("activate_twice"), "ILLEGAL_OPERATION");
    assert_eq!(s("destroy_active"), "ILLEGAL_OPERATION");
    assert_eq!(s("state_after_revoke"), "DEACTIVATED");
    assert_eq!(s("state_after_destroy"), "DESTROYED");
    assert_eq!(s("get_destroyed"), "ILLEGAL_OPERATION");
    assert_eq!(s("get_unknown"), "ITEM_NOT_FOUND");
    // The batch: the Get Attribute List used the Create's id (the ID placeholder).
    assert_eq!(
        seen["batch_statuses"],
        serde_json::json!(["SUCCESS", "SUCCESS", "SUCCESS", "SUCCESS"])
    );
    assert_eq!(seen["batch_created"], seen["batch_listed_for"]);
    assert_eq!(
        seen["batch_versions"],
        serde_json::json!(["1.4", "1.3", "1.2", "1.1", "1.0"])
    );
    assert!(
        seen["batch_operations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "LOCATE")
    );
    // Encrypt and Decrypt: AES-GCM with the server's 12-byte IV and a 16-byte tag; altered
    // additional data is a Cryptographic Failure; a Pre-Active key cannot encrypt.
    assert_eq!(s("encrypt_1_2"), "FEATURE_NOT_SUPPORTED");
    assert_eq!(s("encrypt_pre_active"), "ILLEGAL_OPERATION");
    assert_eq!(seen["encrypted"], serde_json::json!([12, 12, 16]));
    assert_eq!(s("decrypted"), "patient 4711");
    assert_eq!(s("decrypt_wrong_aad"), "CRYPTOGRAPHIC_FAILURE");
    // Attributes: a rename is found by its new name; a deleted Name is gone; modifying an
    // attribute the object lacks is Item Not Found.
    assert_eq!(
        seen["locate_renamed"],
        serde_json::json!([s("batch_created")])
    );
    assert!(
        !seen["attributes_after_delete"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "Name")
    );
    assert_eq!(s("modify_missing"), "ITEM_NOT_FOUND");
    // Another tenant's object is unknown to tenant b, and b sees none of a's objects.
    assert_eq!(s("b_get_a"), "ITEM_NOT_FOUND");
    assert_eq!(s("b_destroy_a"), "ITEM_NOT_FOUND");
    assert_eq!(seen["b_locate"], serde_json::json!([]));
    // Key-name patterns apply to the object's Name.
    assert_eq!(s("narrow_get_outside"), "ITEM_NOT_FOUND");
    assert_eq!(seen["narrow_get_inside"], 16);
    assert_eq!(s("narrow_create_outside"), "PERMISSION_DENIED");
    // Without a client certificate the handshake fails.
    assert_ne!(s("no_certificate"), "SUCCEEDED");

    // Every release of a key is in tenant a's log, with the object, its name and the caller;
    // b's refused attempts are in b's.
    let a_log = verified_export(&server.client(AUDITOR_A).await).await;
    let gets: Vec<_> = a_log
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) if r.body.operation == "KmipGet" && r.body.outcome == "OK" => {
                Some(r.body.clone())
            }
            _ => None,
        })
        .collect();
    let object_key = format!("tenants/a/objects/{uid}");
    assert_eq!(
        gets.iter().filter(|b| b.key == object_key).count(),
        2,
        "{gets:?}"
    );
    assert!(
        gets.iter()
            .all(|b| b.caller == KMIP_A || b.caller == KMIP_NARROW)
    );
    assert!(
        gets.iter()
            .any(|b| b.key == object_key && b.key_version == "vsan-disk-1")
    );
    for op in [
        "KmipCreate",
        "KmipRegister",
        "KmipActivate",
        "KmipRevoke",
        "KmipDestroy",
        "KmipLocate",
    ] {
        assert!(
            a_log
                .iter()
                .any(|i| matches!(i, ExportItem::Record(r) if r.body.operation == op)),
            "no {op} record"
        );
    }
    // Tenant b's attempts on a's object are in a's log too, under the object, with b's caller.
    let probed = format!("tenants/a/objects/{uid2}");
    for op in ["KmipGet", "KmipDestroy"] {
        assert!(
            a_log.iter().any(|i| matches!(i,
                ExportItem::Record(r) if r.body.operation == op && r.body.caller == KMIP_B
                    && r.body.key == probed && r.body.outcome == "DENIED")),
            "no {op} probe by tenant b in tenant a's log"
        );
    }
    let b_log = verified_export(&server.client(AUDITOR_B).await).await;
    assert!(b_log.iter().any(|i| matches!(i,
        ExportItem::Record(r) if r.body.operation == "KmipGet" && r.body.caller == KMIP_B
            && r.body.outcome == "FAILED")));
    server.stop().await;
}

/// A raw TLS connection to the KMIP port as `identity`.
async fn raw(
    server: &TestServer,
    identity: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let (cert, key) = client_files(server, identity);
    let mut roots = rustls::RootCertStore::empty();
    for ca in tresor::pki::load_certs(&server.deployment.dir().join("ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        tresor::pki::load_certs(&cert).unwrap(),
        tresor::pki::load_key(&key).unwrap(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.kmip.unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads one response message.
async fn answer(tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Ttlv {
    let mut header = [0u8; 8];
    tls.read_exact(&mut header).await.unwrap();
    let mut message = vec![0u8; 8 + ttlv::announced_length(&header) as usize];
    message[..8].copy_from_slice(&header);
    tls.read_exact(&mut message[8..]).await.unwrap();
    ttlv::decode(&message).unwrap()
}

fn reason_of(response: &Ttlv) -> (u32, String) {
    let item = response.child(tag::BATCH_ITEM).unwrap();
    (
        item.child(tag::RESULT_REASON)
            .and_then(Ttlv::as_enum)
            .unwrap_or(0),
        item.child(tag::RESULT_MESSAGE)
            .and_then(Ttlv::as_text)
            .unwrap_or_default()
            .to_owned(),
    )
}

fn request(operation: u32, payload: Vec<Ttlv>) -> Zeroizing<Vec<u8>> {
    ttlv::encode(&tresor::kmip::message::request((1, 2), operation, payload))
}

/// Malformed TTLV gets a KMIP error response (Invalid Message) and the connection stays
/// usable; a message that cannot be framed gets one and is closed; an operation the server
/// does not offer gets Operation Not Supported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_kmip_errors_not_closed_connections() {
    let server = start().await;
    let mut tls = raw(&server, KMIP_A).await;
    // A Request Message whose only child is an Integer of 8 bytes.
    let mut broken = vec![0x42, 0x00, 0x78, 0x01, 0, 0, 0, 16];
    broken.extend_from_slice(&[0x42, 0x00, 0x0D, 0x02, 0, 0, 0, 8]);
    broken.extend_from_slice(&[0; 8]);
    tls.write_all(&broken).await.unwrap();
    let (reason, message) = reason_of(&answer(&mut tls).await);
    assert_eq!(reason, 0x04, "{message}");
    assert!(message.contains("cannot be 8 bytes long"), "{message}");
    // The same connection still serves.
    tls.write_all(&request(
        0x18,
        vec![Ttlv::enumeration(tag::QUERY_FUNCTION, 1)],
    ))
    .await
    .unwrap();
    let ok = answer(&mut tls).await;
    let item = ok.child(tag::BATCH_ITEM).unwrap();
    assert_eq!(item.child(tag::RESULT_STATUS).unwrap().as_enum(), Some(0));
    // Rekey (0x04) is not offered.
    tls.write_all(&request(0x04, vec![])).await.unwrap();
    assert_eq!(reason_of(&answer(&mut tls).await).0, 0x05);
    // A message announcing 2 GiB is answered and the connection closed.
    tls.write_all(&[0x42, 0x00, 0x78, 0x01, 0x80, 0, 0, 0])
        .await
        .unwrap();
    let (reason, _) = reason_of(&answer(&mut tls).await);
    assert_eq!(reason, 0x04);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls.read_to_end(&mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the connection stayed open after an unframeable message"
    );

    // Every malformed message is in tenant a's log (the second in a burst record, appended
    // once its one-second window closed).
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let log = verified_export(&server.client(AUDITOR_A).await).await;
    let invalid: u64 = log
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) if r.body.operation == "KmipInvalidMessage" => {
                Some(r.body.repeated.max(1))
            }
            _ => None,
        })
        .sum();
    assert_eq!(invalid, 2);
    server.stop().await;
}

/// A tenant without the wrapping key gets a General Failure that names the fix, and nothing
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_without_its_wrapping_key_is_told_how_to_fix_it() {
    let server = TestServer::start_on(deployment()).await;
    let mut tls = raw(&server, KMIP_A).await;
    let template = Ttlv::structure(
        tag::TEMPLATE_ATTRIBUTE,
        vec![
            tresor::kmip::message::attribute(
                "Cryptographic Algorithm",
                ttlv::Value::Enumeration(3),
            ),
            tresor::kmip::message::attribute("Cryptographic Length", ttlv::Value::Integer(256)),
        ],
    );
    tls.write_all(&request(
        0x01,
        vec![Ttlv::enumeration(tag::OBJECT_TYPE, 2), template],
    ))
    .await
    .unwrap();
    let (reason, message) = reason_of(&answer(&mut tls).await);
    assert_eq!(reason, 0x100, "{message}");
    assert!(
        message.contains("tresor key create tenants/a/keys/kmip"),
        "{message}"
    );
    tls.write_all(&request(0x08, vec![])).await.unwrap();
    let located = answer(&mut tls).await;
    let payload = located
        .child(tag::BATCH_ITEM)
        .and_then(|i| i.child(tag::RESPONSE_PAYLOAD))
        .unwrap();
    assert_eq!(payload.children(tag::UNIQUE_IDENTIFIER).count(), 0);
    server.stop().await;
}

fn payload_of(response: &Ttlv) -> &Ttlv {
    let item = response.child(tag::BATCH_ITEM).unwrap();
    assert_eq!(
        item.child(tag::RESULT_STATUS).and_then(Ttlv::as_enum),
        Some(0),
        "{:?}",
        reason_of(response)
    );
    item.child(tag::RESPONSE_PAYLOAD).unwrap()
}

/// A custom attribute is added once (a second Add is refused), read back, and searched by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_attributes_are_added_once_and_searchable() {
    use tresor::kmip::message::attribute;
    use tresor::kmip::ttlv::Value;
    let server = start().await;
    let mut tls = raw(&server, KMIP_A).await;
    let template = Ttlv::structure(
        tag::TEMPLATE_ATTRIBUTE,
        vec![
            attribute("Cryptographic Algorithm", Value::Enumeration(3)),
            attribute("Cryptographic Length", Value::Integer(128)),
        ],
    );
    tls.write_all(&request(
        0x01,
        vec![Ttlv::enumeration(tag::OBJECT_TYPE, 2), template],
    ))
    .await
    .unwrap();
    let created = answer(&mut tls).await;
    let id = payload_of(&created)
        .child(tag::UNIQUE_IDENTIFIER)
        .and_then(Ttlv::as_text)
        .unwrap()
        .to_owned();
    let owner = || attribute("x-owner", Value::TextString("storage team".into()));
    let add = || {
        request(
            0x0D,
            vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, id.clone()), owner()],
        )
    };
    tls.write_all(&add()).await.unwrap();
    payload_of(&answer(&mut tls).await);
    tls.write_all(&add()).await.unwrap();
    let (reason, message) = reason_of(&answer(&mut tls).await);
    assert_eq!(reason, 0x07, "{message}");
    assert!(message.contains("already has"), "{message}");
    tls.write_all(&request(
        0x0B,
        vec![
            Ttlv::text(tag::UNIQUE_IDENTIFIER, id.clone()),
            Ttlv::text(tag::ATTRIBUTE_NAME, "x-owner"),
        ],
    ))
    .await
    .unwrap();
    let got = answer(&mut tls).await;
    assert_eq!(
        payload_of(&got)
            .children(tag::ATTRIBUTE)
            .collect::<Vec<_>>(),
        vec![&owner()]
    );
    tls.write_all(&request(0x08, vec![owner()])).await.unwrap();
    let located = answer(&mut tls).await;
    let ids: Vec<_> = payload_of(&located)
        .children(tag::UNIQUE_IDENTIFIER)
        .filter_map(Ttlv::as_text)
        .collect();
    assert_eq!(ids, [id.as_str()]);
    // A server-managed attribute cannot be set by a client.
    tls.write_all(&request(
        0x0D,
        vec![
            Ttlv::text(tag::UNIQUE_IDENTIFIER, id.clone()),
            attribute("State", Value::Enumeration(2)),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(reason_of(&answer(&mut tls).await).0, 0x07);
    server.stop().await;
}

/// Creates an AES-128 object named `name` over a raw connection; its id.
async fn create_object(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    name: &str,
) -> String {
    use tresor::kmip::message::attribute;
    use tresor::kmip::ttlv::Value;
    let template = Ttlv::structure(
        tag::TEMPLATE_ATTRIBUTE,
        vec![
            attribute("Cryptographic Algorithm", Value::Enumeration(3)),
            attribute("Cryptographic Length", Value::Integer(128)),
            attribute(
                "Name",
                Value::Structure(vec![
                    Ttlv::text(tag::NAME_VALUE, name),
                    Ttlv::enumeration(tag::NAME_TYPE, 1),
                ]),
            ),
        ],
    );
    tls.write_all(&request(
        0x01,
        vec![Ttlv::enumeration(tag::OBJECT_TYPE, 2), template],
    ))
    .await
    .unwrap();
    let created = answer(tls).await;
    payload_of(&created)
        .child(tag::UNIQUE_IDENTIFIER)
        .and_then(Ttlv::as_text)
        .unwrap()
        .to_owned()
}

/// `tresor` as `identity`, with JSON output.
fn cli(server: &TestServer, identity: &str, args: &[&str]) -> std::process::Output {
    let profile = server.deployment.profile(
        server.addr,
        Some(identity),
        tresor::pki::Validity::default(),
    );
    std::process::Command::new(env!("CARGO_BIN_EXE_tresor"))
        .arg("--profile")
        .arg(&profile)
        .args(["--output", "json"])
        .args(args)
        .output()
        .unwrap()
}

fn cli_json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Officers list, inspect, revoke and destroy KMIP objects with the CLI; a destruction waits
/// for a second officer (the requester cannot approve it), then the KMIP client's Get is
/// refused. Another tenant's officer sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn officers_revoke_and_destroy_kmip_objects_with_four_eyes() {
    let server = start().await;
    let mut tls = raw(&server, KMIP_A).await;
    let id = create_object(&mut tls, "pg-tde-principal").await;

    let listed = cli_json(&cli(&server, OFFICER_A, &["kmip", "list"]));
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["name"], "pg-tde-principal");
    assert_eq!(listed[0]["state"], "PRE_ACTIVE");
    assert_eq!(listed[0]["has_material"], true);
    assert_eq!(
        cli_json(&cli(&server, OFFICER_B, &["kmip", "list"])),
        serde_json::json!([])
    );
    let refused = cli(&server, OFFICER_B, &["kmip", "get", &id]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let revoked = cli_json(&cli(
        &server,
        OFFICER_A,
        &[
            "kmip",
            "revoke",
            &id,
            "--reason",
            "key_compromise",
            "--message",
            "laptop lost",
        ],
    ));
    assert_eq!(revoked["state"], "COMPROMISED");
    assert_eq!(revoked["revocation_reason"], "KEY_COMPROMISE");
    let requested = cli_json(&cli(&server, OFFICER_A, &["kmip", "destroy", &id, "--yes"]));
    assert_eq!(requested["state"], "PENDING");
    assert_eq!(requested["key_version"], format!("tenants/a/objects/{id}"));
    assert_eq!(requested["operation"], "DESTROY_MANAGED_OBJECT");
    let approval = requested["id"].as_str().unwrap().to_owned();
    // Nothing happened yet: the key is still there.
    assert_eq!(
        cli_json(&cli(&server, OFFICER_A, &["kmip", "get", &id]))["state"],
        "COMPROMISED"
    );
    let own = cli(
        &server,
        OFFICER_A,
        &["approvals", "approve", &approval, "--yes"],
    );
    assert!(
        !own.status.success(),
        "the requester approved its own destruction"
    );
    let approved = cli_json(&cli(
        &server,
        OFFICER_A2,
        &["approvals", "approve", &approval, "--yes"],
    ));
    assert_eq!(approved["state"], "APPROVED");
    let destroyed = cli_json(&cli(&server, OFFICER_A, &["kmip", "get", &id]));
    assert_eq!(destroyed["state"], "DESTROYED_COMPROMISED");
    // Tenant a's grace is zero: the material is gone, and the KMIP client's Get is refused.
    assert_eq!(destroyed["has_material"], false);
    tls.write_all(&request(
        0x0A,
        vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, id.clone())],
    ))
    .await
    .unwrap();
    assert_eq!(reason_of(&answer(&mut tls).await).0, 0x0B);

    // The officers' actions are in tenant a's log under the object.
    let log = verified_export(&server.client(AUDITOR_A).await).await;
    let object = format!("tenants/a/objects/{id}");
    for op in [
        "RevokeManagedObject",
        "DestroyManagedObject",
        "GetManagedObject",
    ] {
        assert!(
            log.iter().any(|i| matches!(i,
                ExportItem::Record(r) if r.body.operation == op && r.body.key == object && r.body.outcome == "OK")),
            "no {op} record for {object}"
        );
    }
    // An export filtered by the object holds its records only (the others withheld).
    let mut stream = server
        .client(AUDITOR_A)
        .await
        .audit()
        .export_audit_log(tresor::proto::ExportAuditLogRequest {
            key: object.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut records = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        if let ExportItem::Record(r) = tresor::client::audit_item(item).unwrap() {
            records.push(r.body);
        }
    }
    assert!(records.len() >= 4, "{records:?}");
    assert!(records.iter().all(|b| b.key == object), "{records:?}");
    server.stop().await;
}

/// `tresor bench --kmip` drives Get, Encrypt and Decrypt over KMIP with no errors, and a
/// request that fails is counted by its result reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_drives_kmip_get_encrypt_and_decrypt() {
    let server = start().await;
    let mut tls = raw(&server, KMIP_A).await;
    let id = create_object(&mut tls, "bench").await;
    let profile =
        server
            .deployment
            .profile(server.addr, Some(KMIP_A), tresor::pki::Validity::default());
    let kmip = server.kmip.unwrap().to_string();
    let bench = |op: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tresor"))
            .arg("--profile")
            .arg(&profile)
            .args([
                "--output",
                "json",
                "bench",
                "--kmip",
                &kmip,
                "--kmip-object",
                &id,
            ])
            .args([
                "--op",
                op,
                "--requests",
                "40",
                "--connections",
                "2",
                "--in-flight",
                "2",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // Pre-Active: Get works, Encrypt is refused (Illegal Operation, 0xb) and counted.
    let r = bench("get");
    assert_eq!(
        (r["ok"].as_u64(), &r["errors"]),
        (Some(40), &serde_json::json!({})),
        "{r}"
    );
    tls.write_all(&request(
        0x12,
        vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, id.clone())],
    ))
    .await
    .unwrap();
    payload_of(&answer(&mut tls).await);
    // `--op get` is a KMIP Get: against the gRPC API it is a usage error, not a silent Wrap.
    let misuse = std::process::Command::new(env!("CARGO_BIN_EXE_tresor"))
        .arg("--profile")
        .arg(&profile)
        .args([
            "bench",
            "--key",
            "tenants/a/keys/kmip",
            "--op",
            "get",
            "--requests",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        misuse.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&misuse.stderr)
    );
    assert!(String::from_utf8_lossy(&misuse.stderr).contains("--kmip"));
    for op in ["wrap", "unwrap"] {
        let r = bench(op);
        assert_eq!(
            (r["ok"].as_u64(), &r["errors"]),
            (Some(40), &serde_json::json!({})),
            "{op}: {r}"
        );
    }
    server.stop().await;
}

/// A Get with `justification:CODE:REFERENCE` in the request header's Client Correlation Value.
fn get_declaring(id: &str, correlation: Option<&str>) -> Zeroizing<Vec<u8>> {
    let mut message =
        tresor::kmip::message::request((1, 4), 0x0A, vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, id)]);
    if let (Some(c), ttlv::Value::Structure(parts)) = (correlation, &mut message.value)
        && let Some(ttlv::Value::Structure(header)) = parts.first_mut().map(|h| &mut h.value)
    {
        header.push(Ttlv::text(tag::CLIENT_CORRELATION_VALUE, c));
    }
    ttlv::encode(&message)
}

/// A storage array's keys are released only for a declared reason: the rule covers Get on
/// `disk-*` objects, and a KMIP client declares its reason in the Client Correlation Value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_decide_on_kmip_releases_with_the_declared_justification() {
    let d = deployment();
    let mut policy = std::fs::read_to_string(&d.policy_path).unwrap();
    policy.push_str(
        "\n[justifications]\ncodes = [\"treatment\", \"maintenance\"]\n\
         \n[[access_rule]]\nid = \"disks-for-care\"\ntenant = \"a\"\nkeys = [\"disk-*\"]\n\
         front_end = \"kmip\"\noperations = [\"Get\"]\njustifications = [\"treatment\"]\ndecision = \"allow\"\n",
    );
    std::fs::write(&d.policy_path, policy).unwrap();
    let server = TestServer::start_on(d).await;
    create_key(&server.client(OFFICER_A).await, "tenants/a/keys/kmip").await;
    let mut tls = raw(&server, KMIP_A).await;
    let disk = create_object(&mut tls, "disk-ward-3").await;
    let other = create_object(&mut tls, "backup-catalog").await;

    for correlation in [
        None,
        Some("justification:maintenance"),
        Some("my-own-correlation"),
    ] {
        tls.write_all(&get_declaring(&disk, correlation))
            .await
            .unwrap();
        let (reason, message) = reason_of(&answer(&mut tls).await);
        assert_eq!(reason, 0x0C, "{correlation:?}: {message}");
        assert!(message.contains("default-deny"), "{message}");
    }
    tls.write_all(&get_declaring(&disk, Some("justification:curiosity")))
        .await
        .unwrap();
    let (reason, message) = reason_of(&answer(&mut tls).await);
    assert_eq!(reason, 0x07, "Invalid Field: {message}");
    assert!(message.contains("curiosity"), "{message}");
    tls.write_all(&get_declaring(
        &disk,
        Some("justification:treatment:ward 3 case 17"),
    ))
    .await
    .unwrap();
    let got = answer(&mut tls).await;
    assert!(payload_of(&got).child(tag::SYMMETRIC_KEY).is_some());
    // An object no rule covers is released as before.
    tls.write_all(&get_declaring(&other, None)).await.unwrap();
    payload_of(&answer(&mut tls).await);

    let auditor = server.client(AUDITOR_A).await;
    let gets: Vec<_> = verified_export(&auditor)
        .await
        .into_iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) if r.body.operation == "KmipGet" => Some(r.body),
            _ => None,
        })
        .collect();
    assert_eq!(
        gets.iter()
            .filter(|b| b.outcome == "RULE_DENIED" && b.access_rule == "default-deny")
            .count(),
        3,
        "{gets:#?}"
    );
    assert!(gets.iter().any(|b| b.outcome == "OK"
        && b.access_rule == "disks-for-care"
        && b.justification == "treatment"
        && b.justification_reference == "ward 3 case 17"));
    assert!(
        gets.iter()
            .any(|b| b.outcome == "OK" && b.access_rule.is_empty() && b.key.ends_with(&other))
    );
    server.stop().await;
}
