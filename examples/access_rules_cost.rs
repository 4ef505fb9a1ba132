//! What the access rules cost one call, without the noise of a whole server: the front-end's
//! `Grant::with_context` and custody's `Grant::access_verdict` for a key that 20 rules cover,
//! the first 19 failing only at their last condition and the 20th allowing, against a policy
//! without rules. `tresor bench` measures the whole Wrap; this says how much of it is rules.
//!
//! ```text
//! cargo run --release --example access_rules_cost
//! ```

use std::hint::black_box;
use std::time::Instant;

use tresor::auth::{AccessContext, FrontEnd, Identity, Policy, Role, Verdict};

const IDENTITY: &str = "spiffe://uksh.example/ehr-archive";
const CALLS: u32 = 2_000_000;

fn policy(rules: usize) -> Policy {
    let mut text = format!(
        "[[identity]]\nname = \"{IDENTITY}\"\ntenant = \"uksh\"\nroles = [\"service\"]\n\
         [justifications]\ncodes = [\"treatment\", \"emergency\", \"research-pseudonymised\"]\n"
    );
    for i in 1..rules {
        text.push_str(&format!(
            "[[access_rule]]\nid = \"r{i}\"\ntenant = \"uksh\"\nkeys = [\"ehr-*\", \"other-{i}\"]\n\
             front_end = \"grpc\"\noperations = [\"Wrap\", \"Unwrap\"]\n\
             identities = [\"spiffe://elsewhere.example/{i}/*\"]\ndecision = \"allow\"\n"
        ));
    }
    if rules > 0 {
        text.push_str(&format!(
            "[[access_rule]]\nid = \"r{rules}\"\ntenant = \"uksh\"\nkeys = [\"ehr-*\"]\n\
             front_end = \"grpc\"\noperations = [\"Wrap\", \"Unwrap\"]\nidentities = [\"{IDENTITY}\"]\n\
             justifications = [\"treatment\"]\ndecision = \"allow\"\n"
        ));
    }
    match Policy::from_toml(&text, "example") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Nanoseconds per call of what a Wrap adds for the rules.
fn per_call(policy: &Policy) -> f64 {
    let who = Identity {
        name: IDENTITY.into(),
        fingerprint: String::new(),
    };
    let grant = match policy.grant(&who, Role::Service) {
        Ok(g) => g,
        Err(e) => panic!("{e}"),
    };
    let justification = policy
        .rules()
        .justification("treatment", "case 17")
        .ok()
        .flatten();
    let started = Instant::now();
    for _ in 0..CALLS {
        let g = grant.with_context(AccessContext {
            front_end: FrontEnd::Grpc,
            operation: "Wrap".to_owned(),
            justification: justification.clone(),
            aws: None,
        });
        let verdict = g.access_verdict(black_box("ehr-2024"));
        if policy.rules().is_empty() {
            assert_eq!(verdict, Verdict::Unruled);
        } else {
            assert!(matches!(verdict, Verdict::Allow(_)), "{verdict:?}");
        }
        black_box(verdict);
    }
    started.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

fn main() {
    let (none, twenty) = (policy(0), policy(20));
    for round in 1..=3 {
        let a = per_call(&none);
        let b = per_call(&twenty);
        println!(
            "round {round}: no rules {a:.0} ns/call, 20 rules {b:.0} ns/call, the rules add {:.0} ns",
            b - a
        );
    }
}
