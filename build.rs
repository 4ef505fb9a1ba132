//! Generates the gRPC code from `proto/` with the protoc that `protoc-bin-vendored` ships, so
//! no system protoc is needed.

const SECRET_MESSAGES: &[&str] = &[
    "WrapRequest",
    "UnwrapRequest",
    "UnwrapResponse",
    "GenerateDataKeyRequest",
    "GenerateDataKeyResponse",
    "RewrapRequest",
    "ComputeAadHmacRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Messages that carry plaintext, a data key or AAD: src/proto.rs gives them a `Debug` that
    // prints sizes only. Keep this list and that one the same.
    config.skip_debug(SECRET_MESSAGES.iter().map(|m| format!(".tresor.v1.{m}")));
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tresor_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/tresor/v1/tresor.proto"],
            &[
                "proto",
                well_known.to_str().ok_or("non-UTF-8 include path")?,
            ],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
