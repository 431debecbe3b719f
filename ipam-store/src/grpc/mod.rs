//! The `cairn.ipam.v1.IpamService` edge: parses requests into domain types (naming each bad
//! field, `convert.rs`), calls the ledger (`service.rs`), streams watches (`watch.rs`) and
//! backups (`backup.rs`), and maps [`Error`] to `tonic::Status` here, once — nothing else
//! lives in this layer.

mod backup;
mod convert;
mod service;
mod watch;

use tonic::Status;

use crate::error::Error;

pub use service::IpamService;
pub use watch::DEFAULT_MAX_WATCHERS;

/// Longest status message sent: errors quote input, and input can be huge.
pub const MAX_MESSAGE: usize = 1024;

/// `m` cut to [`MAX_MESSAGE`] bytes (at a character boundary), saying how much was cut.
fn bounded(m: String) -> String {
    if m.len() <= MAX_MESSAGE {
        return m;
    }
    let mut end = MAX_MESSAGE;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &m[..end], m.len() - end)
}

/// Maps a ledger error to its one gRPC code, with a bounded message.
pub fn status(e: Error) -> Status {
    let m = bounded(e.to_string());
    match e {
        Error::Invalid { .. } => Status::invalid_argument(m),
        Error::NotFound(_) => Status::not_found(m),
        Error::Overlap(_) => Status::already_exists(m),
        Error::Conflict(_) => Status::failed_precondition(m),
        Error::Exhausted(_) => Status::resource_exhausted(m),
        Error::Storage(_) => Status::unavailable(m),
    }
}
