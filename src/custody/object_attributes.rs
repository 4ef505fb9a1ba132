//! Client-settable attributes of managed objects (KMIP's Add, Modify and Delete Attribute):
//! the Name, the activation and deactivation dates, and custom text attributes.
//!
//! Owns which attribute may change in which state and the bounds of their values; every
//! change goes through the object's compare-and-set update (`change_object`).

use super::objects::{MAX_OBJECT_ATTRIBUTES, check_text};
use super::{Custody, CustodyError, ManagedObject, ObjectState};
use crate::auth::Grant;
use crate::model::Millis;

/// A client-settable attribute of a managed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectAttribute {
    /// The Name.
    Name,
    /// A text attribute kept as given (`x-…`, Object Group, Contact Information, …).
    Custom(String),
    /// The Activation Date (only while Pre-Active).
    ActivationDate,
    /// The Deactivation Date (only before it passed).
    DeactivationDate,
}

/// What a client does to an attribute (KMIP's Add, Modify and Delete Attribute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeChange {
    /// Sets an attribute the object does not have.
    Add(AttributeValue),
    /// Replaces an attribute the object has.
    Modify(AttributeValue),
    /// Removes an attribute the object has.
    Delete,
}

/// An attribute's new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    /// For Name and custom attributes.
    Text(String),
    /// For dates.
    Date(Millis),
}

impl Custody {
    /// Adds, modifies or deletes one client-settable attribute; returns the object and the
    /// attribute's value before the change (for Delete's answer).
    pub async fn change_object_attribute(
        &self,
        grant: &Grant,
        id: &str,
        attribute: ObjectAttribute,
        change: AttributeChange,
    ) -> Result<(ManagedObject, Option<AttributeValue>), CustodyError> {
        let mut previous = None;
        let object = self
            .change_object(grant, id, |object, row, now| {
                let current = match &attribute {
                    ObjectAttribute::Name => {
                        (!row.name.is_empty()).then(|| AttributeValue::Text(row.name.clone()))
                    }
                    ObjectAttribute::Custom(name) => object
                        .attributes
                        .get(name)
                        .map(|v| AttributeValue::Text(v.clone())),
                    ObjectAttribute::ActivationDate => (row.activation_date != 0)
                        .then_some(AttributeValue::Date(row.activation_date)),
                    ObjectAttribute::DeactivationDate => (row.deactivation_date != 0)
                        .then_some(AttributeValue::Date(row.deactivation_date)),
                };
                let new = match (&change, &current) {
                    (AttributeChange::Add(_), Some(_)) => {
                        return Err(CustodyError::InvalidArgument(format!(
                            "object {id} already has {}; modify it instead",
                            attribute_label(&attribute)
                        )));
                    }
                    (AttributeChange::Modify(_) | AttributeChange::Delete, None) => {
                        return Err(CustodyError::ObjectAttributeNotFound {
                            id: id.to_owned(),
                            attribute: attribute_label(&attribute),
                        });
                    }
                    (AttributeChange::Add(v) | AttributeChange::Modify(v), _) => Some(v.clone()),
                    (AttributeChange::Delete, Some(_)) => None,
                };
                match (&attribute, new) {
                    (ObjectAttribute::Name, Some(AttributeValue::Text(name))) => {
                        check_text("Name", &name)?;
                        self.check_object_grant(grant, &name)?;
                        row.name = name;
                    }
                    (ObjectAttribute::Name, None) => {
                        // An object whose name no longer matches the caller's patterns would
                        // vanish from the caller's sight.
                        self.check_object_grant(grant, "")?;
                        row.name.clear();
                    }
                    (ObjectAttribute::Custom(name), value) => {
                        let mut attributes = object.attributes.clone();
                        match value {
                            Some(AttributeValue::Text(text)) => {
                                check_text(name, &text)?;
                                if attributes.len() >= MAX_OBJECT_ATTRIBUTES
                                    && !attributes.contains_key(name)
                                {
                                    return Err(CustodyError::InvalidArgument(format!(
                                        "at most {MAX_OBJECT_ATTRIBUTES} custom attributes"
                                    )));
                                }
                                attributes.insert(name.clone(), text);
                            }
                            None => {
                                attributes.remove(name);
                            }
                            Some(AttributeValue::Date(_)) => {
                                return Err(CustodyError::InvalidArgument(format!(
                                    "{name} is a text attribute"
                                )));
                            }
                        }
                        row.attributes = serde_json::to_string(&attributes)
                            .map_err(|e| CustodyError::Internal(e.to_string()))?;
                    }
                    (ObjectAttribute::ActivationDate, value) => {
                        if object.state != ObjectState::PreActive {
                            return Err(CustodyError::InvalidArgument(format!(
                                "object {id} is {}; its activation date can change only while it is PRE_ACTIVE",
                                object.state
                            )));
                        }
                        row.activation_date = date_of(value)?;
                    }
                    (ObjectAttribute::DeactivationDate, value) => {
                        if !matches!(object.state, ObjectState::PreActive | ObjectState::Active) {
                            return Err(CustodyError::InvalidArgument(format!(
                                "object {id} is {}; its deactivation date can no longer change",
                                object.state
                            )));
                        }
                        let date = date_of(value)?;
                        if date != 0 && date < now {
                            return Err(CustodyError::InvalidArgument(
                                "a deactivation date in the past: revoke the object instead".into(),
                            ));
                        }
                        row.deactivation_date = date;
                    }
                    (ObjectAttribute::Name, Some(AttributeValue::Date(_))) => {
                        return Err(CustodyError::InvalidArgument("Name is a text attribute".into()));
                    }
                }
                previous = current;
                Ok(())
            })
            .await?;
        Ok((object, previous))
    }
}

fn attribute_label(attribute: &ObjectAttribute) -> String {
    match attribute {
        ObjectAttribute::Name => "a Name".into(),
        ObjectAttribute::Custom(name) => format!("attribute {name:?}"),
        ObjectAttribute::ActivationDate => "an Activation Date".into(),
        ObjectAttribute::DeactivationDate => "a Deactivation Date".into(),
    }
}

fn date_of(value: Option<AttributeValue>) -> Result<Millis, CustodyError> {
    match value {
        None => Ok(0),
        Some(AttributeValue::Date(ms)) => Ok(ms),
        Some(AttributeValue::Text(_)) => Err(CustodyError::InvalidArgument(
            "a date attribute needs a date".into(),
        )),
    }
}
