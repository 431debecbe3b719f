//! The `cairn.ipam.v1` API: messages (with proto3-JSON serde impls), the `IpamService` client
//! and server, and the encoded file descriptor set for gRPC server reflection. Generated at
//! build time from `proto/cairn/ipam/v1/ipam.proto`, which documents every field and error.
#![forbid(unsafe_code)]

/// `cairn.ipam.v1`.
#[allow(
    clippy::all,
    clippy::uninlined_format_args,
    unreachable_pub,
    missing_docs,
    rust_2018_idioms
)]
pub mod v1 {
    tonic::include_proto!("cairn.ipam.v1");
    include!(concat!(env!("OUT_DIR"), "/cairn.ipam.v1.serde.rs"));

    /// Encoded `FileDescriptorSet` of the API, for `tonic-reflection`.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cairn_ipam_v1_descriptor");
}

pub mod tls;

pub use pbjson_types::Timestamp;

/// Largest gRPC message the server and Cairn's clients send or accept (both directions), set
/// explicitly everywhere instead of tonic's 4 MiB receive default; documented in the proto.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
pub use v1::*;
