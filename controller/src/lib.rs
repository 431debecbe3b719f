//! `cairn-ccm`: the per-cluster controller of Cairn.
//!
//! Each reconciler lives in its own module with `reconcile` + `error_policy` and holds every
//! Kubernetes verb it uses: [`network`] (ClusterNetwork → store, status), [`service`]
//! (LoadBalancer Services → VIPs), [`node`] (cloud node initialisation), [`repair`] (orphaned
//! allocations). [`conflict`] asks the network whether a host already answers for a Service's
//! new VIP (over [`probe`]) before the reconciler publishes it. [`svc`] reads Services for the reconciler, repair and the HAProxy model.
//! [`ipam`] is the store client and the one place that decodes the store's refusals into
//! [`StoreRefusal`]; [`run`] wires them under leader election.
//!
//! The store is the authority: the controller never decides an address itself, it asks the
//! store (idempotently, per owner) and mirrors the answer into the cluster.
#![forbid(unsafe_code)]

pub mod conflict;
pub mod context;
pub mod crd;
pub mod haproxy;
pub mod ipam;
pub mod k8s;
pub mod metrics;
pub mod network;
pub mod node;
pub mod policy;
pub mod probe;
pub mod repair;
pub mod run;
pub mod service;
pub mod svc;

use std::time::Duration;

pub use ipam::StoreRefusal;

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
/// Field manager of every write the controller makes (server-side apply, and the JSON patches
/// that remove fields it does not own), and the event reporter.
pub const MANAGER: &str = "cairn-ccm";

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The store refused the request (permanent until something changes).
    #[error("store refused: {0}")]
    Store(StoreRefusal),
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
    /// A pool policy (`spec.policies` of the ClusterNetwork) does not admit the Service.
    #[error("{0}")]
    Policy(String),
    /// An object lacks a field the API always sets.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// JSON (de)serialisation.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// A conflict probe could not run (no such interface, no CAP_NET_RAW); the address is
    /// not published until one does.
    #[error("{0}")]
    Probe(String),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(_) => "store_refused",
            Error::StoreUnavailable(_) => "store_unavailable",
            Error::Invalid { .. } => "invalid",
            Error::NoNetwork(_) => "no_network",
            Error::Policy(_) => "policy",
            Error::MissingObjectKey(_) => "missing_key",
            Error::Json(_) => "json",
            Error::Probe(_) => "probe",
        }
    }

    /// The longest wait before retry number `attempt` (1-based) after this error: doubles per
    /// attempt from a base, up to a cap. Transient failures (store or API server) start short
    /// and stay under half a minute so an outage's end is noticed soon; refusals that need a
    /// change start at seconds.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let (base, cap) = match self {
            Error::StoreUnavailable(_) | Error::Kube(_) => {
                (Duration::from_millis(250), Duration::from_secs(30))
            }
            _ => (Duration::from_secs(5), Duration::from_secs(120)),
        };
        base.saturating_mul(2u32.saturating_pow(attempt.min(16))).min(cap)
    }

    /// How long to wait before retry number `attempt`: a random point in the upper half of
    /// [`Error::backoff_ceiling`], so objects that failed together do not retry together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// The controller's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        let transient = Error::StoreUnavailable("down".into());
        let refused = Error::Store(StoreRefusal::Exhausted("full".into()));
        let ceilings: Vec<_> = (1..=12).map(|a| transient.backoff_ceiling(a)).collect();
        assert_eq!(ceilings[0], Duration::from_millis(500));
        assert!(ceilings.windows(2).all(|w| w[1] >= w[0]), "{ceilings:?}");
        assert_eq!(ceilings[1], 2 * ceilings[0]);
        assert_eq!(*ceilings.last().unwrap(), Duration::from_secs(30));
        assert_eq!(refused.backoff_ceiling(1), Duration::from_secs(10));
        assert_eq!(refused.backoff_ceiling(u32::MAX), Duration::from_secs(120));
    }

    #[test]
    fn backoff_is_jittered_within_the_upper_half() {
        let e = Error::StoreUnavailable("down".into());
        for attempt in [1, 3, 20] {
            let ceiling = e.backoff_ceiling(attempt);
            let waits: Vec<_> = (0..200).map(|_| e.backoff(attempt)).collect();
            assert!(
                waits.iter().all(|w| *w >= ceiling / 2 && *w <= ceiling),
                "attempt {attempt}: {waits:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            assert!(
                waits.iter().any(|w| *w != waits[0]),
                "attempt {attempt}: no jitter in {waits:?}"
            );
        }
    }
}
