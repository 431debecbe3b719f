//! Process plumbing shared by `cairn-ipam` and `cairn-ccm` (controller and HAProxy agent).
//!
//! Contract: everything here is about the process, not the domain. No module knows about
//! Kubernetes, the ledger or HAProxy; the binaries hand in what differs (a metrics text, a
//! readiness answer) and get the same behaviour everywhere:
//!
//! - [`logging`] — `--log-format human|json` and the one subscriber set-up (stderr, `RUST_LOG`).
//! - [`signal`] — a future that resolves on SIGTERM or SIGINT.
//! - [`probes`] — one HTTP listener serving `/metrics`, `/healthz`, `/readyz`.
//! - [`metrics`] — a Prometheus registry that registers and renders in one place.
//! - [`duration`] — the one grammar of duration flags (`500ms`, `30s`, `5m`, `1h`, `30`).
//! - [`cluster_id`] — what a cluster id may be, checked the same way by the store and controller.
#![forbid(unsafe_code)]

pub mod cluster_id;
pub mod duration;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod probes;
pub mod signal;

pub use cluster_id::check_cluster_id;
pub use duration::parse_duration;
pub use error::{Error, InvalidDuration, InvalidValue};
pub use logging::LogFormat;
pub use metrics::MetricsRegistry;
pub use probes::{Endpoints, ProbeServer, Status};
pub use signal::shutdown_signal;
