//! Who is calling, and what they may do.
//!
//! Owns the caller's identity (URI SAN, else subject CN; verified in `certificates.rs`), the
//! policy file, and the authorization decision: a [`Grant`], which only [`Policy::grant`] can
//! make and which every custody operation requires. Knows nothing of gRPC, keys' states or the
//! HSM. The access rules and justifications a grant also carries live in [`access`].
//!
//! Certificates are verified at the request layer, not only in the TLS handshake: the TLS layer
//! ([`ClientAuthenticator::tls_verifier`]) checks that the client holds the private key of the
//! certificate it presents, and the request layer ([`ClientAuthenticator::identify`]) checks the
//! chain, validity and client-auth usage against the client CA on every call. A missing,
//! expired or foreign certificate therefore reaches the caller as a gRPC `UNAUTHENTICATED` with
//! a reason (and can be audited with its fingerprint), not as an opaque handshake failure.

pub mod access;
mod certificates;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use serde::Deserialize;

use crate::model::{KeyName, Tenant, validate_segment};
use crate::sync::{read, write};
pub use access::{
    AccessContext, AccessRules, AwsContext, DEFAULT_DENY, FrontEnd, Justification,
    JustificationError, Verdict,
};
pub use certificates::{ClientAuthenticator, VERIFIED_TTL_SECS, fingerprint};

/// What a caller may act as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Cloud services: Wrap, Unwrap, GenerateDataKey, Rewrap.
    Service,
    /// Security officers: key lifecycle.
    Officer,
    /// Auditors: the audit log.
    Auditor,
    /// KMIP clients (storage arrays, hypervisors, databases): create, fetch and manage the
    /// tenant's managed objects, whose plaintext they receive (`crate::kmip`).
    Kmip,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "service",
            Self::Officer => "officer",
            Self::Auditor => "auditor",
            Self::Kmip => "kmip",
        })
    }
}

/// A caller whose certificate chain verified against the client CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// URI SAN (e.g. `spiffe://uksh.example/ehr-archive`), else the subject CN.
    pub name: String,
    /// SHA-256 of the end-entity certificate, hex.
    pub fingerprint: String,
}

/// Why a caller could not be authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No client certificate was presented.
    #[error("no client certificate; connect with a certificate issued by the client CA")]
    NoCertificate,
    /// The certificate did not verify (unknown issuer, expired, wrong usage, …).
    #[error("client certificate rejected: {reason}")]
    Rejected {
        /// Why, as the verifier says it.
        reason: String,
        /// SHA-256 of the presented end-entity certificate, hex.
        fingerprint: String,
    },
    /// The certificate names no identity (no URI SAN and no subject CN).
    #[error("client certificate has neither a URI SAN nor a subject CN")]
    NoIdentity,
    /// The client CA could not be used.
    #[error("client CA unusable: {0}")]
    ClientCa(String),
}

/// Why a verified caller may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// The identity is not in the policy.
    #[error("{0} is not in the access policy")]
    UnknownIdentity(String),
    /// The identity lacks the role.
    #[error("{identity} does not have the {role} role")]
    Role {
        /// The caller.
        identity: String,
        /// The role the operation needs.
        role: Role,
    },
    /// The key is outside the caller's tenant or key patterns.
    #[error("{identity} may not use {key}")]
    Key {
        /// The caller.
        identity: String,
        /// The key asked for.
        key: String,
    },
    /// The tenant is not the caller's.
    #[error("{identity} may not act in tenant {tenant}")]
    Tenant {
        /// The caller.
        identity: String,
        /// The tenant asked for.
        tenant: String,
    },
}

/// An authorization decision: this identity may act as this role in this tenant, on keys
/// matching these patterns. Only [`Policy::grant`] makes one; custody operations take it and
/// check the key they touch with [`Grant::check_key`], so no path can skip authorization.
#[derive(Debug, Clone)]
pub struct Grant {
    identity: String,
    tenant: Tenant,
    role: Role,
    /// Shared with the policy entry: a grant is made per request and must not copy them.
    keys: Option<Arc<[KeyPattern]>>,
    /// The policy's access rules, shared.
    rules: Arc<AccessRules>,
    /// What the front-end knows of the call, for the rules; `None` until it says.
    context: Option<Arc<AccessContext>>,
    /// How the rules decided, once custody asked them (for the call's audit record).
    note: OnceLock<AccessNote>,
}

/// How access rules decided one call: for its audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessNote {
    /// The deciding rule's id ([`DEFAULT_DENY`] when none matched a covered key).
    pub rule: Arc<str>,
    /// The break-glass window the call used; empty if none.
    pub window: String,
    /// The window's reason (code and reference), recorded when the call declared none.
    pub window_reason: Option<(String, String)>,
    /// Whether the rules refused the call.
    pub refused: bool,
}

impl Grant {
    /// The caller's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The caller's tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The role this grant is for.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This grant for one call through a front-end that knows `context`.
    pub fn with_context(&self, context: AccessContext) -> Self {
        let mut grant = self.clone();
        grant.set_context(context);
        grant
    }

    /// Describes the call this grant is for (and forgets an earlier decision).
    pub fn set_context(&mut self, context: AccessContext) {
        self.context = Some(Arc::new(context));
        self.note = OnceLock::new();
    }

    /// Whether an access rule refused the call (its audit outcome is `RULE_DENIED`).
    pub fn refused_by_rule(&self) -> bool {
        self.note.get().is_some_and(|n| n.refused)
    }

    /// Writes the rules' decision and the justification into the call's audit record: the
    /// declared justification, else the reason of the window the call used.
    pub fn fill_record(&self, body: &mut crate::audit_record::RecordBody) {
        if let Some(note) = self.note.get() {
            body.access_rule = note.rule.to_string();
            body.access_window.clone_from(&note.window);
            if let Some((code, reference)) = &note.window_reason
                && self.justification().is_none()
            {
                body.justification.clone_from(code);
                body.justification_reference.clone_from(reference);
            }
        }
        if let Some(j) = self.justification() {
            body.justification = j.code().to_owned();
            body.justification_reference = j.reference().to_owned();
        }
        if body.outcome == "DENIED" && self.refused_by_rule() {
            body.outcome = "RULE_DENIED".into();
        }
    }

    /// What the access rules say about this call on `key` (a key segment, or a managed
    /// object's Name) of the grant's tenant. A grant that no front-end gave a context is
    /// refused on every key a rule covers: rules cannot be skipped by forgetting them.
    pub fn access_verdict(&self, key: &str) -> Verdict {
        match &self.context {
            Some(ctx) => self.rules.decide(&self.tenant, key, &self.identity, ctx),
            None => match self
                .rules
                .decide(&self.tenant, key, &self.identity, &NO_CONTEXT)
            {
                Verdict::Unruled => Verdict::Unruled,
                _ => Verdict::Deny(Arc::from(DEFAULT_DENY)),
            },
        }
    }

    /// Remembers how the rules decided (the first decision of a call stands).
    pub fn note_access(&self, note: AccessNote) {
        let _ = self.note.set(note);
    }

    /// How the rules decided this call, if they were asked.
    pub fn access_note(&self) -> Option<&AccessNote> {
        self.note.get()
    }

    /// The justification the caller declared.
    pub fn justification(&self) -> Option<&Justification> {
        self.context.as_ref().and_then(|c| c.justification.as_ref())
    }

    /// The policy's access rules (for its justification vocabulary).
    pub fn rules(&self) -> &AccessRules {
        &self.rules
    }

    /// Whether every key `pattern` can match is one the caller's patterns cover.
    pub fn covers_pattern(&self, pattern: &KeyPattern) -> bool {
        self.keys.as_ref().is_none_or(|patterns| {
            patterns.iter().any(|p| {
                if pattern.wildcard {
                    p.wildcard && pattern.prefix.starts_with(&p.prefix)
                } else {
                    p.matches(&pattern.prefix)
                }
            })
        })
    }

    /// Refuses a grant of another role.
    pub fn require(&self, role: Role) -> Result<(), Denied> {
        if self.role == role {
            Ok(())
        } else {
            Err(Denied::Role {
                identity: self.identity.clone(),
                role,
            })
        }
    }

    /// Whether `key` is in the caller's tenant and matches its key patterns.
    pub fn allows_key(&self, key: &KeyName) -> bool {
        key.tenant() == &self.tenant
            && self
                .keys
                .as_ref()
                .is_none_or(|patterns| patterns.iter().any(|p| p.matches(key.key())))
    }

    /// Whether the caller's key patterns cover a managed object's name (any name when the
    /// policy gives no patterns; an object without a name only then).
    pub fn allows_object_name(&self, name: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|patterns| !name.is_empty() && patterns.iter().any(|p| p.matches(name)))
    }

    /// Refuses a key outside the caller's tenant or patterns.
    pub fn check_key(&self, key: &KeyName) -> Result<(), Denied> {
        if self.allows_key(key) {
            Ok(())
        } else {
            Err(Denied::Key {
                identity: self.identity.clone(),
                key: key.to_string(),
            })
        }
    }

    /// Refuses a tenant other than the caller's.
    pub fn check_tenant(&self, tenant: &Tenant) -> Result<(), Denied> {
        if tenant == &self.tenant {
            Ok(())
        } else {
            Err(Denied::Tenant {
                identity: self.identity.clone(),
                tenant: tenant.to_string(),
            })
        }
    }
}

/// The context of a grant no front-end described: matches only rules without conditions.
static NO_CONTEXT: AccessContext = AccessContext {
    front_end: FrontEnd::Grpc,
    operation: String::new(),
    justification: None,
    aws: None,
};

/// A key-name pattern: a key segment, or a prefix followed by `*` (`ehr-*`, `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    prefix: String,
    wildcard: bool,
}

impl fmt::Display for KeyPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.prefix, if self.wildcard { "*" } else { "" })
    }
}

impl KeyPattern {
    /// Parses `name` or `prefix*`; the error says what is allowed.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (prefix, wildcard) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        let ok = (wildcard && prefix.is_empty()) || validate_segment("key", prefix).is_ok();
        if !ok || prefix.contains('*') {
            return Err(format!(
                "key pattern {s:?}: use a key name or a prefix ending in '*'"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            wildcard,
        })
    }

    /// Whether a key segment matches.
    pub fn matches(&self, key: &str) -> bool {
        if self.wildcard {
            key.starts_with(&self.prefix)
        } else {
            key == self.prefix
        }
    }
}

/// Why a policy file was refused. Names the file, the entry and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {source_name}: {problem}")]
pub struct PolicyError {
    source_name: String,
    problem: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    identity: Vec<PolicyFileEntry>,
    #[serde(default)]
    justifications: access::JustificationsFile,
    #[serde(default)]
    access_rule: Vec<access::RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFileEntry {
    name: String,
    tenant: String,
    roles: Vec<Role>,
    keys: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct PolicyEntry {
    tenant: Tenant,
    roles: Vec<Role>,
    keys: Option<Arc<[KeyPattern]>>,
}

/// Identities and what each may do. Anything not listed is denied.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    entries: HashMap<String, PolicyEntry>,
    rules: Arc<AccessRules>,
}

impl Policy {
    /// Parses a policy (see README "Access policy"); `source_name` names it in errors.
    pub fn from_toml(text: &str, source_name: &str) -> Result<Self, PolicyError> {
        let err = |problem: String| PolicyError {
            source_name: source_name.to_owned(),
            problem,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let mut entries = HashMap::new();
        for (i, e) in file.identity.into_iter().enumerate() {
            let at = format!("identity[{i}] ({:?})", e.name);
            if e.name.is_empty() {
                return Err(err(format!("identity[{i}].name is empty")));
            }
            let tenant = Tenant::new(&e.tenant).map_err(|x| err(format!("{at}.tenant: {x}")))?;
            if e.roles.is_empty() {
                return Err(err(format!(
                    "{at}.roles is empty; give at least one of service, officer, auditor, kmip"
                )));
            }
            let keys = match e.keys {
                None => None,
                Some(patterns) => Some(
                    patterns
                        .iter()
                        .map(|p| KeyPattern::parse(p))
                        .collect::<Result<Arc<[_]>, _>>()
                        .map_err(|x| err(format!("{at}.keys: {x}")))?,
                ),
            };
            if entries
                .insert(
                    e.name.clone(),
                    PolicyEntry {
                        tenant,
                        roles: e.roles,
                        keys,
                    },
                )
                .is_some()
            {
                return Err(err(format!("{at} appears twice")));
            }
        }
        let rules = AccessRules::compile(file.justifications, file.access_rule).map_err(err)?;
        Ok(Self {
            entries,
            rules: Arc::new(rules),
        })
    }

    /// The access rules and justification vocabulary.
    pub fn rules(&self) -> &AccessRules {
        &self.rules
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            source_name: path.display().to_string(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// How many identities the policy names.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the policy names no identity (and so denies everything).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant the policy assigns to an identity, if it knows the identity.
    pub fn tenant_of(&self, identity: &Identity) -> Option<&Tenant> {
        self.entries.get(&identity.name).map(|e| &e.tenant)
    }

    /// Decides whether `identity` may act as `role`.
    pub fn grant(&self, identity: &Identity, role: Role) -> Result<Grant, Denied> {
        let entry = self
            .entries
            .get(&identity.name)
            .ok_or_else(|| Denied::UnknownIdentity(identity.name.clone()))?;
        if !entry.roles.contains(&role) {
            return Err(Denied::Role {
                identity: identity.name.clone(),
                role,
            });
        }
        Ok(Grant {
            identity: identity.name.clone(),
            tenant: entry.tenant.clone(),
            role,
            keys: entry.keys.clone(),
            rules: Arc::clone(&self.rules),
            context: None,
            note: OnceLock::new(),
        })
    }
}

/// The policy in force, replaceable while serving (SIGHUP).
#[derive(Debug)]
pub struct SharedPolicy {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
}

impl SharedPolicy {
    /// Loads the policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let policy = Policy::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(policy)),
        })
    }

    /// The policy for one decision.
    pub fn current(&self) -> Arc<Policy> {
        Arc::clone(&read(&self.current))
    }

    /// Re-reads the file. A broken file keeps the policy in force and returns why.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let policy = Policy::load(&self.path)?;
        let n = policy.len();
        *write(&self.current) = Arc::new(policy);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[identity]]
        name = "spiffe://uksh.example/ehr-archive"
        tenant = "uksh"
        roles = ["service"]
        keys = ["ehr-*", "pacs"]

        [[identity]]
        name = "officer-anna"
        tenant = "uksh"
        roles = ["officer", "auditor"]
    "#;

    fn id(name: &str) -> Identity {
        Identity {
            name: name.into(),
            fingerprint: String::new(),
        }
    }

    fn key(s: &str) -> KeyName {
        s.parse().unwrap()
    }

    #[test]
    fn grants_follow_the_policy_and_deny_by_default() {
        let p = Policy::from_toml(POLICY, "test").unwrap();
        let g = p
            .grant(&id("spiffe://uksh.example/ehr-archive"), Role::Service)
            .unwrap();
        assert!(g.allows_key(&key("tenants/uksh/keys/ehr-2024")));
        assert!(g.allows_key(&key("tenants/uksh/keys/pacs")));
        assert!(!g.allows_key(&key("tenants/uksh/keys/pacs-2")));
        assert!(
            !g.allows_key(&key("tenants/other/keys/ehr-2024")),
            "another tenant"
        );
        assert!(matches!(g.require(Role::Officer), Err(Denied::Role { .. })));
        assert!(matches!(
            p.grant(&id("spiffe://uksh.example/ehr-archive"), Role::Officer),
            Err(Denied::Role { .. })
        ));
        assert!(matches!(
            p.grant(&id("stranger"), Role::Service),
            Err(Denied::UnknownIdentity(_))
        ));

        let officer = p.grant(&id("officer-anna"), Role::Officer).unwrap();
        assert!(officer.allows_key(&key("tenants/uksh/keys/anything")));
        assert!(officer.check_tenant(&Tenant::new("uksh").unwrap()).is_ok());
        assert!(
            officer
                .check_tenant(&Tenant::new("other").unwrap())
                .is_err()
        );
        assert!(
            Policy::default()
                .grant(&id("officer-anna"), Role::Officer)
                .is_err()
        );
    }

    #[test]
    fn bad_policies_name_the_entry_and_the_problem() {
        for (text, needle) in [
            (
                "[[identity]]\nname = \"a\"\ntenant = \"UKSH\"\nroles = [\"service\"]",
                "tenant",
            ),
            (
                "[[identity]]\nname = \"a\"\ntenant = \"t\"\nroles = [\"admin\"]",
                "admin",
            ),
            (
                "[[identity]]\nname = \"a\"\ntenant = \"t\"\nroles = []",
                "roles",
            ),
            (
                "[[identity]]\nname = \"a\"\ntenant = \"t\"\nroles = [\"service\"]\nkeys = [\"a*b\"]",
                "key pattern",
            ),
            (
                "[[identity]]\nname = \"a\"\ntenant = \"t\"\nroles = [\"service\"]\nrole = 1",
                "role",
            ),
            (
                "[[identity]]\nname = \"a\"\ntenant = \"t\"\nroles = [\"service\"]\n[[identity]]\nname = \"a\"\ntenant = \"t\"\nroles = [\"service\"]",
                "twice",
            ),
        ] {
            let err = Policy::from_toml(text, "p.toml").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("p.toml"), "{err}");
        }
    }
}
