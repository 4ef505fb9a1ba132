//! What the commands read from and write to the user's files and terminal: input files or base64,
//! AAD, result files (secret ones private), confirmations.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use clap::Args;

use super::exit::{Exit, Failure};

/// Additional authenticated data, given one way at most. `Debug` shows how it was given, not
/// what it is.
#[derive(Args)]
#[group(multiple = false)]
pub(super) struct AadArgs {
    /// AAD as UTF-8 text.
    #[arg(long)]
    pub(super) aad: Option<String>,
    /// AAD as standard base64.
    #[arg(long)]
    aad_base64: Option<String>,
    /// AAD from a file (raw bytes).
    #[arg(long)]
    pub(super) aad_file: Option<PathBuf>,
}

/// Why a key use happens: `--justification CODE [--reference TEXT]`.
#[derive(Debug, Clone, Args)]
pub(super) struct JustificationArgs {
    /// Justification code from the server's access policy (e.g. treatment, emergency,
    /// research-pseudonymised); access rules may require one.
    #[arg(long)]
    pub(super) justification: Option<String>,
    /// Reference for the justification: a ticket or case number (at most 256 bytes).
    #[arg(long, requires = "justification")]
    pub(super) reference: Option<String>,
}

impl JustificationArgs {
    /// The request field.
    pub(super) fn to_proto(&self) -> Option<crate::proto::Justification> {
        self.justification
            .as_ref()
            .map(|code| crate::proto::Justification {
                code: code.clone(),
                reference: self.reference.clone().unwrap_or_default(),
            })
    }
}

impl std::fmt::Debug for AadArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("AadArgs")
            .field("aad", &redacted(&self.aad))
            .field("aad_base64", &redacted(&self.aad_base64))
            .field("aad_file", &self.aad_file)
            .finish()
    }
}

pub(super) fn read_input(path: &Path) -> Result<Vec<u8>, Failure> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| {
            Failure::input(
                format!("cannot read standard input: {e}"),
                "pipe the data in, or use --in FILE",
            )
        })?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| {
        Failure::input(
            format!("cannot read {}: {e}", path.display()),
            "check the path given to --in",
        )
    })
}

pub(super) fn decode_base64(what: &str, text: &str) -> Result<Vec<u8>, Failure> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| {
            Failure::input(
                format!("{what} is not standard base64: {e}"),
                "encode with `base64 -w0`, or pass a file with --in",
            )
        })
}

pub(super) fn input(
    file: Option<&Path>,
    b64: Option<&str>,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    match (file, b64) {
        (Some(p), _) => read_input(p),
        (None, Some(t)) => decode_base64(what, t),
        (None, None) => Err(Failure::new(
            Exit::Usage,
            format!("no {what} given"),
            format!("use --in FILE (or - for standard input) or --{what}-base64"),
        )),
    }
}

pub(super) fn aad(args: &AadArgs) -> Result<Vec<u8>, Failure> {
    match (&args.aad, &args.aad_base64, &args.aad_file) {
        (Some(t), _, _) => Ok(t.as_bytes().to_vec()),
        (_, Some(b), _) => decode_base64("--aad-base64", b),
        (_, _, Some(p)) => std::fs::read(p).map_err(|e| {
            Failure::input(
                format!("cannot read {}: {e}", p.display()),
                "check the path given to --aad-file",
            )
        }),
        _ => Ok(Vec::new()),
    }
}

/// Writes a result file; `secret` files are mode 0600, also when the file already existed
/// (`mode` applies only to files the call creates).
pub(super) fn write_output(path: &Path, data: &[u8], secret: bool) -> Result<(), Failure> {
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| {
            if secret {
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(data)
        })
        .map_err(|e| {
            Failure::new(
                Exit::Other,
                format!("cannot write {}: {e}", path.display()),
                "check the path given to --out",
            )
        })
}

/// Asks the user to type `expected` before a destructive step; refuses without a terminal.
pub(super) fn confirm(what: &str, expected: &str) -> Result<(), Failure> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            Exit::Usage,
            format!("{what} needs confirmation"),
            "run it in a terminal, or pass --yes",
        ));
    }
    eprint!("{what}\nType {expected} to confirm: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).map_err(|e| {
        Failure::new(
            Exit::Other,
            format!("cannot read the confirmation: {e}"),
            "pass --yes",
        )
    })?;
    if answer.trim() == expected {
        Ok(())
    } else {
        Err(Failure::new(
            Exit::Other,
            "not confirmed; nothing was changed",
            "type the exact text, or pass --yes",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn secret_output_is_private_even_over_an_existing_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.bin");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_output(&path, b"secret", true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }
}
