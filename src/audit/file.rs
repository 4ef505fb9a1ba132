//! Export files: JSON Lines and CSV, one row per record, withheld record or checkpoint.
//!
//! Owns the file formats only (SECURITY.md "Audit exports" lists the columns). Both carry the
//! same row shape, so `tresor audit verify` reads either. Rows state each record's hash so the
//! verifier can name an altered record; verification recomputes every hash and never trusts
//! the stated one.

use serde::{Deserialize, Serialize};

use crate::audit_record::{Checkpoint, ExportItem, Record, RecordBody};
use crate::model::{from_hex, from_hex_array, to_hex};

/// File format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row, every field quoted.
    Csv,
}

/// One row of an export file. Columns that do not apply to a row's type are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// `record`, `withheld` or `checkpoint`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Sequence number (for a checkpoint: the last record it covers).
    pub seq: u64,
    /// RFC 3339 time, for people.
    pub time: String,
    /// UTC milliseconds, as hashed and signed.
    pub time_ms: i64,
    #[serde(default)]
    pub tenant: String,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub caller: String,
    #[serde(default)]
    pub certificate_fingerprint: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub operation: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub key_version: String,
    #[serde(default)]
    pub outcome: String,
    #[serde(default)]
    pub status_code: Option<i32>,
    #[serde(default)]
    pub peer: String,
    #[serde(default)]
    pub aad_hmac: String,
    /// The node that served the call.
    #[serde(default)]
    pub node: String,
    /// XKS calls: AWS KMS's request id.
    #[serde(default)]
    pub kms_request_id: String,
    /// XKS calls: the KMS operation.
    #[serde(default)]
    pub kms_operation: String,
    /// XKS calls: the AWS principal.
    #[serde(default)]
    pub aws_principal_arn: String,
    /// XKS calls: the KMS key ARN.
    #[serde(default)]
    pub kms_key_arn: String,
    /// Burst records: the refused calls this record stands for, and their first and last time.
    #[serde(default)]
    pub repeated: Option<u64>,
    #[serde(default)]
    pub first_ms: Option<i64>,
    #[serde(default)]
    pub last_ms: Option<i64>,
    /// The access rule that decided the call.
    #[serde(default)]
    pub access_rule: String,
    /// The break-glass window the call used.
    #[serde(default)]
    pub access_window: String,
    /// The declared justification code (or the window's reason).
    #[serde(default)]
    pub justification: String,
    /// The justification's reference.
    #[serde(default)]
    pub justification_reference: String,
    /// XKS calls: the AWS service that called KMS.
    #[serde(default)]
    pub kms_via_service: String,
    /// XKS calls: the source VPC.
    #[serde(default)]
    pub aws_source_vpc: String,
    /// XKS calls: the source VPC endpoint.
    #[serde(default)]
    pub aws_source_vpce: String,
    /// Hex.
    #[serde(default)]
    pub previous_hash: String,
    /// Hex; withheld rows only.
    #[serde(default)]
    pub body_digest: String,
    /// Hex: the record's hash as exported (records and withheld rows), or the signed chain hash
    /// (checkpoints).
    #[serde(default)]
    pub hash: String,
    /// Hex `r ‖ s`; checkpoints only.
    #[serde(default)]
    pub signature: String,
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn hash32(s: &str, what: &str, seq: u64) -> Result<[u8; 32], String> {
    from_hex_array(s).ok_or_else(|| format!("row {seq}: {what} is not 32 bytes of hex"))
}

impl Row {
    /// The row of an export item.
    pub fn from_item(item: &ExportItem) -> Self {
        match item {
            ExportItem::Record(r) => Self {
                kind: "record".into(),
                seq: r.seq,
                time: rfc3339(r.time_ms),
                time_ms: r.time_ms,
                tenant: r.tenant.clone(),
                request_id: r.body.request_id.clone(),
                caller: r.body.caller.clone(),
                certificate_fingerprint: r.body.fingerprint.clone(),
                role: r.body.role.clone(),
                operation: r.body.operation.clone(),
                key: r.body.key.clone(),
                key_version: r.body.key_version.clone(),
                outcome: r.body.outcome.clone(),
                status_code: Some(r.body.status_code),
                peer: r.body.peer.clone(),
                aad_hmac: r.body.aad_hmac.clone(),
                node: r.body.node.clone(),
                kms_request_id: r.body.kms_request_id.clone(),
                kms_operation: r.body.kms_operation.clone(),
                aws_principal_arn: r.body.aws_principal_arn.clone(),
                kms_key_arn: r.body.kms_key_arn.clone(),
                repeated: (r.body.repeated > 0).then_some(r.body.repeated),
                first_ms: (r.body.repeated > 0).then_some(r.body.first_ms),
                last_ms: (r.body.repeated > 0).then_some(r.body.last_ms),
                access_rule: r.body.access_rule.clone(),
                access_window: r.body.access_window.clone(),
                justification: r.body.justification.clone(),
                justification_reference: r.body.justification_reference.clone(),
                kms_via_service: r.body.kms_via_service.clone(),
                aws_source_vpc: r.body.aws_source_vpc.clone(),
                aws_source_vpce: r.body.aws_source_vpce.clone(),
                previous_hash: to_hex(&r.prev_hash),
                hash: to_hex(&r.hash()),
                ..Default::default()
            },
            ExportItem::Withheld {
                seq,
                prev_hash,
                time_ms,
                tenant,
                body_digest,
            } => Self {
                kind: "withheld".into(),
                seq: *seq,
                time: rfc3339(*time_ms),
                time_ms: *time_ms,
                tenant: tenant.clone(),
                previous_hash: to_hex(prev_hash),
                body_digest: to_hex(body_digest),
                hash: to_hex(&crate::audit_record::record_hash(
                    *seq,
                    prev_hash,
                    *time_ms,
                    tenant,
                    body_digest,
                )),
                ..Default::default()
            },
            ExportItem::Checkpoint(c) => Self {
                kind: "checkpoint".into(),
                seq: c.seq,
                time: rfc3339(c.time_ms),
                time_ms: c.time_ms,
                hash: to_hex(&c.hash),
                signature: to_hex(&c.signature),
                ..Default::default()
            },
        }
    }

    /// The export item of a row, with the hash the row states (records and withheld rows).
    pub fn to_item(&self) -> Result<(ExportItem, Option<[u8; 32]>), String> {
        let seq = self.seq;
        match self.kind.as_str() {
            "record" => {
                let r = Record {
                    seq,
                    prev_hash: hash32(&self.previous_hash, "previous_hash", seq)?,
                    time_ms: self.time_ms,
                    tenant: self.tenant.clone(),
                    body: RecordBody {
                        request_id: self.request_id.clone(),
                        caller: self.caller.clone(),
                        fingerprint: self.certificate_fingerprint.clone(),
                        role: self.role.clone(),
                        operation: self.operation.clone(),
                        key: self.key.clone(),
                        key_version: self.key_version.clone(),
                        outcome: self.outcome.clone(),
                        status_code: self
                            .status_code
                            .ok_or_else(|| format!("row {seq}: status_code is missing"))?,
                        peer: self.peer.clone(),
                        aad_hmac: self.aad_hmac.clone(),
                        node: self.node.clone(),
                        kms_request_id: self.kms_request_id.clone(),
                        kms_operation: self.kms_operation.clone(),
                        aws_principal_arn: self.aws_principal_arn.clone(),
                        kms_key_arn: self.kms_key_arn.clone(),
                        repeated: self.repeated.unwrap_or(0),
                        first_ms: self.first_ms.unwrap_or(0),
                        last_ms: self.last_ms.unwrap_or(0),
                        access_rule: self.access_rule.clone(),
                        access_window: self.access_window.clone(),
                        justification: self.justification.clone(),
                        justification_reference: self.justification_reference.clone(),
                        kms_via_service: self.kms_via_service.clone(),
                        aws_source_vpc: self.aws_source_vpc.clone(),
                        aws_source_vpce: self.aws_source_vpce.clone(),
                    },
                };
                let stated = if self.hash.is_empty() {
                    None
                } else {
                    Some(hash32(&self.hash, "hash", seq)?)
                };
                Ok((ExportItem::Record(r), stated))
            }
            "withheld" => {
                let stated = if self.hash.is_empty() {
                    None
                } else {
                    Some(hash32(&self.hash, "hash", seq)?)
                };
                Ok((
                    ExportItem::Withheld {
                        seq,
                        prev_hash: hash32(&self.previous_hash, "previous_hash", seq)?,
                        time_ms: self.time_ms,
                        tenant: self.tenant.clone(),
                        body_digest: hash32(&self.body_digest, "body_digest", seq)?,
                    },
                    stated,
                ))
            }
            "checkpoint" => Ok((
                ExportItem::Checkpoint(Checkpoint {
                    seq,
                    hash: hash32(&self.hash, "hash", seq)?,
                    time_ms: self.time_ms,
                    signature: from_hex(&self.signature)
                        .ok_or_else(|| format!("checkpoint {seq}: signature is not hex"))?,
                }),
                None,
            )),
            other => Err(format!("row {seq}: unknown type {other:?}")),
        }
    }
}

/// Writes rows to a file as they come.
pub struct Writer<W: std::io::Write> {
    format: Format,
    jsonl: Option<W>,
    csv: Option<csv::Writer<W>>,
}

impl<W: std::io::Write> std::fmt::Debug for Writer<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl<W: std::io::Write> Writer<W> {
    /// A writer of `format` into `out`.
    pub fn new(format: Format, out: W) -> Self {
        match format {
            Format::Jsonl => Self {
                format,
                jsonl: Some(out),
                csv: None,
            },
            Format::Csv => Self {
                format,
                jsonl: None,
                csv: Some(
                    csv::WriterBuilder::new()
                        .quote_style(csv::QuoteStyle::Always)
                        .from_writer(out),
                ),
            },
        }
    }

    /// Writes one row.
    pub fn write(&mut self, row: &Row) -> Result<(), String> {
        if let Some(out) = self.jsonl.as_mut() {
            // Empty columns are left out of JSON lines; the CSV keeps them for its fixed header.
            let mut value = serde_json::to_value(row).map_err(|e| e.to_string())?;
            if let Some(map) = value.as_object_mut() {
                map.retain(|_, v| !(v.is_null() || v.as_str() == Some("")));
            }
            serde_json::to_writer(&mut *out, &value).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        if let Some(out) = self.csv.as_mut() {
            out.serialize(row).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Flushes everything to the file.
    pub fn finish(mut self) -> Result<(), String> {
        if let Some(out) = self.jsonl.as_mut() {
            out.flush().map_err(|e| e.to_string())?;
        }
        if let Some(out) = self.csv.as_mut() {
            out.flush().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Reads an export file, JSON Lines or CSV (told apart by the first byte).
pub fn read(text: &str) -> Result<Vec<Row>, String> {
    if text.trim_start().starts_with('{') {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
            .collect()
    } else {
        csv::Reader::from_reader(text.as_bytes())
            .deserialize()
            .enumerate()
            .map(|(i, r)| r.map_err(|e| format!("CSV row {}: {e}", i + 2)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_record::GENESIS;

    fn items() -> Vec<ExportItem> {
        let r = Record {
            seq: 1,
            prev_hash: GENESIS,
            time_ms: 1_763_770_000_123,
            tenant: "a".into(),
            body: RecordBody {
                request_id: "r1".into(),
                caller: "spiffe://a.example/x, with \"quotes\"".into(),
                operation: "Wrap".into(),
                outcome: "OK".into(),
                aad_hmac: "00ff".into(),
                ..Default::default()
            },
        };
        let h = r.hash();
        vec![
            ExportItem::Record(r),
            ExportItem::Withheld {
                seq: 2,
                prev_hash: h,
                time_ms: 5,
                tenant: "b".into(),
                body_digest: [7; 32],
            },
            ExportItem::Checkpoint(Checkpoint {
                seq: 2,
                hash: [9; 32],
                time_ms: 6,
                signature: vec![1, 2, 3],
            }),
        ]
    }

    #[test]
    fn both_formats_round_trip() {
        for format in [Format::Jsonl, Format::Csv] {
            let mut buf = Vec::new();
            let mut w = Writer::new(format, &mut buf);
            for item in items() {
                w.write(&Row::from_item(&item)).unwrap();
            }
            w.finish().unwrap();
            let rows = read(std::str::from_utf8(&buf).unwrap()).unwrap();
            let back: Vec<ExportItem> = rows.iter().map(|r| r.to_item().unwrap().0).collect();
            assert_eq!(back, items(), "{format:?}");
        }
    }
}
