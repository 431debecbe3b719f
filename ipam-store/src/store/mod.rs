//! Storage engines behind one small trait, so a second engine (etcd, for HA) slots in without
//! touching the ledger, and every engine runs the same test suite (`suite`, test builds only).
//!
//! Contract: `commit` applies a batch atomically and returns only once it is durable (on disk,
//! fsynced); when it returns an error, any part of the batch may or may not have been applied,
//! and the caller must not acknowledge anything of it. `load` returns exactly what the
//! committed batches left, in any order.
//!
//! The value types ([`Op`], [`Snapshot`]) live here, below the ledger: the ledger's transitions
//! produce ops, engines store them.

use std::net::IpAddr;

use crate::{
    error::Result,
    model::{Allocation, NetworkRecord, Quarantined},
};

pub mod etcd;
#[cfg(test)]
pub(crate) mod etcd_cluster;
pub mod failing;
pub mod memory;
pub mod sled_engine;
#[cfg(test)]
pub mod suite;

/// A storage operation, applied atomically with the others of its batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Create or replace a network.
    /// (Shared with the ledger's state: the largest definition is megabytes.)
    PutNetwork(std::sync::Arc<NetworkRecord>),
    /// Delete a network by name.
    DelNetwork(String),
    /// Create or replace an allocation (keyed by `Allocation::key`).
    PutAlloc(Allocation),
    /// Delete an allocation by key.
    DelAlloc(String),
    /// Create or replace a quarantine entry.
    PutQuarantine(Quarantined),
    /// Delete a quarantine entry (network, address).
    DelQuarantine(String, IpAddr),
}

/// Everything the store holds, as plain records (export, import, load).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Networks.
    pub networks: Vec<NetworkRecord>,
    /// Allocations.
    pub allocations: Vec<Allocation>,
    /// Quarantined addresses.
    pub quarantined: Vec<Quarantined>,
    /// Last commit sequence.
    pub seq: u64,
}

/// A durable key-value home for the ledger's records.
pub trait Engine: Send + Sync + 'static {
    /// Everything stored.
    fn load(&self) -> Result<Snapshot>;
    /// What `load` returns, in two parts: first `head` gets every record but the allocations
    /// (its `allocations` empty), then `chunk` gets the allocations, in pieces, as they are
    /// read. Called only before the first commit (at start or takeover), so the parts are one
    /// point in time. The default reads everything with `load` first.
    fn load_streamed(
        &self,
        head: &mut dyn FnMut(Snapshot) -> Result<()>,
        chunk: &mut dyn FnMut(Vec<Allocation>) -> Result<()>,
    ) -> Result<()> {
        let mut snap = self.load()?;
        let allocations = std::mem::take(&mut snap.allocations);
        head(snap)?;
        chunk(allocations)
    }
    /// Applies `ops` atomically and durably, and records `seq` as the last commit sequence.
    fn commit(&self, ops: &[Op], seq: u64) -> Result<()>;
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}
