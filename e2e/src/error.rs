//! The harness's error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while starting, using or stopping a control plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A component binary is not where the harness looks for it.
    #[error(
        "{name} not found at {}: build the test tools first with `e2e/tools/build.sh all` \
         (or `e2e/tools/build.sh {name}`), or point CAIRN_BIN_DIR at a directory that holds it",
        path.display()
    )]
    MissingBinary {
        /// Binary name, e.g. `kube-apiserver`.
        name: String,
        /// Where it was expected.
        path: PathBuf,
    },
    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An `openssl` invocation used to generate the PKI failed.
    #[error("openssl ({step}) failed with {status}: {stderr}")]
    Openssl {
        /// Which PKI step.
        step: &'static str,
        /// Exit status.
        status: String,
        /// What openssl printed on stderr.
        stderr: String,
    },
    /// A component process exited while it was expected to run.
    #[error("{component} exited unexpectedly ({status}); log {}:\n{log_tail}", log.display())]
    ComponentExited {
        /// Component name (`etcd`, `kube-apiserver`, or a name given to `ControlPlane::spawn`).
        component: String,
        /// Its exit status.
        status: String,
        /// Path of its full log.
        log: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A deadline passed while polling for a condition.
    #[error("timed out after {waited:?} waiting for {what}; last observation: {last}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long the harness waited.
        waited: Duration,
        /// The last error or observation of the poll.
        last: String,
    },
    /// The control plane did not become ready in time; the component logs are attached.
    #[error("control plane {name} not ready after {waited:?} (last observation: {last}); logs:\n{logs}")]
    StartTimeout {
        /// Control-plane name.
        name: String,
        /// How long the harness waited.
        waited: Duration,
        /// The last readiness error.
        last: String,
        /// Tails of the component logs.
        logs: String,
    },
    /// A Kubernetes API call made by the harness failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A configuration value is invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// True when a component failed because a port it was given was taken in the meantime
    /// (the harness then retries with fresh ports).
    pub fn is_port_conflict(&self) -> bool {
        matches!(self, Self::ComponentExited { log_tail, .. }
            if log_tail.contains("address already in use"))
    }
}

/// `Result` with the harness's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
