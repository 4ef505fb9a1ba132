//! The errors of custody operations: one enum, mapped to each protocol's codes by each front-end
//! (gRPC status, XKS error names, CLI exit codes), never here.

use super::approvals::ApprovalState;
use crate::auth::Denied;
use crate::envelope::EnvelopeError;
use crate::hsm::HsmError;
use crate::model::{KeyName, KeyUsage, NameError, VersionState};
use crate::store::StoreError;

/// Errors of custody operations. Messages name keys and versions, never key material,
/// plaintext or AAD. The API layer maps each variant to one gRPC status; ciphertext problems
/// (`MalformedCiphertext`, `Unauthentic`, `UnknownVersion`) all reach clients as one generic
/// message so that they are no oracle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CustodyError {
    /// A key or tenant name breaks the naming rules.
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    /// The caller's grant does not cover the operation or key.
    #[error("permission denied: {0}")]
    PermissionDenied(#[from] Denied),
    /// A request value is out of range (sizes, lengths).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No key of that name.
    #[error("key {0} not found")]
    KeyNotFound(String),
    /// A key of that name exists already.
    #[error("key {0} already exists")]
    KeyExists(String),
    /// The key has no such version.
    #[error("{0} not found")]
    VersionNotFound(String),
    /// The bytes are not a blob this build can read.
    #[error("malformed ciphertext: {0}")]
    MalformedCiphertext(EnvelopeError),
    /// The HSM's tag check failed: the AAD differs from the one given at wrap time, or the
    /// blob was altered (the two cannot be told apart, by design of GCM).
    #[error("ciphertext failed authentication (wrong AAD or altered ciphertext)")]
    Unauthentic,
    /// The blob names a key version this installation never had.
    #[error("ciphertext names an unknown key version")]
    UnknownVersion,
    /// The blob belongs to another key than the one the caller named.
    #[error("ciphertext belongs to another key than {expected}")]
    WrongKey {
        /// The key the caller expected.
        expected: String,
    },
    /// The blob belongs to a key the caller's grant does not cover (another tenant's, or one
    /// outside its key patterns). Front-ends answer it exactly like [`Self::UnknownVersion`]:
    /// the caller learns neither the key's name nor that the version exists.
    #[error("ciphertext belongs to {key}, which the caller may not use")]
    ForeignBlob {
        /// The key the blob belongs to: for logs and its owner's audit log only.
        key: KeyName,
    },
    /// The version is disabled.
    #[error("{0} is disabled")]
    VersionDisabled(String),
    /// The version is scheduled for destruction.
    #[error("{0} is scheduled for destruction")]
    VersionDestroyScheduled(String),
    /// The version was destroyed; its blobs can never be unwrapped again.
    #[error("{0} is destroyed")]
    VersionDestroyed(String),
    /// The version's HSM object is missing from the token.
    #[error("{0} is lost: its HSM object is missing from the token")]
    VersionLost(String),
    /// The version has wrapped as many blobs as a random-IV GCM key safely can.
    #[error("{0} has reached its wrap limit; rotate the key")]
    VersionExhausted(String),
    /// The version is below the key's minimum decryption version.
    #[error("{0} is below the key's minimum decryption version")]
    VersionBelowMinimum(String),
    /// The key's usage forbids the operation.
    #[error("the usage of {key} is {usage}: it may not {operation}")]
    UsageForbidden {
        /// The key.
        key: String,
        /// Its usage.
        usage: KeyUsage,
        /// `encrypt` or `decrypt`.
        operation: &'static str,
    },
    /// The approval does not exist (in the caller's tenant).
    #[error("approval {0} not found")]
    ApprovalNotFound(String),
    /// The approval was already decided or expired.
    #[error("approval {id} is {state}; it can no longer be decided")]
    ApprovalClosed {
        /// The approval.
        id: String,
        /// Its state.
        state: ApprovalState,
    },
    /// The officer who asked may not approve.
    #[error("{0} asked for this; a different officer of the tenant must approve it")]
    SelfApproval(String),
    /// A destruction of this version already waits for approval.
    #[error("a destruction of {0} already waits for approval")]
    ApprovalPending(String),
    /// The change is not allowed for the primary version.
    #[error("{0} is the primary version; rotate the key first")]
    PrimaryVersion(String),
    /// The state machine does not allow this change.
    #[error("{version} is {from}; it cannot become {to}")]
    InvalidTransition {
        /// Full version name.
        version: String,
        /// Current state.
        from: VersionState,
        /// Requested state.
        to: VersionState,
    },
    /// The key's rows in the database do not match their integrity value: they were changed
    /// outside Tresor. The key refuses every operation until its rows are restored.
    #[error(
        "metadata integrity check failed for {key}: {reason}; the key refuses service until its database rows are restored"
    )]
    MetadataIntegrity {
        /// The key.
        key: String,
        /// What did not match.
        reason: String,
    },
    /// An approval row does not match its integrity value.
    #[error(
        "metadata integrity check failed for approval {0}: it was changed outside Tresor and cannot be decided"
    )]
    ApprovalIntegrity(String),
    /// The HSM holds no integrity key for this installation although the database holds
    /// sealed rows: the database belongs to another token, or its installation id was changed.
    #[error(
        "metadata integrity: the HSM holds no integrity key for installation {0}, but the database has sealed rows; this database does not belong to this token (or its installation id was changed)"
    )]
    IntegrityKeyMissing(String),
    /// This node could not confirm within [`CHANGE_BOUND_MS`] that it has every key change
    /// made on other nodes (its database connection is away): it serves no key until it has.
    #[error(
        "this node cannot confirm it has every recent key change (database unreachable); retry, or use another node"
    )]
    NotCurrent,
    /// Another writer changed the key at the same time; retry.
    #[error("{0} was changed concurrently; retry")]
    Conflict(String),
    /// No managed object with this id in the caller's tenant (or none the caller may see).
    #[error("object {0} not found")]
    ObjectNotFound(String),
    /// The managed object belongs to another tenant. Its message is [`ObjectNotFound`]'s, so
    /// the caller learns nothing; `owner` is for the owner's audit log only.
    ///
    /// [`ObjectNotFound`]: CustodyError::ObjectNotFound
    #[error("object {id} not found")]
    ForeignObject {
        /// The object.
        id: String,
        /// The tenant that owns it.
        owner: String,
    },
    /// The managed object has no such attribute.
    #[error("object {id} has no {attribute}")]
    ObjectAttributeNotFound {
        /// The object.
        id: String,
        /// The attribute.
        attribute: String,
    },
    /// The managed object's state does not allow this use.
    #[error("object {id} is {state}; it cannot {operation}")]
    ObjectNotUsable {
        /// The object.
        id: String,
        /// Its state.
        state: super::ObjectState,
        /// What was asked.
        operation: &'static str,
    },
    /// Data given to decrypt under a managed object does not authenticate.
    #[error(
        "the data does not authenticate under object {0} with this IV, tag and additional data"
    )]
    ObjectDataUnauthentic(String),
    /// The managed object is destroyed: its material is gone.
    #[error("object {0} is destroyed")]
    ObjectDestroyed(String),
    /// The managed object's state does not allow the change.
    #[error("object {id} is {from}; it cannot become {to}")]
    ObjectState {
        /// The object.
        id: String,
        /// Its state.
        from: super::ObjectState,
        /// The state asked for.
        to: super::ObjectState,
    },
    /// An access rule refused the call. The message names the rule, never its contents.
    #[error("refused by access rule {0}")]
    AccessRuleDenied(String),
    /// An access rule lets the call through only while a break-glass window is open for the
    /// caller and key, and none is.
    #[error(
        "access rule {0} requires an approved access window for this caller and key; an officer requests one (tresor access request) and a second officer approves it"
    )]
    AccessWindowRequired(String),
    /// No break-glass window with this id in the caller's tenant.
    #[error("access window {0} not found")]
    WindowNotFound(String),
    /// The window is closed, expired or refused: it can no longer change.
    #[error("access window {id} is {state}; it can no longer be {action}")]
    WindowClosed {
        /// The window.
        id: String,
        /// Where it stands.
        state: super::WindowState,
        /// What was asked.
        action: &'static str,
    },
    /// A window row does not match its integrity value (changed outside Tresor).
    #[error(
        "metadata integrity check failed for access window {0}: it was changed outside Tresor and is ignored"
    )]
    WindowIntegrity(String),
    /// The deployment lacks something an operator must set up (named, with the fix).
    #[error("{0}")]
    FailedSetup(String),
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The database failed.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A background task failed to complete.
    #[error("internal: {0}")]
    Internal(String),
}
