//! Evidence kept in the HSM for the two moments when custody touches a version's object
//! without the database's word being enough: removing a crash leftover, and destroying a key.
//!
//! Owns two kinds of token data object (application `tresor`, private, not modifiable), labelled
//! with this installation's prefix `tresor/{installation id}/`:
//!
//! - **creation journal** `…creating/{version id hex}`: created *before* a version's key object
//!   and destroyed once its row is committed. An object without a row is removed as a crash
//!   leftover only if its journal is still there; without one it is kept and reported, whatever
//!   the database says, because its row existed once (deleted or restored away).
//! - **destruction order** `…destroy/{version id hex}`: created only by [`super::Custody::approve`]
//!   (a second officer of the key's tenant approving a pending, sealed request of another), and
//!   withdrawn by a cancellation. A version's object is destroyed only while an order for
//!   exactly that version id exists and its `destroy_at` has passed, by the clock of the node.
//!
//! ```text
//! journal value = "tresor/creation-journal/v1\0" ‖ version id (16)
//! order value   = "tresor/destruction-order/v1\0" ‖ version id (16) ‖ i64be(destroy_at ms)
//!                 ‖ str(version name) ‖ str(approval id) ‖ str(requested by) ‖ str(approved by)
//! ```
//!
//! Neither can be written by anyone without the HSM PIN; the database only ever holds copies of
//! what they say.

use std::collections::{HashMap, HashSet};

use super::{Custody, CustodyError};
use crate::envelope::{VERSION_ID_LEN, VersionId};
use crate::model::Millis;

const JOURNAL_MAGIC: &[u8] = b"tresor/creation-journal/v1\0";
const ORDER_MAGIC: &[u8] = b"tresor/destruction-order/v1\0";

/// What two officers decided about one version, as the HSM holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DestructionOrder {
    pub(crate) id: VersionId,
    pub(crate) destroy_at: Millis,
    pub(crate) version: String,
    pub(crate) approval: String,
    pub(crate) requested_by: String,
    pub(crate) approved_by: String,
}

impl DestructionOrder {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = super::integrity::Writer(ORDER_MAGIC.to_vec());
        w.0.extend_from_slice(&self.id.0);
        w.i64(self.destroy_at);
        for s in [
            &self.version,
            &self.approval,
            &self.requested_by,
            &self.approved_by,
        ] {
            w.str(s);
        }
        w.0
    }

    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(ORDER_MAGIC)?;
        let (id, rest) = rest.split_at_checked(VERSION_ID_LEN)?;
        let (at, mut rest) = rest.split_at_checked(8)?;
        let mut strings = Vec::with_capacity(4);
        for _ in 0..4 {
            let (len, tail) = rest.split_at_checked(4)?;
            let len = usize::try_from(u32::from_be_bytes(len.try_into().ok()?)).ok()?;
            let (s, tail) = tail.split_at_checked(len)?;
            strings.push(String::from_utf8(s.to_vec()).ok()?);
            rest = tail;
        }
        if !rest.is_empty() {
            return None;
        }
        let approved_by = strings.pop()?;
        let requested_by = strings.pop()?;
        let approval = strings.pop()?;
        let version = strings.pop()?;
        Some(Self {
            id: VersionId(id.try_into().ok()?),
            destroy_at: Millis::from_be_bytes(at.try_into().ok()?),
            version,
            approval,
            requested_by,
            approved_by,
        })
    }
}

impl Custody {
    fn journal_label(&self, id: &VersionId) -> String {
        format!("{}creating/{}", self.inner.label_prefix, id.to_hex())
    }

    fn order_label(&self, id: &VersionId) -> String {
        format!("{}destroy/{}", self.inner.label_prefix, id.to_hex())
    }

    /// Step zero of creating a version: the journal that lets a crash leftover be removed.
    pub(super) async fn journal_creation(&self, id: &VersionId) -> Result<(), CustodyError> {
        let mut value = JOURNAL_MAGIC.to_vec();
        value.extend_from_slice(&id.0);
        self.inner
            .hsm
            .create_data_object(self.journal_label(id), value)
            .await?;
        Ok(())
    }

    /// The creation committed (or its object is gone): the journal has done its job. A failure
    /// is only logged; start-up reconciliation clears journals of committed versions.
    pub(super) async fn clear_journal(&self, id: &VersionId) {
        if let Err(e) = self
            .inner
            .hsm
            .destroy_data_objects(self.journal_label(id))
            .await
        {
            tracing::warn!(version_id = %id, error = %e, "could not clear a creation journal; start-up reconciliation will");
        }
    }

    /// Version ids with a creation journal in the token.
    pub(super) async fn creation_journals(&self) -> Result<HashSet<VersionId>, CustodyError> {
        let prefix = format!("{}creating/", self.inner.label_prefix);
        let objects = self.inner.hsm.data_objects(prefix.clone()).await?;
        Ok(objects
            .iter()
            .filter_map(|o| {
                let id = VersionId::from_hex(o.label.strip_prefix(&prefix)?)?;
                let recorded = o.value.strip_prefix(JOURNAL_MAGIC)?;
                (recorded == id.0).then_some(id)
            })
            .collect())
    }

    /// Puts a destruction order into the token (replacing any earlier one for the version).
    pub(super) async fn place_order(&self, order: &DestructionOrder) -> Result<(), CustodyError> {
        self.withdraw_order(&order.id).await?;
        self.inner
            .hsm
            .create_data_object(self.order_label(&order.id), order.encode())
            .await?;
        Ok(())
    }

    /// Removes the destruction order of a version, if any.
    pub(super) async fn withdraw_order(&self, id: &VersionId) -> Result<(), CustodyError> {
        self.inner
            .hsm
            .destroy_data_objects(self.order_label(id))
            .await?;
        Ok(())
    }

    /// The destruction orders in the token, by version id. An object under the order prefix
    /// that does not parse, or names another version than its label, is no order.
    pub(super) async fn destruction_orders(
        &self,
    ) -> Result<HashMap<VersionId, DestructionOrder>, CustodyError> {
        let prefix = format!("{}destroy/", self.inner.label_prefix);
        let objects = self.inner.hsm.data_objects(prefix.clone()).await?;
        let mut orders = HashMap::new();
        for o in objects {
            let labelled = o.label.strip_prefix(&prefix).and_then(VersionId::from_hex);
            match DestructionOrder::parse(&o.value) {
                Some(order) if labelled == Some(order.id) => {
                    // Two orders for one version (a retried approval): the later time wins.
                    let keep = orders
                        .get(&order.id)
                        .is_none_or(|k: &DestructionOrder| k.destroy_at < order.destroy_at);
                    if keep {
                        orders.insert(order.id, order);
                    }
                }
                _ => {
                    tracing::warn!(label = %o.label, "token data object under the destruction-order prefix is no valid order; ignored");
                }
            }
        }
        Ok(orders)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_round_trips_and_truncations_are_refused() {
        let order = DestructionOrder {
            id: VersionId([7; 16]),
            destroy_at: 1_700_000_000_000,
            version: "tenants/t/keys/k/versions/2".into(),
            approval: "abc".into(),
            requested_by: "alice".into(),
            approved_by: "bob".into(),
        };
        let bytes = order.encode();
        assert_eq!(DestructionOrder::parse(&bytes), Some(order));
        for n in 0..bytes.len() {
            assert_eq!(DestructionOrder::parse(&bytes[..n]), None, "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(DestructionOrder::parse(&longer), None);
    }
}
