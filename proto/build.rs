//! Generates the gRPC code from `tentacle/v1/*.proto` with the vendored
//! `protoc`, so building needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos: [PathBuf; 6] = [
        "tentacle/v1/script.proto".into(),
        "tentacle/v1/file.proto".into(),
        "tentacle/v1/capabilities.proto".into(),
        "tentacle/v1/tunnel.proto".into(),
        "tentacle/v1/hub.proto".into(),
        "tentacle/v1/package.proto".into(),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Tunnel bytes pass through without being copied into a Vec.
    config.bytes([".tentacle.v1.CallData.data"]);
    let include = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tentacle_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &[PathBuf::from("."), include])?;
    Ok(())
}
