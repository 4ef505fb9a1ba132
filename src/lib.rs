//! Tresor: sovereign key custody in front of PKCS#11 HSMs.
//!
//! Layers, with dependencies pointing down only (DESIGN.md "Parts"):
//!
//! - [`custody`]: key lifecycle, wrap/unwrap/rotate; talks to the HSM and the store only
//!   through their interfaces.
//! - [`hsm`]: every PKCS#11 call. [`store`]: every SQL statement. [`envelope`]: the blob
//!   format, pure. [`model`]: names and states, pure.

pub mod auth;
pub mod custody;
pub mod envelope;
pub mod hsm;
pub mod model;
pub mod pki;
pub mod store;
