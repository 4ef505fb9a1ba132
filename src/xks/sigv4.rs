//! AWS Signature Version 4 as the XKS proxy API uses it: verifying what AWS KMS signs, and
//! signing (for `tresor bench` only; tests sign with AWS's own `aws-sigv4` crate).
//!
//! Owns the canonical request, the string to sign, the signing-key derivation and the checks
//! the XKS specification adds (service `kms-xks-proxy`, the configured region, `host` and
//! `x-amz-date` signed, at most five minutes of clock skew). Pure: no I/O; secrets are only
//! ever used as HMAC keys and never printed.

use std::time::{Duration, SystemTime};

use ring::hmac;

/// The SigV4 service name of the XKS proxy API.
pub const SERVICE: &str = "kms-xks-proxy";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// How far a request's `x-amz-date` may be from the proxy's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(300);

/// One access key id and its secret.
#[derive(Clone)]
pub struct Credential {
    /// The access key id (not secret; it names the secret).
    pub access_key_id: String,
    secret: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Credential {
    /// A credential pair.
    pub fn new(access_key_id: String, secret: String) -> Self {
        Self {
            access_key_id,
            secret: zeroize::Zeroizing::new(secret),
        }
    }
}

/// Why a request's signature was not accepted. The messages are safe to send to the caller:
/// they never contain a secret or a computed signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header")]
    Missing,
    /// The header is not a SigV4 header this proxy accepts.
    #[error("malformed Authorization header: {0}")]
    Malformed(&'static str),
    /// `x-amz-date` is missing or not `YYYYMMDDTHHMMSSZ`.
    #[error("missing or malformed x-amz-date")]
    BadDate,
    /// The credential scope names another date, region or service.
    #[error("credential scope does not match: {0}")]
    Scope(&'static str),
    /// The access key id is not configured for this path prefix.
    #[error("unknown access key id")]
    UnknownAccessKey,
    /// `x-amz-date` is more than five minutes away from the proxy's clock.
    #[error("request time is more than 5 minutes from the proxy's clock")]
    Skew,
    /// The signature does not match.
    #[error("signature does not match")]
    BadSignature,
}

/// What the verifier needs of an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `POST`.
    pub method: &'a str,
    /// The path, as sent (the XKS paths need no URI encoding).
    pub path: &'a str,
    /// The query string, as sent (empty for XKS).
    pub query: &'a str,
    /// The request's headers; `host` falls back to `authority` (HTTP/2's `:authority`).
    pub headers: &'a http::HeaderMap,
    /// The URI authority, for HTTP/2.
    pub authority: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
}

/// What the headers of a request established, before its body is read: the credential that
/// claims to have signed it, within the allowed clock skew and scope.
#[derive(Debug)]
pub struct Claimed<'h, 'c> {
    credential: &'c Credential,
    signed: Vec<&'h str>,
    amz_date: &'h str,
    scope_date: &'h str,
    signature: &'h str,
}

/// Checks everything of a request's SigV4 authorization that does not need its body: the
/// header's form, date, scope, signed headers, that the access key id is configured for this
/// path prefix, and the clock skew. A request that fails here is refused before its body is
/// read.
pub fn check_headers<'h, 'c>(
    headers: &'h http::HeaderMap,
    credentials: &'c [Credential],
    region: &str,
    now: SystemTime,
) -> Result<Claimed<'h, 'c>, AuthError> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed("not ASCII"))?;
    let parsed = parse_authorization(header)?;
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::BadDate)?;
    let time = parse_amz_date(amz_date).ok_or(AuthError::BadDate)?;
    let (scope_date, scope_region, scope_service) = parsed.scope;
    if scope_date != &amz_date[..8] {
        return Err(AuthError::Scope("date differs from x-amz-date"));
    }
    if scope_region != region {
        return Err(AuthError::Scope("region"));
    }
    if scope_service != SERVICE {
        return Err(AuthError::Scope("service must be kms-xks-proxy"));
    }
    let signed: Vec<&str> = parsed.signed_headers.split(';').collect();
    if !signed.contains(&"host") || !signed.contains(&"x-amz-date") {
        return Err(AuthError::Malformed("host and x-amz-date must be signed"));
    }
    let credential = credentials
        .iter()
        .find(|c| c.access_key_id == parsed.access_key_id)
        .ok_or(AuthError::UnknownAccessKey)?;
    let skew = now
        .duration_since(time)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap_or(Duration::MAX);
    if skew > MAX_SKEW {
        return Err(AuthError::Skew);
    }
    Ok(Claimed {
        credential,
        signed,
        amz_date,
        scope_date,
        signature: parsed.signature,
    })
}

impl<'c> Claimed<'_, 'c> {
    /// Checks the signature over the whole request, body included; returns the credential
    /// that signed it.
    pub fn verify(&self, request: &Request<'_>, region: &str) -> Result<&'c Credential, AuthError> {
        let canonical = canonical_request(request, &self.signed)?;
        let given =
            decode_hex(self.signature).ok_or(AuthError::Malformed("signature is not hex"))?;
        // ring compares in constant time; the expected signature never leaves this function.
        hmac::verify(
            &signing_key(&self.credential.secret, self.scope_date, region),
            string_to_sign(self.amz_date, &scope(self.scope_date, region), &canonical).as_bytes(),
            &given,
        )
        .map_err(|_| AuthError::BadSignature)?;
        Ok(self.credential)
    }
}

/// Checks a request's SigV4 signature against the credentials of its path prefix; returns
/// the access key id that signed it ([`check_headers`], then [`Claimed::verify`]).
pub fn verify<'c>(
    request: &Request<'_>,
    credentials: &'c [Credential],
    region: &str,
    now: SystemTime,
) -> Result<&'c Credential, AuthError> {
    check_headers(request.headers, credentials, region, now)?.verify(request, region)
}

/// Signs a request as AWS KMS would (`host;x-amz-date`): returns the `Authorization` and
/// `x-amz-date` header values. For `tresor bench`.
pub fn sign(
    credential: &Credential,
    region: &str,
    host: &str,
    path: &str,
    body: &[u8],
    now: SystemTime,
) -> (String, String) {
    let amz_date = format_amz_date(now);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(host) {
        headers.insert(http::header::HOST, v);
    }
    if let Ok(v) = http::HeaderValue::from_str(&amz_date) {
        headers.insert("x-amz-date", v);
    }
    let request = Request {
        method: "POST",
        path,
        query: "",
        headers: &headers,
        authority: None,
        body,
    };
    let signed = ["host", "x-amz-date"];
    let canonical = canonical_request(&request, &signed).unwrap_or_default();
    let date = &amz_date[..8];
    let sig = hmac::sign(
        &signing_key(&credential.secret, date, region),
        string_to_sign(&amz_date, &scope(date, region), &canonical).as_bytes(),
    );
    (
        format!(
            "{ALGORITHM} Credential={}/{}, SignedHeaders=host;x-amz-date, Signature={}",
            credential.access_key_id,
            scope(date, region),
            hex(sig.as_ref())
        ),
        amz_date,
    )
}

struct Authorization<'a> {
    access_key_id: &'a str,
    scope: (&'a str, &'a str, &'a str),
    signed_headers: &'a str,
    signature: &'a str,
}

fn parse_authorization(header: &str) -> Result<Authorization<'_>, AuthError> {
    let rest = header
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(AuthError::Malformed("algorithm must be AWS4-HMAC-SHA256"))?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        } else {
            return Err(AuthError::Malformed("unexpected component"));
        }
    }
    let credential = credential.ok_or(AuthError::Malformed("no Credential"))?;
    let mut fields = credential.split('/');
    let (Some(akid), Some(date), Some(region), Some(service), Some("aws4_request"), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(AuthError::Malformed(
            "Credential must be KEY/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    let signed_headers = signed_headers.ok_or(AuthError::Malformed("no SignedHeaders"))?;
    let mut previous = "";
    for name in signed_headers.split(';') {
        if name.is_empty() || name <= previous || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(AuthError::Malformed(
                "SignedHeaders must be lower-case, sorted and distinct",
            ));
        }
        previous = name;
    }
    Ok(Authorization {
        access_key_id: akid,
        scope: (date, region, service),
        signed_headers,
        signature: signature.ok_or(AuthError::Malformed("no Signature"))?,
    })
}

/// The SigV4 canonical request. The XKS paths consist of `A-Z a-z 0-9 - . _ /` only (the
/// router refuses anything else before authentication), which URI encoding leaves unchanged.
fn canonical_request(request: &Request<'_>, signed: &[&str]) -> Result<String, AuthError> {
    let mut out = String::with_capacity(256 + request.path.len());
    out.push_str(request.method);
    out.push('\n');
    out.push_str(request.path);
    out.push('\n');
    out.push_str(&canonical_query(request.query));
    out.push('\n');
    for name in signed {
        let values: Vec<&str> = request
            .headers
            .get_all(*name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let value = match (values.is_empty(), *name) {
            (true, "host") => request
                .authority
                .ok_or(AuthError::Malformed("signed header host is missing"))?
                .to_owned(),
            (true, _) => return Err(AuthError::Malformed("a signed header is missing")),
            (false, _) => values
                .iter()
                .map(|v| collapse_spaces(v.trim()))
                .collect::<Vec<_>>()
                .join(","),
        };
        out.push_str(name);
        out.push(':');
        out.push_str(&value);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed.join(";"));
    out.push('\n');
    out.push_str(&sha256_hex(request.body));
    Ok(out)
}

/// Query parameters sorted by name then value (already encoded as sent; XKS sends none).
fn canonical_query(query: &str) -> String {
    if query.is_empty() {
        return String::new();
    }
    let mut pairs: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    pairs.sort_unstable();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn collapse_spaces(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut space = false;
    for c in v.chars() {
        if c == ' ' {
            if !space {
                out.push(' ');
            }
            space = true;
        } else {
            out.push(c);
            space = false;
        }
    }
    out
}

fn scope(date: &str, region: &str) -> String {
    format!("{date}/{region}/{SERVICE}/aws4_request")
}

fn string_to_sign(amz_date: &str, scope: &str, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    )
}

fn signing_key(secret: &str, date: &str, region: &str) -> hmac::Key {
    let step = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    // The secret is copied only into memory that is zeroized when dropped.
    let mut first = zeroize::Zeroizing::new(Vec::with_capacity(4 + secret.len()));
    first.extend_from_slice(b"AWS4");
    first.extend_from_slice(secret.as_bytes());
    let k_date = step(&first, date);
    let k_region = step(k_date.as_ref(), region);
    let k_service = step(k_region.as_ref(), SERVICE);
    let k_signing = step(k_service.as_ref(), "aws4_request");
    hmac::Key::new(hmac::HMAC_SHA256, k_signing.as_ref())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    crate::model::from_hex(s)
}

/// `YYYYMMDDTHHMMSSZ` to a time.
fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let digits = s.get(r)?;
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let date = time::Date::from_calendar_date(
        i32::try_from(num(0..4)?).ok()?,
        time::Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?,
        u8::try_from(num(6..8)?).ok()?,
    )
    .ok()?;
    let clock = time::Time::from_hms(
        u8::try_from(num(9..11)?).ok()?,
        u8::try_from(num(11..13)?).ok()?,
        u8::try_from(num(13..15)?).ok()?,
    )
    .ok()?;
    let secs = u64::try_from(
        time::PrimitiveDateTime::new(date, clock)
            .assume_utc()
            .unix_timestamp(),
    )
    .ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

fn format_amz_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dt = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// SHA-256, lower-case hex.
fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    crate::model::to_hex(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Vec<Credential> {
        vec![Credential::new(
            "AKIAIOSFODNN7EXAMPLEXKS".into(),
            "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEYxks1234567".into(),
        )]
    }

    fn signed(now: SystemTime, body: &[u8]) -> http::HeaderMap {
        let (authorization, date) = sign(
            &credentials()[0],
            "eu-central-1",
            "xks.example:443",
            "/t1/kms/xks/v1/health",
            body,
            now,
        );
        let mut h = http::HeaderMap::new();
        h.insert("host", "xks.example:443".parse().unwrap());
        h.insert("x-amz-date", date.parse().unwrap());
        h.insert("authorization", authorization.parse().unwrap());
        h
    }

    fn request<'a>(headers: &'a http::HeaderMap, body: &'a [u8]) -> Request<'a> {
        Request {
            method: "POST",
            path: "/t1/kms/xks/v1/health",
            query: "",
            headers,
            authority: None,
            body,
        }
    }

    #[test]
    fn a_signed_request_verifies_and_every_change_is_refused() {
        let now = SystemTime::now();
        let creds = credentials();
        let h = signed(now, b"{}");
        assert!(verify(&request(&h, b"{}"), &creds, "eu-central-1", now).is_ok());
        assert_eq!(
            verify(&request(&h, b"{ }"), &creds, "eu-central-1", now).unwrap_err(),
            AuthError::BadSignature
        );
        assert_eq!(
            verify(&request(&h, b"{}"), &creds, "us-east-1", now).unwrap_err(),
            AuthError::Scope("region")
        );
        assert_eq!(
            verify(
                &request(&h, b"{}"),
                &creds,
                "eu-central-1",
                now + Duration::from_secs(301)
            )
            .unwrap_err(),
            AuthError::Skew
        );
        assert!(
            verify(
                &request(&h, b"{}"),
                &creds,
                "eu-central-1",
                now + Duration::from_secs(299)
            )
            .is_ok()
        );
        let other = vec![Credential::new(
            "AKIAIOSFODNN7EXAMPLEXKS".into(),
            "another-secret-of-enough-length-0123456789abcdefgh".into(),
        )];
        assert_eq!(
            verify(&request(&h, b"{}"), &other, "eu-central-1", now).unwrap_err(),
            AuthError::BadSignature
        );
        let mut moved = h.clone();
        moved.insert("host", "elsewhere.example:443".parse().unwrap());
        assert_eq!(
            verify(&request(&moved, b"{}"), &creds, "eu-central-1", now).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn amz_dates_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_amz_date(t), "20231114T221320Z");
        assert_eq!(parse_amz_date("20231114T221320Z"), Some(t));
        assert_eq!(parse_amz_date("2023-11-14"), None);
    }
}
