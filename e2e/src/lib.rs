//! A real Kubernetes control plane on loopback — etcd + kube-apiserver built from the Go module
//! proxy by `e2e/tools/build.sh` — for Cairn's controller tests, `make demo` and CI.
//!
//! ```no_run
//! # async fn demo() -> cairn_e2e::Result<()> {
//! use cairn_e2e::ControlPlane;
//! let cp = ControlPlane::start().await?;          // waits for /readyz
//! let client = cp.client()?;                     // admin (system:masters) kube::Client
//! let kubeconfig = cp.kubeconfig_path();         // for kubectl / `cairn-ccm --kubeconfig`
//! let token = cp.service_account_token("ns", "sa").await?;
//! # let _ = (client, kubeconfig, token);
//! # Ok(()) }
//! ```
//!
//! Each [`ControlPlane`] owns a temp dir (PKI, etcd data, logs, kubeconfig), free loopback
//! ports and two processes. Dropping it — also during a panic — kills their process groups,
//! reaps them and removes the dir; a panicking drop prints the log tails first. Children also
//! carry a parent-death signal, so a killed test binary leaves no orphans. See e2e/README.md.
#![forbid(unsafe_code)]

mod binaries;
mod error;
mod limit;
pub mod netns;
mod pki;
mod plane;
mod ports;
mod process;
mod wait;

pub use binaries::{bin_dir, binary_path, workspace_root};
pub use error::{Error, Result};
pub use limit::max_planes;
pub use plane::{ADMIN_USER, ControlPlane, DEFAULT_SERVICE_CIDRS, Options, ProcessInfo};
pub use process::{parent_death_signal_available, process_alive};
pub use wait::eventually;
