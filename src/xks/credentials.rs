//! SigV4 credentials of one XKS path prefix: read from a file of their own (mode 0600), each
//! secret in that file or in an environment variable, and re-read on SIGHUP.
//!
//! Owns the file format and its checks. A file that fails them is refused whole; on reload
//! the credentials in force stay.
//!
//! ```toml
//! [[credential]]
//! access_key_id = "AKIA2XKSUKSHEXAMPLE01"        # 20-30 of A-Z and 2-7 (the spec's rule)
//! secret_access_key = "…43-64 Base64 characters…"
//! [[credential]]                                   # a second pair, during rotation
//! access_key_id = "AKIA2XKSUKSHEXAMPLE02"
//! secret_env = "TRESOR_XKS_SECRET_2"               # or the secret from the environment
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use super::sigv4::Credential;
use crate::sync::{read, write};

/// At most this many pairs live at once (two for a rotation, with room for a mistake).
pub const MAX_CREDENTIALS: usize = 2;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    credential: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    access_key_id: String,
    secret_access_key: Option<String>,
    secret_env: Option<String>,
}

/// Why a credentials file was refused. Never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct CredentialsError {
    /// The file.
    pub path: String,
    /// What is wrong, and how to fix it.
    pub problem: String,
}

/// The credentials in force for one prefix.
#[derive(Debug)]
pub struct SharedCredentials {
    path: PathBuf,
    current: RwLock<Arc<Vec<Credential>>>,
}

impl SharedCredentials {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        Ok(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(read_file(path)?)),
        })
    }

    /// The credentials in force.
    pub fn current(&self) -> Arc<Vec<Credential>> {
        Arc::clone(&read(&self.current))
    }

    /// Re-reads the file; on error the credentials in force stay. Returns how many are live.
    pub fn reload(&self) -> Result<usize, CredentialsError> {
        let fresh = read_file(&self.path)?;
        let n = fresh.len();
        *write(&self.current) = Arc::new(fresh);
        Ok(n)
    }
}

fn read_file(path: &Path) -> Result<Vec<Credential>, CredentialsError> {
    let err = |problem: String| CredentialsError {
        path: path.display().to_string(),
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(err(
            "holds secrets but is readable by group or others; chmod 600 it".into(),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    // The parser's message may quote a line of the file, which may be a secret: not shown.
    let file: File = toml::from_str(&text).map_err(|_| {
        err("not a credentials file: [[credential]] entries with access_key_id and secret_access_key or secret_env".into())
    })?;
    if file.credential.is_empty() || file.credential.len() > MAX_CREDENTIALS {
        return Err(err(format!(
            "has {} credentials; 1 to {MAX_CREDENTIALS} (two while rotating)",
            file.credential.len()
        )));
    }
    let mut out: Vec<Credential> = Vec::with_capacity(file.credential.len());
    for entry in file.credential {
        let id = &entry.access_key_id;
        if !(20..=30).contains(&id.len())
            || !id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        {
            return Err(err(format!(
                "access_key_id {id:?} must be 20 to 30 of A-Z and 2-7"
            )));
        }
        if out.iter().any(|c| &c.access_key_id == id) {
            return Err(err(format!("access_key_id {id:?} appears twice")));
        }
        let secret = match (entry.secret_access_key, entry.secret_env) {
            (Some(s), None) => s,
            (None, Some(var)) => std::env::var(&var).map_err(|_| {
                err(format!(
                    "secret_env {var:?} of {id:?} is not set in the environment"
                ))
            })?,
            _ => {
                return Err(err(format!(
                    "{id:?} needs exactly one of secret_access_key and secret_env"
                )));
            }
        };
        if !(43..=64).contains(&secret.len())
            || !secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
        {
            return Err(err(format!(
                "the secret of {id:?} must be 43 to 64 of A-Z a-z 0-9 + / = (e.g. openssl rand -base64 32)"
            )));
        }
        out.push(Credential::new(id.clone(), secret));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "FYtE5EFA5FT0mCc3DrGUe2sti527BitkQ0Zr9MO9fvE";

    fn write_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        let path = dir.join("xks.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn files_are_checked_and_a_broken_reload_keeps_the_credentials_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let good = format!(
            "[[credential]]\naccess_key_id = \"AKIAI2SFODNN7EXAMPLE\"\nsecret_access_key = \"{SECRET}\"\n"
        );
        let path = write_file(dir.path(), &good, 0o600);
        let shared = SharedCredentials::load(&path).unwrap();
        assert_eq!(shared.current()[0].access_key_id, "AKIAI2SFODNN7EXAMPLE");

        for (text, mode, says) in [
            (good.clone(), 0o644, "chmod 600"),
            (
                good.replace("AKIAI2SFODNN7EXAMPLE", "akia-lower"),
                0o600,
                "A-Z and 2-7",
            ),
            (good.replace(SECRET, "short"), 0o600, "43 to 64"),
            (format!("{good}{good}"), 0o600, "appears twice"),
            ("nonsense = [".into(), 0o600, "not a credentials file"),
        ] {
            write_file(dir.path(), &text, mode);
            let e = shared.reload().unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains(SECRET), "{e}");
            assert_eq!(shared.current().len(), 1);
        }

        let two = format!(
            "{good}[[credential]]\naccess_key_id = \"AKIAI2SFODNN7EXAMPL2\"\nsecret_env = \"TRESOR_TEST_XKS_SECRET_UNSET\"\n"
        );
        write_file(dir.path(), &two, 0o600);
        assert!(shared.reload().unwrap_err().to_string().contains("not set"));
    }
}
