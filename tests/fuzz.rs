//! Property-based fuzzing of every parser that reads bytes from outside: the blob format, XKS
//! JSON bodies and SigV4 headers, KMIP's TTLV messages, audit export files (`tresor audit verify` reads files an
//! auditor received from elsewhere), and the configuration, policy and credentials files.
//!
//! The property is the same for each: any input gives a value or a clean error, never a panic,
//! and what a parser accepts survives its own round trip where it has one. The generators mix
//! random bytes with mutations of valid inputs, so the fuzzer gets past the first checks.
//! `scripts/test` runs a short seeded pass (`TRESOR_FUZZ_CASES`, default 128 per parser);
//! `scripts/fuzz` runs a long one.
//!
//! The toolchain is stable Rust, where coverage-guided fuzzers (cargo-fuzz) need nightly;
//! proptest's shrinking still reduces a failure to a small input.

mod common;

use std::time::SystemTime;

use proptest::prelude::*;
use tresor::kmip::ttlv::{Ttlv, tag};

fn config() -> ProptestConfig {
    let cases = std::env::var("TRESOR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A valid input with a few bytes replaced, inserted or cut.
fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len().max(1);
    proptest::collection::vec((0..len, any::<u8>(), 0u8..3), 0..8).prop_map(move |edits| {
        let mut out = valid.clone();
        for (at, byte, kind) in edits {
            let at = at.min(out.len());
            match kind {
                0 if at < out.len() => out[at] = byte,
                1 => out.insert(at, byte),
                _ => out.truncate(at),
            }
        }
        out
    })
}

/// Random bytes, or a mutation of one of `valid`.
fn input(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let mutations = proptest::sample::select(valid).prop_flat_map(mutated);
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..512), mutations]
}

/// A KMIP request message: a header and one batch item of `operation` with `payload`.
fn kmip_request(operation: u32, payload: Vec<Ttlv>) -> Vec<u8> {
    tresor::kmip::ttlv::encode(&tresor::kmip::message::request((1, 4), operation, payload)).to_vec()
}

/// Any TTLV item, nested up to four structures deep.
fn ttlv_item() -> impl Strategy<Value = Ttlv> {
    use tresor::kmip::ttlv::Value;
    let tag = 0x42_0000u32..0x42_0140;
    let leaf = (
        tag.clone(),
        prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::LongInteger),
            proptest::collection::vec(any::<u8>(), 1..3)
                .prop_map(|v| Value::BigInteger(v.iter().flat_map(|b| [*b; 8]).collect())),
            any::<u32>().prop_map(Value::Enumeration),
            any::<bool>().prop_map(Value::Boolean),
            ".{0,20}".prop_map(Value::TextString),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|v| Value::ByteString(zeroize::Zeroizing::new(v))),
            any::<i64>().prop_map(Value::DateTime),
            any::<u32>().prop_map(Value::Interval),
        ],
    )
        .prop_map(|(tag, value)| Ttlv { tag, value });
    leaf.prop_recursive(4, 64, 8, move |inner| {
        (tag.clone(), proptest::collection::vec(inner, 0..8))
            .prop_map(|(tag, items)| Ttlv::structure(tag, items))
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn blobs(bytes in input(vec![
        {
            let mut b = vec![1u8];
            b.extend_from_slice(&[7; 16]);
            b.extend_from_slice(&[9; 12]);
            b.extend_from_slice(&[3; 32]);
            b
        },
    ])) {
        if let Ok(blob) = tresor::envelope::parse(&bytes) {
            // What parses names its version and keeps ciphertext and tag.
            prop_assert!(blob.sealed.len() >= 16);
        }
    }

    #[test]
    fn xks_bodies(bytes in input(vec![
        br#"{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::1:root","kmsOperation":"Encrypt","kmsRequestId":"r","kmsKeyArn":"arn:aws:kms:eu-central-1:1:key/k"},"plaintext":"AAEC","encryptionAlgorithm":"AES_GCM","additionalAuthenticatedData":"cHJvamVjdA==","ciphertextDataIntegrityValueAlgorithm":"SHA_256"}"#.to_vec(),
        br#"{"requestMetadata":{"awsPrincipalArn":"a","kmsOperation":"Decrypt","kmsRequestId":"r"},"ciphertext":"AAEC","ciphertextMetadata":"AQ==","encryptionAlgorithm":"AES_GCM","initializationVector":"AAAAAAAAAAAAAAAA","authenticationTag":"AAAAAAAAAAAAAAAAAAAAAA=="}"#.to_vec(),
        br#"{"requestMetadata":{"kmsOperation":"DescribeKey","kmsRequestId":"r"}}"#.to_vec(),
    ])) {
        use tresor::xks::wire;
        if let Ok(r) = serde_json::from_slice::<wire::EncryptRequest>(&bytes) {
            let _ = wire::optional("plaintext", r.plaintext.as_ref(), tresor::xks::MAX_DATA);
            let _ = wire::optional("aad", r.additional_authenticated_data.as_ref(), tresor::xks::MAX_AAD);
            if let Some(m) = &r.request_metadata {
                let _ = m.check(true, true);
            }
        }
        if let Ok(r) = serde_json::from_slice::<wire::DecryptRequest>(&bytes) {
            for field in [&r.ciphertext, &r.ciphertext_metadata, &r.initialization_vector, &r.authentication_tag] {
                let _ = wire::required("field", field.as_ref(), tresor::xks::MAX_DATA);
            }
        }
        let _ = serde_json::from_slice::<wire::MetadataOnly>(&bytes);
    }

    #[test]
    fn sigv4_headers(auth in input(vec![
        b"AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261201/eu-central-1/kms-xks-proxy/aws4_request, SignedHeaders=host;x-amz-date, Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024".to_vec(),
    ]), date in input(vec![b"20261201T120000Z".to_vec()])) {
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_bytes(&auth) {
            headers.insert(http::header::AUTHORIZATION, v);
        }
        if let Ok(v) = http::HeaderValue::from_bytes(&date) {
            headers.insert("x-amz-date", v);
        }
        headers.insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
        let credentials = [tresor::xks::sigv4::Credential::new(
            "AKIAIOSFODNN7EXAMPLE".into(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY0123".into(),
        )];
        let request = tresor::xks::sigv4::Request {
            method: "POST",
            path: "/p/kms/xks/v1/keys/k/encrypt",
            query: "",
            headers: &headers,
            authority: None,
            body: b"{}",
        };
        // A fuzzed signature never verifies (the probability is 2^-256).
        prop_assert!(tresor::xks::sigv4::verify(&request, &credentials, "eu-central-1", SystemTime::now()).is_err());
    }

    #[test]
    fn audit_export_files(bytes in input(vec![
        br#"{"type":"record","seq":1,"time":"2026-12-01T00:00:00Z","time_ms":1,"tenant":"a","request_id":"r","caller":"c","role":"service","operation":"Wrap","outcome":"OK","status_code":0,"previous_hash":"0000000000000000000000000000000000000000000000000000000000000000","hash":"00"}
{"type":"checkpoint","seq":1,"time":"2026-12-01T00:00:00Z","time_ms":1,"hash":"00","signature":"00"}
"#.to_vec(),
        b"type,seq,time\nrecord,1,x\n".to_vec(),
    ])) {
        if let Ok(rows) = tresor::audit::file::read(&text(&bytes)) {
            let items: Result<Vec<_>, _> = rows.iter().map(tresor::audit::file::Row::to_item).collect();
            if let Ok(items) = items {
                // An arbitrary file never verifies against a key that signed nothing in it.
                let point = [4u8; 65];
                let _ = tresor::audit_record::verify(&items, &point);
            }
        }
    }

    #[test]
    fn kmip_messages(bytes in input(vec![
        kmip_request(0x0A, vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, "0123456789abcdef0123456789abcdef")]),
        kmip_request(0x01, vec![
            Ttlv::enumeration(tag::OBJECT_TYPE, 2),
            Ttlv::structure(tag::TEMPLATE_ATTRIBUTE, vec![
                tresor::kmip::message::attribute("Cryptographic Algorithm", tresor::kmip::ttlv::Value::Enumeration(3)),
                tresor::kmip::message::attribute("Cryptographic Length", tresor::kmip::ttlv::Value::Integer(256)),
                tresor::kmip::message::attribute("Name", tresor::kmip::ttlv::Value::Structure(vec![
                    Ttlv::text(tag::NAME_VALUE, "vsan"),
                    Ttlv::enumeration(tag::NAME_TYPE, 1),
                ])),
            ]),
        ]),
        kmip_request(0x1E, vec![tresor::kmip::message::version_item((1, 2))]),
    ])) {
        // Any bytes decode or fail cleanly; what decodes re-encodes to the same bytes and is
        // read as a request or refused with a reason.
        if let Ok(item) = tresor::kmip::ttlv::decode(&bytes) {
            let again = tresor::kmip::ttlv::encode(&item);
            prop_assert_eq!(again.as_slice(), &bytes[..]);
            let _ = tresor::kmip::message::parse_request(&item);
        }
    }

    #[test]
    fn ttlv_round_trips(item in ttlv_item()) {
        let bytes = tresor::kmip::ttlv::encode(&item);
        prop_assert_eq!(tresor::kmip::ttlv::decode(&bytes), Ok(item));
    }

    #[test]
    fn policy_files(bytes in input(vec![
        common::POLICY.as_bytes().to_vec(),
        format!("{}{RULES}", common::POLICY).into_bytes(),
    ])) {
        // A policy that parses also decides, on any call, without panicking.
        if let Ok(policy) = tresor::auth::Policy::from_toml(&text(&bytes), "fuzz") {
            for (key, identity) in [("ehr-1", common::SERVICE_A), ("", ""), ("x*y", "*")] {
                let _ = policy.rules().decide(
                    &tresor::model::Tenant::new("a").unwrap(),
                    key,
                    identity,
                    &xks_context(),
                );
            }
        }
    }

    #[test]
    fn access_rule_patterns(pattern in "[a-z*:/-]{0,12}", value in "[a-z*:/-]{0,16}") {
        // Any pattern compiles, and matching any value terminates with an answer.
        let policy = format!(
            "[[access_rule]]\nid = \"r\"\ntenant = \"a\"\nfront_end = \"xks\"\nkms_via_services = [{pattern:?}]\ndecision = \"allow\"\n"
        );
        let policy = tresor::auth::Policy::from_toml(&policy, "fuzz").unwrap();
        let mut ctx = xks_context();
        if let Some(aws) = ctx.aws.as_mut() {
            aws.via_service = Some(value.clone());
        }
        let verdict = policy.rules().decide(&tresor::model::Tenant::new("a").unwrap(), "k", "i", &ctx);
        if pattern == value {
            prop_assert_eq!(&verdict, &tresor::auth::Verdict::Allow("r".into()));
        }
        if !pattern.contains('*') && pattern != value {
            prop_assert_eq!(verdict, tresor::auth::Verdict::Deny(tresor::auth::DEFAULT_DENY.into()));
        }
    }

    #[test]
    fn configuration_files(bytes in input(vec![
        include_bytes!("../deploy/tresor.toml").to_vec(),
    ])) {
        let _ = tresor::config::Config::parse(&text(&bytes), std::path::Path::new("/nonexistent/tresor.toml"));
    }

    #[test]
    fn credentials_files(bytes in input(vec![
        b"[[credential]]\naccess_key_id = \"AKIA2XKSUKSHEXAMPLE01\"\nsecret_access_key = \"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA\"\n".to_vec(),
    ])) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Err(e) = tresor::xks::SharedCredentials::load(&path) {
            // The parser's message never quotes the file (it may hold a secret).
            let message = e.to_string();
            prop_assert!(!message.contains("c2VjcmV0LXNlY3JldC1zZWNyZXQt"), "{message}");
        }
    }
}

const RULES: &str = r#"
[justifications]
codes = ["treatment", "support"]

[[access_rule]]
id = "aws"
tenant = "a"
keys = ["ehr-*"]
front_end = "xks"
operations = ["Decrypt", "GenerateDataKey*"]
kms_via_services = ["ebs", "s3"]
aws_source_vpces = ["vpce-*"]
decision = "allow"

[[access_rule]]
id = "support"
tenant = "a"
keys = ["ehr-*"]
justifications = ["support"]
identities = ["spiffe://*/support"]
decision = "require-approval"
"#;

fn xks_context() -> tresor::auth::AccessContext {
    tresor::auth::AccessContext {
        front_end: tresor::auth::FrontEnd::Xks,
        operation: "Decrypt".into(),
        justification: None,
        aws: Some(tresor::auth::AwsContext {
            kms_operation: Some("Decrypt".into()),
            principal_arn: Some("arn:aws:iam::1:role/x".into()),
            key_arn: None,
            via_service: Some("ebs".into()),
            source_vpc: None,
            source_vpce: Some("vpce-1".into()),
        }),
    }
}
