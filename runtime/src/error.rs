//! Errors of the runtime crate. Each names the flag or field and the value it is about.

use std::net::SocketAddr;

/// Failures of the probe server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound (in use, not local, no permission).
    #[error("binding {flag} {addr}")]
    Bind {
        /// The flag the address came from, e.g. `--metrics-listen`.
        flag: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// A value that is not valid for its field; `message` says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidValue {
    /// The flag or request field, e.g. `--cluster-id` or `allocation.owner.cluster_id`.
    pub field: String,
    /// What is wrong, quoting the value.
    pub message: String,
}

/// A duration flag value outside the grammar of [`crate::duration`]. (clap adds the flag's
/// name when it reports this.)
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: {reason}")]
pub struct InvalidDuration {
    /// The value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}
