//! `cairn-ipam`: the durable, conflict-free IP ledger behind `cairn.ipam.v1.IpamService`.
//!
//! Layers, each using only the ones before it (data flows one way):
//! 1. [`alloc`] — pure address math, the free-range set and the sharing rule; knows nothing
//!    of the rest.
//! 2. [`error`], [`model`] — the validated domain types (networks, pools, owners,
//!    allocations) and the one error enum.
//! 3. [`store`] — the [`store::Engine`] trait, its value types ([`store::Op`],
//!    [`store::Snapshot`]) and the engines (sled, in-memory, fault-injecting).
//! 4. [`ledger`] — every invariant of the store as pure transitions on an in-memory state,
//!    made durable through an engine with group commit.
//! 5. [`grpc`] — the API edge: proto ⇄ domain conversion, the service, watch streams, and the
//!    one mapping of [`Error`] to `tonic::Status`.
//! 6. [`web`] — the read-only web view and its JSON endpoints (HTML and HTTP only; reads the
//!    ledger).
//! 7. [`server`], [`metrics`], [`cli`] — wiring: listeners, probes, metrics and the web view,
//!    and the admin CLI (a gRPC client of the API).
#![forbid(unsafe_code)]

pub mod alloc;
pub mod auth;
pub mod cli;
pub mod error;
pub mod grpc;
pub mod ha;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod tls;
pub mod web;

pub use error::{Error, Result};
