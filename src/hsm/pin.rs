//! The token PIN: where it comes from, and the type that holds it.
//!
//! Owns reading the PIN from a file or an environment variable. The PIN never comes from a
//! configuration file's own text, is never printed by `Debug`, and is zeroized when dropped.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

/// Where to read the PIN from. Holds only the location, so it may be printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose whole content (one trailing newline removed) is the PIN.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

/// Why the PIN could not be read. Never contains the PIN.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinError {
    /// The PIN file could not be read.
    #[error("cannot read PIN file {path}: {source}")]
    File {
        /// The file named in the configuration.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Anyone on the machine could read the PIN file.
    #[error("PIN file {0} is readable by every user; run: chmod 600 {0}")]
    WorldReadable(PathBuf),
    /// The environment variable is not set or not UTF-8.
    #[error("environment variable {0} with the PIN is not set (or not UTF-8)")]
    EnvMissing(String),
    /// The source held an empty PIN.
    #[error("the PIN from {0} is empty")]
    Empty(String),
}

/// A token PIN. `Debug` prints `Pin(<redacted>)`; the memory is zeroized on drop.
pub struct Pin(AuthPin);

impl Pin {
    /// Wraps a PIN given by a caller (tests, `tresor dev`).
    pub fn new(pin: String) -> Self {
        Self(AuthPin::from(pin))
    }

    pub(crate) fn auth(&self) -> &AuthPin {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

impl PinSource {
    /// Reads the PIN. A file readable by every user is refused, because a PIN in such a file
    /// is not a secret.
    pub fn read(&self) -> Result<Pin, PinError> {
        let (text, from) = match self {
            Self::File(path) => {
                let file_err = |source| PinError::File {
                    path: path.clone(),
                    source,
                };
                let meta = std::fs::metadata(path).map_err(file_err)?;
                if meta.permissions().mode() & 0o004 != 0 {
                    return Err(PinError::WorldReadable(path.clone()));
                }
                if meta.permissions().mode() & 0o040 != 0 {
                    tracing::warn!(path = %path.display(), "PIN file is readable by its group");
                }
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(file_err)?);
                (text, path.display().to_string())
            }
            Self::Env(var) => {
                let text = std::env::var(var).map_err(|_| PinError::EnvMissing(var.clone()))?;
                (Zeroizing::new(text), format!("${var}"))
            }
        };
        let pin = text.strip_suffix('\n').unwrap_or(&text);
        let pin = pin.strip_suffix('\r').unwrap_or(pin);
        if pin.is_empty() {
            return Err(PinError::Empty(from));
        }
        Ok(Pin::new(pin.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pin_debug_is_redacted() {
        let pin = Pin::new("123456-very-secret".into());
        assert_eq!(format!("{pin:?}"), "Pin(<redacted>)");
        assert_eq!(format!("{pin:#?}"), "Pin(<redacted>)");
    }

    #[test]
    fn reads_pin_file_without_its_newline_and_refuses_world_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"4711-secret\r\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pin = PinSource::File(path.clone()).read().unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(pin.auth().expose_secret(), "4711-secret");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = PinSource::File(path.clone()).read().unwrap_err();
        assert!(matches!(err, PinError::WorldReadable(_)));
        assert!(err.to_string().contains("chmod 600"));
        assert!(!err.to_string().contains("4711"));
    }

    #[test]
    fn missing_and_empty_pins_are_named() {
        let err = PinSource::Env("TRESOR_TEST_NO_SUCH_PIN_VAR".into())
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("TRESOR_TEST_NO_SUCH_PIN_VAR"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            PinSource::File(path).read(),
            Err(PinError::Empty(_))
        ));
    }
}
