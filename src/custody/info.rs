//! What custody operations return: key and version metadata, wrapped and unwrapped data. Plaintext
//! is held in zeroizing buffers whose `Debug` prints no secret.

use zeroize::Zeroizing;

use super::cache::KeyEntry;
use crate::envelope::{IV_LEN, VersionId};
use crate::model::{KeyName, KeyUsage, Millis, VersionState};

/// Changes an officer asks of a key; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    /// New description.
    pub description: Option<String>,
    /// New labels (replacing all).
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// New rotation period (`Some(None)` turns automatic rotation off).
    pub rotation_period_ms: Option<Option<Millis>>,
    /// New minimum decryption version.
    pub min_decryption_version: Option<u32>,
    /// New usage.
    pub usage: Option<KeyUsage>,
}

/// What one run of the scheduled work did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DueReport {
    /// Keys rotated (name and new primary version).
    pub rotated: Vec<String>,
    /// Versions destroyed.
    pub destroyed: Vec<String>,
    /// Approvals that expired.
    pub expired_approvals: u64,
}

/// Metadata of a key, as shown to officers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Full name.
    pub name: KeyName,
    /// Free text.
    pub description: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Millis,
    /// Last metadata change.
    pub updated_at: Millis,
    /// The version that wraps.
    pub primary_version: u32,
    /// Automatic rotation period, if any.
    pub rotation_period_ms: Option<Millis>,
    /// When the next automatic rotation is due.
    pub next_rotation_at: Option<Millis>,
    /// Unwrap is refused for versions below this one.
    pub min_decryption_version: u32,
    /// What the key may be used for.
    pub usage: KeyUsage,
    /// Every version, oldest first.
    pub versions: Vec<VersionInfo>,
}

/// Metadata of one key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Full name, `tenants/t/keys/k/versions/n`.
    pub name: String,
    /// Version number.
    pub number: u32,
    /// Lifecycle state.
    pub state: VersionState,
    /// Whether this is the primary version.
    pub primary: bool,
    /// Creation time.
    pub created_at: Millis,
    /// Last state change.
    pub state_changed_at: Millis,
    /// When a scheduled destruction is due.
    pub destroy_at: Option<Millis>,
    /// When it was destroyed.
    pub destroyed_at: Option<Millis>,
    /// When its HSM object was found missing.
    pub lost_at: Option<Millis>,
    /// Upper bound of the blobs it has wrapped.
    pub wraps_at_most: u64,
}

/// What [`Custody::seal_raw`] returns: the pieces of an AES-GCM encryption, no blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSealed {
    /// The version that encrypted.
    pub version_id: VersionId,
    /// Its full name.
    pub key_version: String,
    /// The random IV.
    pub iv: [u8; IV_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub sealed: Vec<u8>,
}

/// A wrapped blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The blob (SECURITY.md "Blob format").
    pub ciphertext: Vec<u8>,
    /// Full name of the version that wrapped it.
    pub key_version: String,
}

/// An unwrapped plaintext. `Debug` does not print the plaintext.
pub struct Unwrapped {
    /// The plaintext, zeroized on drop.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// Full name of the version that had wrapped it.
    pub key_version: String,
}

impl std::fmt::Debug for Unwrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unwrapped")
            .field(
                "plaintext",
                &format_args!("<{} bytes redacted>", self.plaintext.len()),
            )
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A new data key: random bytes from the HSM, and the same bytes wrapped. `Debug` does not
/// print the plaintext.
pub struct DataKey {
    /// The data key, zeroized on drop; `None` when the caller asked for the blob only.
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
    /// The data key wrapped under the primary version.
    pub ciphertext: Vec<u8>,
    /// Full name of the version that wrapped it.
    pub key_version: String,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field(
                "plaintext",
                &self
                    .plaintext
                    .as_ref()
                    .map(|p| format!("<{} bytes redacted>", p.len())),
            )
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

/// The result of a rewrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    /// The blob under the primary version (the input itself when it already was).
    pub ciphertext: Vec<u8>,
    /// Full name of the version that wraps it now.
    pub key_version: String,
    /// Whether the blob changed.
    pub rewrapped: bool,
}

pub(super) fn info(entry: &KeyEntry) -> KeyInfo {
    KeyInfo {
        name: entry.name.clone(),
        description: entry.description.clone(),
        labels: entry.labels.clone(),
        created_at: entry.created_at,
        updated_at: entry.updated_at,
        primary_version: entry.primary,
        rotation_period_ms: entry.rotation_period_ms,
        next_rotation_at: entry.next_rotation_at,
        min_decryption_version: entry.min_decryption_version,
        usage: entry.usage,
        versions: entry
            .versions
            .iter()
            .map(|v| VersionInfo {
                name: v.full_name.to_string(),
                number: v.number,
                state: v.state,
                primary: v.number == entry.primary,
                created_at: v.created_at,
                state_changed_at: v.state_changed_at,
                destroy_at: v.destroy_at,
                destroyed_at: v.destroyed_at,
                lost_at: v.lost_at,
                wraps_at_most: v.wraps.reserved(),
            })
            .collect(),
    }
}
