//! The `[xks]` section: the AWS KMS external key store proxy's listeners, TLS, region and
//! prefixes (each with its policy identity, credentials file and key map).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct XksSection {
    listen: String,
    ping_listen: Option<String>,
    cert: PathBuf,
    key: PathBuf,
    region: String,
    client_ca: Option<PathBuf>,
    client_subject: Option<String>,
    host_names: Option<Vec<String>>,
    max_concurrent_requests: Option<usize>,
    limits: Option<super::limits::LimitsSection>,
    #[serde(default)]
    prefix: Vec<XksPrefixSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct XksPrefixSection {
    path: String,
    identity: String,
    credentials: PathBuf,
    keys: Option<std::collections::BTreeMap<String, String>>,
    allowed_principals: Option<Vec<String>>,
}

/// The AWS KMS external key store proxy (`[xks]`; see `crate::xks`).
#[derive(Debug, Clone)]
pub struct XksConfig {
    /// HTTPS address.
    pub listen: SocketAddr,
    /// Plain-HTTP address answering only `GET /ping`, for load balancers, if any.
    pub ping_listen: Option<SocketAddr>,
    /// Server certificate chain (PEM); AWS KMS requires a publicly trusted one.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The AWS region whose KMS calls (the SigV4 scope).
    pub region: String,
    /// Optional mTLS: the CA that issues KMS's client certificate.
    pub client_ca: Option<PathBuf>,
    /// ... and the subject CN it must carry (`cks.kms.<region>.amazonaws.com`).
    pub client_subject: Option<String>,
    /// The names a request's signed `host` may carry (the proxy's own names); `None`: the DNS
    /// names and IP addresses of the server certificate.
    pub host_names: Option<Vec<String>>,
    /// Requests served at once; beyond, `ThrottlingException`.
    pub max_concurrent_requests: usize,
    /// The HTTPS listener's bounds (`[xks.limits]`).
    pub limits: crate::listener::ListenerLimits,
    /// One entry per path prefix (tenant).
    pub prefixes: Vec<XksPrefix>,
}

/// One XKS path prefix: `{path}/kms/xks/v1/...`.
#[derive(Debug, Clone)]
pub struct XksPrefix {
    /// The part before `/kms/xks/v1` (may be empty).
    pub path: String,
    /// The policy identity KMS acts as (role `service` in one tenant).
    pub identity: String,
    /// The SigV4 credentials file.
    pub credentials: PathBuf,
    /// External key id → key name in the identity's tenant; `None`: the id is the key name.
    pub keys: Option<std::collections::BTreeMap<String, String>>,
    /// Optional secondary authorization: `awsPrincipalArn` values (a trailing `*` matches any
    /// rest) that may use this prefix.
    pub allowed_principals: Option<Vec<String>>,
}

pub(super) fn parse_xks(
    x: XksSection,
    err: &dyn Fn(&str, String) -> ConfigError,
    readable: &dyn Fn(&str, &Path) -> Result<PathBuf, ConfigError>,
) -> Result<XksConfig, ConfigError> {
    let address = |key: &str, a: &str| {
        a.parse::<SocketAddr>().map_err(|_| {
            err(
                key,
                format!("{a:?} is not an address:port such as 0.0.0.0:443"),
            )
        })
    };
    let listen = address("xks.listen", &x.listen)?;
    let ping_listen = x
        .ping_listen
        .as_deref()
        .map(|a| address("xks.ping_listen", a))
        .transpose()?;
    if x.region.is_empty()
        || !x
            .region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err(
            "xks.region",
            format!("{:?} is not an AWS region such as eu-central-1", x.region),
        ));
    }
    if x.client_ca.is_some() != x.client_subject.is_some() {
        return Err(err(
            "xks.client_subject",
            "mTLS needs both client_ca and client_subject (cks.kms.<region>.amazonaws.com)".into(),
        ));
    }
    if let Some(names) = &x.host_names
        && (names.is_empty()
            || names
                .iter()
                .any(|n| n.is_empty() || n.contains(['/', ' ', ':'])))
    {
        return Err(err(
            "xks.host_names",
            "give the proxy's host names without port, e.g. [\"xks.example.org\"] (or leave it out to use the certificate's names)".into(),
        ));
    }
    let max = x.max_concurrent_requests.unwrap_or(256);
    if !(1..=100_000).contains(&max) {
        return Err(err(
            "xks.max_concurrent_requests",
            "must be 1 to 100000".into(),
        ));
    }
    if x.prefix.is_empty() {
        return Err(err(
            "xks.prefix",
            "at least one [[xks.prefix]] (path, identity, credentials) is needed".into(),
        ));
    }
    let mut prefixes: Vec<XksPrefix> = Vec::with_capacity(x.prefix.len());
    for p in x.prefix {
        let path = p.path.trim_end_matches('/').to_owned();
        let valid = (path.is_empty() || path.starts_with('/'))
            && path.len() + "/kms/xks/v1".len() <= 128
            && path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_'))
            && !path.contains("//");
        if !valid {
            return Err(err(
                "xks.prefix.path",
                format!(
                    "{:?}: empty or /a/b, of A-Z a-z 0-9 / - _, at most 117 characters",
                    p.path
                ),
            ));
        }
        if prefixes.iter().any(|q| q.path == path) {
            return Err(err(
                "xks.prefix.path",
                format!("{path:?} is configured twice"),
            ));
        }
        if let Some(keys) = &p.keys {
            for (id, key) in keys {
                let id_ok = (1..=128).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
                if !id_ok || crate::model::KeyName::new("t", key).is_err() {
                    return Err(err(
                        "xks.prefix.keys",
                        format!(
                            "{id:?} = {key:?}: external key ids are 1-128 of A-Z a-z 0-9 - . _, values key names of the tenant"
                        ),
                    ));
                }
            }
        }
        prefixes.push(XksPrefix {
            path,
            identity: p.identity,
            credentials: readable("xks.prefix.credentials", &p.credentials)?,
            keys: p.keys,
            allowed_principals: p.allowed_principals,
        });
    }
    Ok(XksConfig {
        listen,
        ping_listen,
        cert: readable("xks.cert", &x.cert)?,
        key: readable("xks.key", &x.key)?,
        region: x.region,
        client_ca: x
            .client_ca
            .as_deref()
            .map(|p| readable("xks.client_ca", p))
            .transpose()?,
        client_subject: x.client_subject,
        host_names: x
            .host_names
            .map(|names| names.into_iter().map(|n| n.to_ascii_lowercase()).collect()),
        max_concurrent_requests: max,
        limits: super::limits::parse_limits(
            x.limits,
            crate::listener::ListenerLimits {
                max_connections: 1024,
                // KMS authenticates by SigV4, not by certificate.
                anonymous: None,
                ..Default::default()
            },
            "xks.limits",
            err,
        )?,
        prefixes,
    })
}
