//! KMIP's request and response messages (KMIP 1.4 §6, §7): the header, the batch items, and
//! the attribute structures operations carry.
//!
//! Owns the shape of messages, not what operations do: reading a request message's header and
//! batch items out of a decoded [`Ttlv`], building response messages, and the codes of
//! operations, result statuses and reasons. Errors here are [`KmipError`]s that name the
//! field.

use super::KmipError;
use super::ttlv::{Ttlv, Value, tag};

/// Batch items in one request, at most: each is audited before the answer, so a longer batch
/// would hold a concurrency permit for long.
pub const MAX_BATCH_ITEMS: usize = 256;

/// Protocol versions this server speaks, the preferred first (KMIP 1.4 down to 1.0).
pub const SUPPORTED_VERSIONS: [(i32, i32); 5] = [(1, 4), (1, 3), (1, 2), (1, 1), (1, 0)];

/// KMIP operations (KMIP 1.4 §9.1.3.2.27), by code.
pub mod operation {
    #![allow(missing_docs)]
    pub const CREATE: u32 = 0x01;
    pub const REGISTER: u32 = 0x03;
    pub const LOCATE: u32 = 0x08;
    pub const GET: u32 = 0x0A;
    pub const GET_ATTRIBUTES: u32 = 0x0B;
    pub const GET_ATTRIBUTE_LIST: u32 = 0x0C;
    pub const ADD_ATTRIBUTE: u32 = 0x0D;
    pub const MODIFY_ATTRIBUTE: u32 = 0x0E;
    pub const DELETE_ATTRIBUTE: u32 = 0x0F;
    pub const ACTIVATE: u32 = 0x12;
    pub const REVOKE: u32 = 0x13;
    pub const DESTROY: u32 = 0x14;
    pub const QUERY: u32 = 0x18;
    pub const DISCOVER_VERSIONS: u32 = 0x1E;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;

    /// The audit record's operation name.
    pub fn audit_name(code: u32) -> &'static str {
        match code {
            CREATE => "KmipCreate",
            REGISTER => "KmipRegister",
            LOCATE => "KmipLocate",
            GET => "KmipGet",
            GET_ATTRIBUTES => "KmipGetAttributes",
            GET_ATTRIBUTE_LIST => "KmipGetAttributeList",
            ADD_ATTRIBUTE => "KmipAddAttribute",
            MODIFY_ATTRIBUTE => "KmipModifyAttribute",
            DELETE_ATTRIBUTE => "KmipDeleteAttribute",
            ACTIVATE => "KmipActivate",
            REVOKE => "KmipRevoke",
            DESTROY => "KmipDestroy",
            QUERY => "KmipQuery",
            DISCOVER_VERSIONS => "KmipDiscoverVersions",
            ENCRYPT => "KmipEncrypt",
            DECRYPT => "KmipDecrypt",
            _ => "KmipUnsupportedOperation",
        }
    }
}

/// Result Reason codes (KMIP 1.4 §9.1.3.2.29).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ResultReason {
    /// Item Not Found.
    ItemNotFound = 0x01,
    /// Response Too Large.
    ResponseTooLarge = 0x02,
    /// Authentication Not Successful.
    AuthenticationNotSuccessful = 0x03,
    /// Invalid Message.
    InvalidMessage = 0x04,
    /// Operation Not Supported.
    OperationNotSupported = 0x05,
    /// Missing Data.
    MissingData = 0x06,
    /// Invalid Field.
    InvalidField = 0x07,
    /// Feature Not Supported.
    FeatureNotSupported = 0x08,
    /// Cryptographic Failure.
    CryptographicFailure = 0x0A,
    /// Illegal Operation.
    IllegalOperation = 0x0B,
    /// Permission Denied.
    PermissionDenied = 0x0C,
    /// Key Format Type Not Supported.
    KeyFormatTypeNotSupported = 0x10,
    /// General Failure.
    GeneralFailure = 0x100,
}

/// One batch item of a request.
#[derive(Debug)]
pub struct RequestItem {
    /// The operation code.
    pub operation: u32,
    /// The client's Unique Batch Item ID, echoed in the answer.
    pub id: Option<Ttlv>,
    /// The request payload (an empty structure when absent).
    pub payload: Ttlv,
}

/// A parsed request message.
#[derive(Debug)]
pub struct Request {
    /// The protocol version the client speaks.
    pub version: (i32, i32),
    /// Whether to go on after a failed item (Batch Error Continuation Option Continue).
    pub continue_on_error: bool,
    /// The batch.
    pub items: Vec<RequestItem>,
    /// The header's Client Correlation Value (KMIP 1.4), where a client declares its
    /// justification (see [`justification_of`]).
    pub correlation: Option<String>,
}

/// The prefix of a Client Correlation Value that declares a justification.
pub const JUSTIFICATION_PREFIX: &str = "justification:";

/// The justification a Client Correlation Value declares: `justification:CODE` or
/// `justification:CODE:REFERENCE`, as (code, reference). Any other value is the client's own
/// correlation data and declares nothing.
pub fn justification_of(correlation: &str) -> Option<(&str, &str)> {
    let rest = correlation.strip_prefix(JUSTIFICATION_PREFIX)?;
    Some(rest.split_once(':').unwrap_or((rest, "")))
}

/// What one batch item answered.
#[derive(Debug)]
pub struct ResponseItem {
    /// The operation code, echoed (absent for a message that could not be read).
    pub operation: Option<u32>,
    /// The Unique Batch Item ID, echoed.
    pub id: Option<Ttlv>,
    /// The payload, or why there is none.
    pub result: Result<Vec<Ttlv>, KmipError>,
}

/// The request message in `message`, or why it cannot be served (with the version to answer
/// in, where the header could be read).
pub fn parse_request(message: &Ttlv) -> Result<Request, ((i32, i32), KmipError)> {
    let fallback = SUPPORTED_VERSIONS[0];
    if message.tag != tag::REQUEST_MESSAGE || !matches!(message.value, Value::Structure(_)) {
        return Err((
            fallback,
            KmipError::InvalidMessage("the message is not a Request Message structure".into()),
        ));
    }
    let header = message.child(tag::REQUEST_HEADER).ok_or((
        fallback,
        KmipError::InvalidMessage("the request has no Request Header".into()),
    ))?;
    let version = protocol_version(header.child(tag::PROTOCOL_VERSION).ok_or((
        fallback,
        KmipError::InvalidMessage("the Request Header has no Protocol Version".into()),
    ))?)
    .map_err(|e| (fallback, e))?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err((
            fallback,
            KmipError::FeatureNotSupported(format!(
                "protocol version {}.{} is not supported; this server speaks KMIP 1.0 to 1.4",
                version.0, version.1
            )),
        ));
    }
    let at = |e: KmipError| (version, e);
    let continue_on_error = match header
        .child(tag::BATCH_ERROR_CONTINUATION_OPTION)
        .map(|o| o.as_enum())
    {
        None | Some(Some(2)) => false,
        Some(Some(1)) => true,
        Some(Some(3)) => {
            return Err(at(KmipError::FeatureNotSupported(
                "the Undo batch error continuation option is not supported; use Stop or Continue"
                    .into(),
            )));
        }
        Some(_) => {
            return Err(at(KmipError::InvalidField(
                "Batch Error Continuation Option must be Continue, Stop or Undo".into(),
            )));
        }
    };
    let count = header
        .child(tag::BATCH_COUNT)
        .and_then(Ttlv::as_int)
        .ok_or_else(|| {
            at(KmipError::InvalidMessage(
                "the Request Header has no Batch Count".into(),
            ))
        })?;
    let mut items = Vec::new();
    for item in message.children(tag::BATCH_ITEM) {
        let operation = item
            .child(tag::OPERATION)
            .and_then(Ttlv::as_enum)
            .ok_or_else(|| {
                at(KmipError::InvalidMessage(
                    "a Batch Item has no Operation".into(),
                ))
            })?;
        items.push(RequestItem {
            operation,
            id: item.child(tag::UNIQUE_BATCH_ITEM_ID).cloned(),
            payload: item
                .child(tag::REQUEST_PAYLOAD)
                .cloned()
                .unwrap_or_else(|| Ttlv::structure(tag::REQUEST_PAYLOAD, Vec::new())),
        });
    }
    if items.len() > MAX_BATCH_ITEMS {
        return Err(at(KmipError::InvalidMessage(format!(
            "{} batch items; this server takes at most {MAX_BATCH_ITEMS} per request",
            items.len()
        ))));
    }
    if items.is_empty() || usize::try_from(count).ok() != Some(items.len()) {
        return Err(at(KmipError::InvalidMessage(format!(
            "the Batch Count is {count} but the message holds {} batch items",
            items.len()
        ))));
    }
    let correlation = match header.child(tag::CLIENT_CORRELATION_VALUE) {
        None => None,
        Some(v) => Some(v.as_text().map(str::to_owned).ok_or_else(|| {
            at(KmipError::InvalidField(
                "Client Correlation Value must be a Text String".into(),
            ))
        })?),
    };
    Ok(Request {
        correlation,
        version,
        continue_on_error,
        items,
    })
}

/// A Protocol Version structure's (major, minor).
pub fn protocol_version(v: &Ttlv) -> Result<(i32, i32), KmipError> {
    let major = v.child(tag::PROTOCOL_VERSION_MAJOR).and_then(Ttlv::as_int);
    let minor = v.child(tag::PROTOCOL_VERSION_MINOR).and_then(Ttlv::as_int);
    match (major, minor) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(KmipError::InvalidMessage(
            "a Protocol Version needs a major and a minor integer".into(),
        )),
    }
}

/// A Protocol Version structure.
pub fn version_item((major, minor): (i32, i32)) -> Ttlv {
    Ttlv::structure(
        tag::PROTOCOL_VERSION,
        vec![
            Ttlv::integer(tag::PROTOCOL_VERSION_MAJOR, major),
            Ttlv::integer(tag::PROTOCOL_VERSION_MINOR, minor),
        ],
    )
}

/// A request message in `version` of one batch item (for clients: the bench, tests).
pub fn request(version: (i32, i32), operation: u32, payload: Vec<Ttlv>) -> Ttlv {
    Ttlv::structure(
        tag::REQUEST_MESSAGE,
        vec![
            Ttlv::structure(
                tag::REQUEST_HEADER,
                vec![version_item(version), Ttlv::integer(tag::BATCH_COUNT, 1)],
            ),
            Ttlv::structure(
                tag::BATCH_ITEM,
                vec![
                    Ttlv::enumeration(tag::OPERATION, operation),
                    Ttlv::structure(tag::REQUEST_PAYLOAD, payload),
                ],
            ),
        ],
    )
}

/// The response message for `items`, in `version`, stamped `now` (seconds).
pub fn response(version: (i32, i32), now: i64, items: Vec<ResponseItem>) -> Ttlv {
    let count = i32::try_from(items.len()).unwrap_or(i32::MAX);
    let mut message = vec![Ttlv::structure(
        tag::RESPONSE_HEADER,
        vec![
            version_item(version),
            Ttlv::date(tag::TIME_STAMP, now),
            Ttlv::integer(tag::BATCH_COUNT, count),
        ],
    )];
    for item in items {
        let mut fields = Vec::new();
        if let Some(op) = item.operation {
            fields.push(Ttlv::enumeration(tag::OPERATION, op));
        }
        if let Some(id) = item.id {
            fields.push(id);
        }
        match item.result {
            Ok(payload) => {
                fields.push(Ttlv::enumeration(tag::RESULT_STATUS, 0));
                fields.push(Ttlv::structure(tag::RESPONSE_PAYLOAD, payload));
            }
            Err(e) => {
                fields.push(Ttlv::enumeration(tag::RESULT_STATUS, 1));
                fields.push(Ttlv::enumeration(tag::RESULT_REASON, e.reason() as u32));
                fields.push(Ttlv::text(tag::RESULT_MESSAGE, e.to_string()));
            }
        }
        message.push(Ttlv::structure(tag::BATCH_ITEM, fields));
    }
    Ttlv::structure(tag::RESPONSE_MESSAGE, message)
}

/// One attribute (KMIP 1.x's Attribute structure): its name and value.
pub fn attribute(name: &str, value: Value) -> Ttlv {
    Ttlv::structure(
        tag::ATTRIBUTE,
        vec![
            Ttlv::text(tag::ATTRIBUTE_NAME, name),
            Ttlv {
                tag: tag::ATTRIBUTE_VALUE,
                value,
            },
        ],
    )
}

/// An Attribute structure's name and value.
pub fn read_attribute(a: &Ttlv) -> Result<(&str, &Ttlv), KmipError> {
    let name = a
        .child(tag::ATTRIBUTE_NAME)
        .and_then(Ttlv::as_text)
        .ok_or_else(|| KmipError::InvalidField("an Attribute has no Attribute Name".into()))?;
    let value = a
        .child(tag::ATTRIBUTE_VALUE)
        .ok_or_else(|| KmipError::InvalidField(format!("attribute {name:?} has no value")))?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmip::ttlv;

    fn request(header: Vec<Ttlv>, items: Vec<Ttlv>) -> Ttlv {
        let mut all = vec![Ttlv::structure(tag::REQUEST_HEADER, header)];
        all.extend(items);
        Ttlv::structure(tag::REQUEST_MESSAGE, all)
    }

    fn item(op: u32) -> Ttlv {
        Ttlv::structure(
            tag::BATCH_ITEM,
            vec![
                Ttlv::enumeration(tag::OPERATION, op),
                Ttlv::structure(tag::REQUEST_PAYLOAD, vec![]),
            ],
        )
    }

    #[test]
    fn a_request_is_read_with_its_batch() {
        let r = parse_request(&request(
            vec![version_item((1, 2)), Ttlv::integer(tag::BATCH_COUNT, 2)],
            vec![item(operation::QUERY), item(operation::DISCOVER_VERSIONS)],
        ))
        .unwrap();
        assert_eq!(r.version, (1, 2));
        assert!(!r.continue_on_error);
        assert_eq!(
            r.items.iter().map(|i| i.operation).collect::<Vec<_>>(),
            [operation::QUERY, operation::DISCOVER_VERSIONS]
        );
    }

    #[test]
    fn a_wrong_batch_count_or_version_is_refused_with_its_reason() {
        let (_, e) = parse_request(&request(
            vec![version_item((1, 2)), Ttlv::integer(tag::BATCH_COUNT, 3)],
            vec![item(operation::QUERY)],
        ))
        .unwrap_err();
        assert_eq!(e.reason(), ResultReason::InvalidMessage);
        let (answer_in, e) = parse_request(&request(
            vec![version_item((2, 1)), Ttlv::integer(tag::BATCH_COUNT, 1)],
            vec![item(operation::QUERY)],
        ))
        .unwrap_err();
        assert_eq!(e.reason(), ResultReason::FeatureNotSupported);
        assert_eq!(answer_in, (1, 4));
        let (_, e) = parse_request(&Ttlv::integer(tag::REQUEST_MESSAGE, 1)).unwrap_err();
        assert_eq!(e.reason(), ResultReason::InvalidMessage);
        let (_, e) = parse_request(&request(
            vec![version_item((1, 2)), Ttlv::integer(tag::BATCH_COUNT, 257)],
            (0..257).map(|_| item(operation::QUERY)).collect(),
        ))
        .unwrap_err();
        assert_eq!(e.reason(), ResultReason::InvalidMessage);
        assert!(e.to_string().contains("at most 256"), "{e}");
    }

    #[test]
    fn a_failed_item_answers_its_reason_and_message() {
        let r = response(
            (1, 1),
            0x47DA_67F8,
            vec![ResponseItem {
                operation: Some(operation::GET),
                id: None,
                result: Err(KmipError::ItemNotFound("object 12 not found".into())),
            }],
        );
        let decoded = ttlv::decode(&ttlv::encode(&r)).unwrap();
        let item = decoded.child(tag::BATCH_ITEM).unwrap();
        assert_eq!(item.child(tag::RESULT_STATUS).unwrap().as_enum(), Some(1));
        assert_eq!(item.child(tag::RESULT_REASON).unwrap().as_enum(), Some(1));
        assert_eq!(
            item.child(tag::RESULT_MESSAGE).unwrap().as_text(),
            Some("object 12 not found")
        );
    }
}
