//! hsm-sim: a PKCS#11 module that behaves like a network HSM, with fault injection.
//!
//! Built as a `cdylib` (load it like any PKCS#11 module: `libhsm_sim.so`) and an `rlib` (for its
//! configuration types). Keys never leave it: sensitive or non-extractable objects refuse
//! `CKA_VALUE`; token objects persist to the state file named in its configuration (written
//! atomically, mode 0600); session objects vanish with their session. Crypto is ring's.
//!
//! PKCS#11 3.0: `C_GetInterface` offers the 3.0 function list ("PKCS 11" 3.0), with
//! message-based AES-GCM (`C_MessageEncryptInit`/`C_EncryptMessage`/`C_MessageEncryptFinal` and
//! the decrypt twins, one message per call, caller's 12-byte IV, 128-bit tag); the other 3.0
//! functions answer `CKR_FUNCTION_NOT_SUPPORTED`. Every call is charged the configured latency,
//! so one call per message shows as one round trip.
//!
//! Mechanisms: `CKM_AES_KEY_GEN`, `CKM_AES_GCM` (96-bit IV, 128-bit tag), `CKM_GENERIC_SECRET_KEY_GEN`,
//! `CKM_SHA256_HMAC`, `CKM_EC_KEY_PAIR_GEN` (P-256), `CKM_ECDSA_SHA256`, and `C_GenerateRandom`.
//! Raw `CKM_ECDSA` (signing a caller's digest) is not offered: ring signs messages, not
//! digests, and one cryptographic library is enough. Everything else answers with the PKCS#11
//! code for "not here" (`CKR_FUNCTION_NOT_SUPPORTED`, `CKR_MECHANISM_INVALID`, …).
//!
//! `unsafe` lives only in `ffi`, the C boundary, each block with its reason.
//!
//! State file caution: it holds key material (base64, not encrypted). hsm-sim is for
//! development and tests; it is not an HSM.

pub mod config;
pub mod control;
mod ffi;
mod sim;

pub use config::{CONF_ENV, SimConfig, TokenDecl};
pub use control::Faults;

/// The file name of the module cargo builds.
pub const MODULE_FILE_NAME: &str = "libhsm_sim.so";
