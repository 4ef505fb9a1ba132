//! The AWS KMS external key store proxy end to end: the real server's HTTPS listener, a real
//! HTTPS client (hyper over rustls, HTTP/1.1 and HTTP/2), every request signed with AWS's own
//! SigV4 implementation (`aws-sigv4`), not Tresor's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use common::*;
use serde_json::{Value, json};
use tresor::audit_record::{self as record, ExportItem};
use tresor::proto;
use tresor::xks::client::{HttpVersion, XksClient};

const REGION: &str = "eu-central-1";
const PREFIX: &str = "/uksh";
const IDENTITY: &str = "aws-kms-xks-a";
const AKID_A: &str = "AKIAI2SFODNN7EXAMPLE";
const SECRET_A: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";
const AKID_B: &str = "AKIAI2SFODNN7EXAMPL2";
const SECRET_B: &str = "VU6W2byoiBrhDqNGbx703oL0syCAmhlQgwNUT1234567";
const KEY: &str = "tenants/a/keys/ehr";
const EXTERNAL: &str = "ehr-2024";

fn credentials_file(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(id, secret)| {
            format!("[[credential]]\naccess_key_id = \"{id}\"\nsecret_access_key = \"{secret}\"\n")
        })
        .collect()
}

/// A deployment with `[xks]`: one prefix for tenant `a` acting as `IDENTITY` (role service,
/// keys `ehr` and `pacs`), credentials A, external id `ehr-2024` mapped to key `ehr`.
fn deployment(backend: Backend, extra_xks: &str, extra_hsm: &str) -> Deployment {
    let d = Deployment::with(backend, "", extra_hsm);
    let mut policy = std::fs::read_to_string(&d.policy_path).unwrap();
    policy.push_str(&format!(
        "\n[[identity]]\nname = \"{IDENTITY}\"\ntenant = \"a\"\nroles = [\"service\"]\nkeys = [\"ehr\", \"pacs\"]\n"
    ));
    std::fs::write(&d.policy_path, policy).unwrap();
    let creds = d.dir().join("xks-credentials.toml");
    std::fs::write(&creds, credentials_file(&[(AKID_A, SECRET_A)])).unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = std::fs::read_to_string(&d.config_path).unwrap();
    config.push_str(&format!(
        "\n[xks]\nlisten = \"127.0.0.1:0\"\nping_listen = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server.key\"\nregion = \"{REGION}\"\n{extra_xks}\n\
         [[xks.prefix]]\npath = \"{PREFIX}\"\nidentity = \"{IDENTITY}\"\ncredentials = \"xks-credentials.toml\"\n\
         allowed_principals = [\"arn:aws:iam::123456789012:*\"]\n\
         keys = {{ \"{EXTERNAL}\" = \"ehr\", \"pacs\" = \"pacs\", \"unlisted\" = \"lab\" }}\n"
    ));
    std::fs::write(&d.config_path, config).unwrap();
    d
}

struct Proxy {
    server: TestServer,
}

impl Proxy {
    async fn start(d: Deployment) -> Self {
        let server = TestServer::start_on(d).await;
        let officer = server.client(OFFICER_A).await;
        create_key(&officer, KEY).await;
        Self { server }
    }

    async fn client(&self, version: HttpVersion) -> XksClient {
        let mut roots = rustls::RootCertStore::empty();
        for ca in tresor::pki::load_certs(&self.server.deployment.dir().join("ca.pem")).unwrap() {
            roots.add(ca).unwrap();
        }
        XksClient::connect(
            self.server.xks.0.unwrap(),
            "localhost",
            roots,
            version,
            None,
        )
        .await
        .unwrap()
    }

    async fn officer(&self) -> tresor::client::Client {
        self.server.client(OFFICER_A).await
    }
}

fn metadata(operation: &str) -> Value {
    json!({
        "awsPrincipalArn": "arn:aws:iam::123456789012:user/Alice",
        "kmsKeyArn": "arn:aws:kms:eu-central-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "kmsOperation": operation,
        "kmsRequestId": format!("req-{operation}-4112f4d6"),
        "kmsViaService": "ebs"
    })
}

/// A request signed by `aws-sigv4` as AWS KMS signs it.
fn signed(
    client: &XksClient,
    path: &str,
    body: &Value,
    credential: (&str, &str),
    time: SystemTime,
) -> http::Request<Bytes> {
    signed_for_host(client, path, body, credential, time, None)
}

/// [`signed`], with the signed `host` replaced by `host` when given.
fn signed_for_host(
    client: &XksClient,
    path: &str,
    body: &Value,
    (akid, secret): (&str, &str),
    time: SystemTime,
    host: Option<&str>,
) -> http::Request<Bytes> {
    let body = Bytes::from(body.to_string());
    let mut request = client.request(
        http::Method::POST,
        &format!("{PREFIX}/kms/xks/v1{path}"),
        body.clone(),
    );
    if let Some(host) = host {
        request
            .headers_mut()
            .insert(http::header::HOST, host.parse().unwrap());
    }
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    let identity = Credentials::new(akid, secret, None, None, "xks-test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("kms-xks-proxy")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let uri = request.uri().to_string();
    let signable = SignableRequest::new(
        "POST",
        &uri,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(&body),
    )
    .unwrap();
    let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
        .unwrap()
        .into_parts();
    instructions.apply_to_request_http1x(&mut request);
    request
}

async fn call(
    client: &mut XksClient,
    path: &str,
    body: &Value,
    credential: (&str, &str),
    time: SystemTime,
) -> (u16, Value) {
    let (status, body) = client
        .send(signed(client, path, body, credential, time))
        .await
        .unwrap();
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status.as_u16(), value)
}

async fn ok(client: &mut XksClient, path: &str, body: &Value) -> Value {
    let (status, value) = call(client, path, body, (AKID_A, SECRET_A), SystemTime::now()).await;
    assert_eq!(status, 200, "{path}: {value}");
    value
}

async fn refused(
    client: &mut XksClient,
    path: &str,
    body: &Value,
    status: u16,
    name: &str,
) -> String {
    let (got, value) = call(client, path, body, (AKID_A, SECRET_A), SystemTime::now()).await;
    assert_eq!(
        (got, value["errorName"].as_str()),
        (status, Some(name)),
        "{path}: {value}"
    );
    let message = value["errorMessage"].as_str().unwrap_or("").to_owned();
    assert!(message.len() < 512 && message.bytes().all(|b| (0x20..=0x7e).contains(&b)));
    message
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(v: &Value) -> Vec<u8> {
    B64.decode(v.as_str().unwrap()).unwrap()
}

fn encrypt_body(plaintext: &[u8], aad: Option<&[u8]>, cdiv: bool) -> Value {
    let mut body = json!({
        "requestMetadata": metadata("GenerateDataKey"),
        "plaintext": b64(plaintext),
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    if cdiv {
        body["ciphertextDataIntegrityValueAlgorithm"] = json!("SHA_256");
    }
    body
}

fn decrypt_body(encrypted: &Value, aad: Option<&[u8]>) -> Value {
    let mut body = json!({
        "requestMetadata": metadata("Decrypt"),
        "ciphertext": encrypted["ciphertext"],
        "ciphertextMetadata": encrypted["ciphertextMetadata"],
        "initializationVector": encrypted["initializationVector"],
        "authenticationTag": encrypted["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    });
    if let Some(aad) = aad {
        body["additionalAuthenticatedData"] = json!(b64(aad));
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_works_over_http1_and_http2_and_every_call_is_audited() {
    let proxy = Proxy::start(deployment(Backend::SoftHsm, "", "")).await;
    let key_path = format!("/keys/{EXTERNAL}");
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let mut client = proxy.client(version).await;
        let health = ok(
            &mut client,
            "/health",
            &json!({ "requestMetadata": { "kmsRequestId": "h-1", "kmsOperation": "KmsHealthCheck" } }),
        )
        .await;
        assert_eq!(health["xksProxyFleetSize"], 1);
        assert_eq!(health["xksProxyVendor"], "Tresor");
        assert_eq!(health["ekmVendor"], "SoftHSM project");
        assert_eq!(health["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");

        let meta = ok(
            &mut client,
            &format!("{key_path}/metadata"),
            &json!({ "requestMetadata": metadata("DescribeKey") }),
        )
        .await;
        assert_eq!(
            meta,
            json!({ "keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED" })
        );

        // The spec's sizes: 4,300 bytes of plaintext, 8,192 of AAD.
        let plaintext = vec![0x5a; 4300];
        let aad = vec![0xa5; 8192];
        let encrypted = ok(
            &mut client,
            &format!("{key_path}/encrypt"),
            &encrypt_body(&plaintext, Some(&aad), true),
        )
        .await;
        let (ciphertext, iv, tag, cmeta) = (
            unb64(&encrypted["ciphertext"]),
            unb64(&encrypted["initializationVector"]),
            unb64(&encrypted["authenticationTag"]),
            unb64(&encrypted["ciphertextMetadata"]),
        );
        assert_eq!((ciphertext.len(), iv.len(), tag.len()), (4300, 12, 16));
        assert!(cmeta.len() <= 20);
        // The integrity value is SHA-256 over aad ‖ metadata ‖ iv ‖ ciphertext ‖ tag.
        let mut hashed = aad.clone();
        for part in [&cmeta, &iv, &ciphertext, &tag] {
            hashed.extend_from_slice(part);
        }
        let expected = ring::digest::digest(&ring::digest::SHA256, &hashed);
        assert_eq!(
            unb64(&encrypted["ciphertextDataIntegrityValue"]),
            expected.as_ref()
        );

        let decrypted = ok(
            &mut client,
            &format!("{key_path}/decrypt"),
            &decrypt_body(&encrypted, Some(&aad)),
        )
        .await;
        assert_eq!(unb64(&decrypted["plaintext"]), plaintext);

        // Without AAD and without an integrity value.
        let plain = ok(
            &mut client,
            &format!("{key_path}/encrypt"),
            &encrypt_body(b"k", None, false),
        )
        .await;
        assert!(plain.get("ciphertextDataIntegrityValue").is_none());
        let back = ok(
            &mut client,
            &format!("{key_path}/decrypt"),
            &decrypt_body(&plain, None),
        )
        .await;
        assert_eq!(unb64(&back["plaintext"]), b"k");
    }

    // Load balancers: GET /ping on the API port and on the plain-HTTP ping port.
    let ping = proxy.server.xks.1.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(ping).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        b"GET /ping HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut tcp, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut client = proxy.client(HttpVersion::Http1).await;
    let request = client.request(http::Method::GET, "/ping", Bytes::new());
    let (status, _) = client.send(request).await.unwrap();
    assert_eq!(status, 200);

    // A probe of a path that is no API operation is refused and audited too.
    let probe = client.request(
        http::Method::POST,
        "/admin/kms/xks/v1/health",
        Bytes::from_static(b"{}"),
    );
    assert_eq!(client.send(probe).await.unwrap().0, 404);

    // Every call is in the verified audit log, with what CloudTrail shows.
    let auditor = proxy.server.client(AUDITOR_A).await;
    let items = verified_export(&auditor).await;
    let xks: Vec<&record::Record> = items
        .iter()
        .filter_map(|i| match i {
            ExportItem::Record(r) if r.body.operation.starts_with("Xks") => Some(r),
            _ => None,
        })
        .collect();
    let encrypts: Vec<_> = xks
        .iter()
        .filter(|r| r.body.operation == "XksEncrypt")
        .collect();
    assert_eq!(encrypts.len(), 4);
    let e = encrypts[0];
    assert_eq!(e.body.kms_request_id, "req-GenerateDataKey-4112f4d6");
    assert_eq!(e.body.kms_operation, "GenerateDataKey");
    assert_eq!(
        e.body.aws_principal_arn,
        "arn:aws:iam::123456789012:user/Alice"
    );
    assert!(e.body.kms_key_arn.starts_with("arn:aws:kms:eu-central-1"));
    assert_eq!(
        (e.body.caller.as_str(), e.body.key.as_str()),
        (IDENTITY, KEY)
    );
    assert_eq!(e.body.key_version, format!("{KEY}/versions/1"));
    assert_eq!(e.body.fingerprint, format!("sigv4:{AKID_A}"));
    assert!(!e.body.aad_hmac.is_empty());
    assert_eq!(
        xks.iter()
            .filter(|r| r.body.operation == "XksGetHealthStatus")
            .count(),
        2
    );
    assert!(
        xks.iter()
            .filter(|r| r.body.operation == "XksGetHealthStatus")
            .all(|r| r.tenant == "a"),
        "health checks belong to the prefix's tenant"
    );
    let probes: Vec<_> = xks
        .iter()
        .filter(|r| r.body.operation == "XksInvalidPath")
        .collect();
    assert_eq!(probes.len(), 1);
    assert_eq!(
        (
            probes[0].body.status_code,
            probes[0].body.outcome.as_str(),
            probes[0].tenant.as_str()
        ),
        (404, "FAILED", "")
    );
    proxy.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_name_comes_from_the_input_that_should_produce_it() {
    let proxy = Proxy::start(deployment(Backend::SoftHsm, "", "")).await;
    let mut c = proxy.client(HttpVersion::Http2).await;
    let key = format!("/keys/{EXTERNAL}");
    let encrypt = format!("{key}/encrypt");
    let decrypt = format!("{key}/decrypt");
    let aad: &[u8] = b"project=nile,department=marketing";
    let good = ok(
        &mut c,
        &encrypt,
        &encrypt_body(b"data key", Some(aad), false),
    )
    .await;

    // ValidationException: a missing field, a field that is not Base64, missing metadata.
    let mut missing = encrypt_body(b"x", None, false);
    missing.as_object_mut().unwrap().remove("plaintext");
    refused(&mut c, &encrypt, &missing, 400, "ValidationException").await;
    let mut not_b64 = encrypt_body(b"x", None, false);
    not_b64["plaintext"] = json!("not base64!");
    refused(&mut c, &encrypt, &not_b64, 400, "ValidationException").await;
    let mut no_id = encrypt_body(b"x", None, false);
    no_id["requestMetadata"]
        .as_object_mut()
        .unwrap()
        .remove("kmsRequestId");
    refused(&mut c, &encrypt, &no_id, 400, "ValidationException").await;
    refused(
        &mut c,
        &encrypt,
        &json!({"requestMetadata": 5}),
        400,
        "ValidationException",
    )
    .await;

    // InvalidCiphertextException: ciphertext, tag, IV, AAD or metadata changed.
    for (field, tamper) in [
        ("ciphertext", 0usize),
        ("authenticationTag", 3),
        ("initializationVector", 5),
        ("ciphertextMetadata", 9),
    ] {
        let mut bytes = unb64(&good[field]);
        bytes[tamper] ^= 1;
        let mut edited = good.clone();
        edited[field] = json!(b64(&bytes));
        refused(
            &mut c,
            &decrypt,
            &decrypt_body(&edited, Some(aad)),
            400,
            "InvalidCiphertextException",
        )
        .await;
    }
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&good, Some(b"project=nile,department=sales")),
        400,
        "InvalidCiphertextException",
    )
    .await;
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&good, None),
        400,
        "InvalidCiphertextException",
    )
    .await;
    // The metadata moved into the AAD (the spec's example) does not authenticate either.
    let mut moved = good.clone();
    moved.as_object_mut().unwrap().remove("ciphertextMetadata");
    let meta_as_aad = unb64(&good["ciphertextMetadata"]);
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&moved, Some(&meta_as_aad)),
        400,
        "InvalidCiphertextException",
    )
    .await;
    // A ciphertext of another key (same tenant) is refused for this one.
    let officer = proxy.officer().await;
    create_key(&officer, "tenants/a/keys/pacs").await;
    let of_pacs = ok(
        &mut c,
        "/keys/pacs/encrypt",
        &encrypt_body(b"x", None, false),
    )
    .await;
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&of_pacs, None),
        400,
        "InvalidCiphertextException",
    )
    .await;

    // KeyNotFoundException: an id not mapped, a mapped key that does not exist.
    refused(
        &mut c,
        "/keys/nope/metadata",
        &json!({"requestMetadata": metadata("DescribeKey")}),
        404,
        "KeyNotFoundException",
    )
    .await;
    // AccessDeniedException: a key outside the identity's key patterns, another principal.
    refused(
        &mut c,
        "/keys/unlisted/metadata",
        &json!({"requestMetadata": metadata("DescribeKey")}),
        403,
        "AccessDeniedException",
    )
    .await;
    let mut stranger = encrypt_body(b"x", None, false);
    stranger["requestMetadata"]["awsPrincipalArn"] =
        json!("arn:aws:iam::999999999999:user/Mallory");
    refused(&mut c, &encrypt, &stranger, 403, "AccessDeniedException").await;

    // InvalidUriPathException: an unknown prefix or operation. GET on an API path: 405.
    let (status, body) = c
        .send(signed(
            &c,
            "/keys/ehr-2024/rotate",
            &json!({}),
            (AKID_A, SECRET_A),
            SystemTime::now(),
        ))
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["errorName"],
        "InvalidUriPathException"
    );
    let other_prefix = c.request(
        http::Method::POST,
        "/other/kms/xks/v1/health",
        Bytes::from_static(b"{}"),
    );
    let (status, body) = c.send(other_prefix).await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["errorName"],
        "InvalidUriPathException"
    );
    let get = c.request(
        http::Method::GET,
        &format!("{PREFIX}/kms/xks/v1{key}/metadata"),
        Bytes::new(),
    );
    assert_eq!(c.send(get).await.unwrap().0, 405);

    // UnsupportedOperationException: another algorithm, more data than the proxy takes.
    let mut cbc = encrypt_body(b"x", None, false);
    cbc["encryptionAlgorithm"] = json!("AES_CBC");
    refused(&mut c, &encrypt, &cbc, 501, "UnsupportedOperationException").await;
    let mut md5 = encrypt_body(b"x", None, true);
    md5["ciphertextDataIntegrityValueAlgorithm"] = json!("MD5");
    refused(&mut c, &encrypt, &md5, 501, "UnsupportedOperationException").await;
    refused(
        &mut c,
        &encrypt,
        &encrypt_body(&vec![0; 65_537], None, false),
        501,
        "UnsupportedOperationException",
    )
    .await;

    // AuthenticationFailedException: wrong secret, unknown key id, no signature, old or
    // future signatures (more than 5 minutes), a body changed after signing.
    let now = SystemTime::now();
    let body = encrypt_body(b"x", None, false);
    // Every one gets the same answer: a caller learns neither whether an access key id exists
    // nor which check failed (the log says).
    let mut messages = std::collections::BTreeSet::new();
    for (credential, time) in [
        ((AKID_A, SECRET_B), now),
        ((AKID_B, SECRET_B), now),
        ((AKID_A, SECRET_A), now - Duration::from_secs(360)),
        ((AKID_A, SECRET_A), now + Duration::from_secs(360)),
    ] {
        let (status, value) = call(&mut c, &encrypt, &body, credential, time).await;
        assert_eq!(
            (status, value["errorName"].as_str()),
            (401, Some("AuthenticationFailedException"))
        );
        messages.insert(value["errorMessage"].as_str().unwrap_or("").to_owned());
    }
    // A request correctly signed for another endpoint (its signed host is not one of this
    // proxy's names) is refused the same way.
    for foreign in [
        "elsewhere.example",
        "elsewhere.example:443",
        "localhost.evil",
    ] {
        let request = signed_for_host(&c, &encrypt, &body, (AKID_A, SECRET_A), now, Some(foreign));
        let (status, answer) = c.send(request).await.unwrap();
        let value: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(
            (status.as_u16(), value["errorName"].as_str()),
            (401, Some("AuthenticationFailedException")),
            "{foreign}"
        );
        messages.insert(value["errorMessage"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(messages.len(), 1, "{messages:?}");
    let (status, _) = call(
        &mut c,
        &encrypt,
        &body,
        (AKID_A, SECRET_A),
        now - Duration::from_secs(240),
    )
    .await;
    assert_eq!(status, 200, "four minutes of skew are accepted");
    let unsigned = c.request(
        http::Method::POST,
        &format!("{PREFIX}/kms/xks/v1{encrypt}"),
        Bytes::from(body.to_string()),
    );
    assert_eq!(c.send(unsigned).await.unwrap().0, 401);
    let mut altered = signed(&c, &encrypt, &body, (AKID_A, SECRET_A), now);
    *altered.body_mut() = Bytes::from(encrypt_body(b"y", None, false).to_string());
    assert_eq!(c.send(altered).await.unwrap().0, 401);

    // InvalidKeyUsageException, and keyUsage reflects it; InvalidStateException for a
    // disabled version.
    let update = |usage: proto::KeyUsage| proto::UpdateKeyRequest {
        key: KEY.into(),
        usage: usage.into(),
        ..Default::default()
    };
    officer
        .admin()
        .update_key(update(proto::KeyUsage::DecryptOnly))
        .await
        .unwrap();
    let meta = ok(
        &mut c,
        &format!("{key}/metadata"),
        &json!({"requestMetadata": metadata("DescribeKey")}),
    )
    .await;
    assert_eq!(meta["keyUsage"], json!(["DECRYPT"]));
    refused(
        &mut c,
        &encrypt,
        &encrypt_body(b"x", None, false),
        400,
        "InvalidKeyUsageException",
    )
    .await;
    ok(&mut c, &decrypt, &decrypt_body(&good, Some(aad))).await;
    officer
        .admin()
        .update_key(update(proto::KeyUsage::EncryptOnly))
        .await
        .unwrap();
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&good, Some(aad)),
        400,
        "InvalidKeyUsageException",
    )
    .await;
    // The check decrypt behind ciphertextDataIntegrityValue is Tresor verifying its own
    // output, not a decrypt the key's usage forbids: an encrypt-only key answers it, with the
    // value, and the ciphertext still cannot be decrypted here.
    let checked = ok(
        &mut c,
        &encrypt,
        &encrypt_body(b"encrypt-only", Some(aad), true),
    )
    .await;
    let value = unb64(&checked["ciphertextDataIntegrityValue"]);
    let mut hashed = aad.to_vec();
    for field in [
        "ciphertextMetadata",
        "initializationVector",
        "ciphertext",
        "authenticationTag",
    ] {
        hashed.extend(unb64(&checked[field]));
    }
    assert_eq!(
        value,
        ring::digest::digest(&ring::digest::SHA256, &hashed).as_ref(),
        "the integrity value covers AAD, metadata, IV, ciphertext and tag"
    );
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&checked, Some(aad)),
        400,
        "InvalidKeyUsageException",
    )
    .await;
    officer
        .admin()
        .update_key(update(proto::KeyUsage::NoUse))
        .await
        .unwrap();
    let meta = ok(
        &mut c,
        &format!("{key}/metadata"),
        &json!({"requestMetadata": metadata("DescribeKey")}),
    )
    .await;
    assert_eq!(meta["keyUsage"], json!([]));
    officer
        .admin()
        .update_key(update(proto::KeyUsage::EncryptDecrypt))
        .await
        .unwrap();
    officer
        .admin()
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .unwrap();
    // Old ciphertexts still decrypt after a rotation (the version comes from the metadata) ...
    ok(&mut c, &decrypt, &decrypt_body(&good, Some(aad))).await;
    officer
        .admin()
        .disable_key_version(proto::KeyVersionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap();
    // ... until that version is disabled.
    refused(
        &mut c,
        &decrypt,
        &decrypt_body(&good, Some(aad)),
        400,
        "InvalidStateException",
    )
    .await;
    proxy.server.stop().await;
}

async fn health_status(c: &mut XksClient, health: &Value, credential: (&str, &str)) -> u16 {
    let request = signed(c, "/health", health, credential, SystemTime::now());
    c.send(request).await.unwrap().0.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_rotate_without_a_restart() {
    let proxy = Proxy::start(deployment(Backend::SoftHsm, "", "")).await;
    let mut c = proxy.client(HttpVersion::Http1).await;
    let health =
        json!({ "requestMetadata": { "kmsRequestId": "h", "kmsOperation": "KmsHealthCheck" } });
    let creds = proxy.server.deployment.dir().join("xks-credentials.toml");
    assert_eq!(
        health_status(&mut c, &health, (AKID_A, SECRET_A)).await,
        200
    );
    assert_eq!(
        health_status(&mut c, &health, (AKID_B, SECRET_B)).await,
        401
    );
    // 1. add the new pair: both work.
    std::fs::write(
        &creds,
        credentials_file(&[(AKID_A, SECRET_A), (AKID_B, SECRET_B)]),
    )
    .unwrap();
    proxy.server.reload();
    assert_eq!(
        health_status(&mut c, &health, (AKID_A, SECRET_A)).await,
        200
    );
    assert_eq!(
        health_status(&mut c, &health, (AKID_B, SECRET_B)).await,
        200
    );
    // 2. a broken file keeps the pairs in force.
    std::fs::write(&creds, "[[credential]]\naccess_key_id = \"short\"\n").unwrap();
    proxy.server.reload();
    assert_eq!(
        health_status(&mut c, &health, (AKID_B, SECRET_B)).await,
        200
    );
    // 3. remove the old pair.
    std::fs::write(&creds, credentials_file(&[(AKID_B, SECRET_B)])).unwrap();
    proxy.server.reload();
    assert_eq!(
        health_status(&mut c, &health, (AKID_A, SECRET_A)).await,
        401
    );
    assert_eq!(
        health_status(&mut c, &health, (AKID_B, SECRET_B)).await,
        200
    );
    proxy.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_absent_hsm_answers_dependency_timeout_or_internal_and_health_says_so() {
    let proxy = Proxy::start(deployment(
        Backend::HsmSim,
        "max_concurrent_requests = 1",
        "call_timeout_ms = 300\ndispatch = \"threads\"",
    ))
    .await;
    let mut c = proxy.client(HttpVersion::Http2).await;
    let encrypt = format!("/keys/{EXTERNAL}/encrypt");
    ok(&mut c, &encrypt, &encrypt_body(b"x", None, false)).await;

    // ThrottlingException: with one request allowed at a time, a burst is partly refused
    // at once instead of queueing.
    let mut burst = Vec::new();
    for _ in 0..32 {
        let request = signed(
            &c,
            &encrypt,
            &encrypt_body(b"x", None, false),
            (AKID_A, SECRET_A),
            SystemTime::now(),
        );
        let mut client = proxy.client(HttpVersion::Http2).await;
        burst.push(tokio::spawn(
            async move { client.send(request).await.unwrap() },
        ));
    }
    let mut codes = Vec::new();
    for b in burst {
        let (status, body) = b.await.unwrap();
        if status == 429 {
            assert_eq!(
                serde_json::from_slice::<Value>(&body).unwrap()["errorName"],
                "ThrottlingException"
            );
        }
        codes.push(status.as_u16());
    }
    assert!(codes.contains(&429), "no request was throttled: {codes:?}");
    assert!(codes.iter().all(|c| *c == 200 || *c == 429), "{codes:?}");

    let token = &proxy.server.deployment.token;
    // hsm-sim re-reads its control file at most every 20 ms.
    let settle = || tokio::time::sleep(Duration::from_millis(100));
    token.faults(&hsm_sim::Faults {
        latency_ms: 1000,
        ..Default::default()
    });
    settle().await;
    refused(
        &mut c,
        &encrypt,
        &encrypt_body(b"x", None, false),
        503,
        "DependencyTimeoutException",
    )
    .await;
    token.faults(&hsm_sim::Faults {
        unplugged: true,
        ..Default::default()
    });
    settle().await;
    refused(
        &mut c,
        &encrypt,
        &encrypt_body(b"x", None, false),
        500,
        "InternalException",
    )
    .await;
    // Health reports the HSM unavailable (checked anew after the failure), and so does ping.
    let health =
        json!({ "requestMetadata": { "kmsRequestId": "h", "kmsOperation": "KmsHealthCheck" } });
    let answer = ok(&mut c, "/health", &health).await;
    assert_eq!(answer["ekmFleetDetails"][0]["healthStatus"], "UNAVAILABLE");
    let ping = c.request(http::Method::GET, "/ping", Bytes::new());
    assert_eq!(c.send(ping).await.unwrap().0, 503);
    token.faults(&hsm_sim::Faults::default());
    proxy.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_only_the_configured_client_subject_gets_in() {
    const KMS: &str = "cks.kms.eu-central-1.amazonaws.com";
    let proxy = Proxy::start(deployment(
        Backend::SoftHsm,
        &format!("client_ca = \"ca.pem\"\nclient_subject = \"{KMS}\""),
        "",
    ))
    .await;
    let d = &proxy.server.deployment;
    let identity = |cn: &str| {
        let (cert, key) = (
            d.dir().join(format!("{cn}.pem")),
            d.dir().join(format!("{cn}.key")),
        );
        d.ca.issue_client(cn, tresor::pki::Validity::default())
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        (
            tresor::pki::load_certs(&cert).unwrap(),
            tresor::pki::load_key(&key).unwrap(),
        )
    };
    let roots = || {
        let mut roots = rustls::RootCertStore::empty();
        for ca in tresor::pki::load_certs(&d.dir().join("ca.pem")).unwrap() {
            roots.add(ca).unwrap();
        }
        roots
    };
    let addr = proxy.server.xks.0.unwrap();
    let health =
        json!({ "requestMetadata": { "kmsRequestId": "h", "kmsOperation": "KmsHealthCheck" } });
    let status =
        |identity| async {
            let mut client =
                match XksClient::connect(addr, "localhost", roots(), HttpVersion::Http1, identity)
                    .await
                {
                    Ok(c) => c,
                    Err(_) => return None,
                };
            let request = signed(
                &client,
                "/health",
                &health,
                (AKID_A, SECRET_A),
                SystemTime::now(),
            );
            client.send(request).await.ok().map(|(s, _)| s.as_u16())
        };
    assert_eq!(status(Some(identity(KMS))).await, Some(200));
    assert_eq!(
        status(Some(identity("cks.kms.us-east-1.amazonaws.com"))).await,
        None
    );
    assert_eq!(status(None).await, None);
    proxy.server.stop().await;
}

/// The whole configuration is checked before the HSM is opened: a credentials file the proxy
/// would refuse is a configuration error, and the token stays untouched (no audit, integrity
/// or health-check key was created in it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_credentials_file_is_refused_before_the_hsm_is_touched() {
    let d = deployment(Backend::HsmSim, "", "");
    let creds = d.dir().join("xks-credentials.toml");
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = tresor::config::Config::load(&d.config_path).unwrap();
    let hsm_config = config.hsm.clone();
    let err = tresor::server::Server::prepare(config).await.unwrap_err();
    let tresor::server::StartError::Config(c) = &err else {
        panic!("expected a configuration error, got {err}");
    };
    assert_eq!(c.key, "xks.prefix.credentials", "{err}");
    assert_eq!(err.kind(), tresor::server::StartFailure::Config);
    let hsm = tresor::hsm::Hsm::open(&hsm_config).unwrap();
    assert!(
        hsm.list_secret_keys().await.unwrap().is_empty(),
        "the refused start created keys in the token"
    );
}

/// A client that trickles its request headers is closed after the header time, and the
/// proxy keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start(deployment(
        Backend::HsmSim,
        "limits = { header_timeout_secs = 1 }",
        "",
    ))
    .await;
    let mut tls = raw_http1(&proxy).await;
    let started = std::time::Instant::now();
    let trickle = async {
        tls.write_all(b"POST /x HTTP/1.1\r\nHo").await?;
        for byte in b"st: localhost\r\nX-A: " {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tls.write_all(&[*byte]).await?;
        }
        let mut buf = [0u8; 256];
        loop {
            if tls.read(&mut buf).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(8), trickle)
        .await
        .expect("a client trickling its headers was served for more than 8 s");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let mut client = proxy.client(HttpVersion::Http1).await;
    ok(
        &mut client,
        &format!("/keys/{EXTERNAL}/metadata"),
        &json!({"requestMetadata": metadata("DescribeKey")}),
    )
    .await;
}

/// A TLS connection to the proxy speaking HTTP/1.1, for requests no well-behaved client sends.
async fn raw_http1(proxy: &Proxy) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in tresor::pki::load_certs(&proxy.server.deployment.dir().join("ca.pem")).unwrap() {
        roots.add(ca).unwrap();
    }
    let config =
        tresor::xks::client::tls_config(roots, tresor::xks::client::HttpVersion::Http1, None)
            .unwrap();
    let tcp = tokio::net::TcpStream::connect(proxy.server.xks.0.unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// A request whose headers do not authenticate is refused before its body is read: a client
/// that announces a large body and never sends it gets its 401 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_is_read_only_after_the_headers_authenticate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start(deployment(Backend::HsmSim, "", "")).await;
    let mut tls = raw_http1(&proxy).await;
    let amz_date = "20261201T120000Z";
    let head = format!(
        "POST {PREFIX}/kms/xks/v1/keys/{EXTERNAL}/encrypt HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: 200000\r\nx-amz-date: {amz_date}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=AKIAUNKNOWNUNKNOWN22/20261201/{REGION}/kms-xks-proxy/aws4_request, \
         SignedHeaders=host;x-amz-date, Signature={}\r\n\r\n",
        "0".repeat(64)
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = tls.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                return;
            }
        }
    })
    .await;
    assert!(got.is_ok(), "no answer while the announced body is missing");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// The hospital's rule for AWS: its key may be used only through EBS and S3, only from its own
/// VPC endpoint, and never to re-encrypt; the proxy decides on KMS's request metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_decide_on_aws_request_metadata() {
    let d = deployment(Backend::SoftHsm, "", "");
    let mut policy = std::fs::read_to_string(&d.policy_path).unwrap();
    policy.push_str(
        r#"
[[access_rule]]
id = "ebs-s3-from-our-endpoint"
tenant = "a"
keys = ["ehr"]
front_end = "xks"
operations = ["Encrypt", "Decrypt", "GenerateDataKey*"]
aws_principals = ["arn:aws:iam::123456789012:*"]
kms_via_services = ["ebs", "s3"]
aws_source_vpces = ["vpce-0a1b2c3d4e5f"]
decision = "allow"

[[access_rule]]
id = "never-re-encrypt"
tenant = "a"
keys = ["ehr"]
operations = ["ReEncrypt*"]
decision = "deny"
"#,
    );
    std::fs::write(&d.policy_path, policy).unwrap();
    let proxy = Proxy::start(d).await;
    create_key(&proxy.officer().await, "tenants/a/keys/pacs").await;
    let mut client = proxy.client(HttpVersion::Http2).await;
    let key_path = format!("/keys/{EXTERNAL}");
    let with = |mut body: Value, op: &str, via: Option<&str>, vpce: Option<&str>| {
        let meta = &mut body["requestMetadata"];
        meta["kmsOperation"] = json!(op);
        match via {
            Some(v) => meta["kmsViaService"] = json!(v),
            None => {
                meta.as_object_mut().unwrap().remove("kmsViaService");
            }
        }
        if let Some(e) = vpce {
            meta["awsSourceVpce"] = json!(e);
        }
        body
    };
    let ours = Some("vpce-0a1b2c3d4e5f");
    let encrypted = ok(
        &mut client,
        &format!("{key_path}/encrypt"),
        &with(
            encrypt_body(b"dek", None, false),
            "GenerateDataKey",
            Some("ebs"),
            ours,
        ),
    )
    .await;
    let decrypt = decrypt_body(&encrypted, None);
    let back = ok(
        &mut client,
        &format!("{key_path}/decrypt"),
        &with(decrypt.clone(), "Decrypt", Some("s3"), ours),
    )
    .await;
    assert_eq!(unb64(&back["plaintext"]), b"dek");
    // Directly (no service), via RDS, from another endpoint, without an endpoint: no rule
    // matches, and a key with rules is denied by default.
    for (via, vpce) in [
        (None, ours),
        (Some("rds"), ours),
        (Some("ebs"), Some("vpce-ffffffff")),
        (Some("ebs"), None),
    ] {
        let message = refused(
            &mut client,
            &format!("{key_path}/decrypt"),
            &with(decrypt.clone(), "Decrypt", via, vpce),
            403,
            "AccessDeniedException",
        )
        .await;
        assert!(message.contains("default-deny"), "{message}");
    }
    let message = refused(
        &mut client,
        &format!("{key_path}/decrypt"),
        &with(decrypt.clone(), "ReEncryptFrom", Some("ebs"), ours),
        403,
        "AccessDeniedException",
    )
    .await;
    assert!(message.contains("never-re-encrypt"), "{message}");
    // The rule names the rule, not its contents.
    assert!(
        !message.contains("vpce") && !message.contains("ebs"),
        "{message}"
    );
    // A key without rules behaves as before.
    ok(
        &mut client,
        "/keys/pacs/encrypt",
        &with(encrypt_body(b"x", None, false), "Encrypt", None, None),
    )
    .await;

    // Every decision is in the log with its rule and the metadata it was made on.
    let auditor = proxy.server.client(AUDITOR_A).await;
    let records: Vec<_> = verified_export(&auditor)
        .await
        .into_iter()
        .filter_map(|i| match i {
            ExportItem::Record(r)
                if r.body.operation.starts_with("XksEn")
                    || r.body.operation.starts_with("XksDe") =>
            {
                Some(r.body)
            }
            _ => None,
        })
        .collect();
    let allowed: Vec<_> = records
        .iter()
        .filter(|b| b.access_rule == "ebs-s3-from-our-endpoint")
        .collect();
    assert_eq!(allowed.len(), 2, "{records:#?}");
    assert!(allowed.iter().all(|b| b.outcome == "OK"
        && b.aws_source_vpce == "vpce-0a1b2c3d4e5f"
        && ["ebs", "s3"].contains(&b.kms_via_service.as_str())));
    let refusals: Vec<_> = records
        .iter()
        .filter(|b| b.outcome == "RULE_DENIED")
        .collect();
    assert_eq!(refusals.len(), 5, "{records:#?}");
    assert!(
        refusals
            .iter()
            .any(|b| b.kms_via_service == "rds" && b.access_rule == "default-deny")
    );
    assert!(
        refusals
            .iter()
            .any(|b| b.kms_operation == "ReEncryptFrom" && b.access_rule == "never-re-encrypt")
    );
    assert!(
        records.iter().any(|b| b.key == "tenants/a/keys/pacs"
            && b.outcome == "OK"
            && b.access_rule.is_empty())
    );
}
