//! Fault injection, driven at run time through the control file named in the configuration.
//!
//! The module re-reads the file when its modification time changes (checked at most every
//! 20 ms), so tests and operators change faults by rewriting it:
//!
//! ```toml
//! latency_ms = 20          # added to every call (models an HSM in another data centre)
//! latency_jitter_ms = 5    # plus a random 0..=jitter ms
//! unplugged = false        # true: the token is gone (CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT);
//!                          # every session is lost and the user logged out
//! device_error_rate = 0.0  # probability that a call fails with CKR_DEVICE_ERROR
//! lose_sessions = 0        # raise by one to invalidate every open session once
//!                          # (CKR_SESSION_HANDLE_INVALID; the user is logged out)
//! stick_message_finals = 0 # raise by one: the next close of a message-based operation fails
//!                          # (CKR_DEVICE_ERROR) and leaves the operation open
//! count_calls_to = "calls.txt"  # write the number of PKCS#11 calls so far to this file
//!                          # (at most every 100 ms, from within a call)
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One state of the control file. Missing keys take their defaults (no faults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fixed latency per call, in milliseconds.
    pub latency_ms: u64,
    /// Random extra latency per call, 0 to this many milliseconds.
    pub latency_jitter_ms: u64,
    /// The token is unplugged.
    pub unplugged: bool,
    /// Probability (0.0 to 1.0) that a call fails with `CKR_DEVICE_ERROR`.
    pub device_error_rate: f64,
    /// A counter; each increase invalidates every open session once.
    pub lose_sessions: u64,
    /// A counter; each increase makes the next close of a message-based operation
    /// (`C_MessageEncryptFinal`, `C_MessageDecryptFinal`) fail with `CKR_DEVICE_ERROR` and
    /// leave the operation open, as a token whose answer was lost would.
    pub stick_message_finals: u64,
    /// Where to write the number of PKCS#11 calls made so far (benchmarks: calls per Wrap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_calls_to: Option<std::path::PathBuf>,
}

impl Faults {
    /// Writes the control file atomically (write, then rename), so the module never reads half
    /// a file.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads a control file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }
}
