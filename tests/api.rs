//! End to end: the real server on a loopback port with its own SoftHSM2 token, SQLite file and
//! CA, through the real client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tonic::Code;
use tresor::client::Client;
use tresor::grpc::INVALID_CIPHERTEXT;
use tresor::pki::Validity;
use tresor::proto;

const KEY: &str = "tenants/a/keys/ehr";

async fn create(officer: &Client, key: &str) -> proto::Key {
    officer
        .admin()
        .create_key(proto::CreateKeyRequest {
            key: key.into(),
            description: "test key".into(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn wrap(
    service: &Client,
    key: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<proto::WrapResponse, tonic::Status> {
    service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: key.into(),
            plaintext: plaintext.to_vec(),
            aad: aad.to_vec(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn unwrap(
    service: &Client,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<proto::UnwrapResponse, tonic::Status> {
    service
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: None,
            ciphertext: ciphertext.to_vec(),
            aad: aad.to_vec(),
            key: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    let s = r.expect_err("expected a refusal");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.metadata().get("x-request-id").is_some(),
        "no request id: {s:?}"
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_service_rpc_works_end_to_end() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    create(&officer, KEY).await;

    let response = service
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"dek-1".to_vec(),
            aad: b"record 7".to_vec(),
        })
        .await
        .unwrap();
    assert!(response.metadata().get("x-request-id").is_some());
    let wrapped = response.into_inner();
    assert_eq!(wrapped.key_version, "tenants/a/keys/ehr/versions/1");
    let opened = unwrap(&service, &wrapped.ciphertext, b"record 7")
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"dek-1");
    assert_eq!(opened.key_version, wrapped.key_version);

    let dk = service
        .keys()
        .generate_data_key(proto::GenerateDataKeyRequest {
            justification: None,
            key: KEY.into(),
            aad: b"x".to_vec(),
            length_bytes: 0,
            without_plaintext: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dk.plaintext.len(), 32, "default length");
    assert_eq!(
        unwrap(&service, &dk.ciphertext, b"x")
            .await
            .unwrap()
            .plaintext,
        dk.plaintext
    );
    let blind = service
        .keys()
        .generate_data_key(proto::GenerateDataKeyRequest {
            justification: None,
            key: KEY.into(),
            aad: vec![],
            length_bytes: 64,
            without_plaintext: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(blind.plaintext.is_empty());
    assert_eq!(
        unwrap(&service, &blind.ciphertext, b"")
            .await
            .unwrap()
            .plaintext
            .len(),
        64
    );

    officer
        .admin()
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .unwrap();
    let moved = service
        .keys()
        .rewrap(proto::RewrapRequest {
            justification: None,
            ciphertext: wrapped.ciphertext.clone(),
            aad: b"record 7".to_vec(),
            key: KEY.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(moved.rewrapped);
    assert_eq!(moved.key_version, "tenants/a/keys/ehr/versions/2");
    let again = service
        .keys()
        .rewrap(proto::RewrapRequest {
            justification: None,
            ciphertext: moved.ciphertext.clone(),
            aad: b"record 7".to_vec(),
            key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.rewrapped);
    assert_eq!(again.ciphertext, moved.ciphertext);

    // The envelope helper: the payload is encrypted locally, only the data key travels.
    let sealed = service
        .seal(KEY, b"a 2 MB DICOM image, say", b"study 1")
        .await
        .unwrap();
    assert_eq!(
        service.open(&sealed, b"study 1").await.unwrap().as_slice(),
        b"a 2 MB DICOM image, say"
    );
    assert!(service.open(&sealed, b"study 2").await.is_err());

    // Health says SERVING.
    let health = server.client(SERVICE_A).await.health();
    let status = health
        .clone()
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tresor.v1.KeyService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Server reflection lists the public services.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(service.channel())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "tresor.v1.KeyService",
        "tresor.v1.KeyAdminService",
        "tresor.v1.AuditService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // Tools that still speak v1alpha (grpcio-reflection, Postman, older grpcurl, grpcui,
    // Evans) get the same answers, and can resolve the well-known imports by file name.
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let ask = |m| tonic_reflection::pb::v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let requests = [
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileByFilename(
                "google/protobuf/timestamp.proto".into(),
            )),
            ask(MessageRequest::FileByFilename(
                "google/protobuf/duration.proto".into(),
            )),
            ask(MessageRequest::FileContainingSymbol(
                "tresor.v1.KeyService".into(),
            )),
        ];
        let mut replies = ServerReflectionClient::new(service.channel())
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            replies.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list over v1alpha");
        };
        assert!(
            list.service
                .iter()
                .any(|s| s.name == "tresor.v1.KeyService")
        );
        for wanted in [
            "google/protobuf/timestamp.proto",
            "google/protobuf/duration.proto",
            "tresor/v1/tresor.proto",
        ] {
            let Some(MessageResponse::FileDescriptorResponse(files)) =
                replies.message().await.unwrap().unwrap().message_response
            else {
                panic!("{wanted} not resolved over v1alpha");
            };
            let names: Vec<String> = files
                .file_descriptor_proto
                .iter()
                .map(|f| {
                    <prost_types::FileDescriptorProto as prost::Message>::decode(f.as_slice())
                        .unwrap()
                        .name()
                        .to_owned()
                })
                .collect();
            assert!(
                names.iter().any(|n| n == wanted),
                "{wanted} not in {names:?}"
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_admin_rpc_works_end_to_end() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let mut admin = officer.admin();

    let created = admin
        .create_key(proto::CreateKeyRequest {
            key: KEY.into(),
            description: "EHR archive".into(),
            labels: [("owner".to_owned(), "radiology".to_owned())].into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, KEY);
    assert_eq!(created.primary_version, 1);
    assert_eq!(
        created.labels.get("owner").map(String::as_str),
        Some("radiology")
    );
    assert_eq!(
        created.versions[0].state,
        proto::KeyVersionState::Enabled as i32
    );
    assert!(created.create_time.is_some());

    for k in [
        "tenants/a/keys/k1",
        "tenants/a/keys/k2",
        "tenants/a/keys/k3",
    ] {
        create(&officer, k).await;
    }
    let got = admin
        .get_key(proto::GetKeyRequest { key: KEY.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);

    // Pagination: 4 keys, pages of 3.
    let page1 = admin
        .list_keys(proto::ListKeysRequest {
            tenant: "a".into(),
            page_size: 3,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.keys.len(), 3);
    assert!(!page1.next_page_token.is_empty());
    let page2 = admin
        .list_keys(proto::ListKeysRequest {
            tenant: String::new(),
            page_size: 3,
            page_token: page1.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = page1
        .keys
        .iter()
        .chain(&page2.keys)
        .map(|k| k.name.clone())
        .collect();
    assert_eq!(
        names,
        [
            "tenants/a/keys/ehr",
            "tenants/a/keys/k1",
            "tenants/a/keys/k2",
            "tenants/a/keys/k3"
        ]
    );
    assert!(page2.next_page_token.is_empty());

    let rotated = admin
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.primary_version, 2);
    let updated = admin
        .update_key(proto::UpdateKeyRequest {
            key: KEY.into(),
            description: Some("EHR archive, 2026".into()),
            labels: [("owner".to_owned(), "it-security".to_owned())].into(),
            update_labels: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.description, "EHR archive, 2026");
    assert_eq!(
        updated.labels.get("owner").map(String::as_str),
        Some("it-security")
    );
    let kept = admin
        .update_key(proto::UpdateKeyRequest {
            key: KEY.into(),
            description: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (kept.description.as_str(), kept.labels.len()),
        ("EHR archive, 2026", 1),
        "unset fields are kept"
    );

    let disabled = admin
        .disable_key_version(proto::KeyVersionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        disabled.versions[0].state,
        proto::KeyVersionState::Disabled as i32
    );
    let enabled = admin
        .enable_key_version(proto::KeyVersionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        enabled.versions[0].state,
        proto::KeyVersionState::Enabled as i32
    );
    // Nothing is scheduled for destruction, so there is nothing to cancel.
    assert_code(
        admin
            .cancel_key_version_destruction(proto::KeyVersionRequest {
                key: KEY.into(),
                version: 1,
            })
            .await,
        Code::FailedPrecondition,
    );

    // Four eyes: one officer asks, another approves; the asker cannot, nor can another tenant.
    let approval = admin
        .schedule_key_version_destruction(proto::ScheduleKeyVersionDestructionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approval.state, proto::ApprovalState::Pending as i32);
    assert_eq!(approval.key_version, "tenants/a/keys/ehr/versions/1");
    assert_code(
        admin
            .schedule_key_version_destruction(proto::ScheduleKeyVersionDestructionRequest {
                key: KEY.into(),
                version: 1,
            })
            .await,
        Code::FailedPrecondition,
    );
    let s = assert_code(
        admin
            .approve(proto::ApprovalRequest {
                id: approval.id.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("different officer"), "{s:?}");
    let stranger = server.client(OFFICER_B).await;
    assert_code(
        stranger
            .admin()
            .approve(proto::ApprovalRequest {
                id: approval.id.clone(),
            })
            .await,
        Code::NotFound,
    );
    let listed = admin
        .list_approvals(proto::ListApprovalsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(listed.len(), 1);
    let second = server.client(OFFICER_A2).await;
    let approved = second
        .admin()
        .approve(proto::ApprovalRequest {
            id: approval.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.state, proto::ApprovalState::Approved as i32);
    assert_eq!(approved.decided_by, OFFICER_A2);
    assert!(approved.destroy_time.is_some());
    let key = admin
        .get_key(proto::GetKeyRequest { key: KEY.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        key.versions[0].state,
        proto::KeyVersionState::DestroyScheduled as i32
    );
    assert_code(
        admin
            .reject(proto::ApprovalRequest { id: approval.id })
            .await,
        Code::FailedPrecondition,
    );
    assert_code(
        admin
            .approve(proto::ApprovalRequest { id: "nope".into() })
            .await,
        Code::NotFound,
    );

    // Rotation period and minimum decryption version.
    let updated = admin
        .update_key(proto::UpdateKeyRequest {
            key: KEY.into(),
            rotation_period: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
            min_decryption_version: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.rotation_period.map(|d| d.seconds), Some(86_400));
    assert!(updated.next_rotation_time.is_some());
    assert_eq!(updated.min_decryption_version, 2);
    assert_code(
        admin
            .update_key(proto::UpdateKeyRequest {
                key: KEY.into(),
                min_decryption_version: 9,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        admin
            .update_key(proto::UpdateKeyRequest {
                key: KEY.into(),
                rotation_period: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_designed_status_code_comes_from_the_input_that_should_produce_it() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    let service = server.client(SERVICE_A).await;
    create(&officer, KEY).await;
    let blob = wrap(&service, KEY, b"dek", b"aad")
        .await
        .unwrap()
        .ciphertext;

    // NOT_FOUND
    assert_code(
        wrap(&service, "tenants/a/keys/missing", b"x", b"").await,
        Code::NotFound,
    );
    assert_code(
        officer
            .admin()
            .get_key(proto::GetKeyRequest {
                key: "tenants/a/keys/missing".into(),
            })
            .await,
        Code::NotFound,
    );
    assert_code(
        officer
            .admin()
            .disable_key_version(proto::KeyVersionRequest {
                key: KEY.into(),
                version: 9,
            })
            .await,
        Code::NotFound,
    );

    // INVALID_ARGUMENT: names, sizes, and every ciphertext problem with one message.
    let s = assert_code(
        wrap(&service, "keys/ehr", b"x", b"").await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("tenants/{tenant}/keys/{key}"), "{s:?}");
    assert_code(wrap(&service, KEY, b"", b"").await, Code::InvalidArgument);
    assert_code(
        wrap(&service, KEY, &vec![0; 64 * 1024 + 1], b"").await,
        Code::InvalidArgument,
    );
    assert_code(
        wrap(&service, KEY, b"x", &vec![0; 64 * 1024 + 1]).await,
        Code::InvalidArgument,
    );
    let mut tampered = blob.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let mut unknown = blob.clone();
    unknown[1..17].copy_from_slice(&[0xee; 16]);
    for (bad, aad) in [
        (&blob, &b"other aad"[..]),
        (&tampered, b"aad"),
        (&unknown, b"aad"),
        (&blob[..10].to_vec(), b"aad"),
    ] {
        let s = assert_code(unwrap(&service, bad, aad).await, Code::InvalidArgument);
        assert!(s.message().starts_with(INVALID_CIPHERTEXT), "{s:?}");
    }
    // A request far beyond the size caps is refused by the transport (tonic resets the stream
    // once the gRPC frame header announces more than MAX_REQUEST_BYTES) without buffering it,
    // and the server keeps serving.
    assert!(
        wrap(&service, KEY, &vec![0; 1024 * 1024], b"")
            .await
            .is_err()
    );
    assert!(wrap(&service, KEY, b"still served", b"").await.is_ok());

    // ALREADY_EXISTS
    assert_code(
        officer
            .admin()
            .create_key(proto::CreateKeyRequest {
                key: KEY.into(),
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
    );

    // FAILED_PRECONDITION: disabled version, primary version.
    officer
        .admin()
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .unwrap();
    officer
        .admin()
        .disable_key_version(proto::KeyVersionRequest {
            key: KEY.into(),
            version: 1,
        })
        .await
        .unwrap();
    let s = assert_code(
        unwrap(&service, &blob, b"aad").await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("versions/1 is disabled"), "{s:?}");
    assert_code(
        officer
            .admin()
            .disable_key_version(proto::KeyVersionRequest {
                key: KEY.into(),
                version: 2,
            })
            .await,
        Code::FailedPrecondition,
    );

    // UNAVAILABLE: the database fails (a trigger makes every new version row fail).
    let side = tresor::store::Store::open(&format!(
        "sqlite://{}",
        server.deployment.dir().join("tresor.db").display()
    ))
    .await
    .unwrap();
    side.execute_raw_for_tests(
        "CREATE TRIGGER down BEFORE INSERT ON key_versions BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
    )
    .await
    .unwrap();
    let s = assert_code(
        officer
            .admin()
            .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
            .await,
        Code::Unavailable,
    );
    assert!(
        !s.message().contains("disk on fire"),
        "internal detail leaked: {s:?}"
    );
    side.execute_raw_for_tests("DROP TRIGGER down")
        .await
        .unwrap();
    officer
        .admin()
        .rotate_key(proto::RotateKeyRequest { key: KEY.into() })
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_a_valid_certificate_are_unauthenticated() {
    let server = TestServer::start().await;
    let officer = server.client(OFFICER_A).await;
    create(&officer, KEY).await;

    let anonymous = server.client_with(None, Validity::default()).await;
    let expired = server
        .client_with(
            Some(SERVICE_A),
            Validity {
                from_days: -30,
                to_days: -1,
            },
        )
        .await;
    let other_ca = tresor::pki::DevCa::new("someone else's CA").unwrap();
    let foreign_profile = server.deployment.profile_from(
        &other_ca,
        server.addr,
        Some(SERVICE_A),
        Validity::default(),
    );
    let foreign = Client::connect(&tresor::client::Profile::load(&foreign_profile).unwrap())
        .await
        .unwrap();

    for (who, client) in [
        ("no certificate", &anonymous),
        ("expired", &expired),
        ("other CA", &foreign),
    ] {
        let s = wrap(client, KEY, b"x", b"").await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{who}: {s:?}");
        let s = client
            .admin()
            .get_key(proto::GetKeyRequest { key: KEY.into() })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated, "{who}: {s:?}");
    }
    // Refused before its message is read: a message too large to decode gets the
    // authentication answer, not a decoding error.
    let s = proto::key_service_client::KeyServiceClient::new(anonymous.channel())
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: vec![0; 200_000],
            aad: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = wrap(&anonymous, KEY, b"x", b"").await.unwrap_err();
    assert!(s.message().contains("no client certificate"), "{s:?}");

    // A valid certificate whose identity the policy does not know.
    let stranger = server.client("spiffe://a.example/unknown").await;
    assert_code(
        wrap(&stranger, KEY, b"x", b"").await,
        Code::PermissionDenied,
    );
    // Refused before its message is read too: an officer's Wrap (the wrong role), and the
    // stranger's, with a message too large to decode, get the authorization answer.
    let officer = server.client(OFFICER_A).await;
    for (who, client) in [("officer", &officer), ("stranger", &stranger)] {
        let s = proto::key_service_client::KeyServiceClient::new(client.channel())
            .wrap(proto::WrapRequest {
                justification: None,
                key: KEY.into(),
                plaintext: vec![0; 200_000],
                aad: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{who}: {s:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_tenants_and_keys_are_enforced() {
    let server = TestServer::start().await;
    let officer_a = server.client(OFFICER_A).await;
    let service_a = server.client(SERVICE_A).await;
    let service_b = server.client(SERVICE_B).await;
    let officer_b = server.client(OFFICER_B).await;
    let auditor_a = server.client(AUDITOR_A).await;
    create(&officer_a, KEY).await;
    let blob = wrap(&service_a, KEY, b"dek", b"").await.unwrap().ciphertext;

    // A service of tenant B using a key of tenant A.
    assert_code(
        wrap(&service_b, KEY, b"x", b"").await,
        Code::PermissionDenied,
    );
    // Its blob gets exactly the answer of a blob no installation made: no key name, no
    // existence oracle.
    let foreign = unwrap(&service_b, &blob, b"").await.unwrap_err();
    let mut unknown_blob = blob.clone();
    unknown_blob[1..17].copy_from_slice(&[0x5a; 16]);
    let unknown = unwrap(&service_b, &unknown_blob, b"").await.unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument, "{foreign:?}");
    assert_eq!(foreign.code(), unknown.code());
    let without_id = |s: &tonic::Status| {
        s.message()
            .split(" (request")
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(
        without_id(&foreign),
        without_id(&unknown),
        "{foreign:?} / {unknown:?}"
    );
    assert!(!foreign.message().contains("tenants/a"), "{foreign:?}");
    assert_code(
        service_b
            .keys()
            .rewrap(proto::RewrapRequest {
                justification: None,
                ciphertext: blob.clone(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
    );
    // A service calling KeyAdminService.
    assert_code(
        service_a
            .admin()
            .get_key(proto::GetKeyRequest { key: KEY.into() })
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        service_a
            .admin()
            .create_key(proto::CreateKeyRequest {
                key: "tenants/a/keys/x".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    // An auditor calling Wrap.
    assert_code(
        wrap(&auditor_a, KEY, b"x", b"").await,
        Code::PermissionDenied,
    );
    // An officer of tenant B reaching into tenant A.
    assert_code(
        officer_b
            .admin()
            .get_key(proto::GetKeyRequest { key: KEY.into() })
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        officer_b
            .admin()
            .list_keys(proto::ListKeysRequest {
                tenant: "a".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        officer_b
            .admin()
            .create_key(proto::CreateKeyRequest {
                key: "tenants/a/keys/planted".into(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
    );
    // An officer may not wrap; a service may not read the audit log.
    assert_code(
        wrap(&officer_a, KEY, b"x", b"").await,
        Code::PermissionDenied,
    );
    assert_code(
        service_a
            .audit()
            .get_audit_public_key(proto::GetAuditPublicKeyRequest {})
            .await,
        Code::PermissionDenied,
    );

    // Tenant A's auditors see who tried their key, and with which key; tenant B's log shows
    // its service's failed calls without A's key name.
    let tried =
        |items: &[tresor::audit_record::ExportItem], op: &str| -> Vec<(String, String, String)> {
            items
                .iter()
                .filter_map(|i| match i {
                    tresor::audit_record::ExportItem::Record(r)
                        if r.body.caller == SERVICE_B && r.body.operation == op =>
                    {
                        Some((r.tenant.clone(), r.body.key.clone(), r.body.outcome.clone()))
                    }
                    _ => None,
                })
                .collect()
        };
    // A failed unwrap in the key's own tenant is recorded with the key it tried, so that a
    // key-filtered export contains it.
    assert_code(
        unwrap(&service_a, &blob, b"wrong aad").await,
        Code::InvalidArgument,
    );
    let in_a = verified_export(&auditor_a).await;
    assert!(
        in_a.iter()
            .any(|i| matches!(i, tresor::audit_record::ExportItem::Record(r)
            if r.body.caller == SERVICE_A && r.body.operation == "Unwrap"
                && r.body.outcome == "FAILED" && r.body.key == KEY)),
        "the failed unwrap names its key"
    );
    assert_eq!(
        tried(&in_a, "Unwrap"),
        vec![("a".to_owned(), KEY.to_owned(), "FAILED".to_owned())],
        "the owner's log records the attempt on its key (the unknown blob is no key of A's)"
    );
    assert_eq!(tried(&in_a, "Rewrap").len(), 1);
    let auditor_b = server.client(AUDITOR_B).await;
    let in_b = verified_export(&auditor_b).await;
    let b_unwraps = tried(&in_b, "Unwrap");
    assert_eq!(b_unwraps.len(), 2, "{b_unwraps:?}");
    assert!(
        b_unwraps
            .iter()
            .all(|(t, key, _)| t == "b" && key.is_empty()),
        "{b_unwraps:?}"
    );

    // A policy reload takes effect for new calls, on existing connections.
    std::fs::write(
        &server.deployment.policy_path,
        POLICY.replace(
            "tenant = \"b\"\nroles = [\"service\"]",
            "tenant = \"a\"\nroles = [\"service\"]",
        ),
    )
    .unwrap();
    server.policy.reload().unwrap();
    assert_eq!(
        unwrap(&service_b, &blob, b"").await.unwrap().plaintext,
        b"dek"
    );
    // A broken policy file keeps the policy in force.
    std::fs::write(&server.deployment.policy_path, "[[identity]]\nname = 1").unwrap();
    assert!(server.policy.reload().is_err());
    assert_eq!(
        unwrap(&service_b, &blob, b"").await.unwrap().plaintext,
        b"dek"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_at_once_not_queued() {
    let server = TestServer::start_with("max_concurrent_requests = 1").await;
    let officer = server.client(OFFICER_A).await;
    create(&officer, KEY).await;
    let service = server.client(SERVICE_A).await;
    let mut exhausted = 0;
    for _round in 0..5 {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move { wrap(&service, KEY, &[7; 4096], b"").await })
            })
            .collect();
        for c in calls {
            match c.await.unwrap() {
                Ok(_) => {}
                Err(s) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    exhausted += 1;
                }
            }
        }
        if exhausted > 0 {
            break;
        }
    }
    assert!(
        exhausted > 0,
        "32 concurrent calls never exceeded a limit of 1"
    );

    // The permit is taken before the message is read: an overloaded call is refused for the
    // overload even when its message is too large to decode (which would be another error).
    let mut refused_before_decoding = 0;
    for _round in 0..5 {
        let calls: Vec<_> = (0..32)
            .map(|i| {
                // A raw client: the library's own refuses to send more than the server takes.
                let mut raw = proto::key_service_client::KeyServiceClient::new(service.channel());
                let size = if i % 2 == 0 { 4096 } else { 200_000 };
                tokio::spawn(async move {
                    raw.wrap(proto::WrapRequest {
                        justification: None,
                        key: KEY.into(),
                        plaintext: vec![7; size],
                        aad: Vec::new(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| (s, size))
                })
            })
            .collect();
        for c in calls {
            if let Err((s, 200_000)) = c.await.unwrap()
                && s.code() == Code::ResourceExhausted
                && s.message().contains("request limit")
            {
                refused_before_decoding += 1;
            }
        }
        if refused_before_decoding > 0 {
            break;
        }
    }
    assert!(
        refused_before_decoding > 0,
        "no call was refused before its message was read"
    );
    server.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: tresor\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

/// The value of the sample `name` (with its labels, exactly as exposed), if present.
fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_hsm_calls_and_audit_commits_and_reveal_no_names() {
    let server = TestServer::start_with("metrics_listen = \"127.0.0.1:0\"").await;
    let metrics = server.metrics.expect("metrics listener bound");
    let before = http_get(metrics, "/metrics").await;
    let count = |text: &str, name: &str| sample(text, name).unwrap_or(0.0);
    let wraps_ok = "tresor_requests_seconds_count{operation=\"Wrap\",code=\"OK\"}";
    let wraps_denied =
        "tresor_requests_seconds_count{operation=\"Wrap\",code=\"PERMISSION_DENIED\"}";

    server
        .client(OFFICER_A)
        .await
        .admin()
        .create_key(proto::CreateKeyRequest {
            key: KEY.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let service = server.client(SERVICE_A).await;
    for _ in 0..3 {
        service
            .keys()
            .wrap(proto::WrapRequest {
                justification: None,
                key: KEY.into(),
                plaintext: b"dek".to_vec(),
                aad: b"patient-4711".to_vec(),
            })
            .await
            .unwrap();
    }
    let denied = server
        .client(OFFICER_A)
        .await
        .keys()
        .wrap(proto::WrapRequest {
            justification: None,
            key: KEY.into(),
            plaintext: b"dek".to_vec(),
            aad: vec![],
        })
        .await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);

    let answer = http_get(metrics, "/metrics").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let after = answer.split("\r\n\r\n").nth(1).unwrap();
    // Several servers may share this process's registry: compare increments.
    assert!(
        count(after, wraps_ok) >= count(&before, wraps_ok) + 3.0,
        "{after}"
    );
    assert!(
        count(after, wraps_denied) >= count(&before, wraps_denied) + 1.0,
        "{after}"
    );
    for name in [
        "tresor_hsm_call_seconds_count",
        "tresor_audit_batch_records_count",
        "tresor_audit_commit_seconds_count",
    ] {
        assert!(count(after, name) > count(&before, name), "{name}: {after}");
    }
    assert!(sample(after, "tresor_hsm_sessions").is_some(), "{after}");
    assert!(after.contains("# TYPE tresor_requests_seconds histogram"));
    // Load, not content: no key names, callers, AADs.
    for secret in [KEY, SERVICE_A, OFFICER_A, "patient-4711"] {
        assert!(!after.contains(secret), "{secret} in {after}");
    }
    assert!(http_get(metrics, "/").await.starts_with("HTTP/1.1 404"));
    server.stop().await;
}
