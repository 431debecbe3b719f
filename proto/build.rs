//! Compiles the Cairn API with tonic-prost-build, writes the descriptor set that the server's
//! reflection service publishes, and generates proto3-JSON serde impls (pbjson) so the CLI,
//! backups and grpcurl all speak the same JSON.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor = out.join("cairn_ipam_v1_descriptor.bin");
    println!("cargo:rerun-if-changed=cairn/ipam/v1/ipam.proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&["cairn/ipam/v1/ipam.proto"], &["."])?;
    let set = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".cairn.ipam.v1"])?;
    Ok(())
}
