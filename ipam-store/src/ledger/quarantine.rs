//! Released addresses in their reuse grace period (invariant 5).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use crate::model::Quarantined;

/// Released addresses in their reuse grace period, indexed by address, by expiry (to reap in
/// order) and by previous owner (so an owner's own address is found in O(log n), not by a
/// scan: a busy network can hold tens of thousands).
#[derive(Clone, Debug, Default)]
pub(super) struct Quarantine {
    by_addr: BTreeMap<IpAddr, Quarantined>,
    expiry: BTreeSet<(u64, IpAddr)>,
    by_owner: HashMap<String, BTreeSet<IpAddr>>,
}

impl Quarantine {
    pub(super) fn insert(&mut self, q: Quarantined) {
        self.remove(&q.address);
        self.expiry.insert((q.until_ms, q.address));
        self.by_owner
            .entry(q.previous_owner.key(&q.network))
            .or_default()
            .insert(q.address);
        self.by_addr.insert(q.address, q);
    }

    pub(super) fn remove(&mut self, ip: &IpAddr) -> Option<Quarantined> {
        let q = self.by_addr.remove(ip)?;
        self.expiry.remove(&(q.until_ms, *ip));
        let k = q.previous_owner.key(&q.network);
        if let Some(set) = self.by_owner.get_mut(&k) {
            set.remove(ip);
            if set.is_empty() {
                self.by_owner.remove(&k);
            }
        }
        Some(q)
    }

    /// Removes and returns the earliest entry whose grace ended by `now_ms`.
    pub(super) fn pop_expired(&mut self, now_ms: u64) -> Option<Quarantined> {
        let &(until, ip) = self.expiry.first()?;
        if until > now_ms {
            return None;
        }
        self.remove(&ip)
    }

    /// Entries whose address lies in `r`, in address order.
    pub(super) fn in_range(&self, r: std::ops::RangeInclusive<IpAddr>) -> impl Iterator<Item = &Quarantined> {
        self.by_addr.range(r).map(|(_, q)| q)
    }

    pub(super) fn get(&self, ip: &IpAddr) -> Option<&Quarantined> {
        self.by_addr.get(ip)
    }

    /// Addresses the owner with allocation key `key` released.
    pub(super) fn released_by(&self, key: &str) -> impl Iterator<Item = &IpAddr> {
        self.by_owner.get(key).into_iter().flatten()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &IpAddr> {
        self.by_addr.keys()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Quarantined> {
        self.by_addr.values()
    }
}
