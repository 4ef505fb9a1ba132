//! Everything the configuration names, read and checked before the HSM is opened: TLS
//! material of every listener, the client CA, the access policy, the XKS credentials, the
//! HSM module and PIN. A problem here is a configuration error (exit 64) that touched nothing.

use std::sync::Arc;

use rustls::ServerConfig;

use crate::auth::{ClientAuthenticator, SharedPolicy};
use crate::config::{Config, ConfigError};
use crate::listener;
use crate::pki;

/// What the checks produced, ready for the front-ends.
pub(super) struct Checked {
    pub grpc_tls: Arc<ServerConfig>,
    pub authenticator: ClientAuthenticator,
    pub policy: Arc<SharedPolicy>,
    pub xks: Option<CheckedXks>,
    pub kmip: Option<CheckedKmip>,
}

pub(super) struct CheckedKmip {
    pub tls: Arc<ServerConfig>,
    pub authenticator: ClientAuthenticator,
}

pub(super) struct CheckedXks {
    pub tls: Arc<ServerConfig>,
    pub credentials: crate::xks::Credentials,
    /// The names a signed `host` may carry.
    pub host_names: Vec<String>,
}

pub(super) fn config_error(
    config: &Config,
    key: &str,
    problem: impl std::fmt::Display,
) -> ConfigError {
    ConfigError {
        file: config.source.display().to_string(),
        key: key.to_owned(),
        problem: problem.to_string(),
    }
}

/// Reads and checks every file `config` names, in the order a reader of the configuration
/// finds them; the first problem is the error.
pub(super) fn check(config: &Config) -> Result<Checked, ConfigError> {
    let error = |key: &str, e: &dyn std::fmt::Display| config_error(config, key, e);
    let certs = pki::load_certs(&config.tls_cert).map_err(|e| error("tls.cert", &e))?;
    let key = pki::load_key(&config.tls_key).map_err(|e| error("tls.key", &e))?;
    let client_ca = pki::load_certs(&config.client_ca).map_err(|e| error("tls.client_ca", &e))?;
    let authenticator =
        ClientAuthenticator::new(&client_ca).map_err(|e| error("tls.client_ca", &e))?;
    // The handshake asks for a certificate but lets a caller without one in, so that the
    // missing certificate reaches it as a clear UNAUTHENTICATED (crate::auth).
    let grpc_tls = listener::server_config(
        certs,
        key,
        Some(authenticator.tls_verifier()),
        crate::grpc::ALPN,
    )
    .map_err(|e| error("tls.key", &e))?;
    let policy = SharedPolicy::load(&config.policy_file).map_err(|e| error("policy.file", &e))?;
    if policy.current().is_empty() {
        tracing::warn!(file = %config.policy_file.display(), "the access policy names no identity: every call will be denied");
    }
    let xks = match &config.xks {
        None => None,
        Some(x) => {
            let certs = pki::load_certs(&x.cert).map_err(|e| error("xks.cert", &e))?;
            let host_names = match &x.host_names {
                Some(names) => names.clone(),
                None => certs
                    .first()
                    .map(pki::certificate_names)
                    .unwrap_or_default(),
            };
            if host_names.is_empty() {
                return Err(error(
                    "xks.host_names",
                    &"the XKS certificate names no DNS name or IP address to check the signed host against; set xks.host_names",
                ));
            }
            let key = pki::load_key(&x.key).map_err(|e| error("xks.key", &e))?;
            let verifier = match &x.client_ca {
                None => None,
                Some(path) => {
                    let cas = pki::load_certs(path).map_err(|e| error("xks.client_ca", &e))?;
                    Some(listener::ca_verifier(cas).map_err(|e| error("xks.client_ca", &e))?)
                }
            };
            let tls = listener::server_config(certs, key, verifier, crate::xks::ALPN)
                .map_err(|e| error("xks.key", &e))?;
            let credentials = crate::xks::Credentials::load(x)
                .map_err(|e| error("xks.prefix.credentials", &e))?;
            Some(CheckedXks {
                tls: Arc::new(tls),
                credentials,
                host_names,
            })
        }
    };
    let kmip = match &config.kmip {
        None => None,
        Some(k) => {
            let certs = pki::load_certs(&k.cert).map_err(|e| error("kmip.cert", &e))?;
            let key = pki::load_key(&k.key).map_err(|e| error("kmip.key", &e))?;
            let cas = pki::load_certs(&k.client_ca).map_err(|e| error("kmip.client_ca", &e))?;
            let authenticator =
                ClientAuthenticator::new(&cas).map_err(|e| error("kmip.client_ca", &e))?;
            // KMIP clients authenticate by certificate: the handshake requires one.
            let verifier = listener::ca_verifier(cas).map_err(|e| error("kmip.client_ca", &e))?;
            let tls =
                listener::server_config(certs, key, Some(verifier), crate::kmip::server::ALPN)
                    .map_err(|e| error("kmip.key", &e))?;
            Some(CheckedKmip {
                tls: Arc::new(tls),
                authenticator,
            })
        }
    };
    // Read once here so that an unreadable or world-readable PIN file, or an unset PIN
    // variable, is a configuration error; the HSM back-end reads it again when it logs in.
    let pin_key = match &config.hsm.pin {
        crate::hsm::PinSource::File(_) => "hsm.pin_file",
        crate::hsm::PinSource::Env(_) => "hsm.pin_env",
    };
    drop(config.hsm.pin.read().map_err(|e| error(pin_key, &e))?);
    Ok(Checked {
        grpc_tls: Arc::new(grpc_tls),
        authenticator,
        policy: Arc::new(policy),
        xks,
        kmip,
    })
}
