//! Tresor: sovereign key custody in front of PKCS#11 HSMs.
//!
//! One custody core, sibling front-ends, one composition root; dependencies point down only
//! (ARCHITECTURE.md in the repository describes each part and the request paths):
//!
//! - [`server`]: the composition root of `tresor serve`. [`cli`]: the binary's commands.
//!   [`client`]: the typed gRPC client, on [`proto`] and the pure modules only.
//! - Front-ends, never importing each other: [`grpc`], [`xks`]; all listen through
//!   [`listener`].
//! - [`auth`]: who is calling and what they may do; its [`auth::Grant`] is required by every
//!   custody operation.
//! - [`custody`]: key lifecycle, wrap/unwrap, approvals, schedule, reconciliation; talks to
//!   the HSM and the store only through their interfaces and hands neither out. [`audit`]: the
//!   tamper-evident log.
//! - [`hsm`]: every PKCS#11 call. [`store`]: every SQL statement. [`envelope`]: the blob
//!   format, pure. [`audit_record`]: the audit record format, pure. [`model`]: names and
//!   states, pure. [`config`]: `tresor serve`'s configuration.

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
pub mod kmip;
pub(crate) mod listener;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod proto;
pub mod refusal_log;
pub mod server;
pub mod store;
mod sync;
pub mod xks;
