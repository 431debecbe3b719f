//! The store's error type. Each variant maps to exactly one gRPC code at the edge (`grpc.rs`);
//! messages name the offending field or the conflicting holder.

/// Everything the ledger can refuse or fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Malformed input. `field` is the request path, e.g. `network.pools[0].ranges[1]`.
    #[error("{field}: {msg}")]
    Invalid {
        /// The offending field's path.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A named network, pool or allocation does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A definition overlaps one that exists; both are named.
    #[error("{0}")]
    Overlap(String),
    /// The request conflicts with stored state (other holder, uid, manager, version).
    #[error("{0}")]
    Conflict(String),
    /// No free address left.
    #[error("{0}")]
    Exhausted(String),
    /// The disk failed; the ledger refuses further work until restarted.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl Error {
    /// An `Invalid` for `field`.
    pub fn invalid(field: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Invalid {
            field: field.into(),
            msg: msg.to_string(),
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid",
            Error::NotFound(_) => "not_found",
            Error::Overlap(_) => "overlap",
            Error::Conflict(_) => "conflict",
            Error::Exhausted(_) => "exhausted",
            Error::Storage(_) => "storage",
        }
    }
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
