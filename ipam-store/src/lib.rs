//! `cairn-ipam`: the durable, conflict-free IP ledger behind `cairn.ipam.v1.IpamService`.
//!
//! Layers, data flowing one way: [`alloc`] (pure address math and the free-range set) →
//! [`ledger`] (the store's invariants on top of it, made durable through a [`store::Engine`]
//! with group commit) → [`grpc`] (request parsing and error mapping only) → [`server`].
#![forbid(unsafe_code)]

pub mod alloc;
pub mod auth;
pub mod cli;
pub mod error;
pub mod grpc;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod server;
pub mod store;
pub mod tls;

pub use error::{Error, Result};
