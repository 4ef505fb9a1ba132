//! The KMIP operations this server offers, each from its request payload to its response
//! payload (KMIP 1.4 §4): DiscoverVersions, Query, Create, Register, Get, GetAttributes,
//! GetAttributeList, Locate, AddAttribute, ModifyAttribute, DeleteAttribute, Activate, Revoke
//! and Destroy on symmetric (AES) keys, and Encrypt and Decrypt (AES-GCM) under them. Anything
//! else answers Operation Not Supported.
//!
//! Owns each operation's payloads (attributes are `attributes.rs`'s); decides nothing about who
//! may do what (custody checks the grant) and never sees sealed material.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::attributes::{
    ALGORITHM_AES, KEY_FORMAT_RAW, KEY_FORMAT_TRANSPARENT_SYMMETRIC, OBJECT_TYPE_SYMMETRIC_KEY,
    attribute_named, attributes_of, check_index, int_of, invalid, is_custom, name_value,
    new_object, revocation_code, settable, state_of_number, value_of,
};
use super::message::{self, attribute, operation as op, read_attribute};
use super::ttlv::{Ttlv, Value, tag};
use super::{KmipError, required};
use crate::auth::Grant;
use crate::config::KmipConfig;
use crate::custody::{AttributeChange, Custody, ManagedObject};

/// The object a batch item touched (for its audit record).
#[derive(Debug, Default)]
pub struct Touched {
    /// Its unique identifier.
    pub object: Option<String>,
    /// Its name.
    pub name: Option<String>,
}

/// Runs one batch item. `placeholder` is the batch's ID Placeholder: the id the last Create or
/// Register produced, which later items of the batch use when they name none.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    custody: &Custody,
    config: &KmipConfig,
    grant: &Grant,
    version: (i32, i32),
    operation: u32,
    payload: &Ttlv,
    placeholder: &mut Option<String>,
    touched: &mut Touched,
) -> Result<Vec<Ttlv>, KmipError> {
    match operation {
        op::DISCOVER_VERSIONS => discover_versions(payload),
        op::QUERY => Ok(query(payload)),
        op::CREATE => {
            let object_type = required(payload, tag::OBJECT_TYPE, "Object Type")?;
            check_object_type(object_type)?;
            let new = new_object(payload.child(tag::TEMPLATE_ATTRIBUTE), false)?;
            let created = custody
                .create_object(grant, &config.wrapping_key, new)
                .await?;
            touched.set(&created);
            *placeholder = Some(created.id.clone());
            Ok(vec![
                Ttlv::enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY),
                Ttlv::text(tag::UNIQUE_IDENTIFIER, created.id),
            ])
        }
        op::REGISTER => {
            let object_type = required(payload, tag::OBJECT_TYPE, "Object Type")?;
            check_object_type(object_type)?;
            let key = required(payload, tag::SYMMETRIC_KEY, "Symmetric Key")?;
            let (material, bits) = key_block(key)?;
            let mut new = new_object(payload.child(tag::TEMPLATE_ATTRIBUTE), true)?;
            if new.length_bits == 0 {
                new.length_bits = bits;
            }
            let registered = custody
                .register_object(grant, &config.wrapping_key, new, material)
                .await?;
            touched.set(&registered);
            *placeholder = Some(registered.id.clone());
            Ok(vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, registered.id)])
        }
        op::GET => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let format = payload
                .child(tag::KEY_FORMAT_TYPE)
                .map(|f| f.as_enum().ok_or_else(|| invalid("Key Format Type")))
                .transpose()?
                .unwrap_or(KEY_FORMAT_RAW);
            if format != KEY_FORMAT_RAW && format != KEY_FORMAT_TRANSPARENT_SYMMETRIC {
                return Err(KmipError::KeyFormatTypeNotSupported(format!(
                    "key format type {format:#x} is not offered; ask for Raw or Transparent Symmetric Key"
                )));
            }
            if payload.child(0x42_0047).is_some() {
                return Err(KmipError::FeatureNotSupported(
                    "key wrapping is not offered; the key is protected by the mutually authenticated connection".into(),
                ));
            }
            let (object, material) = custody
                .object_material(grant, &config.wrapping_key, &id)
                .await?;
            touched.set(&object);
            let key_material = if format == KEY_FORMAT_RAW {
                Ttlv::bytes(tag::KEY_MATERIAL, material)
            } else {
                Ttlv::structure(tag::KEY_MATERIAL, vec![Ttlv::bytes(tag::KEY, material)])
            };
            Ok(vec![
                Ttlv::enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY),
                Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id.clone()),
                Ttlv::structure(
                    tag::SYMMETRIC_KEY,
                    vec![Ttlv::structure(
                        tag::KEY_BLOCK,
                        vec![
                            Ttlv::enumeration(tag::KEY_FORMAT_TYPE, format),
                            Ttlv::structure(tag::KEY_VALUE, vec![key_material]),
                            Ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, ALGORITHM_AES),
                            Ttlv::integer(
                                tag::CRYPTOGRAPHIC_LENGTH,
                                i32::try_from(object.length_bits).unwrap_or(0),
                            ),
                        ],
                    )],
                ),
            ])
        }
        op::GET_ATTRIBUTES => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let object = custody.object(grant, &id).await?;
            touched.set(&object);
            let wanted: Vec<&str> = payload
                .children(tag::ATTRIBUTE_NAME)
                .map(|n| n.as_text().ok_or_else(|| invalid("Attribute Name")))
                .collect::<Result<_, _>>()?;
            let mut out = vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id.clone())];
            for (name, value) in attributes_of(&object, version) {
                if wanted.is_empty() || wanted.contains(&name.as_str()) {
                    out.push(attribute(&name, value));
                }
            }
            Ok(out)
        }
        op::GET_ATTRIBUTE_LIST => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let object = custody.object(grant, &id).await?;
            touched.set(&object);
            let mut out = vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id.clone())];
            out.extend(
                attributes_of(&object, version)
                    .into_iter()
                    .map(|(name, _)| Ttlv::text(tag::ATTRIBUTE_NAME, name)),
            );
            Ok(out)
        }
        op::LOCATE => locate(custody, grant, version, payload).await,
        op::ADD_ATTRIBUTE | op::MODIFY_ATTRIBUTE => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let a = required(payload, tag::ATTRIBUTE, "Attribute")?;
            let (name, value) = read_attribute(a)?;
            check_index(a)?;
            let (attribute, new) = settable(name, value)?;
            let change = if operation == op::ADD_ATTRIBUTE {
                AttributeChange::Add(new)
            } else {
                AttributeChange::Modify(new)
            };
            let (object, _) = custody
                .change_object_attribute(grant, &id, attribute, change)
                .await?;
            touched.set(&object);
            Ok(vec![
                Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id),
                message::attribute(name, value.value.clone()),
            ])
        }
        op::DELETE_ATTRIBUTE => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let name = required(payload, tag::ATTRIBUTE_NAME, "Attribute Name")?
                .as_text()
                .ok_or_else(|| invalid("Attribute Name"))?;
            check_index(payload)?;
            let attribute = attribute_named(name)?;
            let (object, previous) = custody
                .change_object_attribute(grant, &id, attribute, AttributeChange::Delete)
                .await?;
            touched.set(&object);
            let mut out = vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id)];
            if let Some(previous) = previous {
                out.push(message::attribute(name, value_of(name, previous)));
            }
            Ok(out)
        }
        op::ACTIVATE => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let object = custody.activate_object(grant, &id).await?;
            touched.set(&object);
            Ok(vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id)])
        }
        op::REVOKE => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let reason = required(payload, tag::REVOCATION_REASON, "Revocation Reason")?;
            let code = reason
                .child(tag::REVOCATION_REASON_CODE)
                .and_then(Ttlv::as_enum)
                .ok_or_else(|| {
                    KmipError::MissingData(
                        "the Revocation Reason has no Revocation Reason Code".into(),
                    )
                })?;
            let code = revocation_code(code)?;
            let text = reason
                .child(tag::REVOCATION_MESSAGE)
                .map(|m| m.as_text().ok_or_else(|| invalid("Revocation Message")))
                .transpose()?
                .unwrap_or("");
            let occurred = payload
                .child(tag::COMPROMISE_OCCURRENCE_DATE)
                .map(|d| {
                    d.as_date()
                        .ok_or_else(|| invalid("Compromise Occurrence Date"))
                })
                .transpose()?
                .map_or(0, |s| s.saturating_mul(1000));
            let object = custody
                .revoke_object(grant, &id, code, text, occurred)
                .await?;
            touched.set(&object);
            Ok(vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id)])
        }
        op::DESTROY => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            let object = custody.destroy_object(grant, &id).await?;
            touched.set(&object);
            Ok(vec![Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id)])
        }
        op::ENCRYPT => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            check_gcm(version, payload)?;
            if payload.child(tag::IV_COUNTER_NONCE).is_some() {
                return Err(KmipError::InvalidField(
                    "the server chooses the IV: leave IV/Counter/Nonce out of Encrypt".into(),
                ));
            }
            let data = bytes_field(payload, tag::DATA, "Data")?;
            let aad = optional_bytes(payload, tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)?;
            let (object, iv, ciphertext, auth_tag) = custody
                .encrypt_with_object(grant, &config.wrapping_key, &id, data, aad)
                .await?;
            touched.set(&object);
            Ok(vec![
                Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id),
                Ttlv::bytes(tag::DATA, Zeroizing::new(ciphertext)),
                Ttlv::bytes(tag::IV_COUNTER_NONCE, Zeroizing::new(iv.to_vec())),
                Ttlv::bytes(tag::AUTHENTICATED_ENCRYPTION_TAG, Zeroizing::new(auth_tag)),
            ])
        }
        op::DECRYPT => {
            let id = unique_id(payload, placeholder)?;
            touched.object = Some(id.clone());
            check_gcm(version, payload)?;
            let data = bytes_field(payload, tag::DATA, "Data")?;
            let iv = bytes_field(payload, tag::IV_COUNTER_NONCE, "IV/Counter/Nonce")?;
            let auth_tag = bytes_field(
                payload,
                tag::AUTHENTICATED_ENCRYPTION_TAG,
                "Authenticated Encryption Tag",
            )?;
            let aad = optional_bytes(payload, tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)?;
            let (object, plaintext) = custody
                .decrypt_with_object(grant, &config.wrapping_key, &id, (iv, data, auth_tag), aad)
                .await?;
            touched.set(&object);
            Ok(vec![
                Ttlv::text(tag::UNIQUE_IDENTIFIER, object.id),
                Ttlv::bytes(tag::DATA, plaintext),
            ])
        }
        other => Err(KmipError::OperationNotSupported(format!(
            "operation {other:#x} is not supported by this server; Query lists those it offers"
        ))),
    }
}

/// Encrypt and Decrypt offer AES-GCM with 16-byte tags only, from KMIP 1.4 on (the tag and
/// additional data fields are 1.4's).
fn check_gcm(version: (i32, i32), payload: &Ttlv) -> Result<(), KmipError> {
    const GCM: u32 = 0x09;
    if version < (1, 4) {
        return Err(KmipError::FeatureNotSupported(
            "Encrypt and Decrypt (AES-GCM) need KMIP 1.4, whose messages carry the tag and additional data".into(),
        ));
    }
    let Some(params) = payload.child(tag::CRYPTOGRAPHIC_PARAMETERS) else {
        return Ok(());
    };
    if let Some(mode) = params.child(tag::BLOCK_CIPHER_MODE)
        && mode.as_enum() != Some(GCM)
    {
        return Err(KmipError::FeatureNotSupported(
            "only the GCM block cipher mode is offered".into(),
        ));
    }
    if let Some(alg) = params.child(tag::CRYPTOGRAPHIC_ALGORITHM)
        && alg.as_enum() != Some(ALGORITHM_AES)
    {
        return Err(KmipError::FeatureNotSupported("only AES is offered".into()));
    }
    if let Some(len) = params.child(tag::TAG_LENGTH)
        && len.as_int() != Some(16)
    {
        return Err(KmipError::FeatureNotSupported(
            "only 16-byte GCM tags are offered".into(),
        ));
    }
    Ok(())
}

fn bytes_field<'a>(payload: &'a Ttlv, t: u32, what: &str) -> Result<&'a [u8], KmipError> {
    required(payload, t, what)?
        .as_bytes()
        .ok_or_else(|| invalid(what))
}

fn optional_bytes(payload: &Ttlv, t: u32) -> Result<&[u8], KmipError> {
    payload.child(t).map_or(Ok(&[][..]), |v| {
        v.as_bytes()
            .ok_or_else(|| invalid("Authenticated Encryption Additional Data"))
    })
}

/// The operations Query lists.
const OFFERED: [u32; 16] = [
    op::DISCOVER_VERSIONS,
    op::QUERY,
    op::CREATE,
    op::REGISTER,
    op::GET,
    op::GET_ATTRIBUTES,
    op::GET_ATTRIBUTE_LIST,
    op::LOCATE,
    op::ADD_ATTRIBUTE,
    op::MODIFY_ATTRIBUTE,
    op::DELETE_ATTRIBUTE,
    op::ACTIVATE,
    op::REVOKE,
    op::DESTROY,
    op::ENCRYPT,
    op::DECRYPT,
];

fn discover_versions(payload: &Ttlv) -> Result<Vec<Ttlv>, KmipError> {
    let asked: Vec<(i32, i32)> = payload
        .children(tag::PROTOCOL_VERSION)
        .map(message::protocol_version)
        .collect::<Result<_, _>>()?;
    Ok(message::SUPPORTED_VERSIONS
        .iter()
        .filter(|v| asked.is_empty() || asked.contains(v))
        .map(|v| message::version_item(*v))
        .collect())
}

fn query(payload: &Ttlv) -> Vec<Ttlv> {
    let asked: Vec<u32> = payload
        .children(tag::QUERY_FUNCTION)
        .filter_map(Ttlv::as_enum)
        .collect();
    let mut out = Vec::new();
    // Query Operations (1), Query Objects (2), Query Server Information (3); other functions
    // have nothing to report here.
    if asked.contains(&1) {
        out.extend(
            OFFERED
                .iter()
                .map(|o| Ttlv::enumeration(tag::OPERATION, *o)),
        );
    }
    if asked.contains(&2) {
        out.push(Ttlv::enumeration(
            tag::OBJECT_TYPE,
            OBJECT_TYPE_SYMMETRIC_KEY,
        ));
    }
    if asked.contains(&3) {
        out.push(Ttlv::text(
            tag::VENDOR_IDENTIFICATION,
            format!("Tresor {}", env!("CARGO_PKG_VERSION")),
        ));
        out.push(Ttlv::structure(tag::SERVER_INFORMATION, Vec::new()));
    }
    out
}

fn check_object_type(t: &Ttlv) -> Result<(), KmipError> {
    match t.as_enum() {
        Some(OBJECT_TYPE_SYMMETRIC_KEY) => Ok(()),
        Some(other) => Err(KmipError::FeatureNotSupported(format!(
            "object type {other:#x} is not offered; this server manages symmetric keys"
        ))),
        None => Err(invalid("Object Type")),
    }
}

fn unique_id(payload: &Ttlv, placeholder: &Option<String>) -> Result<String, KmipError> {
    match payload.child(tag::UNIQUE_IDENTIFIER) {
        Some(id) => id
            .as_text()
            .map(str::to_owned)
            .ok_or_else(|| invalid("Unique Identifier")),
        None => placeholder.clone().ok_or_else(|| {
            KmipError::MissingData(
                "the request names no Unique Identifier and no earlier item of the batch created one"
                    .into(),
            )
        }),
    }
}

/// A Register's key block: the material and its length in bits.
fn key_block(key: &Ttlv) -> Result<(Zeroizing<Vec<u8>>, u32), KmipError> {
    let block = key
        .child(tag::KEY_BLOCK)
        .ok_or_else(|| KmipError::MissingData("the Symmetric Key has no Key Block".into()))?;
    if block.child(0x42_0046).is_some() {
        return Err(KmipError::FeatureNotSupported(
            "wrapped key blocks are not accepted; register the key in the clear over this connection".into(),
        ));
    }
    let format = block
        .child(tag::KEY_FORMAT_TYPE)
        .and_then(Ttlv::as_enum)
        .ok_or_else(|| KmipError::MissingData("the Key Block has no Key Format Type".into()))?;
    if let Some(alg) = block.child(tag::CRYPTOGRAPHIC_ALGORITHM)
        && alg.as_enum() != Some(ALGORITHM_AES)
    {
        return Err(KmipError::FeatureNotSupported(
            "only AES keys can be registered".into(),
        ));
    }
    let material = block
        .child(tag::KEY_VALUE)
        .and_then(|v| v.child(tag::KEY_MATERIAL))
        .ok_or_else(|| KmipError::MissingData("the Key Value has no Key Material".into()))?;
    let bytes = match format {
        KEY_FORMAT_RAW => material.as_bytes(),
        KEY_FORMAT_TRANSPARENT_SYMMETRIC => material.child(tag::KEY).and_then(Ttlv::as_bytes),
        other => {
            return Err(KmipError::KeyFormatTypeNotSupported(format!(
                "key format type {other:#x} is not accepted; use Raw or Transparent Symmetric Key"
            )));
        }
    }
    .ok_or_else(|| KmipError::InvalidField("the Key Material is not a byte string".into()))?;
    let bits = u32::try_from(bytes.len() * 8).unwrap_or(u32::MAX);
    if let Some(length) = block.child(tag::CRYPTOGRAPHIC_LENGTH) {
        let declared = int_of(length, "Cryptographic Length")?;
        if declared != bits {
            return Err(KmipError::InvalidField(format!(
                "the key material is {bits} bits, the Key Block says {declared}"
            )));
        }
    }
    Ok((Zeroizing::new(bytes.to_vec()), bits))
}

/// Locate: the caller's objects matching every attribute given, oldest first, from Offset
/// Items (KMIP 1.3), at most Maximum Items.
async fn locate(
    custody: &Custody,
    grant: &Grant,
    version: (i32, i32),
    payload: &Ttlv,
) -> Result<Vec<Ttlv>, KmipError> {
    let non_negative = |t: u32, field: &str| -> Result<Option<usize>, KmipError> {
        payload
            .child(t)
            .map(|v| {
                v.as_int()
                    .and_then(|i| usize::try_from(i).ok())
                    .ok_or_else(|| {
                        KmipError::InvalidField(format!("{field} must be a non-negative integer"))
                    })
            })
            .transpose()
    };
    let maximum = non_negative(tag::MAXIMUM_ITEMS, "Maximum Items")?;
    let offset = non_negative(tag::OFFSET_ITEMS, "Offset Items")?.unwrap_or(0);
    let mut name = None;
    let mut state = None;
    let mut wanted: BTreeMap<String, Value> = BTreeMap::new();
    for a in payload.children(tag::ATTRIBUTE) {
        let (attr, value) = read_attribute(a)?;
        match attr {
            "Name" => name = Some(name_value(value)?.to_owned()),
            "State" => {
                state = Some(state_of_number(
                    value.as_enum().ok_or_else(|| invalid(attr))?,
                )?)
            }
            "Object Type"
            | "Cryptographic Algorithm"
            | "Cryptographic Length"
            | "Cryptographic Usage Mask"
            | "Unique Identifier" => {
                wanted.insert(attr.to_owned(), value.value.clone());
            }
            custom if is_custom(custom) => {
                wanted.insert(custom.to_owned(), value.value.clone());
            }
            other => {
                return Err(KmipError::InvalidField(format!(
                    "Locate cannot search by {other:?}"
                )));
            }
        }
    }
    let objects = custody
        .locate_objects(grant, name.as_deref(), state)
        .await?;
    let matching: Vec<&ManagedObject> = objects
        .iter()
        .filter(|o| {
            let attributes = attributes_of(o, version);
            wanted.iter().all(|(k, v)| {
                attributes
                    .iter()
                    .any(|(name, value)| name == k && value == v)
            })
        })
        .collect();
    let mut out = Vec::new();
    if version >= (1, 3) {
        out.push(Ttlv::integer(
            tag::LOCATED_ITEMS,
            i32::try_from(matching.len()).unwrap_or(i32::MAX),
        ));
    }
    out.extend(
        matching
            .iter()
            .skip(offset)
            .take(maximum.unwrap_or(usize::MAX))
            .map(|o| Ttlv::text(tag::UNIQUE_IDENTIFIER, o.id.clone())),
    );
    Ok(out)
}
