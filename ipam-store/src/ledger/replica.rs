//! Following another writer: the state a follower replica keeps by applying, in commit
//! order, the storage ops the leader committed (read back from the shared engine, e.g. an
//! etcd watch), so it can serve reads and watches without loading the store again.
//!
//! Contract: starting from the state the leader had (both loaded from the same records), and
//! applying every committed batch in order, the follower's records, free space, holders,
//! quarantine, sharing index and counters equal the leader's after the same transitions
//! (checked by a model test against random transition sequences). Nothing here checks an
//! invariant: the leader did, before it committed; a record the leader could not have written
//! (an unparsable network definition) is an error, on which the follower loads afresh.
//! A batch comes as engines store it: the last op per record, in the order of those last
//! ops (an etcd watch returns a transaction's events in its operations' order). So a network
//! force-deleted and re-created in one batch arrives as a put of the network: its grace
//! entries stay in its own quarantine instead of the deleted networks' one, as after a
//! restart of the leader; either keeps the addresses from everyone until the grace ends.

use std::{collections::BTreeSet, net::IpAddr};

use super::{
    Change,
    state::{NetState, State},
};
use crate::{
    alloc::addr::Family,
    error::{Error, Result},
    model::{Allocation, NetworkRecord, Quarantined},
    store::Op,
};

impl State {
    /// Applies one committed batch (`seq` = its sequence); returns the changes watchers see.
    pub fn apply(&mut self, ops: Vec<Op>, seq: u64) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        for op in ops {
            match op {
                Op::PutNetwork(rec) => self.put_network(std::sync::Arc::unwrap_or_clone(rec))?,
                Op::DelNetwork(name) => self.del_network(&name),
                Op::PutAlloc(a) => changes.push(self.put_alloc(a)),
                Op::DelAlloc(key) => {
                    if let Some(a) = self.del_alloc(&key) {
                        changes.push(Change::Deleted(a));
                    }
                }
                Op::PutQuarantine(q) => self.put_quarantine(q),
                Op::DelQuarantine(network, ip) => self.del_quarantine(&network, &ip),
            }
        }
        self.seq = self.seq.max(seq);
        // The leader reaps expired entries itself and commits their deletion later.
        self.deferred.clear();
        Ok(changes)
    }

    fn put_network(&mut self, rec: NetworkRecord) -> Result<()> {
        let super::networks::Prepared {
            footprint,
            space,
            mut pools,
        } = super::networks::prepare(&rec.def)
            .map_err(|e| Error::Storage(format!("replicated network {:?}: {e}", rec.def.name)))?;
        let name = rec.def.name.clone();
        let old = self.networks.remove(&name);
        let (holders, quarantine) = match old {
            Some(ex) => {
                for p in &mut pools {
                    p.allocations = ex
                        .pools
                        .iter()
                        .find(|o| o.name == p.name)
                        .map_or(0, |o| o.allocations);
                }
                self.spaces.remove(&name, &ex.space);
                (ex.holders, ex.quarantine)
            }
            None => Default::default(),
        };
        let mut net = NetState {
            rec: rec.into(),
            pools,
            footprint,
            space,
            holders,
            quarantine,
            out_of_range: BTreeSet::new(),
        };
        Self::rebuild_free(&mut net, &self.allocs, &self.released);
        self.spaces.insert(&name, &net.space);
        self.networks.insert(name, net);
        Ok(())
    }

    fn del_network(&mut self, name: &str) {
        let Some(net) = self.networks.remove(name) else {
            return;
        };
        self.spaces.remove(name, &net.space);
        // As `delete_network`: its quarantine keeps the addresses from every other network.
        for q in net.quarantine.values() {
            self.released.insert(q.clone());
        }
    }

    fn put_alloc(&mut self, a: Allocation) -> Change {
        let key = a.key();
        let old = self.del_alloc(&key);
        if let Some(net) = self.networks.get_mut(&a.network) {
            let pi = net.pool(&a.pool);
            if let Some(pi) = pi {
                net.pools[pi].allocations += 1;
            }
            for ip in &a.addresses {
                net.quarantine.remove(ip);
                for p in &mut net.pools {
                    p.take(ip);
                }
                let holders = net.holders.entry(*ip).or_default();
                if holders.is_empty() {
                    if let Some(p) = net.pools.iter_mut().find(|p| p.spans(ip)) {
                        p.held[Family::of(ip).index()] += 1;
                    }
                    if !pi.is_some_and(|pi| net.pools[pi].spans(ip)) {
                        net.out_of_range.insert(*ip);
                    }
                }
                holders.push(key.clone());
            }
        }
        self.shared.add(&a);
        self.allocs.insert(key, a.clone());
        match old {
            Some(_) => Change::Modified(a),
            None => Change::Added(a),
        }
    }

    /// Removes the allocation under `key`; an address its last holder leaves goes back to
    /// free unless a quarantine entry (put in the same batch, before or after) keeps it.
    fn del_alloc(&mut self, key: &str) -> Option<Allocation> {
        let a = self.allocs.remove(key)?;
        self.shared.remove(&a);
        let released = &self.released;
        if let Some(net) = self.networks.get_mut(&a.network) {
            if let Some(pi) = net.pool(&a.pool) {
                net.pools[pi].allocations = net.pools[pi].allocations.saturating_sub(1);
            }
            for ip in &a.addresses {
                let Some(hs) = net.holders.get_mut(ip) else {
                    continue;
                };
                hs.retain(|h| h != key);
                if !hs.is_empty() {
                    continue;
                }
                net.holders.remove(ip);
                net.out_of_range.remove(ip);
                if let Some(p) = net.pools.iter_mut().find(|p| p.spans(ip)) {
                    p.held[Family::of(ip).index()] -= 1;
                }
                if net.quarantine.get(ip).is_none() && released.get(ip).is_none() {
                    for p in &mut net.pools {
                        p.give_back(ip);
                    }
                }
            }
        }
        Some(a)
    }

    fn put_quarantine(&mut self, q: Quarantined) {
        let ip = q.address;
        match self.networks.get_mut(&q.network) {
            Some(net) => {
                for p in &mut net.pools {
                    p.take(&ip);
                }
                net.quarantine.insert(q);
            }
            // Its network is gone (force-deleted): it keeps the address from every network.
            None => {
                for net in self.networks.values_mut() {
                    for p in &mut net.pools {
                        p.take(&ip);
                    }
                }
                self.released.insert(q);
            }
        }
    }

    fn del_quarantine(&mut self, network: &str, ip: &IpAddr) {
        let own = self
            .networks
            .get_mut(network)
            .and_then(|net| net.quarantine.remove(ip));
        if own.is_none() && self.released.remove(ip).is_none() {
            return;
        }
        let released = &self.released;
        for net in self.networks.values_mut() {
            if !net.holders.contains_key(ip) && net.quarantine.get(ip).is_none() && released.get(ip).is_none()
            {
                for p in &mut net.pools {
                    p.give_back(ip);
                }
            }
        }
    }
}
