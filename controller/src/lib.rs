//! `cairn-ccm`: the per-cluster controller of Cairn.
//!
//! Each reconciler lives in its own module with `reconcile` + `error_policy` and holds every
//! Kubernetes verb it uses: [`network`] (ClusterNetwork → store, status), [`service`]
//! (LoadBalancer Services → VIPs), [`node`] (cloud node initialisation), [`repair`] (orphaned
//! allocations). [`ipam`] is the store client; [`run`] wires them under leader election.
//!
//! The store is the authority: the controller never decides an address itself, it asks the
//! store (idempotently, per owner) and mirrors the answer into the cluster.
#![forbid(unsafe_code)]

pub mod context;
pub mod crd;
pub mod haproxy;
pub mod ipam;
pub mod k8s;
pub mod metrics;
pub mod network;
pub mod node;
pub mod repair;
pub mod run;
pub mod service;

use std::time::Duration;

/// Finalizer on Services that hold a VIP.
pub const SERVICE_FINALIZER: &str = "cairn.dev/vip-release";
/// Finalizer on Nodes that hold a node address.
pub const NODE_FINALIZER: &str = "cairn.dev/node-ip-release";
/// Requested VIPs (comma list, at most one per family).
pub const ANN_IPS: &str = "cairn.dev/load-balancer-ips";
/// Pool to draw from.
pub const ANN_POOL: &str = "cairn.dev/pool";
/// Sharing key.
pub const ANN_SHARING: &str = "cairn.dev/sharing-key";
/// Which ClusterNetwork (by name) a Service or Node uses, when the cluster has several.
pub const ANN_NETWORK: &str = "cairn.dev/network";
/// Result: `network/pool` the VIP came from.
pub const ANN_ALLOCATED_FROM: &str = "cairn.dev/allocated-from";
/// The taint the kubelet sets with `--cloud-provider=external`.
pub const UNINITIALIZED_TAINT: &str = "node.cloudprovider.kubernetes.io/uninitialized";
/// Owner name of a cluster's API-server VIP in the store (shared with the cloud service).
pub const API_SERVER_OWNER: &str = "kube-apiserver";
/// Field manager and event reporter.
pub const MANAGER: &str = "cairn-ccm";

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The store refused the request (permanent until something changes).
    #[error("store refused: {code:?}: {message}")]
    Store {
        /// gRPC code.
        code: tonic::Code,
        /// The store's message (names the field or the conflicting holder).
        message: String,
    },
    /// The store is unreachable or failed transiently; retried with backoff.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// A user input (annotation, spec field) is malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The annotation or field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No ClusterNetwork can serve the object.
    #[error("{0}")]
    NoNetwork(String),
    /// An object lacks a field the API always sets.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// JSON (de)serialisation.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store { .. } => "store_refused",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::Invalid { .. } => "invalid",
            Error::NoNetwork(_) => "no_network",
            Error::MissingObjectKey(_) => "missing_key",
            Error::Json(_) => "json",
        }
    }

    /// How long to wait before retrying after this error.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = match self {
            Error::StoreUnavailable(_) | Error::Kube(_) => Duration::from_millis(250),
            _ => Duration::from_secs(5),
        };
        (base * 2u32.saturating_pow(attempt.min(8))).min(Duration::from_secs(120))
    }
}

/// The controller's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
