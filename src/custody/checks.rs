//! Checks of callers' grants and request values, shared by every operation.

use super::cache::VersionEntry;
use super::{CustodyError, MAX_DESCRIPTION_LEN, MAX_LABELS};
use crate::auth::{Grant, Role};
use crate::envelope::{MAX_AAD_LEN, MAX_PLAINTEXT_LEN};
use crate::model::{KeyName, VersionState};

/// Every caller-facing operation starts here: the grant must be for `role` and cover `key`.
pub(crate) fn authorize(grant: &Grant, role: Role, key: &KeyName) -> Result<(), CustodyError> {
    grant.require(role)?;
    grant.check_key(key)?;
    Ok(())
}

pub(super) fn check_description(description: &str) -> Result<(), CustodyError> {
    if description.len() > MAX_DESCRIPTION_LEN {
        return Err(CustodyError::InvalidArgument(format!(
            "description is longer than {MAX_DESCRIPTION_LEN} bytes"
        )));
    }
    Ok(())
}

/// Label names: 1–63 of `[a-z0-9_-]` starting with a letter; values: 0–63 of `[a-z0-9_-]`.
pub(super) fn check_labels(
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), CustodyError> {
    let charset = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if labels.len() > MAX_LABELS {
        return Err(CustodyError::InvalidArgument(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    for (k, v) in labels {
        if !((1..=63).contains(&k.len()) && k.as_bytes()[0].is_ascii_lowercase() && charset(k)) {
            return Err(CustodyError::InvalidArgument(format!(
                "label name {k:?}: 1-63 characters of a-z, 0-9, '-', '_', starting with a letter"
            )));
        }
        if v.len() > 63 || !charset(v) {
            return Err(CustodyError::InvalidArgument(format!(
                "label {k:?}: values are 0-63 characters of a-z, 0-9, '-', '_'"
            )));
        }
    }
    Ok(())
}

pub(super) fn check_plaintext(plaintext: &[u8]) -> Result<(), CustodyError> {
    if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT_LEN {
        return Err(CustodyError::InvalidArgument(format!(
            "plaintext must be 1 to {MAX_PLAINTEXT_LEN} bytes, not {}",
            plaintext.len()
        )));
    }
    Ok(())
}

pub(super) fn check_aad(aad: &[u8]) -> Result<(), CustodyError> {
    if aad.len() > MAX_AAD_LEN {
        return Err(CustodyError::InvalidArgument(format!(
            "AAD must be at most {MAX_AAD_LEN} bytes"
        )));
    }
    Ok(())
}

/// Whether a version may wrap or unwrap now.
pub(super) fn usable(v: &VersionEntry) -> Result<(), CustodyError> {
    let name = || v.full_name.to_string();
    match v.state {
        VersionState::Enabled if v.lost_at.is_some() => Err(CustodyError::VersionLost(name())),
        VersionState::Enabled => Ok(()),
        VersionState::Disabled => Err(CustodyError::VersionDisabled(name())),
        VersionState::DestroyScheduled => Err(CustodyError::VersionDestroyScheduled(name())),
        VersionState::Destroyed => Err(CustodyError::VersionDestroyed(name())),
    }
}
