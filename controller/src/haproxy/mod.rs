//! `cairn-ccm haproxy-agent`: keeps one cluster's HAProxy configured.
//!
//! - [`model`] — what to serve, from Services, Nodes, EndpointSlices (pure).
//! - [`render`] — the deterministic `haproxy.cfg` text (pure; golden-tested).
//! - [`apply`] — `haproxy -c`, atomic swap, reload, and running HAProxy itself.
//! - [`master`] — HAProxy's master CLI (`show proc`, `reload`, `show stat`).
//! - [`agent`] — flags, watches, the loop, Events, metrics and probe endpoints.
//!
//! See `docs/haproxy.md` for running it on a load-balancer host.

pub mod agent;
pub mod apply;
pub mod master;
pub mod model;
pub mod render;

pub use agent::{AgentArgs, run};
