//! Access rules, justifications and break-glass windows at custody's door: what a rule decides
//! for a grant a front-end described, the four-eyes window lifecycle on a test clock, and a
//! database administrator who forges or stretches a window.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::Fixture;
use tresor::auth::{AccessContext, FrontEnd, Grant, Identity, Policy, Role};
use tresor::custody::{CustodyError, CustodyOptions, ManualClock, WindowRequest, WindowState};
use tresor::model::KeyName;
use zeroize::Zeroizing;

const SERVICE: &str = "spiffe://uksh.example/ehr";
const SUPPORT: &str = "spiffe://vendor.example/support";

const POLICY: &str = r#"
[justifications]
codes = ["treatment", "emergency", "support"]

[[identity]]
name = "spiffe://uksh.example/ehr"
tenant = "uksh"
roles = ["service"]

[[identity]]
name = "spiffe://vendor.example/support"
tenant = "uksh"
roles = ["service"]

[[identity]]
name = "officer-anna"
tenant = "uksh"
roles = ["officer"]

[[identity]]
name = "officer-ben"
tenant = "uksh"
roles = ["officer"]

[[access_rule]]
id = "support-needs-window"
tenant = "uksh"
keys = ["ehr-*"]
identities = ["spiffe://vendor.example/*"]
decision = "require-approval"

[[access_rule]]
id = "treatment"
tenant = "uksh"
keys = ["ehr-*"]
justifications = ["treatment", "emergency"]
decision = "allow"
"#;

fn policy() -> Policy {
    Policy::from_toml(POLICY, "policy.toml").unwrap()
}

fn grant(who: &str, role: Role) -> Grant {
    policy()
        .grant(
            &Identity {
                name: who.into(),
                fingerprint: String::new(),
            },
            role,
        )
        .unwrap()
}

/// A service grant as the gRPC front-end describes a call: the RPC and a justification.
fn service(who: &str, op: &str, code: Option<&str>) -> Grant {
    let g = grant(who, Role::Service);
    let justification = code.map(|c| g.rules().justification(c, "INC-4711").unwrap().unwrap());
    g.with_context(AccessContext {
        front_end: FrontEnd::Grpc,
        operation: op.into(),
        justification,
        aws: None,
    })
}

fn pt(b: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(b.to_vec())
}

struct Setup {
    f: Fixture,
    clock: Arc<ManualClock>,
    ehr: KeyName,
    blob: Vec<u8>,
}

async fn setup() -> Setup {
    let clock = Arc::new(ManualClock::new(tresor::model::now_millis()));
    let f = Fixture::with(CustodyOptions {
        clock: clock.clone(),
        ..CustodyOptions::default()
    })
    .await;
    let ehr: KeyName = "tenants/uksh/keys/ehr-records".parse().unwrap();
    f.custody
        .create_key(
            &grant("officer-anna", Role::Officer),
            &ehr,
            "",
            Default::default(),
        )
        .await
        .unwrap();
    let blob = f
        .custody
        .wrap(
            &service(SERVICE, "Wrap", Some("treatment")),
            &ehr,
            pt(b"dek"),
            b"case",
        )
        .await
        .unwrap()
        .ciphertext;
    Setup {
        f,
        clock,
        ehr,
        blob,
    }
}

impl Setup {
    async fn support_unwrap(&self) -> Result<Zeroizing<Vec<u8>>, CustodyError> {
        let g = service(SUPPORT, "Unwrap", Some("support"));
        let r = self
            .f
            .custody
            .unwrap(&g, &self.blob, b"case", None)
            .await
            .map(|u| u.plaintext);
        // Every decision is noted for the audit record, with the rule that made it.
        let note = g.access_note().expect("the rules were asked");
        assert_eq!(&*note.rule, "support-needs-window");
        assert_eq!(note.refused, r.is_err());
        r
    }

    async fn request(&self, who: &str, minutes: i64) -> String {
        self.f
            .custody
            .request_window(
                &grant(who, Role::Officer),
                WindowRequest {
                    identity: SUPPORT.into(),
                    key_pattern: "ehr-*".into(),
                    reason: "support".into(),
                    reference: "INC-4711".into(),
                    duration_ms: minutes * 60_000,
                },
            )
            .await
            .unwrap()
            .id
    }

    async fn state(&self, id: &str) -> WindowState {
        self.f
            .custody
            .list_windows(&grant("officer-anna", Role::Officer))
            .await
            .unwrap()
            .into_iter()
            .find(|w| w.id == id)
            .map(|w| w.state)
            .expect("listed")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_by_justification_and_a_covered_key_is_denied_by_default() {
    let s = setup().await;
    let custody = &s.f.custody;
    // Declared treatment: allowed, and the decision names the rule.
    let g = service(SERVICE, "Unwrap", Some("emergency"));
    assert_eq!(
        &*custody
            .unwrap(&g, &s.blob, b"case", None)
            .await
            .unwrap()
            .plaintext,
        b"dek"
    );
    assert_eq!(&*g.access_note().unwrap().rule, "treatment");
    // No justification: the key has rules and none matched.
    let g = service(SERVICE, "Unwrap", None);
    let e = custody
        .unwrap(&g, &s.blob, b"case", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, CustodyError::AccessRuleDenied(r) if r == "default-deny"),
        "{e}"
    );
    assert!(g.refused_by_rule());
    // Wrap, data keys and rewrap are asked the same.
    let e = custody
        .generate_data_key(
            &service(SERVICE, "GenerateDataKey", None),
            &s.ehr,
            b"",
            32,
            true,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CustodyError::AccessRuleDenied(_)), "{e}");
    let e = custody
        .rewrap(&service(SERVICE, "Rewrap", None), &s.blob, b"case", None)
        .await
        .unwrap_err();
    assert!(matches!(e, CustodyError::AccessRuleDenied(_)), "{e}");
    // A grant no front-end described is refused on a ruled key: rules cannot be skipped.
    let e = custody
        .wrap(&grant(SERVICE, Role::Service), &s.ehr, pt(b"x"), b"")
        .await
        .unwrap_err();
    assert!(matches!(e, CustodyError::AccessRuleDenied(_)), "{e}");
    // A key no rule covers behaves as without rules.
    let plain: KeyName = "tenants/uksh/keys/scratch".parse().unwrap();
    custody
        .create_key(
            &grant("officer-anna", Role::Officer),
            &plain,
            "",
            Default::default(),
        )
        .await
        .unwrap();
    let g = service(SERVICE, "Wrap", None);
    custody.wrap(&g, &plain, pt(b"x"), b"").await.unwrap();
    assert!(g.access_note().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_glass_window_needs_a_second_officer_and_closes_by_itself() {
    let s = setup().await;
    // The rule opens nothing by itself.
    let e = s.support_unwrap().await.unwrap_err();
    assert!(matches!(&e, CustodyError::AccessWindowRequired(r) if r == "support-needs-window"));
    assert!(e.to_string().contains("tresor access request"), "{e}");

    let id = s.request("officer-anna", 60).await;
    assert_eq!(s.state(&id).await, WindowState::Pending);
    // Requested is not open.
    assert!(s.support_unwrap().await.is_err());
    // The requester cannot be the second officer.
    let e =
        s.f.custody
            .approve(&grant("officer-anna", Role::Officer), &id)
            .await
            .unwrap_err();
    assert!(matches!(e, CustodyError::SelfApproval(_)), "{e}");
    assert!(s.support_unwrap().await.is_err());
    // Another officer opens it: the support call goes through, and the note names the window.
    s.f.custody
        .approve(&grant("officer-ben", Role::Officer), &id)
        .await
        .unwrap();
    assert_eq!(s.state(&id).await, WindowState::Open);
    let g = service(SUPPORT, "Unwrap", Some("support"));
    assert_eq!(
        &*s.f
            .custody
            .unwrap(&g, &s.blob, b"case", None)
            .await
            .unwrap()
            .plaintext,
        b"dek"
    );
    let note = g.access_note().unwrap();
    assert_eq!(note.window, id);
    assert_eq!(
        note.window_reason,
        Some(("support".to_owned(), "INC-4711".to_owned()))
    );
    // Only for the identity and keys it names.
    let other: KeyName = "tenants/uksh/keys/lab-results".parse().unwrap();
    s.f.custody
        .create_key(
            &grant("officer-anna", Role::Officer),
            &other,
            "",
            Default::default(),
        )
        .await
        .unwrap();
    // (lab-results has no rules: the window neither widens nor narrows it.)
    s.f.custody
        .wrap(&service(SUPPORT, "Wrap", None), &other, pt(b"x"), b"")
        .await
        .unwrap();
    // An hour later it has closed by itself.
    s.clock.advance(60 * 60_000 + 1);
    assert_eq!(s.state(&id).await, WindowState::Expired);
    assert!(matches!(
        s.support_unwrap().await,
        Err(CustodyError::AccessWindowRequired(_))
    ));
    let e =
        s.f.custody
            .close_window(&grant("officer-ben", Role::Officer), &id)
            .await
            .unwrap_err();
    assert!(matches!(e, CustodyError::WindowClosed { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_closed_early_or_rejected_opens_nothing_and_windows_are_bounded() {
    let s = setup().await;
    let id = s.request("officer-anna", 120).await;
    s.f.custody
        .approve(&grant("officer-ben", Role::Officer), &id)
        .await
        .unwrap();
    assert!(s.support_unwrap().await.is_ok());
    let closed =
        s.f.custody
            .close_window(&grant("officer-anna", Role::Officer), &id)
            .await
            .unwrap();
    assert_eq!(closed.state, WindowState::Closed);
    assert_eq!(closed.closed_by, "officer-anna");
    assert!(s.support_unwrap().await.is_err());

    // A rejected request never opens.
    let id = s.request("officer-ben", 30).await;
    s.f.custody
        .reject(&grant("officer-anna", Role::Officer), &id)
        .await
        .unwrap();
    assert_eq!(s.state(&id).await, WindowState::Rejected);
    assert!(
        s.f.custody
            .approve(&grant("officer-anna", Role::Officer), &id)
            .await
            .is_err()
    );
    assert!(s.support_unwrap().await.is_err());

    // Longer than configured, without a reason, or with a reason not in the vocabulary.
    let anna = grant("officer-anna", Role::Officer);
    for (req, needle) in [
        (
            WindowRequest {
                identity: SUPPORT.into(),
                key_pattern: "ehr-*".into(),
                reason: "support".into(),
                reference: String::new(),
                duration_ms: 9 * 3_600_000,
            },
            "max_access_window_hours",
        ),
        (
            WindowRequest {
                identity: SUPPORT.into(),
                key_pattern: "ehr-*".into(),
                reason: String::new(),
                reference: String::new(),
                duration_ms: 3_600_000,
            },
            "reason",
        ),
        (
            WindowRequest {
                identity: SUPPORT.into(),
                key_pattern: "ehr-*".into(),
                reason: "curiosity".into(),
                reference: String::new(),
                duration_ms: 3_600_000,
            },
            "curiosity",
        ),
        (
            WindowRequest {
                identity: SUPPORT.into(),
                key_pattern: "ehr-*-x".into(),
                reason: "support".into(),
                reference: String::new(),
                duration_ms: 3_600_000,
            },
            "key pattern",
        ),
    ] {
        let e = s.f.custody.request_window(&anna, req).await.unwrap_err();
        assert!(
            matches!(&e, CustodyError::InvalidArgument(m) if m.contains(needle)),
            "{needle}: {e}"
        );
    }
    // A service cannot ask for a window.
    assert!(matches!(
        s.f.custody
            .request_window(
                &grant(SUPPORT, Role::Service),
                WindowRequest {
                    identity: SUPPORT.into(),
                    key_pattern: "*".into(),
                    reason: "support".into(),
                    reference: String::new(),
                    duration_ms: 3_600_000,
                },
            )
            .await,
        Err(CustodyError::PermissionDenied(_))
    ));
}

/// The attacker: a database administrator with SQL, who wants the vendor's support identity
/// to read patient keys without two officers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_the_database_forged_or_stretched_opens_nothing() {
    let s = setup().await;
    let now = s.f.custody.now();
    // Forged: a row no officer requested, claiming to be open.
    s.f.store
        .execute_raw_for_tests(&format!(
            "INSERT INTO access_windows VALUES ('forged', 'uksh', '{SUPPORT}', '*', 'support', '', 3600000, \
             'officer-anna', {now}, 'OPEN', 'officer-ben', {now}, {}, '', 0, '00')",
            now + 3_600_000
        ))
        .await
        .unwrap();
    assert!(matches!(
        s.support_unwrap().await,
        Err(CustodyError::AccessWindowRequired(_))
    ));
    // Stretched: a genuine window, expired, given another day.
    let id = s.request("officer-anna", 10).await;
    s.f.custody
        .approve(&grant("officer-ben", Role::Officer), &id)
        .await
        .unwrap();
    assert!(s.support_unwrap().await.is_ok());
    s.clock.advance(11 * 60_000);
    assert!(s.support_unwrap().await.is_err());
    s.f.store
        .execute_raw_for_tests(&format!(
            "UPDATE access_windows SET expires_at = expires_at + 86400000 WHERE id = '{id}'"
        ))
        .await
        .unwrap();
    assert!(matches!(
        s.support_unwrap().await,
        Err(CustodyError::AccessWindowRequired(_))
    ));
    // Neither is listed to officers as if it were real.
    let listed =
        s.f.custody
            .list_windows(&grant("officer-anna", Role::Officer))
            .await
            .unwrap();
    assert!(listed.iter().all(|w| w.id != "forged" && w.id != id));
    // A pending request approved in the database (no second officer) opens nothing either.
    let pending = s.request("officer-anna", 30).await;
    s.f.store
        .execute_raw_for_tests(&format!(
            "UPDATE access_windows SET state = 'OPEN', approved_by = 'officer-ben', opened_at = {now}, expires_at = {} WHERE id = '{pending}'",
            now + 86_400_000
        ))
        .await
        .unwrap();
    assert!(matches!(
        s.support_unwrap().await,
        Err(CustodyError::AccessWindowRequired(_))
    ));
}
