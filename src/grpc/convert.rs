//! Custody and audit values as protocol messages and back: times, states, keys, versions,
//! approvals, checkpoints, exported records.

use std::collections::BTreeMap;

use crate::audit_record::{Checkpoint, ExportItem};
use crate::custody::{ApprovalInfo, ApprovalState, KeyInfo, VersionInfo};
use crate::model::{KeyUsage, Millis, VersionState};
use crate::proto;

pub(super) fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

pub(super) fn millis(t: &prost_types::Timestamp) -> Millis {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000))
}

pub(super) fn version_state(s: VersionState) -> proto::KeyVersionState {
    match s {
        VersionState::Enabled => proto::KeyVersionState::Enabled,
        VersionState::Disabled => proto::KeyVersionState::Disabled,
        VersionState::DestroyScheduled => proto::KeyVersionState::DestroyScheduled,
        VersionState::Destroyed => proto::KeyVersionState::Destroyed,
    }
}

pub(super) fn key_message(k: KeyInfo) -> proto::Key {
    proto::Key {
        name: k.name.to_string(),
        description: k.description,
        labels: k.labels.into_iter().collect(),
        create_time: Some(timestamp(k.created_at)),
        update_time: Some(timestamp(k.updated_at)),
        primary_version: k.primary_version,
        versions: k.versions.into_iter().map(version_message).collect(),
        rotation_period: k.rotation_period_ms.map(|ms| prost_types::Duration {
            seconds: ms / 1000,
            nanos: 0,
        }),
        next_rotation_time: k.next_rotation_at.map(timestamp),
        min_decryption_version: k.min_decryption_version,
        usage: usage_message(k.usage).into(),
    }
}

pub(super) fn usage_message(u: KeyUsage) -> proto::KeyUsage {
    match u {
        KeyUsage::EncryptDecrypt => proto::KeyUsage::EncryptDecrypt,
        KeyUsage::EncryptOnly => proto::KeyUsage::EncryptOnly,
        KeyUsage::DecryptOnly => proto::KeyUsage::DecryptOnly,
        KeyUsage::None => proto::KeyUsage::NoUse,
    }
}

pub(super) fn version_message(v: VersionInfo) -> proto::KeyVersion {
    proto::KeyVersion {
        name: v.name,
        version: v.number,
        state: version_state(v.state).into(),
        primary: v.primary,
        create_time: Some(timestamp(v.created_at)),
        state_change_time: Some(timestamp(v.state_changed_at)),
        destroy_time: v.destroy_at.map(timestamp),
        destroyed_time: v.destroyed_at.map(timestamp),
        lost_time: v.lost_at.map(timestamp),
        wraps_at_most: v.wraps_at_most,
    }
}

pub(super) fn checkpoint_message(c: &Checkpoint) -> proto::AuditCheckpoint {
    proto::AuditCheckpoint {
        sequence: c.seq,
        chain_hash: c.hash.to_vec(),
        time: Some(timestamp(c.time_ms)),
        signature: c.signature.clone(),
        time_ms: c.time_ms,
    }
}

/// The wire form of one export item.
pub(super) fn export_message(item: ExportItem) -> proto::AuditRecord {
    match item {
        ExportItem::Record(r) => proto::AuditRecord {
            sequence: r.seq,
            time: Some(timestamp(r.time_ms)),
            time_ms: r.time_ms,
            request_id: r.body.request_id,
            caller: r.body.caller,
            tenant: r.tenant,
            role: r.body.role,
            operation: r.body.operation,
            key_version: r.body.key_version,
            outcome: r.body.outcome,
            status_code: r.body.status_code,
            peer: r.body.peer,
            aad_hmac: r.body.aad_hmac,
            node: r.body.node,
            kms_request_id: r.body.kms_request_id,
            kms_operation: r.body.kms_operation,
            aws_principal_arn: r.body.aws_principal_arn,
            kms_key_arn: r.body.kms_key_arn,
            repeated: r.body.repeated,
            first_ms: r.body.first_ms,
            last_ms: r.body.last_ms,
            access_rule: r.body.access_rule,
            access_window: r.body.access_window,
            justification: r.body.justification,
            justification_reference: r.body.justification_reference,
            kms_via_service: r.body.kms_via_service,
            aws_source_vpc: r.body.aws_source_vpc,
            aws_source_vpce: r.body.aws_source_vpce,
            previous_hash: r.prev_hash.to_vec(),
            key: r.body.key,
            certificate_fingerprint: r.body.fingerprint,
            kind: proto::AuditItemKind::Record.into(),
            ..Default::default()
        },
        ExportItem::Withheld {
            seq,
            prev_hash,
            time_ms,
            tenant,
            body_digest,
        } => proto::AuditRecord {
            sequence: seq,
            time: Some(timestamp(time_ms)),
            time_ms,
            tenant,
            previous_hash: prev_hash.to_vec(),
            body_digest: body_digest.to_vec(),
            kind: proto::AuditItemKind::Withheld.into(),
            ..Default::default()
        },
        ExportItem::Checkpoint(c) => proto::AuditRecord {
            sequence: c.seq,
            time: Some(timestamp(c.time_ms)),
            time_ms: c.time_ms,
            kind: proto::AuditItemKind::Checkpoint.into(),
            checkpoint: Some(checkpoint_message(&c)),
            ..Default::default()
        },
    }
}

pub(super) fn approval_message(a: ApprovalInfo) -> proto::Approval {
    // An officer's destruction of a managed object names the object, not a key version.
    let (key, key_version) = if a.operation == "OPEN_ACCESS_WINDOW" {
        // A break-glass window's approval names the window.
        let window = format!(
            "tenants/{}/windows/{}",
            a.key.tenant().as_str(),
            a.key.key()
        );
        (window.clone(), window)
    } else if a.operation == "DESTROY_MANAGED_OBJECT" {
        let object = format!(
            "tenants/{}/objects/{}",
            a.key.tenant().as_str(),
            a.key.key()
        );
        (object.clone(), object)
    } else {
        (a.key.to_string(), a.key.version(a.version))
    };
    proto::Approval {
        id: a.id,
        operation: a.operation,
        key_version,
        requested_by: a.requested_by,
        state: match a.state {
            ApprovalState::Pending => proto::ApprovalState::Pending,
            ApprovalState::Approved => proto::ApprovalState::Approved,
            ApprovalState::Rejected => proto::ApprovalState::Rejected,
            ApprovalState::Expired => proto::ApprovalState::Expired,
        }
        .into(),
        create_time: Some(timestamp(a.requested_at)),
        expire_time: Some(timestamp(a.expires_at)),
        decided_by: a.decided_by,
        version: a.version,
        key,
        destroy_time: a.destroy_at.map(timestamp),
    }
}

pub(super) fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}
