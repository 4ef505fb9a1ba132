//! `tresor bench`: its arguments, the XKS target built from them, and the run against a
//! server, optionally beside the raw PKCS#11 loop in the same run (the load generator itself
//! is [`load`]).

mod load;

use std::path::{Path, PathBuf};

use clap::Args;

use super::output::Output;
use super::{Exit, Failure};
use crate::client::Profile;
pub(super) use load::{BenchOp, BenchPlan, BenchReport, KmipTarget, Target, XksTarget, run};

#[derive(Debug, Args)]
pub(super) struct BenchArgs {
    /// The key to use (tenants/{tenant}/keys/{key}); not needed with --raw-hsm or --xks.
    #[arg(long, required_unless_present_any = ["raw_hsm", "xks", "kmip"])]
    pub(super) key: Option<String>,
    /// Load the XKS proxy instead of the gRPC API: its base URL up to the path prefix, e.g.
    /// https://xks.example.org:443/uksh (requests go to {URL}/kms/xks/v1/...). wrap = Encrypt,
    /// unwrap = Decrypt, mixed = both; one connection per request in flight.
    #[arg(long, requires_all = ["xks_key", "xks_credentials", "xks_region", "xks_ca"], conflicts_with_all = ["raw_hsm", "compare_raw"])]
    pub(super) xks: Option<String>,
    /// The external key id to use with --xks.
    #[arg(long)]
    pub(super) xks_key: Option<String>,
    /// A credentials file as the proxy reads it (its first pair signs).
    #[arg(long)]
    pub(super) xks_credentials: Option<PathBuf>,
    /// The SigV4 region the proxy expects.
    #[arg(long)]
    pub(super) xks_region: Option<String>,
    /// CA certificate(s) (PEM) that issued the proxy's certificate.
    #[arg(long)]
    pub(super) xks_ca: Option<PathBuf>,
    /// Load the KMIP server instead: its HOST:PORT. The connection profile gives the CA, the
    /// client certificate (an identity with role kmip) and the server name. wrap = Encrypt,
    /// unwrap = Decrypt (AES-GCM, KMIP 1.4), get = Get; one connection per worker.
    #[arg(long, requires = "kmip_object", conflicts_with_all = ["xks", "raw_hsm"])]
    pub(super) kmip: Option<String>,
    /// The managed object (Unique Identifier) to use with --kmip: Active, AES-128 or AES-256.
    #[arg(long)]
    pub(super) kmip_object: Option<String>,
    /// Speak HTTP/1.1 to the proxy (default HTTP/2).
    #[arg(long)]
    xks_http1: bool,
    /// Measure the ceiling instead: the same AES-GCM encryptions directly on the server's
    /// PKCS#11 module and token (from --config), no gRPC, no audit.
    #[arg(long, requires = "config", conflicts_with = "compare_raw")]
    pub(super) raw_hsm: bool,
    /// Measure the service, then the raw HSM, and print service/raw.
    #[arg(long, requires = "config")]
    pub(super) compare_raw: bool,
    /// The server's configuration (for --raw-hsm and --compare-raw: module, token, PIN).
    #[arg(long)]
    pub(super) config: Option<PathBuf>,
    /// Threads of the raw loop (default: the server's hsm.sessions).
    #[arg(long)]
    pub(super) threads: Option<usize>,
    /// What to send.
    #[arg(long, value_enum, default_value_t = BenchOp::Wrap)]
    pub(super) op: BenchOp,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(super) connections: u16,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(super) in_flight: u16,
    /// How long to run: 30s, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) duration: std::time::Duration,
    /// Stop after this many requests instead.
    #[arg(long)]
    pub(super) requests: Option<u64>,
    /// Plaintext bytes per request.
    #[arg(long, default_value_t = 32)]
    pub(super) payload: usize,
    /// AAD bytes per request.
    #[arg(long, default_value_t = 16)]
    pub(super) aad: usize,
    /// Open loop at this many requests per second (latency then counts from each request's
    /// scheduled start).
    #[arg(long)]
    pub(super) rate: Option<f64>,
}

/// The bench's XKS target from `--xks URL` and its companions.
pub(super) async fn xks_target(url: &str, a: &BenchArgs) -> Result<XksTarget, Failure> {
    let usage = |what: String| {
        Failure::new(
            Exit::Config,
            what,
            "write --xks https://HOST[:PORT][/PREFIX], e.g. https://xks.example.org/uksh",
        )
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| usage(format!("{url:?} is not an https:// URL")))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| usage(format!("{p:?} is not a port")))?,
        ),
        None => (authority, 443),
    };
    let addr = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| usage(format!("cannot resolve {host}")))?;
    let missing = |flag: &str| {
        Failure::new(
            Exit::Config,
            format!("{flag} is missing"),
            "--xks needs --xks-key, --xks-credentials, --xks-region and --xks-ca",
        )
    };
    let credentials_path = a
        .xks_credentials
        .as_deref()
        .ok_or_else(|| missing("--xks-credentials"))?;
    let credential = crate::xks::SharedCredentials::load(credentials_path)
        .map_err(|e| {
            Failure::new(
                Exit::Config,
                e.to_string(),
                "give the proxy's credentials file (mode 0600)",
            )
        })?
        .current()
        .first()
        .cloned()
        .ok_or_else(|| missing("a credential"))?;
    let mut roots = rustls::RootCertStore::empty();
    let ca = a.xks_ca.as_deref().ok_or_else(|| missing("--xks-ca"))?;
    for cert in crate::pki::load_certs(ca).map_err(|e| {
        Failure::new(
            Exit::Config,
            e.to_string(),
            "give the CA that issued the proxy's certificate",
        )
    })? {
        roots.add(cert).map_err(|e| {
            Failure::new(Exit::Config, e.to_string(), "give a CA certificate in PEM")
        })?;
    }
    Ok(XksTarget {
        addr,
        server_name: host.to_owned(),
        roots,
        path: path.trim_end_matches('/').to_owned(),
        external_key: a.xks_key.clone().ok_or_else(|| missing("--xks-key"))?,
        credential,
        region: a
            .xks_region
            .clone()
            .ok_or_else(|| missing("--xks-region"))?,
        http: if a.xks_http1 {
            crate::xks::client::HttpVersion::Http1
        } else {
            crate::xks::client::HttpVersion::Http2
        },
    })
}

/// The bench's KMIP target: `HOST:PORT`, with the profile's CA and client certificate.
async fn kmip_target(addr: &str, object: String, p: &Profile) -> Result<KmipTarget, Failure> {
    let config = |what: String, hint: &str| Failure::new(Exit::Config, what, hint.to_owned());
    let (host, _) = addr.rsplit_once(':').ok_or_else(|| {
        config(
            format!("{addr:?} is not HOST:PORT"),
            "write --kmip kmip.example.org:5696",
        )
    })?;
    let resolved = tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| config(format!("cannot resolve {addr}"), "check --kmip"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::pki::load_certs(&p.ca)
        .map_err(|e| config(e.to_string(), "the profile's ca must be PEM"))?
    {
        roots
            .add(cert)
            .map_err(|e| config(e.to_string(), "the profile's ca must be a CA certificate"))?;
    }
    let (Some(cert), Some(key)) = (&p.cert, &p.key) else {
        return Err(config(
            "the profile has no client certificate".into(),
            "KMIP needs one: use a profile with cert and key of an identity with role kmip",
        ));
    };
    let chain = crate::pki::load_certs(cert)
        .map_err(|e| config(e.to_string(), "the profile's cert must be PEM"))?;
    let key = crate::pki::load_key(key)
        .map_err(|e| config(e.to_string(), "the profile's key must be PEM"))?;
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
    })
    .map_err(|e| config(e.to_string(), "check the profile's certificate and key"))?;
    Ok(KmipTarget {
        addr: resolved,
        server_name: p.server_name.clone().unwrap_or_else(|| host.to_owned()),
        tls: std::sync::Arc::new(tls),
        object,
    })
}

pub(super) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: write a number and a unit, e.g. 30s, 2m"))?;
    match unit {
        "s" | "" => Ok(std::time::Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(std::time::Duration::from_secs)
            .ok_or_else(|| format!("{s:?}: too long")),
        "ms" => Ok(std::time::Duration::from_millis(n)),
        _ => Err(format!("{s:?}: units are ms, s, m")),
    }
}

/// `tresor bench`: against a server (gRPC or XKS), optionally compared with the raw PKCS#11
/// loop in the same run, or the raw loop alone.
pub(super) async fn command(
    a: BenchArgs,
    profile: Option<&Path>,
    out: &Output,
) -> Result<(), Failure> {
    let (threads_arg, payload, aad_len) = (a.threads, a.payload, a.aad);
    let raw = move |config: &Path, duration| {
        let config = crate::config::Config::load(config).map_err(|e| {
            Failure::new(
                Exit::Config,
                e.to_string(),
                "give the server's configuration with --config",
            )
        })?;
        let threads = threads_arg.unwrap_or(config.hsm.sessions);
        crate::hsm::raw_gcm_encrypt(&config.hsm, threads, duration, payload, aad_len)
            .map(|r| (r, threads))
            .map_err(|e| {
                Failure::new(
                    Exit::Dependency,
                    format!("raw HSM loop: {e}"),
                    "check the module, token label and PIN in the configuration",
                )
            })
    };
    if a.raw_hsm {
        let config = a.config.clone().unwrap_or_default();
        let (r, threads) = tokio::task::spawn_blocking(move || raw(&config, a.duration))
            .await
            .map_err(|e| Failure::new(Exit::Other, e.to_string(), "report this"))??;
        out.raw(&r, threads, None);
        return Ok(());
    }
    let profile_file = || {
        profile.ok_or_else(|| {
            Failure::new(
                Exit::Config,
                "no connection profile",
                "pass --profile FILE or set TRESOR_PROFILE (see README \"Connection profiles\")",
            )
        })
    };
    let target = match (&a.xks, &a.kmip) {
        (Some(url), _) => Target::Xks(xks_target(url, &a).await?),
        (None, Some(addr)) => Target::Kmip(
            kmip_target(
                addr,
                a.kmip_object.clone().unwrap_or_default(),
                &Profile::load(profile_file()?)?,
            )
            .await?,
        ),
        (None, None) => Target::Grpc(Profile::load(profile_file()?)?),
    };
    if a.op == BenchOp::Get && !matches!(target, Target::Kmip(_)) {
        return Err(Failure::new(
            Exit::Usage,
            "--op get is a KMIP Get",
            "use it with --kmip HOST:PORT --kmip-object ID",
        ));
    }
    let plan = BenchPlan {
        key: a.key.clone().unwrap_or_default(),
        op: a.op,
        connections: usize::from(a.connections),
        in_flight: usize::from(a.in_flight),
        duration: a.duration,
        requests: a.requests,
        payload: a.payload,
        aad: a.aad,
        rate: a.rate,
    };
    let report = run(&target, &plan).await?;
    let raw_report = if a.compare_raw {
        let config = a.config.clone().unwrap_or_default();
        let duration = plan.duration;
        Some(
            tokio::task::spawn_blocking(move || raw(&config, duration))
                .await
                .map_err(|e| Failure::new(Exit::Other, e.to_string(), "report this"))??,
        )
    } else {
        None
    };
    out.bench(&report, &plan, raw_report.as_ref().map(|(r, t)| (r, *t)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_refuse_overflow_instead_of_wrapping() {
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert!(parse_duration("999999999999999999m").is_err());
    }
}
