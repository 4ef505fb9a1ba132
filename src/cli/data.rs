//! `tresor wrap`, `unwrap`, `datakey` and `rewrap`: a service's calls from the command line.

use std::path::PathBuf;

use clap::Args;
use zeroize::Zeroizing;

use super::exit::{Exit, Failure, from_status};
use super::files::{AadArgs, JustificationArgs, aad, input, write_output};
use super::output::Output;
use crate::client::Client;
use crate::proto;

/// `Debug` shows whether a plaintext was given on the command line, never the plaintext.
#[derive(Args)]
pub(super) struct WrapArgs {
    /// tenants/{tenant}/keys/{key}
    #[arg(long)]
    pub(super) key: String,
    /// Plaintext from a file (raw bytes; `-` for standard input).
    #[arg(long = "in", conflicts_with = "plaintext_base64")]
    pub(super) input: Option<PathBuf>,
    /// Plaintext as standard base64.
    #[arg(long)]
    plaintext_base64: Option<String>,
    #[command(flatten)]
    pub(super) aad: AadArgs,
    #[command(flatten)]
    pub(super) why: JustificationArgs,
    /// Write the blob (raw bytes) to this file instead of printing it as base64.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
}

impl std::fmt::Debug for WrapArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrapArgs")
            .field("key", &self.key)
            .field("input", &self.input)
            .field(
                "plaintext_base64",
                &self.plaintext_base64.as_ref().map(|_| "<redacted>"),
            )
            .field("aad", &self.aad)
            .field("why", &self.why)
            .field("out", &self.out)
            .finish()
    }
}

#[derive(Debug, Args)]
pub(super) struct UnwrapArgs {
    /// Blob from a file (raw bytes; `-` for standard input).
    #[arg(long = "in", conflicts_with = "ciphertext_base64")]
    pub(super) input: Option<PathBuf>,
    /// Blob as standard base64.
    #[arg(long)]
    ciphertext_base64: Option<String>,
    /// Refuse blobs of any other key.
    #[arg(long)]
    pub(super) key: Option<String>,
    #[command(flatten)]
    pub(super) aad: AadArgs,
    #[command(flatten)]
    pub(super) why: JustificationArgs,
    /// Write the result (raw bytes; plaintext files get mode 0600) to this file instead of
    /// printing it as base64.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(super) struct RewrapArgs {
    /// One blob, standard base64.
    #[arg(long, conflicts_with_all = ["input", "out"])]
    ciphertext_base64: Option<String>,
    /// A file of blobs: one JSON object per line, `{"ciphertext": base64, "aad": base64?, ...}`.
    #[arg(long = "in", requires = "out")]
    pub(super) input: Option<PathBuf>,
    /// Where re-wrapped lines go (appended to on resume).
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
    /// Where failed lines go, with the reason (default: OUT.failed.jsonl).
    #[arg(long)]
    pub(super) failures: Option<PathBuf>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(super) parallel: u16,
    /// Refuse blobs of any other key.
    #[arg(long)]
    pub(super) key: Option<String>,
    #[command(flatten)]
    pub(super) aad: AadArgs,
    #[command(flatten)]
    pub(super) why: JustificationArgs,
}

#[derive(Debug, Args)]
pub(super) struct DatakeyArgs {
    /// tenants/{tenant}/keys/{key}
    #[arg(long)]
    pub(super) key: String,
    /// Data key length in bytes (16 to 1024).
    #[arg(long, default_value_t = 32)]
    pub(super) length: u32,
    /// Return only the wrapped data key.
    #[arg(long)]
    pub(super) without_plaintext: bool,
    #[command(flatten)]
    pub(super) aad: AadArgs,
    #[command(flatten)]
    pub(super) why: JustificationArgs,
}

pub(super) async fn wrap(client: &Client, a: WrapArgs, out: &Output) -> Result<(), Failure> {
    let mut plaintext = Zeroizing::new(input(
        a.input.as_deref(),
        a.plaintext_base64.as_deref(),
        "plaintext",
    )?);
    let r = client
        .keys()
        .wrap(proto::WrapRequest {
            justification: a.why.to_proto(),
            key: a.key,
            // Moved, not copied: no second plain copy of the secret stays behind.
            plaintext: std::mem::take(&mut *plaintext),
            aad: aad(&a.aad)?,
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    if let Some(path) = &a.out {
        write_output(path, &r.ciphertext, false)?;
    }
    out.blob(
        "ciphertext",
        &r.ciphertext,
        a.out.is_none(),
        &r.key_version,
        None,
    );
    Ok(())
}

pub(super) async fn unwrap(client: &Client, a: UnwrapArgs, out: &Output) -> Result<(), Failure> {
    let ciphertext = input(
        a.input.as_deref(),
        a.ciphertext_base64.as_deref(),
        "ciphertext",
    )?;
    let r = client
        .keys()
        .unwrap(proto::UnwrapRequest {
            justification: a.why.to_proto(),
            ciphertext,
            aad: aad(&a.aad)?,
            key: a.key.unwrap_or_default(),
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    let plaintext = Zeroizing::new(r.plaintext);
    if let Some(path) = &a.out {
        write_output(path, &plaintext, true)?;
    }
    out.blob(
        "plaintext",
        &plaintext,
        a.out.is_none(),
        &r.key_version,
        None,
    );
    Ok(())
}

pub(super) async fn rewrap(client: &Client, a: RewrapArgs, out: &Output) -> Result<(), Failure> {
    if let (Some(input), Some(output)) = (&a.input, &a.out) {
        let failures = a
            .failures
            .clone()
            .unwrap_or_else(|| super::bulk::default_failures(output));
        let client = match a.why.to_proto() {
            Some(j) => client.clone().with_justification(&j.code, &j.reference),
            None => client.clone(),
        };
        let s = super::bulk::run(
            &client,
            input,
            output,
            &failures,
            usize::from(a.parallel),
            a.key.clone(),
        )
        .await?;
        out.summary(&format!(
            "re-wrapped {}, already current {}, failed {}{}{}",
            s.rewrapped,
            s.current,
            s.failed,
            if s.failed > 0 {
                format!(" (see {})", failures.display())
            } else {
                String::new()
            },
            if s.resumed > 0 {
                format!("; resumed after {} lines done earlier", s.resumed)
            } else {
                String::new()
            },
        ));
        return if s.failed > 0 {
            Err(Failure::new(
                Exit::Input,
                format!("{} lines could not be re-wrapped", s.failed),
                format!("see {}", failures.display()),
            ))
        } else {
            Ok(())
        };
    }
    let ciphertext = input(None, a.ciphertext_base64.as_deref(), "ciphertext")?;
    let r = client
        .keys()
        .rewrap(proto::RewrapRequest {
            justification: a.why.to_proto(),
            ciphertext,
            aad: aad(&a.aad)?,
            key: a.key.unwrap_or_default(),
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    out.blob(
        "ciphertext",
        &r.ciphertext,
        true,
        &r.key_version,
        Some(r.rewrapped),
    );
    Ok(())
}

pub(super) async fn datakey(client: &Client, a: DatakeyArgs, out: &Output) -> Result<(), Failure> {
    let r = client
        .keys()
        .generate_data_key(proto::GenerateDataKeyRequest {
            justification: a.why.to_proto(),
            key: a.key,
            aad: aad(&a.aad)?,
            length_bytes: a.length,
            without_plaintext: a.without_plaintext,
        })
        .await
        .map_err(|s| from_status(&s))?
        .into_inner();
    let plaintext = Zeroizing::new(r.plaintext);
    out.data_key(
        &plaintext,
        &r.ciphertext,
        &r.key_version,
        !a.without_plaintext,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::Cli;

    #[test]
    fn debug_of_the_arguments_holds_no_plaintext_or_aad() {
        for args in [
            vec![
                "tresor",
                "wrap",
                "--key",
                "tenants/t/keys/k",
                "--plaintext-base64",
                "cGF0aWVudC1zZWNyZXQ=",
                "--aad",
                "patient-aad",
            ],
            vec![
                "tresor",
                "unwrap",
                "--ciphertext-base64",
                "AAAA",
                "--aad-base64",
                "cGF0aWVudC1hYWQ=",
            ],
            vec![
                "tresor",
                "datakey",
                "--key",
                "tenants/t/keys/k",
                "--aad",
                "patient-aad",
            ],
            vec!["tresor", "audit", "hmac", "--aad", "patient-aad"],
        ] {
            let cli = Cli::try_parse_from(&args).unwrap();
            let debug = format!("{cli:?}");
            for secret in ["cGF0aWVudC1zZWNyZXQ=", "patient-aad", "cGF0aWVudC1hYWQ="] {
                assert!(!debug.contains(secret), "{debug}");
            }
            assert!(debug.contains("redacted"), "{debug}");
        }
    }
}
