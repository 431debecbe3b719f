//! The `cairn.ipam.v1.IpamService` edge: parses requests into domain types (naming each bad
//! field, `convert.rs`), calls the ledger (`service.rs`), streams watches (`watch.rs`), and
//! maps [`Error`] to `tonic::Status` here, once — nothing else lives in this layer.

mod convert;
mod service;
mod watch;

use tonic::Status;

use crate::error::Error;

pub use service::IpamService;

/// Maps a ledger error to its one gRPC code.
pub fn status(e: Error) -> Status {
    match e {
        Error::Invalid { .. } => Status::invalid_argument(e.to_string()),
        Error::NotFound(m) => Status::not_found(m),
        Error::Overlap(m) => Status::already_exists(m),
        Error::Conflict(m) => Status::failed_precondition(m),
        Error::Exhausted(m) => Status::resource_exhausted(m),
        Error::Storage(m) => Status::unavailable(format!("storage failure: {m}")),
    }
}
