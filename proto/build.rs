//! Compiles the Cairn API with tonic-prost-build and writes the descriptor set that the
//! server's reflection service publishes.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=cairn/ipam/v1/ipam.proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("cairn_ipam_v1_descriptor.bin"))
        .compile_protos(&["cairn/ipam/v1/ipam.proto"], &["."])?;
    Ok(())
}
