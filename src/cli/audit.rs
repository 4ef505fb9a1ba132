//! `tresor audit …`: export, verify (offline), public key, checkpoint, AAD HMAC.

use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use rustls::pki_types::pem::PemObject;

use super::exit::{Exit, Failure, from_status};
use super::files::{AadArgs, aad, write_output};
use super::output::Output;
use crate::client::Client;
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Export your tenant's audit log, verifiable offline, to a file.
    Export {
        /// Start of the range: RFC 3339 (2026-11-21T00:00:00Z) or Unix milliseconds.
        #[arg(long)]
        from: Option<String>,
        /// End of the range (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Only records of this key (tenants/T/keys/K), or of this KMIP object
        /// (tenants/T/objects/ID).
        #[arg(long)]
        key: Option<String>,
        /// Only records of this caller identity.
        #[arg(long)]
        caller: Option<String>,
        /// Only records with this justification code (declared, or the window's reason).
        #[arg(long)]
        justification: Option<String>,
        /// Only records with this outcome: OK, DENIED, RULE_DENIED, UNAUTHENTICATED, FAILED.
        #[arg(long)]
        outcome: Option<String>,
        /// File format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// The file to write.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
    /// Verify an export offline: every hash link and checkpoint signature; with `--since`,
    /// also that it extends an earlier export (no record of it removed or rewritten).
    Verify {
        /// The export (JSON Lines or CSV).
        file: PathBuf,
        /// The checkpoint public key, PEM (`tresor audit public-key`).
        #[arg(long)]
        public_key: PathBuf,
        /// An earlier export (verified too) that this one must extend.
        #[arg(long, conflicts_with = "since_checkpoint")]
        since: Option<PathBuf>,
        /// A checkpoint kept from earlier, `SEQ:HASH`, that this export must extend.
        #[arg(long)]
        since_checkpoint: Option<crate::audit::continuity::Since>,
    },
    /// Print the checkpoint public key (PEM), or write it to a file.
    PublicKey {
        /// Write the PEM to this file.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Sign the chain head now and show the latest checkpoint.
    Checkpoint,
    /// The HMAC the audit log records for an AAD value, to search exports for it.
    Hmac(AadArgs),
}

/// Audit export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(super) enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// Parses RFC 3339 or Unix milliseconds into a protobuf timestamp.
pub(super) fn parse_time(flag: &str, text: &str) -> Result<prost_types::Timestamp, Failure> {
    let ms = match text.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => {
            let t =
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                    Failure::new(
                        Exit::Usage,
                        format!("{flag} {text:?}: {e}"),
                        "give RFC 3339 (2026-11-21T00:00:00Z) or Unix milliseconds",
                    )
                })?;
            i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
        }
    };
    Ok(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    })
}

pub(super) async fn audit_command(
    client: &Client,
    command: AuditCommand,
    out: &Output,
) -> Result<(), Failure> {
    use crate::audit::file::{Format as FileFormat, Row, Writer};
    use crate::audit_record::ExportItem;
    let mut audit = client.audit();
    match command {
        AuditCommand::Export {
            from,
            to,
            key,
            caller,
            justification,
            outcome,
            format,
            out: path,
        } => {
            let request = proto::ExportAuditLogRequest {
                from: from
                    .as_deref()
                    .map(|t| parse_time("--from", t))
                    .transpose()?,
                to: to.as_deref().map(|t| parse_time("--to", t)).transpose()?,
                key: key.unwrap_or_default(),
                caller: caller.unwrap_or_default(),
                justification: justification.unwrap_or_default(),
                outcome: outcome.unwrap_or_default(),
            };
            let mut stream = audit
                .export_audit_log(request)
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            let file = std::fs::File::create(&path).map_err(|e| {
                Failure::new(
                    Exit::Other,
                    format!("cannot write {}: {e}", path.display()),
                    "check the path given to -o",
                )
            })?;
            let format = match format {
                ExportFormat::Jsonl => FileFormat::Jsonl,
                ExportFormat::Csv => FileFormat::Csv,
            };
            let mut writer = Writer::new(format, std::io::BufWriter::new(file));
            let progress = indicatif::ProgressBar::new_spinner();
            progress.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos} items exported ({per_sec}) {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let (mut shown, mut withheld, mut checkpoints) = (0u64, 0u64, 0u64);
            while let Some(message) = stream.message().await.map_err(|s| from_status(&s))? {
                let item = crate::client::audit_item(message).map_err(|e| {
                    Failure::new(
                        Exit::Other,
                        e.to_string(),
                        "report this with the request id",
                    )
                })?;
                match &item {
                    ExportItem::Record(_) => shown += 1,
                    ExportItem::Withheld { .. } => withheld += 1,
                    ExportItem::Checkpoint(_) => checkpoints += 1,
                }
                writer.write(&Row::from_item(&item)).map_err(|e| {
                    Failure::new(
                        Exit::Other,
                        format!("cannot write {}: {e}", path.display()),
                        "check free space",
                    )
                })?;
                progress.inc(1);
            }
            progress.finish_and_clear();
            writer.finish().map_err(|e| {
                Failure::new(
                    Exit::Other,
                    format!("cannot write {}: {e}", path.display()),
                    "check free space",
                )
            })?;
            out.summary(&format!(
                "exported {shown} records ({withheld} withheld by tenant, range or filter) and {checkpoints} checkpoints to {}",
                path.display()
            ));
            Ok(())
        }
        AuditCommand::PublicKey { out: path } => {
            let pem = audit
                .get_audit_public_key(proto::GetAuditPublicKeyRequest {})
                .await
                .map_err(|s| from_status(&s))?
                .into_inner()
                .pem;
            match path {
                Some(p) => write_output(&p, pem.as_bytes(), false),
                None => {
                    out.text(&pem);
                    Ok(())
                }
            }
        }
        AuditCommand::Checkpoint => {
            let c = audit
                .get_audit_checkpoint(proto::GetAuditCheckpointRequest {})
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.checkpoint(&c);
            Ok(())
        }
        AuditCommand::Hmac(a) => {
            let aad = aad(&a)?;
            let r = audit
                .compute_aad_hmac(proto::ComputeAadHmacRequest { aad })
                .await
                .map_err(|s| from_status(&s))?
                .into_inner();
            out.hmac(&r.aad_hmac);
            Ok(())
        }
        AuditCommand::Verify { .. } => Ok(()),
    }
}

/// `tresor audit verify`: offline, no server.
pub(super) fn verify_export(
    path: &Path,
    public_key: &Path,
    since: Option<&Path>,
    since_checkpoint: Option<crate::audit::continuity::Since>,
    out: &Output,
) -> Result<(), Failure> {
    use crate::audit::continuity;
    use crate::audit_record as record;
    let pem = std::fs::read(public_key).map_err(|e| {
        Failure::new(
            Exit::Config,
            format!("cannot read {}: {e}", public_key.display()),
            "save it with `tresor audit public-key -o FILE`",
        )
    })?;
    let spki = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(&pem).map_err(|e| {
        Failure::new(
            Exit::Config,
            format!("{}: not a PEM public key: {e}", public_key.display()),
            "save it with `tresor audit public-key -o FILE`",
        )
    })?;
    let point = record::p256_point_from_spki(spki.as_ref()).ok_or_else(|| {
        Failure::new(
            Exit::Config,
            format!("{}: not a P-256 public key", public_key.display()),
            "use the key `tresor audit public-key` prints",
        )
    })?;
    let (items, verified) = verified_items(path, &point)?;
    let old = since.map(|p| verified_items(p, &point)).transpose()?;
    let anchor = match (&old, since_checkpoint) {
        (Some((old_items, _)), _) => {
            Some(continuity::last_checkpoint(old_items).ok_or_else(|| {
                Failure::new(
                    Exit::NotVerified,
                    format!(
                        "{}: {}",
                        since.unwrap_or(path).display(),
                        continuity::ContinuityError::NoCheckpoint
                    ),
                    "give an export that `tresor audit verify` accepted",
                )
            })?)
        }
        (None, given) => given,
    };
    if let Some(anchor) = anchor {
        continuity::extends(&items, old.as_ref().map(|(o, _)| o.as_slice()), anchor).map_err(
            |e| {
                Failure::new(
                    Exit::NotVerified,
                    format!(
                        "{} does not extend the earlier history (checkpoint {}): {e}",
                        path.display(),
                        anchor.seq
                    ),
                    "records the earlier export showed were removed or rewritten in the log; keep both files as evidence",
                )
            },
        )?;
    }
    out.verified(&verified, anchor.map(|a| a.seq));
    Ok(())
}

/// An export's items with their stated hashes, and what verifying it found.
pub(super) type VerifiedExport = (
    Vec<(crate::audit_record::ExportItem, Option<[u8; 32]>)>,
    crate::audit_record::Verified,
);

/// Reads an export and verifies it on its own (exit code 8 naming the first failure).
pub(super) fn verified_items(path: &Path, point: &[u8]) -> Result<VerifiedExport, Failure> {
    use crate::audit::file;
    use crate::audit_record as record;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            Exit::Input,
            format!("cannot read {}: {e}", path.display()),
            "check the path of the export",
        )
    })?;
    let rows = file::read(&text).map_err(|e| {
        Failure::new(
            Exit::NotVerified,
            format!("{}: {e}", path.display()),
            "the file is not a Tresor audit export, or was damaged",
        )
    })?;
    let items = rows
        .iter()
        .map(file::Row::to_item)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Failure::new(
                Exit::NotVerified,
                format!("{}: {e}", path.display()),
                "the file is not a Tresor audit export, or was damaged",
            )
        })?;
    match record::verify(&items, point) {
        Ok(v) => Ok((items, v)),
        Err(e) => Err(Failure::new(
            Exit::NotVerified,
            format!("{} does not verify: {e}", path.display()),
            "the export or the log it came from was altered, truncated or signed by another key; keep the file as evidence",
        )),
    }
}
