//! `tresor key …`: the officer's commands on keys and versions.

use std::collections::HashMap;

use clap::Subcommand;

use super::exit::{Exit, Failure, from_status};
use super::files::confirm;
use super::output::Output;
use crate::client::Client;
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum KeyCommand {
    /// Create a key; version 1 becomes primary.
    Create {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// A label NAME=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Show a key and its versions.
    Get {
        /// tenants/{tenant}/keys/{key}
        name: String,
    },
    /// List the keys of your tenant.
    List {
        /// Your tenant (optional: the policy knows it).
        #[arg(long)]
        tenant: Option<String>,
        /// Keys per request.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Create a new primary version; old versions keep unwrapping their blobs.
    Rotate {
        /// tenants/{tenant}/keys/{key}
        name: String,
    },
    /// Change a key's description or labels.
    Update {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// Replace all labels with these NAME=VALUE pairs; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Remove all labels.
        #[arg(long, conflicts_with = "labels")]
        clear_labels: bool,
        /// Rotate automatically this often: 90d, 12h, 3600s (at least 1h).
        #[arg(long, value_parser = parse_period)]
        rotation_period: Option<i64>,
        /// Stop rotating automatically.
        #[arg(long, conflicts_with = "rotation_period")]
        no_rotation: bool,
        /// Refuse unwrap for versions below this number (to force re-wrapping before destruction).
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// What the key may be used for: encrypt-decrypt, encrypt (no unwrap), decrypt (no new
        /// wraps) or none; applies to the gRPC API and the XKS proxy.
        #[arg(long, value_parser = ["encrypt-decrypt", "encrypt", "decrypt", "none"])]
        usage: Option<String>,
    },
    /// Show a key's versions: state, created, destroy time, wrap count.
    Versions {
        /// tenants/{tenant}/keys/{key}
        name: String,
    },
    /// Ask for a version's destruction; a second officer must approve (`tresor approvals`).
    Destroy {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        #[arg(long)]
        version: u32,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Show what would be asked, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cancel a scheduled destruction; the version becomes DISABLED.
    CancelDestroy {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        #[arg(long)]
        version: u32,
    },
    /// Enable a disabled version.
    Enable {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        version: u32,
    },
    /// Disable a version (not the primary one): its blobs are refused until enabled again.
    Disable {
        /// tenants/{tenant}/keys/{key}
        name: String,
        /// Version number.
        version: u32,
    },
}

pub(super) fn parse_period(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?}: write a number and a unit, e.g. 90d, 12h, 3600s"))?;
    let unit_seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(format!("{s:?}: units are d, h, m, s")),
    };
    // The server enforces the longest period; here only overflow must not panic or wrap.
    let seconds = n
        .checked_mul(unit_seconds)
        .ok_or_else(|| format!("{s:?}: too long; the longest rotation period is 100 years"))?;
    if seconds < 3_600 {
        return Err(format!("{s:?}: the shortest rotation period is 1h"));
    }
    Ok(seconds)
}

pub(super) fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: write labels as NAME=VALUE"))
}

pub(super) async fn key_command(
    client: &Client,
    command: KeyCommand,
    out: &Output,
) -> Result<(), Failure> {
    let mut admin = client.admin();
    let key = match command {
        KeyCommand::Create {
            name,
            description,
            labels,
        } => {
            admin
                .create_key(proto::CreateKeyRequest {
                    key: name,
                    description,
                    labels: labels.into_iter().collect(),
                })
                .await
        }
        KeyCommand::Get { name } => admin.get_key(proto::GetKeyRequest { key: name }).await,
        KeyCommand::List { tenant, page_size } => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_keys(proto::ListKeysRequest {
                        tenant: tenant.clone().unwrap_or_default(),
                        page_size,
                        page_token: page_token.clone(),
                    })
                    .await
                    .map_err(|s| from_status(&s))?
                    .into_inner();
                keys.extend(page.keys);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            out.keys(&keys);
            return Ok(());
        }
        KeyCommand::Rotate { name } => {
            admin
                .rotate_key(proto::RotateKeyRequest { key: name })
                .await
        }
        KeyCommand::Update { name, description, labels, clear_labels, rotation_period, no_rotation, min_decryption_version, usage } => {
            let usage = match usage.as_deref() {
                None => proto::KeyUsage::Unspecified,
                Some("encrypt") => proto::KeyUsage::EncryptOnly,
                Some("decrypt") => proto::KeyUsage::DecryptOnly,
                Some("none") => proto::KeyUsage::NoUse,
                Some(_) => proto::KeyUsage::EncryptDecrypt,
            };
            let update_labels = clear_labels || !labels.is_empty();
            admin
                .update_key(proto::UpdateKeyRequest {
                    key: name,
                    description,
                    labels: labels.into_iter().collect::<HashMap<_, _>>(),
                    update_labels,
                    rotation_period: rotation_period.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
                    clear_rotation_period: no_rotation,
                    min_decryption_version: min_decryption_version.unwrap_or(0),
                    usage: usage.into(),
                })
                .await
        }
        KeyCommand::Versions { name } => {
            let key = admin.get_key(proto::GetKeyRequest { key: name }).await.map_err(|s| from_status(&s))?.into_inner();
            out.versions(&key);
            return Ok(());
        }
        KeyCommand::Destroy { name, version, yes, dry_run } => {
            if dry_run {
                let key = admin.get_key(proto::GetKeyRequest { key: name.clone() }).await.map_err(|s| from_status(&s))?.into_inner();
                let v = key
                    .versions
                    .iter()
                    .find(|v| v.version == version)
                    .ok_or_else(|| Failure::new(Exit::NotFound, format!("{name} has no version {version}"), "`tresor key versions NAME` lists them"))?;
                let state = proto::KeyVersionState::try_from(v.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN");
                let verdict = if v.primary {
                    "refused: it is the primary version (rotate first)"
                } else if matches!(state, "ENABLED" | "DISABLED") {
                    "a destruction request would wait for a second officer's approval"
                } else {
                    "refused: only ENABLED or DISABLED versions can be destroyed"
                };
                out.summary(&format!("dry run: {} is {state}, wraps at most {}; {verdict}; nothing was changed", v.name, v.wraps_at_most));
                return Ok(());
            }
            if !yes {confirm(
                    &format!("This asks for the destruction of {name}/versions/{version}: once a second officer approves and the grace period ends, its blobs can never be unwrapped again."),
                    &format!("{name}/versions/{version}"),
                )?;
            }
            let a = admin
                .schedule_key_version_destruction(proto::ScheduleKeyVersionDestructionRequest { key: name, version })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.approval(&a);
            return Ok(());
        }
        KeyCommand::CancelDestroy { name, version } => {
            admin.cancel_key_version_destruction(proto::KeyVersionRequest { key: name, version }).await
        }
        KeyCommand::Enable { name, version } => {
            admin
                .enable_key_version(proto::KeyVersionRequest { key: name, version })
                .await
        }
        KeyCommand::Disable { name, version } => {
            admin
                .disable_key_version(proto::KeyVersionRequest { key: name, version })
                .await
        }
    }
    .map_err(|s| from_status(&s))?
    .into_inner();
    out.key(&key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_refuse_overflow_instead_of_wrapping() {
        assert_eq!(parse_period("90d"), Ok(90 * 86_400));
        assert!(parse_period("30m").unwrap_err().contains("shortest"));
        assert!(
            parse_period("999999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }
}
