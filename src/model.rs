//! Domain vocabulary shared by every layer: key and version names, version states, time.
//!
//! Owns name validation (SECURITY.md "Key hierarchy") and the set of version states.
//! Pure: no I/O, no HSM, no database; the state machine's *transitions* belong to `custody`.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a key or tenant name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is not of the form `tenants/{tenant}/keys/{key}`.
    #[error("key name must look like tenants/{{tenant}}/keys/{{key}}")]
    Shape,
    /// A tenant or key segment breaks the character or length rule.
    #[error("{what} must be 1-63 characters of lowercase letters, digits and '-'")]
    Segment {
        /// Which segment: `tenant` or `key`.
        what: &'static str,
    },
}

/// Checks one name segment: 1–63 of `[a-z0-9-]`.
pub fn validate_segment(what: &'static str, s: &str) -> Result<(), NameError> {
    let ok = (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Segment { what })
    }
}

/// A tenant: one organisation. Nothing crosses tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// Validates a bare tenant name such as `uksh`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        validate_segment("tenant", name)?;
        Ok(Self(name.to_owned()))
    }

    /// The bare tenant name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key's full name, `tenants/{tenant}/keys/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyName {
    tenant: Tenant,
    key: String,
}

impl KeyName {
    /// Builds a name from its two validated segments.
    pub fn new(tenant: &str, key: &str) -> Result<Self, NameError> {
        let tenant = Tenant::new(tenant)?;
        validate_segment("key", key)?;
        Ok(Self {
            tenant,
            key: key.to_owned(),
        })
    }

    /// The tenant that owns the key.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The key's own segment (without the tenant).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The full name of one version of this key.
    pub fn version(&self, number: u32) -> String {
        format!("{self}/versions/{number}")
    }
}

impl FromStr for KeyName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let mut parts = s.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("tenants"), Some(tenant), Some("keys"), Some(key), None) => {
                Self::new(tenant, key)
            }
            _ => Err(NameError::Shape),
        }
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenants/{}/keys/{}", self.tenant, self.key)
    }
}

/// The lifecycle state of one key version (SECURITY.md "Key hierarchy").
///
/// `ENABLED` ↔ `DISABLED`; either → `DESTROY_SCHEDULED` (cancellable back to `DISABLED`)
/// → `DESTROYED`, which is final: the HSM object is gone, the metadata stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VersionState {
    /// Usable for unwrap; the primary version is also used for wrap.
    Enabled,
    /// Kept in the HSM but refused for every operation until enabled again.
    Disabled,
    /// Waiting for its destroy time; refused for every operation; cancellable.
    DestroyScheduled,
    /// HSM object destroyed. Blobs of this version can never be unwrapped again.
    Destroyed,
}

impl VersionState {
    /// The name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "ENABLED",
            Self::Disabled => "DISABLED",
            Self::DestroyScheduled => "DESTROY_SCHEDULED",
            Self::Destroyed => "DESTROYED",
        }
    }

    /// Parses the database/API spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ENABLED" => Self::Enabled,
            "DISABLED" => Self::Disabled,
            "DESTROY_SCHEDULED" => Self::DestroyScheduled,
            "DESTROYED" => Self::Destroyed,
            _ => return None,
        })
    }
}

impl fmt::Display for VersionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a key may be used for, set by officers: it applies to the gRPC API (Wrap and
/// GenerateDataKey encrypt, Unwrap decrypts, Rewrap does both) and to the XKS proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyUsage {
    /// Encrypt and decrypt (the default).
    #[default]
    EncryptDecrypt,
    /// Encrypt only: new blobs, but nothing is unwrapped (for example while an incident is
    /// investigated).
    EncryptOnly,
    /// Decrypt only: existing blobs unwrap, nothing new is wrapped (a key being retired).
    DecryptOnly,
    /// Neither.
    None,
}

impl KeyUsage {
    /// The name used in the database, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EncryptDecrypt => "ENCRYPT_DECRYPT",
            Self::EncryptOnly => "ENCRYPT",
            Self::DecryptOnly => "DECRYPT",
            Self::None => "NONE",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ENCRYPT_DECRYPT" => Self::EncryptDecrypt,
            "ENCRYPT" => Self::EncryptOnly,
            "DECRYPT" => Self::DecryptOnly,
            "NONE" => Self::None,
            _ => return None,
        })
    }

    /// Whether wrapping (encryption) is allowed.
    pub fn encrypts(self) -> bool {
        matches!(self, Self::EncryptDecrypt | Self::EncryptOnly)
    }

    /// Whether unwrapping (decryption) is allowed.
    pub fn decrypts(self) -> bool {
        matches!(self, Self::EncryptDecrypt | Self::DecryptOnly)
    }
}

impl fmt::Display for KeyUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch (UTC): the one time unit stored and compared.
pub type Millis = i64;

/// The current time in [`Millis`].
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_round_trip_and_reject_bad_shapes() {
        let name: KeyName = "tenants/uksh/keys/ehr-archive-2".parse().unwrap();
        assert_eq!(name.tenant().as_str(), "uksh");
        assert_eq!(name.key(), "ehr-archive-2");
        assert_eq!(name.to_string(), "tenants/uksh/keys/ehr-archive-2");
        assert_eq!(
            name.version(3),
            "tenants/uksh/keys/ehr-archive-2/versions/3"
        );

        for bad in [
            "",
            "tenants/uksh/keys",
            "tenants/uksh/keys/a/b",
            "tenant/uksh/keys/a",
            "/tenants/uksh/keys/a",
        ] {
            assert_eq!(bad.parse::<KeyName>(), Err(NameError::Shape), "{bad:?}");
        }
        for bad in [
            "tenants/UKSH/keys/a",
            "tenants/u_k/keys/a",
            "tenants/u/keys/ä",
        ] {
            assert!(
                matches!(bad.parse::<KeyName>(), Err(NameError::Segment { .. })),
                "{bad:?}"
            );
        }
        assert!(KeyName::new(&"a".repeat(63), "k").is_ok());
        assert!(KeyName::new(&"a".repeat(64), "k").is_err());
        assert!(KeyName::new("t", "").is_err());
    }

    #[test]
    fn version_states_round_trip() {
        for s in [
            VersionState::Enabled,
            VersionState::Disabled,
            VersionState::DestroyScheduled,
            VersionState::Destroyed,
        ] {
            assert_eq!(VersionState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VersionState::parse("enabled"), None);
    }
}

/// Lower-case hex of bytes: the text form of hashes, ids and signatures in storage and exports.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Parses lower- or upper-case hex; anything but hex digits (a sign, a space) is refused.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let digits = s.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| Some((hex_digit(pair[0])? << 4) | hex_digit(pair[1])?))
        .collect()
}

/// Parses hex of exactly `N` bytes.
pub fn from_hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    from_hex(s).and_then(|v| <[u8; N]>::try_from(v).ok())
}

fn hex_digit(c: u8) -> Option<u8> {
    char::from(c)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod hex_tests {
    #[test]
    fn hex_round_trips() {
        assert_eq!(super::to_hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(super::from_hex("00abFF"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(super::from_hex("+a"), None);
        assert_eq!(super::from_hex_array::<2>("00ab"), Some([0, 0xab]));
        assert_eq!(super::from_hex_array::<2>("00abff"), None);
        assert_eq!(super::from_hex("0"), None);
        assert_eq!(super::from_hex("zz"), None);
    }
}
