//! The XKS proxy API's JSON bodies and error answers, as the specification spells them.
//!
//! Owns field names (camelCase), Base64 decoding with the spec's limits, and the error table
//! (name, HTTP status, a message of at most 511 printable ASCII characters). Knows nothing of
//! keys or the HSM.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::custody::CustodyError;
use crate::hsm::HsmError;

/// Longest ARN or other metadata string accepted (the spec requires 2,048 for ARNs).
const MAX_METADATA_FIELD: usize = 4096;

/// `requestMetadata`. Unknown fields are ignored: KMS may add some.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMetadata {
    pub aws_principal_arn: Option<String>,
    pub aws_source_vpc: Option<String>,
    pub aws_source_vpce: Option<String>,
    pub kms_key_arn: Option<String>,
    pub kms_operation: Option<String>,
    pub kms_request_id: Option<String>,
    pub kms_via_service: Option<String>,
}

impl RequestMetadata {
    /// Checks the fields an API requires and the length of all of them.
    pub fn check(&self, principal: bool, key_arn: bool) -> Result<(), XksError> {
        let fields = [
            ("awsPrincipalArn", &self.aws_principal_arn, principal),
            ("kmsKeyArn", &self.kms_key_arn, key_arn),
            ("kmsOperation", &self.kms_operation, true),
            ("kmsRequestId", &self.kms_request_id, true),
            ("awsSourceVpc", &self.aws_source_vpc, false),
            ("awsSourceVpce", &self.aws_source_vpce, false),
            ("kmsViaService", &self.kms_via_service, false),
        ];
        for (name, value, required) in fields {
            match value {
                None if required => {
                    return Err(XksError::Validation(format!(
                        "requestMetadata.{name} is required"
                    )));
                }
                Some(v) if v.len() > MAX_METADATA_FIELD => {
                    return Err(XksError::Validation(format!(
                        "requestMetadata.{name} is longer than {MAX_METADATA_FIELD} characters"
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The body of GetKeyMetadata and GetHealthStatus.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetadataOnly {
    pub request_metadata: Option<RequestMetadata>,
}

/// Encrypt's body. `Debug` shows neither plaintext nor AAD.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    pub request_metadata: Option<RequestMetadata>,
    pub plaintext: Option<String>,
    pub encryption_algorithm: Option<String>,
    pub additional_authenticated_data: Option<String>,
    pub ciphertext_data_integrity_value_algorithm: Option<String>,
}

/// Decrypt's body. `Debug` does not show the AAD.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    pub request_metadata: Option<RequestMetadata>,
    pub ciphertext: Option<String>,
    pub ciphertext_metadata: Option<String>,
    pub encryption_algorithm: Option<String>,
    pub additional_authenticated_data: Option<String>,
    pub initialization_vector: Option<String>,
    pub authentication_tag: Option<String>,
}

impl std::fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("request_metadata", &self.request_metadata)
            .field("encryption_algorithm", &self.encryption_algorithm)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DecryptRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptRequest")
            .field("request_metadata", &self.request_metadata)
            .field("encryption_algorithm", &self.encryption_algorithm)
            .finish_non_exhaustive()
    }
}

/// GetKeyMetadata's answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyMetadataResponse {
    pub key_spec: &'static str,
    pub key_usage: Vec<&'static str>,
    pub key_status: &'static str,
}

/// Encrypt's answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    pub ciphertext: String,
    pub ciphertext_metadata: String,
    pub initialization_vector: String,
    pub authentication_tag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_data_integrity_value: Option<String>,
}

/// Decrypt's answer, `{"plaintext": "<Base64>"}`, built in memory that is zeroized when
/// dropped (Base64 needs no JSON escaping).
pub fn decrypt_response(plaintext: &[u8]) -> zeroize::Zeroizing<String> {
    let encoded = zeroize::Zeroizing::new(encode(plaintext));
    let mut out = zeroize::Zeroizing::new(String::with_capacity(encoded.len() + 16));
    out.push_str("{\"plaintext\":\"");
    out.push_str(&encoded);
    out.push_str("\"}");
    out
}

/// GetHealthStatus's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    pub xks_proxy_fleet_size: u64,
    pub xks_proxy_vendor: String,
    pub xks_proxy_model: String,
    pub ekm_vendor: String,
    pub ekm_fleet_details: Vec<EkmDetails>,
}

/// One HSM in GetHealthStatus's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EkmDetails {
    pub id: String,
    pub model: String,
    pub health_status: &'static str,
}

/// Decodes a required Base64 field (standard alphabet, padded) of at most `max` bytes.
pub fn required(
    field: &'static str,
    value: Option<&String>,
    max: usize,
) -> Result<Vec<u8>, XksError> {
    let value = value.ok_or_else(|| XksError::Validation(format!("{field} is required")))?;
    decode(field, value, max)
}

/// Decodes an optional Base64 field; absent is empty.
pub fn optional(
    field: &'static str,
    value: Option<&String>,
    max: usize,
) -> Result<Vec<u8>, XksError> {
    value.map_or(Ok(Vec::new()), |v| decode(field, v, max))
}

fn decode(field: &'static str, value: &str, max: usize) -> Result<Vec<u8>, XksError> {
    // Checked before decoding, so an oversized field costs no allocation.
    if value.len() > max.div_ceil(3) * 4 {
        return Err(XksError::Unsupported(format!(
            "{field} is longer than the {max} bytes this proxy accepts"
        )));
    }
    let bytes = STANDARD
        .decode(value)
        .map_err(|_| XksError::Validation(format!("{field} is not standard Base64")))?;
    if bytes.len() > max {
        return Err(XksError::Unsupported(format!(
            "{field} is longer than the {max} bytes this proxy accepts"
        )));
    }
    Ok(bytes)
}

/// Standard Base64.
pub fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The specification's errors. The message is shown to AWS KMS (which logs it in the
/// customer's CloudWatch): never a secret, plaintext or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XksError {
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    InvalidCiphertext(String),
    #[error("{0}")]
    InvalidKeyUsage(String),
    #[error("{0}")]
    AuthenticationFailed(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    KeyNotFound(String),
    #[error("{0}")]
    InvalidUriPath(String),
    #[error("{0}")]
    Throttling(String),
    /// Not in the spec's table: its rule that a GET on an API path is answered 405.
    #[error("{0}")]
    NotPost(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    DependencyTimeout(String),
    #[error("{0}")]
    Internal(String),
}

impl XksError {
    /// The specification's `errorName`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Validation(_) | Self::NotPost(_) => "ValidationException",
            Self::InvalidState(_) => "InvalidStateException",
            Self::InvalidCiphertext(_) => "InvalidCiphertextException",
            Self::InvalidKeyUsage(_) => "InvalidKeyUsageException",
            Self::AuthenticationFailed(_) => "AuthenticationFailedException",
            Self::AccessDenied(_) => "AccessDeniedException",
            Self::KeyNotFound(_) => "KeyNotFoundException",
            Self::InvalidUriPath(_) => "InvalidUriPathException",
            Self::Throttling(_) => "ThrottlingException",
            Self::Unsupported(_) => "UnsupportedOperationException",
            Self::DependencyTimeout(_) => "DependencyTimeoutException",
            Self::Internal(_) => "InternalException",
        }
    }

    /// The specification's HTTP status.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::Validation(_)
            | Self::InvalidState(_)
            | Self::InvalidCiphertext(_)
            | Self::InvalidKeyUsage(_) => S::BAD_REQUEST,
            Self::AuthenticationFailed(_) => S::UNAUTHORIZED,
            Self::AccessDenied(_) => S::FORBIDDEN,
            Self::KeyNotFound(_) | Self::InvalidUriPath(_) => S::NOT_FOUND,
            Self::Throttling(_) => S::TOO_MANY_REQUESTS,
            Self::NotPost(_) => S::METHOD_NOT_ALLOWED,
            Self::Unsupported(_) => S::NOT_IMPLEMENTED,
            Self::DependencyTimeout(_) => S::SERVICE_UNAVAILABLE,
            Self::Internal(_) => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: `errorName` and an `errorMessage` of at most 511 printable ASCII
    /// characters (anything else replaced by `?`).
    pub fn body(&self) -> String {
        let message: String = self
            .to_string()
            .chars()
            .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
            .take(511)
            .collect();
        serde_json::json!({ "errorName": self.name(), "errorMessage": message }).to_string()
    }
}

/// The one map from custody's errors to the specification's error names. Exhaustive, so a new
/// custody error cannot reach AWS KMS without a decision here. Messages name keys and states,
/// never internals: the HSM's and the database's details stay in Tresor's log.
pub fn from_custody(e: CustodyError) -> XksError {
    use CustodyError as E;
    match e {
        E::KeyNotFound(k) => XksError::KeyNotFound(format!("key {k} not found")),
        E::PermissionDenied(d) => XksError::AccessDenied(d.to_string()),
        E::AccessRuleDenied(_) | E::AccessWindowRequired(_) => {
            XksError::AccessDenied(e.to_string())
        }
        E::UsageForbidden { .. } => XksError::InvalidKeyUsage(e.to_string()),
        E::VersionDisabled(_)
        | E::VersionDestroyScheduled(_)
        | E::VersionDestroyed(_)
        | E::VersionExhausted(_)
        | E::VersionBelowMinimum(_)
        | E::VersionLost(_)
        | E::MetadataIntegrity { .. }
        | E::VersionNotFound(_) => XksError::InvalidState(e.to_string()),
        E::MalformedCiphertext(_)
        | E::Unauthentic
        | E::UnknownVersion
        | E::ForeignBlob { .. }
        | E::WrongKey { .. }
        | E::Hsm(HsmError::BadCiphertext) => XksError::InvalidCiphertext(
            "the ciphertext, its metadata, IV, tag or AAD is not valid for this key".into(),
        ),
        E::InvalidArgument(m) => XksError::Validation(m),
        E::InvalidName(_) => XksError::Validation(e.to_string()),
        E::Hsm(HsmError::Deadline(_)) => {
            XksError::DependencyTimeout("the HSM did not answer in time; retry".into())
        }
        E::Hsm(_) => XksError::Internal("the HSM is unavailable; retry later".into()),
        E::Store(_) | E::NotCurrent => {
            XksError::Internal("the key database is unavailable; retry later".into())
        }
        E::Conflict(_) => XksError::Internal("the key changed concurrently; retry".into()),
        // Managed objects are KMIP's; the proxy never reaches them.
        E::ObjectNotFound(_)
        | E::ObjectAttributeNotFound { .. }
        | E::ForeignObject { .. }
        | E::ObjectNotUsable { .. }
        | E::ObjectDataUnauthentic(_)
        | E::ObjectDestroyed(_)
        | E::ObjectState { .. }
        | E::FailedSetup(_) => XksError::Internal("internal error".into()),
        // Officer operations and start-up conditions: no XKS call reaches them, and if one
        // did, AWS KMS can do nothing about it but retry.
        E::KeyExists(_)
        | E::ApprovalNotFound(_)
        | E::ApprovalClosed { .. }
        | E::SelfApproval(_)
        | E::ApprovalPending(_)
        | E::PrimaryVersion(_)
        | E::InvalidTransition { .. }
        | E::ApprovalIntegrity(_)
        | E::WindowNotFound(_)
        | E::WindowClosed { .. }
        | E::WindowIntegrity(_)
        | E::IntegrityKeyMissing(_)
        | E::Internal(_) => XksError::Internal("internal error".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_follow_the_table_and_the_message_rules() {
        let e = XksError::InvalidCiphertext(format!("bad tag \u{e9}\n{}", "x".repeat(600)));
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        let body: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(body["errorName"], "InvalidCiphertextException");
        let message = body["errorMessage"].as_str().unwrap();
        assert!(message.len() < 512);
        assert!(
            message.bytes().all(|b| (0x20..=0x7e).contains(&b)),
            "{message:?}"
        );
        assert_eq!(XksError::Throttling(String::new()).status().as_u16(), 429);
        assert_eq!(XksError::Unsupported(String::new()).status().as_u16(), 501);
        assert_eq!(
            XksError::DependencyTimeout(String::new()).status().as_u16(),
            503
        );
    }

    #[test]
    fn debug_output_shows_no_plaintext_or_aad() {
        let r: EncryptRequest = serde_json::from_str(
            r#"{"plaintext": "U0VDUkVULVBMQUlOVEVYVA==", "additionalAuthenticatedData": "QUFELU1BUktFUg==", "encryptionAlgorithm": "AES_GCM"}"#,
        )
        .unwrap();
        let d: DecryptRequest = serde_json::from_str(
            r#"{"ciphertext": "AA==", "additionalAuthenticatedData": "QUFELU1BUktFUg=="}"#,
        )
        .unwrap();
        let shown = format!("{r:?} {d:?}");
        assert!(
            !shown.contains("U0VDUkVU") && !shown.contains("QUFELU1B"),
            "{shown}"
        );
    }

    #[test]
    fn base64_fields_are_bounded_before_they_are_decoded() {
        let ok = Some(encode(&[7u8; 12]));
        assert_eq!(required("iv", ok.as_ref(), 16).unwrap(), vec![7u8; 12]);
        assert!(matches!(
            required("iv", None, 16),
            Err(XksError::Validation(_))
        ));
        assert!(matches!(
            required("iv", Some(&"***".to_owned()), 16),
            Err(XksError::Validation(_))
        ));
        let big = Some(encode(&[0u8; 17]));
        assert!(matches!(
            required("iv", big.as_ref(), 16),
            Err(XksError::Unsupported(_))
        ));
        assert!(optional("aad", None, 8).unwrap().is_empty());
    }
}
