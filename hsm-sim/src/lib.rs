//! hsm-sim: a PKCS#11 module that behaves like a network HSM, with fault injection.
//!
//! Placeholder until the hsm-sim issue: the crate exists so the workspace has its final shape.
//! It exports nothing yet.
