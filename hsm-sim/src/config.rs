//! hsm-sim's configuration file, named by the `HSM_SIM_CONF` environment variable and read at
//! `C_Initialize` (as SoftHSM reads `SOFTHSM2_CONF`).
//!
//! ```toml
//! state_file = "state.json"      # token objects persist here (atomic writes, mode 0600)
//! control_file = "control.toml"  # optional: fault injection, see `control`
//!
//! [[token]]                      # created on first start, one slot each, in this order
//! label = "tresor-dev"
//! so_pin_file = "so.pin"
//! user_pin_file = "user.pin"
//! ```
//!
//! Relative paths are relative to the configuration file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The environment variable that names the configuration file.
pub const CONF_ENV: &str = "HSM_SIM_CONF";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Where token objects and PIN hashes persist.
    pub state_file: PathBuf,
    /// Fault-injection settings, re-read while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_file: Option<PathBuf>,
    /// Tokens to create when the state file does not have them yet.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenDecl>,
}

/// A token to create on first start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDecl {
    /// Token label (at most 32 bytes).
    pub label: String,
    /// File holding the security officer's PIN.
    pub so_pin_file: PathBuf,
    /// File holding the user PIN.
    pub user_pin_file: PathBuf,
}

impl SimConfig {
    /// Reads a configuration file and resolves its relative paths.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c: SimConfig =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.state_file = base.join(&c.state_file);
        c.control_file = c.control_file.map(|f| base.join(f));
        for t in &mut c.tokens {
            t.so_pin_file = base.join(&t.so_pin_file);
            t.user_pin_file = base.join(&t.user_pin_file);
            if t.label.is_empty() || t.label.len() > 32 {
                return Err(format!(
                    "{}: token label {:?} must be 1 to 32 bytes",
                    path.display(),
                    t.label
                ));
            }
        }
        Ok(c)
    }

    /// Writes the configuration as TOML.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
    }
}
