//! KMIP's attributes of a managed object: reading them from requests (templates, Add and
//! Modify Attribute, Locate's filters) and writing them into answers, by their KMIP names.
//!
//! Owns the mapping between KMIP's attribute names and values and custody's managed objects;
//! decides nothing about which change is allowed (custody does).

use super::KmipError;
use super::message::read_attribute;
use super::ttlv::{Ttlv, Value, tag};
use crate::custody::{
    AttributeValue, ManagedObject, NewObject, ObjectAttribute, ObjectState, RevocationCode,
};

pub(super) const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
pub(super) const ALGORITHM_AES: u32 = 0x03;
pub(super) const KEY_FORMAT_RAW: u32 = 0x01;
pub(super) const KEY_FORMAT_TRANSPARENT_SYMMETRIC: u32 = 0x07;
pub(super) const NAME_TYPE_TEXT: u32 = 0x01;

pub(super) fn invalid(field: &str) -> KmipError {
    KmipError::InvalidField(format!("{field} has the wrong type"))
}

/// The attribute a client may change, by its KMIP name.
pub(super) fn attribute_named(name: &str) -> Result<ObjectAttribute, KmipError> {
    Ok(match name {
        "Name" => ObjectAttribute::Name,
        "Activation Date" => ObjectAttribute::ActivationDate,
        "Deactivation Date" => ObjectAttribute::DeactivationDate,
        custom if is_custom(custom) => ObjectAttribute::Custom(custom.to_owned()),
        other => {
            return Err(KmipError::InvalidField(format!(
                "attribute {other:?} cannot be changed by a client"
            )));
        }
    })
}

/// An attribute and its new value, from an Attribute structure.
pub(super) fn settable(
    name: &str,
    value: &Ttlv,
) -> Result<(ObjectAttribute, AttributeValue), KmipError> {
    let attribute = attribute_named(name)?;
    let new = match &attribute {
        ObjectAttribute::Name => AttributeValue::Text(name_value(value)?.to_owned()),
        ObjectAttribute::ActivationDate | ObjectAttribute::DeactivationDate => {
            AttributeValue::Date(date_ms(value, name)?)
        }
        ObjectAttribute::Custom(_) => AttributeValue::Text(
            value
                .as_text()
                .ok_or_else(|| {
                    KmipError::InvalidField(format!("attribute {name:?} must be a text string"))
                })?
                .to_owned(),
        ),
    };
    Ok((attribute, new))
}

/// The TTLV value of an attribute's stored value.
pub(super) fn value_of(name: &str, value: AttributeValue) -> Value {
    match value {
        AttributeValue::Text(text) if name == "Name" => Value::Structure(vec![
            Ttlv::text(tag::NAME_VALUE, text),
            Ttlv::enumeration(tag::NAME_TYPE, NAME_TYPE_TEXT),
        ]),
        AttributeValue::Text(text) => Value::TextString(text),
        AttributeValue::Date(ms) => seconds(ms),
    }
}

/// Every attribute this server keeps has one instance: an Attribute Index above 0 names none.
pub(super) fn check_index(item: &Ttlv) -> Result<(), KmipError> {
    match item.child(tag::ATTRIBUTE_INDEX).map(Ttlv::as_int) {
        None | Some(Some(0)) => Ok(()),
        Some(Some(i)) => Err(KmipError::ItemNotFound(format!(
            "attribute index {i}: every attribute here has one instance (index 0)"
        ))),
        Some(None) => Err(invalid("Attribute Index")),
    }
}

/// A Name attribute's value.
pub(super) fn name_value(v: &Ttlv) -> Result<&str, KmipError> {
    v.child(tag::NAME_VALUE)
        .and_then(Ttlv::as_text)
        .ok_or_else(|| KmipError::InvalidField("a Name has no Name Value".into()))
}

pub(super) fn date_ms(v: &Ttlv, field: &str) -> Result<i64, KmipError> {
    v.as_date()
        .map(|s| s.saturating_mul(1000))
        .ok_or_else(|| invalid(field))
}

pub(super) fn int_of(v: &Ttlv, field: &str) -> Result<u32, KmipError> {
    v.as_int()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| invalid(field))
}

/// Custom attributes clients may set: text values of these names.
pub(super) fn is_custom(name: &str) -> bool {
    name.starts_with("x-")
        || name.starts_with("y-")
        || matches!(
            name,
            "Object Group" | "Contact Information" | "Operation Policy Name"
        )
}

/// What a Create's or Register's template asks for.
pub(super) fn new_object(template: Option<&Ttlv>, register: bool) -> Result<NewObject, KmipError> {
    let mut new = NewObject {
        usage_mask: 0x04 | 0x08,
        ..NewObject::default()
    };
    let mut algorithm = None;
    for a in template
        .map(|t| t.children(tag::ATTRIBUTE).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let (name, value) = read_attribute(a)?;
        match name {
            "Cryptographic Algorithm" => {
                algorithm = Some(value.as_enum().ok_or_else(|| invalid(name))?)
            }
            "Cryptographic Length" => new.length_bits = int_of(value, name)?,
            "Cryptographic Usage Mask" => new.usage_mask = int_of(value, name)?,
            "Name" => {
                if !new.name.is_empty() {
                    return Err(KmipError::InvalidField(
                        "an object has at most one Name here".into(),
                    ));
                }
                new.name = name_value(value)?.to_owned();
            }
            "Activation Date" => new.activation_date = date_ms(value, name)?,
            "Deactivation Date" => new.deactivation_date = date_ms(value, name)?,
            custom if is_custom(custom) => {
                let text = value.as_text().ok_or_else(|| {
                    KmipError::InvalidField(format!("attribute {custom:?} must be a text string"))
                })?;
                new.attributes.insert(custom.to_owned(), text.to_owned());
            }
            other => {
                return Err(KmipError::InvalidField(format!(
                    "attribute {other:?} cannot be set here"
                )));
            }
        }
    }
    match algorithm {
        Some(ALGORITHM_AES) => {}
        None if register => {}
        None => {
            return Err(KmipError::MissingData(
                "the template has no Cryptographic Algorithm (AES)".into(),
            ));
        }
        Some(other) => {
            return Err(KmipError::FeatureNotSupported(format!(
                "cryptographic algorithm {other:#x} is not offered; this server creates AES keys"
            )));
        }
    }
    if new.length_bits == 0 && !register {
        return Err(KmipError::MissingData(
            "the template has no Cryptographic Length (128, 192 or 256)".into(),
        ));
    }
    Ok(new)
}

pub(super) fn revocation_code(code: u32) -> Result<RevocationCode, KmipError> {
    Ok(match code {
        1 => RevocationCode::Unspecified,
        2 => RevocationCode::KeyCompromise,
        3 => RevocationCode::CaCompromise,
        4 => RevocationCode::AffiliationChanged,
        5 => RevocationCode::Superseded,
        6 => RevocationCode::CessationOfOperation,
        7 => RevocationCode::PrivilegeWithdrawn,
        other => {
            return Err(KmipError::InvalidField(format!(
                "revocation reason code {other:#x} is not one KMIP defines"
            )));
        }
    })
}

pub(super) fn revocation_number(code: RevocationCode) -> u32 {
    match code {
        RevocationCode::Unspecified => 1,
        RevocationCode::KeyCompromise => 2,
        RevocationCode::CaCompromise => 3,
        RevocationCode::AffiliationChanged => 4,
        RevocationCode::Superseded => 5,
        RevocationCode::CessationOfOperation => 6,
        RevocationCode::PrivilegeWithdrawn => 7,
    }
}

pub(super) fn state_number(state: ObjectState) -> u32 {
    match state {
        ObjectState::PreActive => 1,
        ObjectState::Active => 2,
        ObjectState::Deactivated => 3,
        ObjectState::Compromised => 4,
        ObjectState::Destroyed => 5,
        ObjectState::DestroyedCompromised => 6,
    }
}

pub(super) fn state_of_number(n: u32) -> Result<ObjectState, KmipError> {
    Ok(match n {
        1 => ObjectState::PreActive,
        2 => ObjectState::Active,
        3 => ObjectState::Deactivated,
        4 => ObjectState::Compromised,
        5 => ObjectState::Destroyed,
        6 => ObjectState::DestroyedCompromised,
        other => {
            return Err(KmipError::InvalidField(format!(
                "state {other:#x} is not one KMIP defines"
            )));
        }
    })
}

pub(super) fn seconds(ms: i64) -> Value {
    Value::DateTime(ms.div_euclid(1000))
}

/// An object's attributes as KMIP names them, in a stable order.
pub(super) fn attributes_of(o: &ManagedObject, version: (i32, i32)) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = vec![
        ("Unique Identifier".into(), Value::TextString(o.id.clone())),
        (
            "Object Type".into(),
            Value::Enumeration(OBJECT_TYPE_SYMMETRIC_KEY),
        ),
        (
            "Cryptographic Algorithm".into(),
            Value::Enumeration(ALGORITHM_AES),
        ),
        (
            "Cryptographic Length".into(),
            Value::Integer(i32::try_from(o.length_bits).unwrap_or(0)),
        ),
        (
            "Cryptographic Usage Mask".into(),
            Value::Integer(i32::try_from(o.usage_mask).unwrap_or(0)),
        ),
        ("State".into(), Value::Enumeration(state_number(o.state))),
        ("Initial Date".into(), seconds(o.created_at)),
    ];
    if !o.name.is_empty() {
        out.push((
            "Name".into(),
            Value::Structure(vec![
                Ttlv::text(tag::NAME_VALUE, o.name.clone()),
                Ttlv::enumeration(tag::NAME_TYPE, NAME_TYPE_TEXT),
            ]),
        ));
    }
    for (name, ms) in [
        ("Activation Date", o.activation_date),
        ("Deactivation Date", o.deactivation_date),
        ("Compromise Date", o.compromise_date),
        ("Destroy Date", o.destroy_date),
    ] {
        if ms != 0 {
            out.push((name.into(), seconds(ms)));
        }
    }
    if let Some((code, text)) = &o.revocation {
        let mut reason = vec![Ttlv::enumeration(
            tag::REVOCATION_REASON_CODE,
            revocation_number(*code),
        )];
        if !text.is_empty() {
            reason.push(Ttlv::text(tag::REVOCATION_MESSAGE, text.clone()));
        }
        out.push(("Revocation Reason".into(), Value::Structure(reason)));
    }
    // Last Change Date is a KMIP 1.1 attribute.
    if version >= (1, 1) {
        out.push(("Last Change Date".into(), seconds(o.last_change)));
    }
    out.extend(
        o.attributes
            .iter()
            .map(|(k, v)| (k.clone(), Value::TextString(v.clone()))),
    );
    out
}
