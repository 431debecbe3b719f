//! What transitions take and give: parsed requests, filters, results, and the changes watchers
//! see.

use std::net::IpAddr;

use crate::{
    alloc::addr::Family,
    model::{Allocation, NetworkRecord, Owner, OwnerKind, Port, Purpose, Quarantined},
    store::Op,
};

/// A change as watchers see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A new allocation.
    Added(Allocation),
    /// An allocation whose addresses, ports or sharing key changed.
    Modified(Allocation),
    /// A released allocation.
    Deleted(Allocation),
}

impl Change {
    /// The allocation it concerns.
    pub fn allocation(&self) -> &Allocation {
        match self {
            Change::Added(a) | Change::Modified(a) | Change::Deleted(a) => a,
        }
    }
}

/// The outcome of a mutating call: its result, the ops to commit and the watch changes.
pub type Outcome<T> = (T, Vec<Op>, Vec<Change>);

/// What an Allocate call asks for, already parsed.
#[derive(Clone, Debug, Default)]
pub struct AllocateReq {
    /// Network name.
    pub network: String,
    /// The owner (validated here).
    pub owner: Option<Owner>,
    /// A pool by name.
    pub pool: Option<String>,
    /// Pool purpose when no pool is named.
    pub purpose: Option<Purpose>,
    /// Families in order.
    pub families: Vec<Family>,
    /// Families after the first are best-effort.
    pub optional_extra_families: bool,
    /// At most one per family.
    pub requested: Vec<IpAddr>,
    /// Sharing key, empty = exclusive.
    pub sharing_key: String,
    /// Ports (validated, sorted).
    pub ports: Vec<Port>,
    /// Say what would be allocated; change nothing.
    pub dry_run: bool,
}

/// Filters of ListAllocations.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Network.
    pub network: Option<String>,
    /// Pool.
    pub pool: Option<String>,
    /// Cluster.
    pub cluster_id: Option<String>,
    /// Owner kind.
    pub kind: Option<OwnerKind>,
    /// Holding this address.
    pub address: Option<IpAddr>,
    /// Owner namespace (Services).
    pub namespace: Option<String>,
    /// Owner name.
    pub name: Option<String>,
}

impl ListFilter {
    /// True when `a` passes every filter.
    pub fn matches(&self, a: &Allocation) -> bool {
        self.network.as_ref().is_none_or(|n| *n == a.network)
            && self.pool.as_ref().is_none_or(|p| *p == a.pool)
            && self.cluster_id.as_ref().is_none_or(|c| *c == a.owner.cluster_id)
            && self.kind.is_none_or(|k| k == a.owner.kind)
            && self.address.is_none_or(|ip| a.addresses.contains(&ip))
            && self.namespace.as_ref().is_none_or(|n| *n == a.owner.namespace)
            && self.name.as_ref().is_none_or(|n| *n == a.owner.name)
    }
}

/// Everything the ledger knows about one address: whose space it lies in, who holds it, and
/// whether it waits out a reuse grace.
#[derive(Clone, Debug, PartialEq)]
pub struct AddressInfo {
    /// The address (IPv4-mapped IPv6 normalised to IPv4).
    pub address: IpAddr,
    /// The network whose address space contains it.
    pub network: Option<String>,
    /// The pool of that network whose ranges contain it.
    pub pool: Option<String>,
    /// Its holders (more than one only when shared), in key order.
    pub holders: Vec<Allocation>,
    /// Its reuse-grace entry, when released recently.
    pub grace: Option<Quarantined>,
}

/// Usage of one pool and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Network.
    pub network: String,
    /// Pool.
    pub pool: String,
    /// Purpose.
    pub purpose: Purpose,
    /// Family.
    pub family: Family,
    /// Addresses in the pool.
    pub total: u128,
    /// Held.
    pub used: u128,
    /// Free now.
    pub free: u128,
    /// In their reuse grace period.
    pub quarantined: u128,
    /// Held, but outside the pool's ranges.
    pub out_of_range: u128,
    /// Held by unknown-host records (in use by a host the store never handed them to).
    pub unknown_hosts: u128,
}

/// Result of UpsertNetwork.
#[derive(Clone, Debug)]
pub struct Upserted {
    /// The record as stored (or as it would be); shared with the ledger's state.
    pub network: std::sync::Arc<NetworkRecord>,
    /// The definition differed.
    pub changed: bool,
    /// It did not exist.
    pub created: bool,
    /// Allocations left outside every range.
    pub out_of_range: Vec<Allocation>,
}
