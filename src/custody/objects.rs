//! Managed objects: symmetric keys that a client fetches and holds (KMIP's model), unlike key
//! versions, which never leave the HSM.
//!
//! Owns their life cycle (KMIP's states: Pre-Active, Active, Deactivated, Compromised,
//! Destroyed, Destroyed Compromised, with activation and deactivation dates honoured when an
//! object is read) and their material: drawn from the HSM's generator (or brought by the
//! client), stored only sealed under the tenant's HSM-resident wrapping key with the object's
//! id bound into the AAD, and opened only for a caller with the `kmip` role in the object's
//! tenant whose key patterns cover its name. Officers of the tenant see, revoke and destroy
//! objects (never their material), a destruction with a second officer's approval where the
//! configuration asks for it. Client-settable attributes are in `object_attributes.rs`, KMIP's
//! Encrypt and Decrypt in `object_crypto.rs`. Speaks no protocol: `crate::kmip` maps these to
//! TTLV. Never touches another tenant's rows: every store call names the caller's tenant.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::{Custody, CustodyError};
use crate::auth::{Grant, Role};
use crate::model::{KeyName, Millis};
use crate::store::{ObjectRow, StoreError};

/// Where a managed object is in its life (KMIP 1.4 §3.22).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// Created, not yet usable for protecting data.
    PreActive,
    /// Usable.
    Active,
    /// Revoked or past its deactivation date: only for processing old data.
    Deactivated,
    /// Revoked for compromise.
    Compromised,
    /// Destroyed: its material is gone (after the grace period).
    Destroyed,
    /// Destroyed after being compromised.
    DestroyedCompromised,
}

impl ObjectState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreActive => "PRE_ACTIVE",
            Self::Active => "ACTIVE",
            Self::Deactivated => "DEACTIVATED",
            Self::Compromised => "COMPROMISED",
            Self::Destroyed => "DESTROYED",
            Self::DestroyedCompromised => "DESTROYED_COMPROMISED",
        }
    }

    fn parse(s: &str) -> Result<Self, CustodyError> {
        Ok(match s {
            "PRE_ACTIVE" => Self::PreActive,
            "ACTIVE" => Self::Active,
            "DEACTIVATED" => Self::Deactivated,
            "COMPROMISED" => Self::Compromised,
            "DESTROYED" => Self::Destroyed,
            "DESTROYED_COMPROMISED" => Self::DestroyedCompromised,
            other => {
                return Err(CustodyError::Store(StoreError::Corrupt {
                    table: "managed_objects",
                    what: format!("state {other:?}"),
                }));
            }
        })
    }

    /// The state a Destroy leads to, if the object may be destroyed (not while Active, not
    /// twice).
    fn after_destroy(self) -> Option<Self> {
        match self {
            Self::PreActive | Self::Deactivated => Some(Self::Destroyed),
            Self::Compromised => Some(Self::DestroyedCompromised),
            Self::Active | Self::Destroyed | Self::DestroyedCompromised => None,
        }
    }

    /// Whether the object is destroyed (either way).
    pub fn is_destroyed(self) -> bool {
        matches!(self, Self::Destroyed | Self::DestroyedCompromised)
    }
}

impl std::fmt::Display for ObjectState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an object is revoked (KMIP's Revocation Reason Code, 1.4 §3.31).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationCode {
    /// Unspecified.
    Unspecified,
    /// The key was compromised.
    KeyCompromise,
    /// The CA was compromised.
    CaCompromise,
    /// The owner's affiliation changed.
    AffiliationChanged,
    /// Replaced by another key.
    Superseded,
    /// No longer needed.
    CessationOfOperation,
    /// Privilege withdrawn.
    PrivilegeWithdrawn,
}

impl RevocationCode {
    fn compromised(self) -> bool {
        matches!(self, Self::KeyCompromise | Self::CaCompromise)
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "UNSPECIFIED",
            Self::KeyCompromise => "KEY_COMPROMISE",
            Self::CaCompromise => "CA_COMPROMISE",
            Self::AffiliationChanged => "AFFILIATION_CHANGED",
            Self::Superseded => "SUPERSEDED",
            Self::CessationOfOperation => "CESSATION_OF_OPERATION",
            Self::PrivilegeWithdrawn => "PRIVILEGE_WITHDRAWN",
        }
    }

    /// The code for a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Unspecified,
            Self::KeyCompromise,
            Self::CaCompromise,
            Self::AffiliationChanged,
            Self::Superseded,
            Self::CessationOfOperation,
            Self::PrivilegeWithdrawn,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Key lengths a managed AES key may have, in bits.
pub const OBJECT_KEY_BITS: [u32; 3] = [128, 192, 256];
/// The longest Name or attribute value accepted.
pub const MAX_OBJECT_TEXT: usize = 1024;
/// Custom attributes per object, at most.
pub(super) const MAX_OBJECT_ATTRIBUTES: usize = 64;

/// A managed object's metadata (never its material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedObject {
    /// Unique identifier (random, 32 hex digits).
    pub id: String,
    /// The owning tenant.
    pub tenant: String,
    /// The Name (empty: none).
    pub name: String,
    /// Key length in bits (AES).
    pub length_bits: u32,
    /// KMIP Cryptographic Usage Mask.
    pub usage_mask: u32,
    /// The state as of the read (dates applied).
    pub state: ObjectState,
    /// Creation.
    pub created_at: Millis,
    /// Activation date (0: none).
    pub activation_date: Millis,
    /// Deactivation date (0: none).
    pub deactivation_date: Millis,
    /// Compromise date (0: none).
    pub compromise_date: Millis,
    /// Destroy date (0: none).
    pub destroy_date: Millis,
    /// Revocation reason and message, if revoked.
    pub revocation: Option<(RevocationCode, String)>,
    /// Last change.
    pub last_change: Millis,
    /// Other attributes, by name (text values).
    pub attributes: BTreeMap<String, String>,
    /// Whether the wrapped material is still stored.
    pub has_material: bool,
}

/// What an officer's destruction did.
#[derive(Debug, Clone)]
pub enum ObjectDestruction {
    /// Destroyed (no second officer is asked for).
    Destroyed(ManagedObject),
    /// Waits for a second officer.
    Requested(super::ApprovalInfo),
}

/// What a client asks to create or register.
#[derive(Debug, Clone, Default)]
pub struct NewObject {
    /// The Name (empty: none).
    pub name: String,
    /// AES key length in bits.
    pub length_bits: u32,
    /// Usage mask.
    pub usage_mask: u32,
    /// Activation date requested (0: none; an object activates when it passes).
    pub activation_date: Millis,
    /// Deactivation date requested (0: none).
    pub deactivation_date: Millis,
    /// Other attributes.
    pub attributes: BTreeMap<String, String>,
}

/// The AAD a managed object's material is sealed with: its tenant and id, so a DBA cannot
/// move one object's material to another object or tenant.
fn object_aad(tenant: &str, id: &str) -> Vec<u8> {
    format!("tresor-managed-object\0{tenant}\0{id}").into_bytes()
}

impl ManagedObject {
    fn from_row(row: &ObjectRow, now: Millis) -> Result<Self, CustodyError> {
        let mut state = ObjectState::parse(&row.state)?;
        // Dates take effect when they pass, whoever reads the object first.
        if state == ObjectState::PreActive && row.activation_date != 0 && row.activation_date <= now
        {
            state = ObjectState::Active;
        }
        if state == ObjectState::Active
            && row.deactivation_date != 0
            && row.deactivation_date <= now
        {
            state = ObjectState::Deactivated;
        }
        let revocation = if row.revocation_reason.is_empty() {
            None
        } else {
            let (code, message) = row
                .revocation_reason
                .split_once(':')
                .unwrap_or((row.revocation_reason.as_str(), ""));
            Some((
                RevocationCode::parse(code).unwrap_or(RevocationCode::Unspecified),
                message.trim_start().to_owned(),
            ))
        };
        let attributes = serde_json::from_str(&row.attributes).map_err(|e| {
            CustodyError::Store(StoreError::Corrupt {
                table: "managed_objects",
                what: format!("attributes: {e}"),
            })
        })?;
        Ok(Self {
            id: row.id.clone(),
            tenant: row.tenant.clone(),
            name: row.name.clone(),
            length_bits: row.length_bits,
            usage_mask: row.usage_mask,
            state,
            created_at: row.created_at,
            activation_date: row.activation_date,
            deactivation_date: row.deactivation_date,
            compromise_date: row.compromise_date,
            destroy_date: row.destroy_date,
            revocation,
            last_change: row.last_change,
            attributes,
            has_material: !row.material.is_empty(),
        })
    }
}

fn check_new(new: &NewObject) -> Result<(), CustodyError> {
    if !OBJECT_KEY_BITS.contains(&new.length_bits) {
        return Err(CustodyError::InvalidArgument(format!(
            "an AES key is 128, 192 or 256 bits, not {}",
            new.length_bits
        )));
    }
    check_text("Name", &new.name)?;
    if new.attributes.len() > MAX_OBJECT_ATTRIBUTES {
        return Err(CustodyError::InvalidArgument(format!(
            "at most {MAX_OBJECT_ATTRIBUTES} custom attributes"
        )));
    }
    for (k, v) in &new.attributes {
        check_text("an attribute name", k)?;
        check_text(k, v)?;
    }
    Ok(())
}

pub(super) fn check_text(what: &str, text: &str) -> Result<(), CustodyError> {
    if text.len() > MAX_OBJECT_TEXT || text.chars().any(char::is_control) {
        return Err(CustodyError::InvalidArgument(format!(
            "{what} must be at most {MAX_OBJECT_TEXT} bytes without control characters"
        )));
    }
    Ok(())
}

impl Custody {
    /// Creates an AES key in the caller's tenant: material from the HSM's generator, sealed
    /// under the tenant's wrapping key `wrapping_key` (a Tresor key the officers created).
    pub async fn create_object(
        &self,
        grant: &Grant,
        wrapping_key: &str,
        new: NewObject,
    ) -> Result<ManagedObject, CustodyError> {
        self.check_object_grant(grant, &new.name)?;
        check_new(&new)?;
        let material = self.inner.hsm.random(new.length_bits as usize / 8).await?;
        self.insert_object(grant, wrapping_key, new, material).await
    }

    /// Registers a key the client brings (`material`, of the length the request names).
    pub async fn register_object(
        &self,
        grant: &Grant,
        wrapping_key: &str,
        new: NewObject,
        material: Zeroizing<Vec<u8>>,
    ) -> Result<ManagedObject, CustodyError> {
        self.check_object_grant(grant, &new.name)?;
        check_new(&new)?;
        if material.len() * 8 != new.length_bits as usize {
            return Err(CustodyError::InvalidArgument(format!(
                "the key material is {} bits, the Cryptographic Length says {}",
                material.len() * 8,
                new.length_bits
            )));
        }
        self.insert_object(grant, wrapping_key, new, material).await
    }

    async fn insert_object(
        &self,
        grant: &Grant,
        wrapping_key: &str,
        new: NewObject,
        material: Zeroizing<Vec<u8>>,
    ) -> Result<ManagedObject, CustodyError> {
        let tenant = grant.tenant().as_str().to_owned();
        let id = crate::model::to_hex(&self.random_bytes::<16>()?);
        let key = KeyName::new(&tenant, wrapping_key)?;
        let wrapped = self
            .wrap_authorized(&key, material, &object_aad(&tenant, &id))
            .await
            .map_err(|e| match e {
                CustodyError::KeyNotFound(_) => CustodyError::FailedSetup(format!(
                    "tenant {tenant} has no key {wrapping_key:?} to seal managed objects under; an officer creates it with `tresor key create {key}`"
                )),
                other => other,
            })?;
        let now = self.now();
        let row = ObjectRow {
            id,
            tenant,
            name: new.name,
            object_type: "SYMMETRIC_KEY".into(),
            algorithm: "AES".into(),
            length_bits: new.length_bits,
            usage_mask: new.usage_mask,
            state: ObjectState::PreActive.as_str().into(),
            created_at: now,
            activation_date: new.activation_date,
            deactivation_date: new.deactivation_date,
            compromise_date: 0,
            destroy_date: 0,
            revocation_reason: String::new(),
            last_change: now,
            attributes: serde_json::to_string(&new.attributes)
                .map_err(|e| CustodyError::Internal(e.to_string()))?,
            material: crate::model::to_hex(&wrapped.ciphertext),
            purge_after: 0,
        };
        self.inner.store.insert_object(&row).await?;
        ManagedObject::from_row(&row, now)
    }

    pub(super) fn check_object_grant(&self, grant: &Grant, name: &str) -> Result<(), CustodyError> {
        grant.require(Role::Kmip)?;
        if !grant.allows_object_name(name) {
            return Err(CustodyError::PermissionDenied(crate::auth::Denied::Key {
                identity: grant.identity().to_owned(),
                key: if name.is_empty() {
                    "an object without a name".into()
                } else {
                    name.to_owned()
                },
            }));
        }
        Ok(())
    }

    /// An object's row, for a KMIP client or an officer of its tenant.
    async fn object_row(&self, grant: &Grant, id: &str) -> Result<ObjectRow, CustodyError> {
        if grant.role() != Role::Officer {
            grant.require(Role::Kmip)?;
        }
        let Some(row) = self.inner.store.object(grant.tenant().as_str(), id).await? else {
            // Another tenant's id reads as unknown to the caller (no existence oracle), but the
            // front-end records the attempt where the owner's auditors see it.
            return Err(match self.inner.store.object_tenant(id).await? {
                Some(owner) => CustodyError::ForeignObject {
                    id: id.to_owned(),
                    owner,
                },
                None => CustodyError::ObjectNotFound(id.to_owned()),
            });
        };
        if !grant.allows_object_name(&row.name) {
            return Err(CustodyError::ObjectNotFound(id.to_owned()));
        }
        Ok(row)
    }

    /// One object of the caller's tenant.
    pub async fn object(&self, grant: &Grant, id: &str) -> Result<ManagedObject, CustodyError> {
        let row = self.object_row(grant, id).await?;
        ManagedObject::from_row(&row, self.now())
    }

    /// An object and its plaintext material, for a caller entitled to hold the key. Refused
    /// once the object is destroyed.
    pub async fn object_material(
        &self,
        grant: &Grant,
        wrapping_key: &str,
        id: &str,
    ) -> Result<(ManagedObject, Zeroizing<Vec<u8>>), CustodyError> {
        grant.require(Role::Kmip)?;
        let row = self.object_row(grant, id).await?;
        let object = ManagedObject::from_row(&row, self.now())?;
        if object.state.is_destroyed() || row.material.is_empty() {
            return Err(CustodyError::ObjectDestroyed(id.to_owned()));
        }
        let blob = crate::model::from_hex(&row.material).ok_or_else(|| {
            CustodyError::Store(StoreError::Corrupt {
                table: "managed_objects",
                what: "material is not hex".into(),
            })
        })?;
        // A release (Get) or a use (Encrypt, Decrypt) of the key: the access rules decide on
        // the object's Name.
        self.check_access(grant, &row.name).await?;
        let key = KeyName::new(&row.tenant, wrapping_key)?;
        let (material, _, _) = self
            .open_blob_allowed(
                &|k| k == &key,
                None,
                &blob,
                &object_aad(&row.tenant, &row.id),
                Some(&key),
            )
            .await?;
        Ok((object, material))
    }

    /// The caller's objects, oldest first, narrowed by name and state; only those whose
    /// names its key patterns cover.
    pub async fn locate_objects(
        &self,
        grant: &Grant,
        name: Option<&str>,
        state: Option<ObjectState>,
    ) -> Result<Vec<ManagedObject>, CustodyError> {
        if grant.role() != Role::Officer {
            grant.require(Role::Kmip)?;
        }
        let now = self.now();
        let rows = self
            .inner
            .store
            .objects(grant.tenant().as_str(), name, None)
            .await?;
        let mut found = Vec::new();
        for row in rows.iter().filter(|r| grant.allows_object_name(&r.name)) {
            let object = ManagedObject::from_row(row, now)?;
            if state.is_none_or(|s| s == object.state) {
                found.push(object);
            }
        }
        Ok(found)
    }

    /// Pre-Active → Active.
    pub async fn activate_object(
        &self,
        grant: &Grant,
        id: &str,
    ) -> Result<ManagedObject, CustodyError> {
        self.change_object(grant, id, |object, row, now| {
            if object.state != ObjectState::PreActive {
                return Err(object_transition(object, ObjectState::Active));
            }
            row.state = ObjectState::Active.as_str().into();
            row.activation_date = now;
            Ok(())
        })
        .await
    }

    /// Revokes: for a compromise, to Compromised (from any state but destroyed); otherwise
    /// to Deactivated (from Pre-Active or Active).
    pub async fn revoke_object(
        &self,
        grant: &Grant,
        id: &str,
        code: RevocationCode,
        message: &str,
        compromise_occurred: Millis,
    ) -> Result<ManagedObject, CustodyError> {
        check_text("the revocation message", message)?;
        self.change_object(grant, id, |object, row, now| {
            let to = if code.compromised() {
                ObjectState::Compromised
            } else {
                ObjectState::Deactivated
            };
            let allowed = match to {
                ObjectState::Compromised => !object.state.is_destroyed(),
                _ => matches!(object.state, ObjectState::PreActive | ObjectState::Active),
            };
            if !allowed {
                return Err(object_transition(object, to));
            }
            row.state = to.as_str().into();
            if to == ObjectState::Compromised {
                row.compromise_date = if compromise_occurred == 0 {
                    now
                } else {
                    compromise_occurred.min(now)
                };
            } else {
                row.deactivation_date = now;
            }
            row.revocation_reason = if message.is_empty() {
                code.as_str().to_owned()
            } else {
                format!("{}: {message}", code.as_str())
            };
            Ok(())
        })
        .await
    }

    /// Destroys an object that is not Active: its material is removed once the tenant's grace
    /// period has passed (at once where the configuration sets it to zero). For a KMIP
    /// client, or an officer once a second officer approved (or where no approval is asked).
    pub async fn destroy_object(
        &self,
        grant: &Grant,
        id: &str,
    ) -> Result<ManagedObject, CustodyError> {
        let options = &self.inner.options;
        let grace = options
            .tenant_object_destroy_grace_ms
            .get(grant.tenant().as_str())
            .copied()
            .unwrap_or(options.object_destroy_grace_ms);
        self.change_object(grant, id, |object, row, now| {
            let to = object
                .state
                .after_destroy()
                .ok_or_else(|| object_transition(object, ObjectState::Destroyed))?;
            row.state = to.as_str().into();
            row.destroy_date = now;
            row.purge_after = now.saturating_add(grace);
            if grace == 0 {
                row.material.clear();
            }
            Ok(())
        })
        .await
    }

    /// An officer's destruction of a managed object: done at once where the configuration
    /// asks for no second officer, otherwise a request another officer approves
    /// (`tresor approvals approve`).
    pub async fn officer_destroy_object(
        &self,
        grant: &Grant,
        id: &str,
    ) -> Result<ObjectDestruction, CustodyError> {
        grant.require(Role::Officer)?;
        if !self.inner.options.object_destroy_approval {
            return self
                .destroy_object(grant, id)
                .await
                .map(ObjectDestruction::Destroyed);
        }
        let object = self.object(grant, id).await?;
        if object.state.after_destroy().is_none() {
            return Err(object_transition(&object, ObjectState::Destroyed));
        }
        self.request_approval(
            grant,
            &object.tenant,
            &object.id,
            0,
            super::approvals::DESTROY_OBJECT,
            None,
        )
        .await
        .map(ObjectDestruction::Requested)
    }

    /// Removes the material of destroyed objects whose grace period ended; how many.
    pub async fn purge_destroyed_objects(&self) -> Result<u64, CustodyError> {
        Ok(self.inner.store.purge_destroyed_objects(self.now()).await?)
    }

    pub(super) async fn change_object(
        &self,
        grant: &Grant,
        id: &str,
        change: impl FnOnce(&ManagedObject, &mut ObjectRow, Millis) -> Result<(), CustodyError>,
    ) -> Result<ManagedObject, CustodyError> {
        let mut row = self.object_row(grant, id).await?;
        let now = self.now();
        let object = ManagedObject::from_row(&row, now)?;
        let expected = row.last_change;
        // The dates that passed become the stored state.
        row.state = object.state.as_str().into();
        change(&object, &mut row, now)?;
        row.last_change = now.max(expected + 1);
        self.inner
            .store
            .update_object(&row, expected)
            .await
            .map_err(|e| match e {
                StoreError::Conflict => CustodyError::Conflict(format!("object {id}")),
                other => other.into(),
            })?;
        ManagedObject::from_row(&row, now)
    }

    pub(super) fn random_bytes<const N: usize>(&self) -> Result<[u8; N], CustodyError> {
        use ring::rand::SecureRandom;
        let mut b = [0u8; N];
        self.inner
            .rng
            .fill(&mut b)
            .map_err(|_| CustodyError::Internal("no randomness".into()))?;
        Ok(b)
    }
}

fn object_transition(object: &ManagedObject, to: ObjectState) -> CustodyError {
    CustodyError::ObjectState {
        id: object.id.clone(),
        from: object.state,
        to,
    }
}
