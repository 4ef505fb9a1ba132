//! Metadata integrity: the database cannot change what a key may do unseen.
//!
//! Owns the HSM's metadata integrity key (an HMAC-SHA256 generic secret, sensitive, never
//! extractable, sign only), the exact bytes it MACs (a key's whole state, an approval row),
//! and the seal each cache entry carries. A key whose stored value does not match the MAC of
//! its rows is *broken*: custody refuses every operation on it ([`super::CustodyError::MetadataIntegrity`])
//! while other keys keep working. It never decides anything else and never touches the store:
//! custody writes the values it computes here in the same statement as the state they cover.
//!
//! Encodings (SECURITY.md "Metadata integrity"): `str(x)` is `u32be(len) ‖ bytes`, `opt(x)` is
//! `0x00` or `0x01 ‖ i64be(x)`, integers big-endian.
//!
//! ```text
//! key      = "tresor/metadata/key/v1\0" ‖ str(installation) ‖ str(tenant) ‖ str(key)
//!            ‖ str(description) ‖ u32be(#labels) ‖ (str(name) ‖ str(value))*   (name order)
//!            ‖ u32be(primary) ‖ i64be(created_at) ‖ i64be(updated_at) ‖ opt(rotation_period_ms)
//!            ‖ opt(next_rotation_at) ‖ u32be(min_decryption_version) ‖ str(usage)
//!            ‖ u32be(#versions) ‖ per version, by number: id(16) ‖ u32be(number) ‖ str(state)
//!            ‖ i64be(created_at) ‖ i64be(state_changed_at) ‖ opt(destroy_at) ‖ opt(destroyed_at)
//! approval = "tresor/metadata/approval/v1\0" ‖ str(installation) ‖ str(id) ‖ str(tenant)
//!            ‖ str(key) ‖ u32be(version) ‖ str(operation) ‖ str(requested_by)
//!            ‖ i64be(requested_at) ‖ i64be(expires_at) ‖ str(state) ‖ str(decided_by)
//! window   = "tresor/metadata/window/v1\0" ‖ str(installation) ‖ str(id) ‖ str(tenant)
//!            ‖ str(identity) ‖ str(key_pattern) ‖ str(reason) ‖ str(reference)
//!            ‖ i64be(duration_ms) ‖ str(requested_by) ‖ i64be(requested_at) ‖ str(state)
//!            ‖ str(approved_by) ‖ i64be(opened_at) ‖ i64be(expires_at) ‖ str(closed_by)
//!            ‖ i64be(closed_at)
//! value    = hex(HMAC-SHA256(K_meta, key | approval | window))
//! ```
//!
//! Not covered, on purpose: a version's wrap reservation (`wraps_reserved`, written every
//! 4,096 wraps on the hot path) and its lost mark (`lost_at`, set when the token says the object
//! is gone, which the token will say again).

use std::sync::Arc;

use super::cache::KeyEntry;
use crate::hsm::{Hsm, HsmError, ObjectId};
use crate::store::{ApprovalRow, WindowRow};

/// Where a cache entry's state stands against its integrity value.
#[derive(Debug, Clone)]
pub(crate) enum Seal {
    /// The stored value matched the MAC of the rows (or this node wrote it): the hex value,
    /// which the next write of the key must replace (compare-and-set).
    Valid(Arc<str>),
    /// The rows failed the check; why, for the error and the log.
    Broken(Arc<str>),
}

/// The HSM-resident MAC key and the installation it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct Sealer {
    hsm: Hsm,
    key: ObjectId,
    installation: String,
}

/// The integrity key's `CKA_ID`: derived from the installation id, so the token alone says
/// whether this installation has one (no database row points to it).
fn key_id(installation: &str) -> ObjectId {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("tresor metadata integrity key v1\0{installation}").as_bytes(),
    );
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_ref()[..16]);
    ObjectId(id)
}

/// The integrity key's `CKA_LABEL` (outside the version objects' prefix, so reconciliation
/// never takes it for one).
pub(crate) fn key_label(installation: &str) -> String {
    format!("tresor-meta/{installation}/integrity")
}

impl Sealer {
    /// Finds this installation's integrity key in the token, or creates it. Returns whether it
    /// was created now (the caller then seals the rows it finds, once).
    pub(crate) async fn open(hsm: Hsm, installation: &str) -> Result<(Self, bool), HsmError> {
        let key = key_id(installation);
        let created = if hsm.secret_key_exists(key).await? {
            false
        } else {
            hsm.generate_hmac_key(key, key_label(installation)).await?;
            tracing::info!("metadata integrity key created in the HSM");
            true
        };
        Ok((
            Self {
                hsm,
                key,
                installation: installation.to_owned(),
            },
            created,
        ))
    }

    /// The integrity value of a key's state.
    pub(crate) async fn seal_key(&self, entry: &KeyEntry) -> Result<String, HsmError> {
        self.mac(key_message(&self.installation, entry)).await
    }

    /// The integrity value of an approval row (its own `integrity` field aside).
    pub(crate) async fn seal_approval(&self, row: &ApprovalRow) -> Result<String, HsmError> {
        self.mac(approval_message(&self.installation, row)).await
    }

    /// The integrity value of an access window row (its own `integrity` field aside).
    pub(crate) async fn seal_window(&self, row: &WindowRow) -> Result<String, HsmError> {
        self.mac(window_message(&self.installation, row)).await
    }

    async fn mac(&self, message: Vec<u8>) -> Result<String, HsmError> {
        let mac = self.hsm.hmac_sha256(self.key, message).await?;
        Ok(crate::model::to_hex(&mac))
    }
}

/// Compares two hex values without an early exit.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The length-prefixed encoding of the seals and of the HSM evidence ([`super::evidence`]).
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn str(&mut self, s: &str) {
        self.0
            .extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    pub(super) fn i64(&mut self, n: i64) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn opt(&mut self, n: Option<i64>) {
        match n {
            None => self.0.push(0),
            Some(n) => {
                self.0.push(1);
                self.i64(n);
            }
        }
    }
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// The bytes MAC'd for a key's state.
pub(crate) fn key_message(installation: &str, e: &KeyEntry) -> Vec<u8> {
    let mut w = Writer(b"tresor/metadata/key/v1\0".to_vec());
    w.str(installation);
    w.str(e.name.tenant().as_str());
    w.str(e.name.key());
    w.str(&e.description);
    w.count(e.labels.len());
    for (k, v) in &e.labels {
        w.str(k);
        w.str(v);
    }
    w.u32(e.primary);
    w.i64(e.created_at);
    w.i64(e.updated_at);
    w.opt(e.rotation_period_ms);
    w.opt(e.next_rotation_at);
    w.u32(e.min_decryption_version);
    w.str(e.usage.as_str());
    let mut versions: Vec<_> = e.versions.iter().collect();
    versions.sort_by_key(|v| v.number);
    w.count(versions.len());
    for v in versions {
        w.0.extend_from_slice(&v.id.0);
        w.u32(v.number);
        w.str(v.state.as_str());
        w.i64(v.created_at);
        w.i64(v.state_changed_at);
        w.opt(v.destroy_at);
        w.opt(v.destroyed_at);
    }
    w.0
}

/// The bytes MAC'd for an approval row.
pub(crate) fn approval_message(installation: &str, a: &ApprovalRow) -> Vec<u8> {
    let mut w = Writer(b"tresor/metadata/approval/v1\0".to_vec());
    w.str(installation);
    w.str(&a.id);
    w.str(&a.tenant);
    w.str(&a.key_name);
    w.u32(a.version);
    w.str(&a.operation);
    w.str(&a.requested_by);
    w.i64(a.requested_at);
    w.i64(a.expires_at);
    w.str(&a.state);
    w.str(&a.decided_by);
    w.0
}

/// The bytes MAC'd for an access window row.
pub(crate) fn window_message(installation: &str, w: &WindowRow) -> Vec<u8> {
    let mut wr = Writer(b"tresor/metadata/window/v1\0".to_vec());
    wr.str(installation);
    for s in [
        &w.id,
        &w.tenant,
        &w.identity,
        &w.key_pattern,
        &w.reason,
        &w.reference,
    ] {
        wr.str(s);
    }
    wr.i64(w.duration_ms);
    wr.str(&w.requested_by);
    wr.i64(w.requested_at);
    wr.str(&w.state);
    wr.str(&w.approved_by);
    wr.i64(w.opened_at);
    wr.i64(w.expires_at);
    wr.str(&w.closed_by);
    wr.i64(w.closed_at);
    wr.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval() -> ApprovalRow {
        ApprovalRow {
            id: "a1".into(),
            tenant: "t".into(),
            key_name: "k".into(),
            version: 2,
            operation: "DESTROY_KEY_VERSION".into(),
            requested_by: "alice".into(),
            requested_at: 1,
            expires_at: 2,
            state: "PENDING".into(),
            decided_by: String::new(),
            integrity: "ignored".into(),
        }
    }

    #[test]
    fn every_approval_field_but_the_seal_changes_the_message() {
        let base = approval_message("i", &approval());
        let changes: [fn(&mut ApprovalRow); 10] = [
            |a| a.id = "a2".into(),
            |a| a.tenant = "u".into(),
            |a| a.key_name = "l".into(),
            |a| a.version = 3,
            |a| a.operation = "X".into(),
            |a| a.requested_by = "bob".into(),
            |a| a.requested_at = 5,
            |a| a.expires_at = 5,
            |a| a.state = "APPROVED".into(),
            |a| a.decided_by = "bob".into(),
        ];
        for change in changes {
            let mut a = approval();
            change(&mut a);
            assert_ne!(approval_message("i", &a), base);
        }
        let mut a = approval();
        a.integrity = "other".into();
        assert_eq!(approval_message("i", &a), base);
        assert_ne!(approval_message("j", &approval()), base);
    }

    #[test]
    fn every_window_field_but_the_seal_changes_the_message() {
        let window = || WindowRow {
            id: "w".into(),
            tenant: "t".into(),
            identity: "svc".into(),
            key_pattern: "ehr-*".into(),
            reason: "support".into(),
            reference: "INC-1".into(),
            duration_ms: 3_600_000,
            requested_by: "anna".into(),
            requested_at: 1,
            state: "OPEN".into(),
            approved_by: "ben".into(),
            opened_at: 2,
            expires_at: 3,
            closed_by: String::new(),
            closed_at: 0,
            integrity: "ignored".into(),
        };
        let base = window_message("i", &window());
        let changes: [fn(&mut WindowRow); 15] = [
            |w| w.id = "x".into(),
            |w| w.tenant = "u".into(),
            |w| w.identity = "other".into(),
            |w| w.key_pattern = "*".into(),
            |w| w.reason = "emergency".into(),
            |w| w.reference = "INC-2".into(),
            |w| w.duration_ms += 1,
            |w| w.requested_by = "bob".into(),
            |w| w.requested_at = 9,
            |w| w.state = "CLOSED".into(),
            |w| w.approved_by = "carl".into(),
            |w| w.opened_at = 9,
            |w| w.expires_at = 9,
            |w| w.closed_by = "anna".into(),
            |w| w.closed_at = 9,
        ];
        for change in changes {
            let mut w = window();
            change(&mut w);
            assert_ne!(window_message("i", &w), base);
        }
        let mut w = window();
        w.integrity = "other".into();
        assert_eq!(window_message("i", &w), base);
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let mut a = approval();
        a.tenant = "tk".into();
        a.key_name = String::new();
        let mut b = approval();
        b.tenant = "t".into();
        b.key_name = "k".into();
        assert_ne!(approval_message("i", &a), approval_message("i", &b));
    }

    #[test]
    fn hex_comparison() {
        assert!(same("ab01", "ab01"));
        assert!(!same("ab01", "ab02"));
        assert!(!same("ab01", "ab0"));
        assert!(!same("", "00"));
    }
}
