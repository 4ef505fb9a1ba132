//! The generated protobuf and gRPC code for `tresor.v1` (`proto/tresor/v1/tresor.proto`),
//! shared by the gRPC front-end ([`crate::grpc`]) and the client ([`crate::client`]).
//!
//! Messages that carry plaintext, data keys or AAD get a `Debug` that prints their size only
//! (`build.rs` lists them), so a `{:?}` of a request or response never shows a secret.

#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
mod generated {
    tonic::include_proto!("tresor.v1");
}
pub use generated::*;

/// The encoded descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tresor_descriptor");

/// Largest message accepted either way: 64 KiB of plaintext or ciphertext plus 64 KiB of AAD,
/// plus framing.
pub const MAX_MESSAGE_BYTES: usize = 2 * 64 * 1024 + 4096;

/// `Debug` for a message that carries secrets: its non-secret fields, and only the length of
/// each secret one.
macro_rules! redacted_debug {
    ($($message:ident { shown: [$($shown:ident),*], secret: [$($secret:ident),*] })*) => {$(
        impl std::fmt::Debug for $message {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($message))
                    $(.field(stringify!($shown), &self.$shown))*
                    $(.field(stringify!($secret), &Redacted(self.$secret.len())))*
                    .finish()
            }
        }
    )*};
}

struct Redacted(usize);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes redacted>", self.0)
    }
}

redacted_debug! {
    WrapRequest { shown: [key], secret: [plaintext, aad] }
    UnwrapRequest { shown: [key, ciphertext], secret: [aad] }
    UnwrapResponse { shown: [key_version], secret: [plaintext] }
    GenerateDataKeyRequest { shown: [key, length_bytes, without_plaintext], secret: [aad] }
    GenerateDataKeyResponse { shown: [key_version, ciphertext], secret: [plaintext] }
    RewrapRequest { shown: [key, ciphertext], secret: [aad] }
    ComputeAadHmacRequest { shown: [], secret: [aad] }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"patient-secret-7f3a";

    fn shows_no_secret(debug: String) {
        let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
        let decimal = format!("{:?}", SECRET);
        let inner = &decimal[1..decimal.len() - 1];
        assert!(!debug.contains("patient-secret"), "{debug}");
        assert!(!debug.contains(&hex), "{debug}");
        assert!(!debug.contains(inner), "{debug}");
        assert!(debug.contains("bytes redacted"), "{debug}");
    }

    #[test]
    fn debug_of_a_message_with_plaintext_or_aad_prints_no_secret() {
        let s = SECRET.to_vec();
        shows_no_secret(format!(
            "{:?}",
            WrapRequest {
                justification: None,
                key: "k".into(),
                plaintext: s.clone(),
                aad: s.clone()
            }
        ));
        shows_no_secret(format!(
            "{:?}",
            UnwrapRequest {
                justification: None,
                ciphertext: vec![1],
                aad: s.clone(),
                key: String::new()
            }
        ));
        shows_no_secret(format!(
            "{:?}",
            UnwrapResponse {
                plaintext: s.clone(),
                key_version: "v".into()
            }
        ));
        shows_no_secret(format!(
            "{:?}",
            GenerateDataKeyRequest {
                justification: None,
                key: "k".into(),
                aad: s.clone(),
                length_bytes: 32,
                without_plaintext: false
            }
        ));
        shows_no_secret(format!(
            "{:?}",
            GenerateDataKeyResponse {
                plaintext: s.clone(),
                ciphertext: vec![1],
                key_version: "v".into()
            }
        ));
        shows_no_secret(format!(
            "{:?}",
            RewrapRequest {
                justification: None,
                ciphertext: vec![1],
                aad: s.clone(),
                key: String::new()
            }
        ));
        shows_no_secret(format!("{:?}", ComputeAadHmacRequest { aad: s.clone() }));
        // The non-secret fields are still there, for debugging.
        let d = format!(
            "{:?}",
            WrapRequest {
                justification: None,
                key: "tenants/t/keys/k".into(),
                plaintext: s.clone(),
                aad: s
            }
        );
        assert!(
            d.contains("tenants/t/keys/k") && d.contains("<19 bytes redacted>"),
            "{d}"
        );
    }
}
