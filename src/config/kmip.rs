//! The `[kmip]` section: the KMIP server's listener, TLS, the tenant key its objects are
//! sealed under, and how long a destroyed object's material is kept.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KmipSection {
    listen: String,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    wrapping_key: Option<String>,
    destroy_grace_hours: Option<u64>,
    tenant_destroy_grace_hours: Option<BTreeMap<String, u64>>,
    officer_destroy_approval: Option<bool>,
    max_concurrent_requests: Option<usize>,
    limits: Option<super::limits::LimitsSection>,
}

/// The KMIP server (`[kmip]`; see `crate::kmip`).
#[derive(Debug, Clone)]
pub struct KmipConfig {
    /// The TLS address (KMIP's port is 5696).
    pub listen: SocketAddr,
    /// Server certificate chain (PEM); `[tls].cert` when not given.
    pub cert: PathBuf,
    /// Its key; `[tls].key` when not given.
    pub key: PathBuf,
    /// The CA that issues KMIP clients' certificates; `[tls].client_ca` when not given.
    pub client_ca: PathBuf,
    /// The key of each tenant that managed objects are sealed under (`tenants/T/keys/NAME`).
    pub wrapping_key: String,
    /// How long a destroyed object's material is kept, by default.
    pub destroy_grace: Duration,
    /// ... and per tenant, where an officer set it (zero: removed at once).
    pub tenant_destroy_grace: BTreeMap<String, Duration>,
    /// Whether an officer's `tresor kmip destroy` needs a second officer's approval (default
    /// yes; a KMIP client's own Destroy never does).
    pub officer_destroy_approval: bool,
    /// Requests served at once; beyond, the request is refused.
    pub max_concurrent_requests: usize,
    /// The listener's bounds (`[kmip.limits]`).
    pub limits: crate::listener::ListenerLimits,
}

/// The TLS files the `[tls]` section names, which `[kmip]` uses where it names none.
pub(super) struct TlsDefaults<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
}

pub(super) fn parse_kmip(
    k: KmipSection,
    tls: TlsDefaults<'_>,
    err: &dyn Fn(&str, String) -> ConfigError,
    readable: &dyn Fn(&str, &Path) -> Result<PathBuf, ConfigError>,
) -> Result<KmipConfig, ConfigError> {
    let listen = k.listen.parse::<SocketAddr>().map_err(|_| {
        err(
            "kmip.listen",
            format!("{:?} is not an address:port such as 0.0.0.0:5696", k.listen),
        )
    })?;
    let file = |key: &str, given: Option<PathBuf>, default: &Path| match given {
        Some(p) => readable(key, &p),
        None => Ok(default.to_owned()),
    };
    let wrapping_key = k.wrapping_key.unwrap_or_else(|| "kmip".into());
    if crate::model::KeyName::new("t", &wrapping_key).is_err() {
        return Err(err(
            "kmip.wrapping_key",
            format!("{wrapping_key:?} is not a key name (the key segment, e.g. \"kmip\")"),
        ));
    }
    let hours = |key: &str, h: u64| {
        if h <= 24 * 365 {
            Ok(Duration::from_secs(h * 3600))
        } else {
            Err(err(key, "must be 0 to 8760 hours".into()))
        }
    };
    let destroy_grace = hours(
        "kmip.destroy_grace_hours",
        k.destroy_grace_hours.unwrap_or(7 * 24),
    )?;
    let mut tenant_destroy_grace = BTreeMap::new();
    for (tenant, h) in k.tenant_destroy_grace_hours.unwrap_or_default() {
        if crate::model::Tenant::new(&tenant).is_err() {
            return Err(err(
                "kmip.tenant_destroy_grace_hours",
                format!("{tenant:?} is not a tenant name"),
            ));
        }
        tenant_destroy_grace.insert(tenant, hours("kmip.tenant_destroy_grace_hours", h)?);
    }
    let max = k.max_concurrent_requests.unwrap_or(256);
    if !(1..=100_000).contains(&max) {
        return Err(err(
            "kmip.max_concurrent_requests",
            "must be 1 to 100000".into(),
        ));
    }
    Ok(KmipConfig {
        listen,
        cert: file("kmip.cert", k.cert, tls.cert)?,
        key: file("kmip.key", k.key, tls.key)?,
        client_ca: file("kmip.client_ca", k.client_ca, tls.client_ca)?,
        wrapping_key,
        destroy_grace,
        tenant_destroy_grace,
        officer_destroy_approval: k.officer_destroy_approval.unwrap_or(true),
        max_concurrent_requests: max,
        limits: super::limits::parse_limits(
            k.limits,
            crate::listener::ListenerLimits {
                max_connections: 1024,
                // Every KMIP connection presents a certificate at the handshake.
                anonymous: None,
                ..Default::default()
            },
            "kmip.limits",
            err,
        )?,
    })
}
