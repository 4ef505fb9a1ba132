//! Access rules and justifications: why a key may be used, decided by the operator.
//!
//! Owns the policy file's `[justifications]` vocabulary and `[[access_rule]]` list, the request
//! context a front-end hands over ([`AccessContext`]: the front-end, the operation, a declared
//! [`Justification`], AWS KMS's request metadata), and the pure decision: for one key, the first
//! matching rule decides `allow`, `deny` or `require-approval`; a key that some rule covers but
//! no rule matches is denied (`default-deny`); a key no rule covers behaves as without rules.
//! Knows nothing of protocols' encodings, of break-glass windows' storage (custody checks a
//! window when a rule requires one) or of the HSM.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::KeyPattern;
use crate::model::Tenant;

/// The rule id a refusal names when rules cover a key but none matched the call.
pub const DEFAULT_DENY: &str = "default-deny";

/// Google Cloud's Key Access Justifications reason codes: the vocabulary for reasons a cloud
/// provider states, so a Google front-end maps onto the same rules. Always known, beside the
/// operator's own codes.
pub const KAJ_CODES: [&str; 10] = [
    "CUSTOMER_INITIATED_ACCESS",
    "GOOGLE_INITIATED_SYSTEM_OPERATION",
    "CUSTOMER_INITIATED_SUPPORT",
    "GOOGLE_INITIATED_SERVICE",
    "GOOGLE_RESPONSE_TO_PRODUCTION_ALERT",
    "GOOGLE_INITIATED_REVIEW",
    "THIRD_PARTY_DATA_REQUEST",
    "CUSTOMER_AUTHORIZED_WORKFLOW_SERVICING",
    "REASON_NOT_EXPECTED",
    "REASON_UNSPECIFIED",
];

/// Longest justification reference (a ticket or case number), in bytes.
pub const MAX_REFERENCE_LEN: usize = 256;

/// Which front-end a call came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontEnd {
    /// The gRPC API.
    Grpc,
    /// The AWS XKS proxy.
    Xks,
    /// The KMIP server.
    Kmip,
}

/// A declared reason for a use: a code from the policy's vocabulary (or a KAJ code) and a
/// free-text reference. Recorded in the audit log, never in metrics.
#[derive(Clone, PartialEq, Eq)]
pub struct Justification {
    code: String,
    reference: String,
}

impl fmt::Debug for Justification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Justification")
            .field("code", &self.code)
            .field("reference_len", &self.reference.len())
            .finish()
    }
}

impl Justification {
    /// The reason code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// The reference (ticket, case number); may be empty.
    pub fn reference(&self) -> &str {
        &self.reference
    }
}

/// Why a declared justification was refused (the caller's error: `INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JustificationError {
    /// The code is neither the operator's nor a KAJ code.
    #[error("justification code {0:?} is not one the access policy defines")]
    UnknownCode(String),
    /// A reference without a code.
    #[error("a justification reference needs a justification code")]
    ReferenceWithoutCode,
    /// The reference is too long or holds control characters.
    #[error("justification reference must be at most {MAX_REFERENCE_LEN} bytes of printable text")]
    BadReference,
}

/// AWS KMS's `requestMetadata` of an XKS call, as rules match it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsContext {
    /// `kmsOperation`.
    pub kms_operation: Option<String>,
    /// `awsPrincipalArn`.
    pub principal_arn: Option<String>,
    /// `kmsKeyArn`.
    pub key_arn: Option<String>,
    /// `kmsViaService`.
    pub via_service: Option<String>,
    /// `awsSourceVpc`.
    pub source_vpc: Option<String>,
    /// `awsSourceVpce`.
    pub source_vpce: Option<String>,
}

/// What a front-end knows about a call that rules may decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessContext {
    /// The front-end.
    pub front_end: FrontEnd,
    /// The operation as rules name it: the RPC (`Wrap`, `Unwrap`, `GenerateDataKey`,
    /// `Rewrap`), the KMIP operation (`Get`, `Encrypt`, `Decrypt`), or XKS's `kmsOperation`.
    pub operation: String,
    /// The caller's declared justification.
    pub justification: Option<Justification>,
    /// XKS calls: AWS KMS's request metadata.
    pub aws: Option<AwsContext>,
}

/// What a rule decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// The call goes on.
    Allow,
    /// The call is refused.
    Deny,
    /// The call goes on only while an approved break-glass window covers its caller and key.
    RequireApproval,
}

/// The outcome of evaluating the rules for one call on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No rule covers the key: the grant alone decides, as without rules.
    Unruled,
    /// Allowed by this rule.
    Allow(Arc<str>),
    /// Refused by this rule (or [`DEFAULT_DENY`]).
    Deny(Arc<str>),
    /// This rule needs an open window for the caller and key.
    NeedsWindow(Arc<str>),
}

/// A glob over a string: `*` matches any run of characters, everything else itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob(Vec<String>);

impl Glob {
    fn new(pattern: &str) -> Self {
        Self(pattern.split('*').map(str::to_owned).collect())
    }

    fn matches(&self, s: &str) -> bool {
        let parts = &self.0;
        let [first, middle @ .., last] = parts.as_slice() else {
            return parts.first().is_some_and(|p| p == s);
        };
        let Some(mut rest) = s.strip_prefix(first.as_str()) else {
            return false;
        };
        for part in middle {
            match rest.find(part.as_str()) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last.as_str())
    }
}

/// Whether a condition (any of its globs) holds for a value the call may lack. An absent
/// condition holds; a condition on a value the call lacks does not.
fn holds(condition: &Option<Vec<Glob>>, value: Option<&str>) -> bool {
    match condition {
        None => true,
        Some(globs) => value.is_some_and(|v| globs.iter().any(|g| g.matches(v))),
    }
}

#[derive(Debug, Clone)]
struct Rule {
    id: Arc<str>,
    keys: Option<Vec<KeyPattern>>,
    front_end: Option<FrontEnd>,
    operations: Option<Vec<Glob>>,
    identities: Option<Vec<Glob>>,
    aws_principals: Option<Vec<Glob>>,
    kms_key_arns: Option<Vec<Glob>>,
    kms_via_services: Option<Vec<Glob>>,
    aws_source_vpcs: Option<Vec<Glob>>,
    aws_source_vpces: Option<Vec<Glob>>,
    justifications: Option<Vec<Glob>>,
    decision: Decision,
}

impl Rule {
    fn covers(&self, key: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| p.matches(key)))
    }

    fn matches(&self, identity: &str, ctx: &AccessContext) -> bool {
        let aws = ctx.aws.as_ref();
        let field = |f: fn(&AwsContext) -> &Option<String>| aws.and_then(|a| f(a).as_deref());
        self.front_end.is_none_or(|f| f == ctx.front_end)
            && holds(&self.operations, Some(&ctx.operation))
            && holds(&self.identities, Some(identity))
            && holds(&self.aws_principals, field(|a| &a.principal_arn))
            && holds(&self.kms_key_arns, field(|a| &a.key_arn))
            && holds(&self.kms_via_services, field(|a| &a.via_service))
            && holds(&self.aws_source_vpcs, field(|a| &a.source_vpc))
            && holds(&self.aws_source_vpces, field(|a| &a.source_vpce))
            && holds(
                &self.justifications,
                ctx.justification.as_ref().map(Justification::code),
            )
    }
}

/// The policy file's `[[access_rule]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    id: String,
    tenant: String,
    keys: Option<Vec<String>>,
    front_end: Option<FrontEnd>,
    operations: Option<Vec<String>>,
    identities: Option<Vec<String>>,
    aws_principals: Option<Vec<String>>,
    kms_key_arns: Option<Vec<String>>,
    kms_via_services: Option<Vec<String>>,
    aws_source_vpcs: Option<Vec<String>>,
    aws_source_vpces: Option<Vec<String>>,
    justifications: Option<Vec<String>>,
    decision: Decision,
}

/// The policy file's `[justifications]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JustificationsFile {
    #[serde(default)]
    codes: Vec<String>,
}

/// The access rules of every tenant and the justification vocabulary.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    by_tenant: HashMap<Tenant, Vec<Rule>>,
    codes: HashSet<String>,
}

impl AccessRules {
    /// Checks and compiles the rules; an error names the entry and the problem.
    pub(super) fn compile(
        vocabulary: JustificationsFile,
        rules: Vec<RuleFile>,
    ) -> Result<Self, String> {
        let mut codes = HashSet::new();
        for code in vocabulary.codes {
            let ok = !code.is_empty()
                && code.len() <= 64
                && code
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(format!(
                    "justifications.codes: {code:?} must be 1 to 64 of a-z, A-Z, 0-9, '-', '_'"
                ));
            }
            if !codes.insert(code.clone()) {
                return Err(format!("justifications.codes: {code:?} appears twice"));
            }
        }
        codes.extend(KAJ_CODES.iter().map(|c| (*c).to_owned()));
        let mut ids = HashSet::new();
        let mut by_tenant: HashMap<Tenant, Vec<Rule>> = HashMap::new();
        for (i, r) in rules.into_iter().enumerate() {
            let at = format!("access_rule[{i}] ({:?})", r.id);
            let id_ok = !r.id.is_empty()
                && r.id.len() <= 64
                && r.id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !id_ok || r.id == DEFAULT_DENY {
                return Err(format!(
                    "{at}.id must be 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.' and not {DEFAULT_DENY:?}"
                ));
            }
            if !ids.insert(r.id.clone()) {
                return Err(format!("{at}.id appears twice"));
            }
            let tenant = Tenant::new(&r.tenant).map_err(|e| format!("{at}.tenant: {e}"))?;
            let keys = r
                .keys
                .map(|ps| {
                    ps.iter()
                        .map(|p| KeyPattern::parse(p))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(|e| format!("{at}.keys: {e}"))?;
            let globs = |name: &str, list: Option<Vec<String>>| -> Result<_, String> {
                match list {
                    Some(l) if l.is_empty() => Err(format!(
                        "{at}.{name} is empty, which no call matches; leave it out to match any"
                    )),
                    Some(l) => Ok(Some(l.iter().map(|g| Glob::new(g)).collect::<Vec<_>>())),
                    None => Ok(None),
                }
            };
            if let Some(js) = &r.justifications
                && let Some(unknown) = js
                    .iter()
                    .find(|j| !j.contains('*') && !codes.contains(j.as_str()))
            {
                return Err(format!(
                    "{at}.justifications: {unknown:?} is not in justifications.codes or the KAJ codes"
                ));
            }
            let aws_only = [
                ("aws_principals", r.aws_principals.is_some()),
                ("kms_key_arns", r.kms_key_arns.is_some()),
                ("kms_via_services", r.kms_via_services.is_some()),
                ("aws_source_vpcs", r.aws_source_vpcs.is_some()),
                ("aws_source_vpces", r.aws_source_vpces.is_some()),
            ];
            if let Some((name, _)) = aws_only.iter().find(|(_, set)| *set)
                && r.front_end.is_some_and(|f| f != FrontEnd::Xks)
            {
                return Err(format!(
                    "{at}.{name} is AWS KMS request metadata, which only front_end = \"xks\" has"
                ));
            }
            let rule = Rule {
                id: Arc::from(r.id.as_str()),
                keys,
                front_end: r.front_end,
                operations: globs("operations", r.operations)?,
                identities: globs("identities", r.identities)?,
                aws_principals: globs("aws_principals", r.aws_principals)?,
                kms_key_arns: globs("kms_key_arns", r.kms_key_arns)?,
                kms_via_services: globs("kms_via_services", r.kms_via_services)?,
                aws_source_vpcs: globs("aws_source_vpcs", r.aws_source_vpcs)?,
                aws_source_vpces: globs("aws_source_vpces", r.aws_source_vpces)?,
                justifications: globs("justifications", r.justifications)?,
                decision: r.decision,
            };
            by_tenant.entry(tenant).or_default().push(rule);
        }
        Ok(Self { by_tenant, codes })
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.by_tenant.values().map(Vec::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }

    /// A justification a caller declared, checked against the vocabulary. An empty code and
    /// reference is no justification.
    pub fn justification(
        &self,
        code: &str,
        reference: &str,
    ) -> Result<Option<Justification>, JustificationError> {
        if reference.len() > MAX_REFERENCE_LEN || reference.chars().any(char::is_control) {
            return Err(JustificationError::BadReference);
        }
        if code.is_empty() {
            return if reference.is_empty() {
                Ok(None)
            } else {
                Err(JustificationError::ReferenceWithoutCode)
            };
        }
        if !self.codes.contains(code) {
            return Err(JustificationError::UnknownCode(
                code.chars().take(64).collect(),
            ));
        }
        Ok(Some(Justification {
            code: code.to_owned(),
            reference: reference.to_owned(),
        }))
    }

    /// The first rule of `tenant` that covers `key` and matches the call decides; a covered
    /// key that no rule matches is denied ([`DEFAULT_DENY`]).
    pub fn decide(
        &self,
        tenant: &Tenant,
        key: &str,
        identity: &str,
        ctx: &AccessContext,
    ) -> Verdict {
        let Some(rules) = self.by_tenant.get(tenant) else {
            return Verdict::Unruled;
        };
        let mut covered = false;
        for rule in rules.iter().filter(|r| r.covers(key)) {
            covered = true;
            if rule.matches(identity, ctx) {
                let id = Arc::clone(&rule.id);
                return match rule.decision {
                    Decision::Allow => Verdict::Allow(id),
                    Decision::Deny => Verdict::Deny(id),
                    Decision::RequireApproval => Verdict::NeedsWindow(id),
                };
            }
        }
        if covered {
            Verdict::Deny(Arc::from(DEFAULT_DENY))
        } else {
            Verdict::Unruled
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<AccessRules, String> {
        #[derive(Deserialize)]
        struct F {
            #[serde(default)]
            justifications: JustificationsFile,
            #[serde(default)]
            access_rule: Vec<RuleFile>,
        }
        let f: F = toml::from_str(text).map_err(|e| e.to_string())?;
        AccessRules::compile(f.justifications, f.access_rule)
    }

    const HOSPITAL: &str = r#"
        [justifications]
        codes = ["treatment", "emergency", "research-pseudonymised", "support"]

        [[access_rule]]
        id = "aws-via-ebs-s3"
        tenant = "uksh"
        keys = ["aws-*"]
        front_end = "xks"
        operations = ["Decrypt", "Encrypt", "GenerateDataKey*"]
        kms_via_services = ["ebs", "s3"]
        aws_source_vpces = ["vpce-0a1b2c3d"]
        decision = "allow"

        [[access_rule]]
        id = "support-break-glass"
        tenant = "uksh"
        keys = ["ehr-*"]
        justifications = ["support"]
        decision = "require-approval"

        [[access_rule]]
        id = "research-declares"
        tenant = "uksh"
        keys = ["research"]
        justifications = ["research-pseudonymised"]
        identities = ["spiffe://uksh.example/research/*"]
        decision = "allow"

        [[access_rule]]
        id = "ehr-treatment"
        tenant = "uksh"
        keys = ["ehr-*"]
        front_end = "grpc"
        decision = "allow"
    "#;

    fn t(s: &str) -> Tenant {
        Tenant::new(s).unwrap()
    }

    fn grpc(op: &str, code: Option<&str>, r: &AccessRules) -> AccessContext {
        AccessContext {
            front_end: FrontEnd::Grpc,
            operation: op.into(),
            justification: code.map(|c| r.justification(c, "INC-1").unwrap().unwrap()),
            aws: None,
        }
    }

    fn xks(op: &str, via: Option<&str>, vpce: Option<&str>) -> AccessContext {
        AccessContext {
            front_end: FrontEnd::Xks,
            operation: op.into(),
            justification: None,
            aws: Some(AwsContext {
                kms_operation: Some(op.into()),
                principal_arn: Some("arn:aws:iam::111122223333:role/app".into()),
                key_arn: Some("arn:aws:kms:eu-central-1:111122223333:key/k".into()),
                via_service: via.map(Into::into),
                source_vpc: None,
                source_vpce: vpce.map(Into::into),
            }),
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_a_covered_key_is_denied_by_default() {
        let r = rules(HOSPITAL).unwrap();
        let uksh = t("uksh");
        let svc = "spiffe://uksh.example/ehr";
        // A key no rule covers behaves as without rules.
        assert_eq!(
            r.decide(&uksh, "pacs", svc, &grpc("Wrap", None, &r)),
            Verdict::Unruled
        );
        assert_eq!(
            r.decide(&t("other"), "ehr-1", svc, &grpc("Wrap", None, &r)),
            Verdict::Unruled
        );
        // Support needs a window, even though a later rule would allow the call.
        assert_eq!(
            r.decide(&uksh, "ehr-1", svc, &grpc("Unwrap", Some("support"), &r)),
            Verdict::NeedsWindow("support-break-glass".into())
        );
        assert_eq!(
            r.decide(&uksh, "ehr-1", svc, &grpc("Unwrap", Some("treatment"), &r)),
            Verdict::Allow("ehr-treatment".into())
        );
        // The same key through KMIP matches no rule: denied by default.
        let mut kmip = grpc("Get", None, &r);
        kmip.front_end = FrontEnd::Kmip;
        assert_eq!(
            r.decide(&uksh, "ehr-1", svc, &kmip),
            Verdict::Deny(DEFAULT_DENY.into())
        );
        // Research must declare research-pseudonymised, from a research identity.
        let research = "spiffe://uksh.example/research/job-7";
        assert_eq!(
            r.decide(&uksh, "research", research, &grpc("Unwrap", None, &r)),
            Verdict::Deny(DEFAULT_DENY.into())
        );
        assert_eq!(
            r.decide(
                &uksh,
                "research",
                research,
                &grpc("Unwrap", Some("research-pseudonymised"), &r)
            ),
            Verdict::Allow("research-declares".into())
        );
        assert_eq!(
            r.decide(
                &uksh,
                "research",
                svc,
                &grpc("Unwrap", Some("research-pseudonymised"), &r)
            ),
            Verdict::Deny(DEFAULT_DENY.into())
        );
    }

    #[test]
    fn aws_metadata_rules_match_service_endpoint_and_operation() {
        let r = rules(HOSPITAL).unwrap();
        let uksh = t("uksh");
        let id = "xks-uksh";
        let allowed = Verdict::Allow("aws-via-ebs-s3".into());
        let denied = Verdict::Deny(DEFAULT_DENY.into());
        assert_eq!(
            r.decide(
                &uksh,
                "aws-1",
                id,
                &xks("Decrypt", Some("ebs"), Some("vpce-0a1b2c3d"))
            ),
            allowed
        );
        assert_eq!(
            r.decide(
                &uksh,
                "aws-1",
                id,
                &xks(
                    "GenerateDataKeyWithoutPlaintext",
                    Some("s3"),
                    Some("vpce-0a1b2c3d")
                )
            ),
            allowed
        );
        // Directly (no service), via another service, from another endpoint, or another
        // operation: no rule matches.
        for ctx in [
            xks("Decrypt", None, Some("vpce-0a1b2c3d")),
            xks("Decrypt", Some("rds"), Some("vpce-0a1b2c3d")),
            xks("Decrypt", Some("ebs"), Some("vpce-ffff")),
            xks("Decrypt", Some("ebs"), None),
            xks("ReEncryptFrom", Some("ebs"), Some("vpce-0a1b2c3d")),
        ] {
            assert_eq!(r.decide(&uksh, "aws-1", id, &ctx), denied, "{ctx:?}");
        }
    }

    #[test]
    fn justifications_come_from_the_vocabulary_and_are_bounded() {
        let r = rules(HOSPITAL).unwrap();
        assert_eq!(r.justification("", "").unwrap(), None);
        let j = r.justification("emergency", "case 4711").unwrap().unwrap();
        assert_eq!((j.code(), j.reference()), ("emergency", "case 4711"));
        assert!(r.justification("CUSTOMER_INITIATED_SUPPORT", "").is_ok());
        assert!(matches!(
            r.justification("curiosity", ""),
            Err(JustificationError::UnknownCode(_))
        ));
        assert_eq!(
            r.justification("", "x"),
            Err(JustificationError::ReferenceWithoutCode)
        );
        assert_eq!(
            r.justification("support", &"x".repeat(MAX_REFERENCE_LEN + 1)),
            Err(JustificationError::BadReference)
        );
        assert_eq!(
            r.justification("support", "a\nb"),
            Err(JustificationError::BadReference)
        );
        // The reference is a case number, not for logs: Debug prints its length.
        assert!(!format!("{j:?}").contains("4711"));
    }

    #[test]
    fn broken_rule_sets_name_the_rule_and_the_problem() {
        let base = "[[access_rule]]\nid = \"r\"\ntenant = \"t\"\ndecision = \"allow\"\n";
        assert!(rules(base).is_ok());
        for (text, needle) in [
            (
                format!("{base}[[access_rule]]\nid = \"r\"\ntenant = \"t\"\ndecision = \"deny\"\n"),
                "twice",
            ),
            (base.replace("allow", "maybe"), "maybe"),
            (format!("{base}justifications = [\"whim\"]\n"), "whim"),
            (format!("{base}keys = [\"a*b\"]\n"), "key pattern"),
            (format!("{base}operations = []\n"), "empty"),
            (
                format!("{base}front_end = \"grpc\"\nkms_via_services = [\"ebs\"]\n"),
                "xks",
            ),
            (
                format!("{base}kms_via_service = [\"ebs\"]\n"),
                "kms_via_service",
            ),
            (base.replace("\"r\"", "\"default-deny\""), "default-deny"),
            (base.replace("\"t\"", "\"T T\""), "tenant"),
            ("[justifications]\ncodes = [\"a b\"]\n".to_owned(), "codes"),
        ] {
            let err = rules(&text).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn globs_match_anywhere_and_only_whole_strings() {
        let g = Glob::new("arn:aws:iam::*:role/ebs-*");
        assert!(g.matches("arn:aws:iam::1234:role/ebs-writer"));
        assert!(!g.matches("arn:aws:iam::1234:user/ebs-writer"));
        assert!(Glob::new("ebs").matches("ebs"));
        assert!(!Glob::new("ebs").matches("ebs2"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a*a").matches("aa"));
        assert!(!Glob::new("a*a").matches("a"));
        assert!(Glob::new("*-x").matches("y-x"));
    }
}
