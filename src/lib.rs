//! Tresor: sovereign key custody in front of PKCS#11 HSMs.
//!
//! Layers, with dependencies pointing down only (DESIGN.md "Parts"):
//!
//! - [`cli`] and [`api`]: the binary's commands and the gRPC services; [`client`]: the typed
//!   gRPC client; [`config`]: `tresor serve`'s configuration.
//! - [`auth`]: who is calling and what they may do; its [`auth::Grant`] is required by every
//!   custody operation.
//! - [`custody`]: key lifecycle, wrap/unwrap/rotate; talks to the HSM and the store only
//!   through their interfaces.
//! - [`hsm`]: every PKCS#11 call. [`store`]: every SQL statement. [`envelope`]: the blob
//!   format, pure. [`model`]: names and states, pure.

pub mod audit;
pub mod audit_record;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod custody;
pub mod envelope;
pub mod grpc;
pub mod hsm;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod proto;
pub mod server;
pub mod store;
mod sync;
pub mod xks;
