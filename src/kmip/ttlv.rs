//! TTLV, KMIP's binary encoding (KMIP 1.4 §9.1): a 3-byte tag, a 1-byte type, a 4-byte
//! big-endian length, and the value padded to a multiple of 8 bytes.
//!
//! Owns decoding bytes from the network into [`Ttlv`] items and encoding them back. Knows
//! nothing of operations or objects. The decoder is strict about lengths (an Integer is 4
//! bytes, a Boolean 8 and 0 or 1, a Text String UTF-8) and bounded: at most [`MAX_DEPTH`]
//! nested structures and [`MAX_ITEMS`] items, padding must be zero, so a hostile message cannot make it recurse or
//! allocate without limit. Byte strings (key material in Register and Get) are wiped when
//! dropped and never printed.

use std::fmt;

use zeroize::Zeroizing;

/// Structures nested deeper than this are refused (KMIP's own messages nest about 8 deep).
pub const MAX_DEPTH: usize = 16;
/// Items in one message, at most.
pub const MAX_ITEMS: usize = 10_000;

/// KMIP tags (KMIP 1.4 §9.1.3.1), the ones this server reads or writes.
pub mod tag {
    #![allow(missing_docs)]
    pub const ACTIVATION_DATE: u32 = 0x42_0001;
    pub const ATTRIBUTE: u32 = 0x42_0008;
    pub const ATTRIBUTE_INDEX: u32 = 0x42_0009;
    pub const ATTRIBUTE_NAME: u32 = 0x42_000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42_000B;
    pub const BLOCK_CIPHER_MODE: u32 = 0x42_0011;
    pub const BATCH_COUNT: u32 = 0x42_000D;
    pub const BATCH_ERROR_CONTINUATION_OPTION: u32 = 0x42_000E;
    pub const BATCH_ITEM: u32 = 0x42_000F;
    pub const COMPROMISE_OCCURRENCE_DATE: u32 = 0x42_0021;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x42_0028;
    pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42_002A;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42_002B;
    pub const CRYPTOGRAPHIC_USAGE_MASK: u32 = 0x42_002C;
    pub const IV_COUNTER_NONCE: u32 = 0x42_003D;
    pub const KEY: u32 = 0x42_003F;
    pub const KEY_BLOCK: u32 = 0x42_0040;
    pub const KEY_FORMAT_TYPE: u32 = 0x42_0042;
    pub const KEY_MATERIAL: u32 = 0x42_0043;
    pub const KEY_VALUE: u32 = 0x42_0045;
    pub const MAXIMUM_ITEMS: u32 = 0x42_004F;
    pub const NAME: u32 = 0x42_0053;
    pub const NAME_TYPE: u32 = 0x42_0054;
    pub const NAME_VALUE: u32 = 0x42_0055;
    pub const OBJECT_TYPE: u32 = 0x42_0057;
    pub const OPERATION: u32 = 0x42_005C;
    pub const PROTOCOL_VERSION: u32 = 0x42_0069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42_006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42_006B;
    pub const QUERY_FUNCTION: u32 = 0x42_0074;
    pub const REQUEST_HEADER: u32 = 0x42_0077;
    pub const REQUEST_MESSAGE: u32 = 0x42_0078;
    pub const REQUEST_PAYLOAD: u32 = 0x42_0079;
    pub const RESPONSE_HEADER: u32 = 0x42_007A;
    pub const RESPONSE_MESSAGE: u32 = 0x42_007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42_007C;
    pub const RESULT_MESSAGE: u32 = 0x42_007D;
    pub const RESULT_REASON: u32 = 0x42_007E;
    pub const RESULT_STATUS: u32 = 0x42_007F;
    pub const REVOCATION_MESSAGE: u32 = 0x42_0080;
    pub const REVOCATION_REASON: u32 = 0x42_0081;
    pub const REVOCATION_REASON_CODE: u32 = 0x42_0082;
    pub const SERVER_INFORMATION: u32 = 0x42_0088;
    pub const SYMMETRIC_KEY: u32 = 0x42_008F;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x42_0091;
    pub const TIME_STAMP: u32 = 0x42_0092;
    pub const UNIQUE_BATCH_ITEM_ID: u32 = 0x42_0093;
    pub const UNIQUE_IDENTIFIER: u32 = 0x42_0094;
    pub const VENDOR_IDENTIFICATION: u32 = 0x42_009D;
    pub const DATA: u32 = 0x42_00C2;
    pub const TAG_LENGTH: u32 = 0x42_00CE;
    pub const OFFSET_ITEMS: u32 = 0x42_00D4;
    pub const LOCATED_ITEMS: u32 = 0x42_00D5;
    pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: u32 = 0x42_00FE;
    pub const AUTHENTICATED_ENCRYPTION_TAG: u32 = 0x42_00FF;
    pub const CLIENT_CORRELATION_VALUE: u32 = 0x42_0105;
}

/// One TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub struct Ttlv {
    /// The tag (`0x42xxxx` for KMIP's own, `0x54xxxx` for extensions).
    pub tag: u32,
    /// The typed value.
    pub value: Value,
}

/// A TTLV value, by type (KMIP 1.4 §9.1.1.2).
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// `0x01`: a sequence of items.
    Structure(Vec<Ttlv>),
    /// `0x02`: signed 32-bit.
    Integer(i32),
    /// `0x03`: signed 64-bit.
    LongInteger(i64),
    /// `0x04`: two's-complement big-endian, a multiple of 8 bytes.
    BigInteger(Vec<u8>),
    /// `0x05`: unsigned 32-bit.
    Enumeration(u32),
    /// `0x06`.
    Boolean(bool),
    /// `0x07`: UTF-8.
    TextString(String),
    /// `0x08`: wiped on drop (key material travels in these).
    ByteString(Zeroizing<Vec<u8>>),
    /// `0x09`: seconds since the Unix epoch.
    DateTime(i64),
    /// `0x0A`: seconds.
    Interval(u32),
}

impl fmt::Debug for Ttlv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06X}=", self.tag)?;
        match &self.value {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "{v}"),
            Value::LongInteger(v) => write!(f, "{v}L"),
            Value::BigInteger(v) => write!(f, "<big integer, {} bytes>", v.len()),
            Value::Enumeration(v) => write!(f, "enum {v:#x}"),
            Value::Boolean(v) => write!(f, "{v}"),
            Value::TextString(v) => write!(f, "{v:?}"),
            Value::ByteString(v) => write!(f, "<{} bytes>", v.len()),
            Value::DateTime(v) => write!(f, "date {v}"),
            Value::Interval(v) => write!(f, "{v} s"),
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ttlv {
            tag: 0,
            value: self.clone(),
        }
        .fmt(f)
    }
}

/// Why bytes are not a TTLV item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TtlvError {
    /// The bytes end inside an item.
    #[error("the message ends inside an item at byte {at}")]
    Truncated {
        /// Offset of the item.
        at: usize,
    },
    /// Bytes follow the outermost item.
    #[error("{0} bytes follow the message")]
    Trailing(usize),
    /// A type byte TTLV does not define.
    #[error("unknown item type {kind:#04x} at byte {at}")]
    UnknownType {
        /// The type byte.
        kind: u8,
        /// Offset of the item.
        at: usize,
    },
    /// A length the type does not allow.
    #[error("an item of type {kind:#04x} cannot be {length} bytes long (at byte {at})")]
    BadLength {
        /// The type byte.
        kind: u8,
        /// The length given.
        length: u32,
        /// Offset of the item.
        at: usize,
    },
    /// A Boolean other than 0 or 1.
    #[error("a boolean must be 0 or 1 (at byte {at})")]
    BadBoolean {
        /// Offset of the item.
        at: usize,
    },
    /// A Text String that is not UTF-8.
    #[error("a text string is not UTF-8 (at byte {at})")]
    BadText {
        /// Offset of the item.
        at: usize,
    },
    /// Padding bytes that are not zero.
    #[error("padding bytes must be zero (at byte {at})")]
    BadPadding {
        /// Offset of the item.
        at: usize,
    },
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("structures nest deeper than {MAX_DEPTH}")]
    TooDeep,
    /// More than [`MAX_ITEMS`] items.
    #[error("more than {MAX_ITEMS} items")]
    TooManyItems,
}

const fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Decodes exactly one item from `bytes` (nothing may follow it).
pub fn decode(bytes: &[u8]) -> Result<Ttlv, TtlvError> {
    let mut items = 0;
    let (item, used) = decode_at(bytes, 0, 0, &mut items)?;
    if used != bytes.len() {
        return Err(TtlvError::Trailing(bytes.len() - used));
    }
    Ok(item)
}

/// The length an item's 8-byte header announces for its value (unpadded), for framing.
pub fn announced_length(header: &[u8; 8]) -> u32 {
    u32::from_be_bytes([header[4], header[5], header[6], header[7]])
}

fn decode_at(
    bytes: &[u8],
    at: usize,
    depth: usize,
    items: &mut usize,
) -> Result<(Ttlv, usize), TtlvError> {
    *items += 1;
    if *items > MAX_ITEMS {
        return Err(TtlvError::TooManyItems);
    }
    let header = bytes.get(at..at + 8).ok_or(TtlvError::Truncated { at })?;
    let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let kind = header[3];
    let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let len = length as usize;
    let start = at + 8;
    let end = start
        .checked_add(padded(len))
        .filter(|&e| e <= bytes.len())
        .ok_or(TtlvError::Truncated { at })?;
    let raw = &bytes[start..start + len];
    if bytes[start + len..end].iter().any(|&b| b != 0) {
        return Err(TtlvError::BadPadding { at });
    }
    let bad_length = || TtlvError::BadLength { kind, length, at };
    let fixed = |want: usize| {
        if len == want {
            Ok(())
        } else {
            Err(bad_length())
        }
    };
    let value = match kind {
        0x01 => {
            if depth >= MAX_DEPTH {
                return Err(TtlvError::TooDeep);
            }
            let mut children = Vec::new();
            let mut pos = start;
            let inner_end = start + len;
            if !len.is_multiple_of(8) {
                return Err(bad_length());
            }
            while pos < inner_end {
                let (child, next) = decode_at(&bytes[..inner_end], pos, depth + 1, items)?;
                children.push(child);
                pos = next;
            }
            Value::Structure(children)
        }
        0x02 => {
            fixed(4)?;
            Value::Integer(i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
        }
        0x03 => {
            fixed(8)?;
            Value::LongInteger(i64::from_be_bytes(eight(raw)))
        }
        0x04 => {
            if len == 0 || !len.is_multiple_of(8) {
                return Err(bad_length());
            }
            Value::BigInteger(raw.to_vec())
        }
        0x05 => {
            fixed(4)?;
            Value::Enumeration(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
        }
        0x06 => {
            fixed(8)?;
            match u64::from_be_bytes(eight(raw)) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                _ => return Err(TtlvError::BadBoolean { at }),
            }
        }
        0x07 => Value::TextString(
            std::str::from_utf8(raw)
                .map_err(|_| TtlvError::BadText { at })?
                .to_owned(),
        ),
        0x08 => Value::ByteString(Zeroizing::new(raw.to_vec())),
        0x09 => {
            fixed(8)?;
            Value::DateTime(i64::from_be_bytes(eight(raw)))
        }
        0x0A => {
            fixed(4)?;
            Value::Interval(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
        }
        _ => return Err(TtlvError::UnknownType { kind, at }),
    };
    Ok((Ttlv { tag, value }, end))
}

fn eight(raw: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[..8]);
    b
}

/// Encodes an item. The buffer may hold key material: callers wipe it after sending.
pub fn encode(item: &Ttlv) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(256));
    encode_into(item, &mut out);
    out
}

fn encode_into(item: &Ttlv, out: &mut Vec<u8>) {
    let tag = item.tag.to_be_bytes();
    out.extend_from_slice(&tag[1..]);
    let (kind, body): (u8, std::borrow::Cow<'_, [u8]>) = match &item.value {
        Value::Structure(children) => {
            out.push(0x01);
            let length_at = out.len();
            out.extend_from_slice(&[0; 4]);
            let start = out.len();
            for child in children {
                encode_into(child, out);
            }
            let length = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
            out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
            return;
        }
        Value::Integer(v) => (0x02, v.to_be_bytes().to_vec().into()),
        Value::LongInteger(v) => (0x03, v.to_be_bytes().to_vec().into()),
        Value::BigInteger(v) => (0x04, v.as_slice().into()),
        Value::Enumeration(v) => (0x05, v.to_be_bytes().to_vec().into()),
        Value::Boolean(v) => (0x06, u64::from(*v).to_be_bytes().to_vec().into()),
        Value::TextString(v) => (0x07, v.as_bytes().into()),
        Value::ByteString(v) => (0x08, v.as_slice().into()),
        Value::DateTime(v) => (0x09, v.to_be_bytes().to_vec().into()),
        Value::Interval(v) => (0x0A, v.to_be_bytes().to_vec().into()),
    };
    out.push(kind);
    let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&body);
    out.resize(out.len() + padded(body.len()) - body.len(), 0);
}

impl Ttlv {
    /// A structure.
    pub fn structure(tag: u32, items: Vec<Ttlv>) -> Self {
        Self {
            tag,
            value: Value::Structure(items),
        }
    }
    /// An integer.
    pub fn integer(tag: u32, v: i32) -> Self {
        Self {
            tag,
            value: Value::Integer(v),
        }
    }
    /// An enumeration.
    pub fn enumeration(tag: u32, v: u32) -> Self {
        Self {
            tag,
            value: Value::Enumeration(v),
        }
    }
    /// A text string.
    pub fn text(tag: u32, v: impl Into<String>) -> Self {
        Self {
            tag,
            value: Value::TextString(v.into()),
        }
    }
    /// A byte string.
    pub fn bytes(tag: u32, v: Zeroizing<Vec<u8>>) -> Self {
        Self {
            tag,
            value: Value::ByteString(v),
        }
    }
    /// A date-time, in seconds since the epoch.
    pub fn date(tag: u32, seconds: i64) -> Self {
        Self {
            tag,
            value: Value::DateTime(seconds),
        }
    }

    /// The children of a structure (none for other types).
    pub fn items(&self) -> &[Ttlv] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }
    /// The first child with `tag`.
    pub fn child(&self, tag: u32) -> Option<&Ttlv> {
        self.items().iter().find(|i| i.tag == tag)
    }
    /// Every child with `tag`.
    pub fn children(&self, tag: u32) -> impl Iterator<Item = &Ttlv> {
        self.items().iter().filter(move |i| i.tag == tag)
    }
    /// The value as an enumeration.
    pub fn as_enum(&self) -> Option<u32> {
        match self.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }
    /// The value as an integer.
    pub fn as_int(&self) -> Option<i32> {
        match self.value {
            Value::Integer(v) => Some(v),
            _ => None,
        }
    }
    /// The value as text.
    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::TextString(v) => Some(v),
            _ => None,
        }
    }
    /// The value as bytes.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::ByteString(v) => Some(v),
            _ => None,
        }
    }
    /// The value as a date-time.
    pub fn as_date(&self) -> Option<i64> {
        match self.value {
            Value::DateTime(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '|')
            .collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn round_trip(item: Ttlv, spec: &str) {
        let bytes = hex(spec);
        assert_eq!(encode(&item).as_slice(), bytes.as_slice(), "{item:?}");
        assert_eq!(decode(&bytes).unwrap(), item);
    }

    /// The encoding examples of KMIP 1.4 §9.1.2, byte for byte.
    #[test]
    fn the_specifications_examples_encode_and_decode_byte_for_byte() {
        const T: u32 = 0x42_0020;
        round_trip(
            Ttlv::integer(T, 8),
            "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00",
        );
        round_trip(
            Ttlv {
                tag: T,
                value: Value::LongInteger(123_456_789_000_000_000),
            },
            "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00",
        );
        round_trip(
            Ttlv {
                tag: T,
                value: Value::BigInteger(hex("00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00")),
            },
            "42 00 20 | 04 | 00 00 00 10 | 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00",
        );
        round_trip(
            Ttlv::enumeration(T, 255),
            "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
        );
        round_trip(
            Ttlv {
                tag: T,
                value: Value::Boolean(true),
            },
            "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01",
        );
        round_trip(
            Ttlv::text(T, "Hello World"),
            "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00",
        );
        round_trip(
            Ttlv::bytes(T, Zeroizing::new(vec![1, 2, 3])),
            "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00",
        );
        // Friday, March 14, 2008, 11:56:40 GMT.
        round_trip(
            Ttlv::date(T, 0x47DA_67F8),
            "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8",
        );
        // Ten days.
        round_trip(
            Ttlv {
                tag: T,
                value: Value::Interval(864_000),
            },
            "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00",
        );
        round_trip(
            Ttlv::structure(
                T,
                vec![
                    Ttlv::enumeration(0x42_0004, 254),
                    Ttlv::integer(0x42_0005, 255),
                ],
            ),
            "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | \
             42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
        );
    }

    #[test]
    fn malformed_items_are_refused_with_the_reason() {
        // Truncated header and truncated value.
        assert!(matches!(
            decode(&hex("42 00 20 02")),
            Err(TtlvError::Truncated { at: 0 })
        ));
        assert!(matches!(
            decode(&hex("42 00 20 | 02 | 00 00 00 04 | 00 00 00 08")),
            Err(TtlvError::Truncated { .. })
        ));
        // An integer of 8 bytes.
        assert!(matches!(
            decode(&hex(
                "42 00 20 | 02 | 00 00 00 08 | 00 00 00 08 00 00 00 00"
            )),
            Err(TtlvError::BadLength { kind: 2, .. })
        ));
        // A boolean of 2.
        assert!(matches!(
            decode(&hex(
                "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 02"
            )),
            Err(TtlvError::BadBoolean { .. })
        ));
        // An unknown type.
        assert!(matches!(
            decode(&hex("42 00 20 | 0C | 00 00 00 00")),
            Err(TtlvError::UnknownType { kind: 0x0C, .. })
        ));
        // Invalid UTF-8.
        assert!(matches!(
            decode(&hex(
                "42 00 20 | 07 | 00 00 00 01 | FF 00 00 00 00 00 00 00"
            )),
            Err(TtlvError::BadText { .. })
        ));
        // A length near u32::MAX does not overflow or allocate.
        assert!(matches!(
            decode(&hex("42 00 20 | 08 | FF FF FF FF")),
            Err(TtlvError::Truncated { .. })
        ));
        // Padding that is not zero.
        assert!(matches!(
            decode(&hex(
                "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 01"
            )),
            Err(TtlvError::BadPadding { .. })
        ));
        // Bytes after the item.
        assert!(matches!(
            decode(&hex(
                "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00 00"
            )),
            Err(TtlvError::Trailing(1))
        ));
        // A child that claims to run past its structure.
        assert!(matches!(
            decode(&hex(
                "42 00 20 | 01 | 00 00 00 08 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00"
            )),
            Err(TtlvError::Truncated { .. })
        ));
    }

    #[test]
    fn nesting_and_item_counts_are_bounded() {
        let mut item = Ttlv::integer(0x42_0001, 1);
        for _ in 0..MAX_DEPTH + 1 {
            item = Ttlv::structure(0x42_0002, vec![item]);
        }
        assert_eq!(decode(&encode(&item)), Err(TtlvError::TooDeep));
        let wide = Ttlv::structure(
            0x42_0002,
            (0..MAX_ITEMS as i32)
                .map(|i| Ttlv::integer(0x42_0001, i))
                .collect(),
        );
        assert_eq!(decode(&encode(&wide)), Err(TtlvError::TooManyItems));
    }

    #[test]
    fn byte_strings_are_not_printed() {
        let item = Ttlv::bytes(
            tag::KEY_MATERIAL,
            Zeroizing::new(b"secret key bytes".to_vec()),
        );
        let shown = format!("{item:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("16 bytes"), "{shown}");
    }
}
