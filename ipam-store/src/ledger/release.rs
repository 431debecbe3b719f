//! Giving addresses back: Release, the last holder leaving an address, and the reuse grace
//! (invariant 5): a released address waits in quarantine, then returns to its pool's free set.

use std::net::IpAddr;

use super::{Change, Outcome, state::State};
use crate::{
    alloc::addr::Family,
    error::{Error, Result},
    model::{Allocation, Owner, Quarantined},
    store::Op,
};

impl State {
    /// Moves expired quarantine entries of `network`, and of deleted networks, back to the
    /// free sets of the pools that span them.
    pub fn reap(&mut self, network: &str, now_ms: u64) {
        while let Some(q) = self.released.pop_expired(now_ms) {
            for net in self.networks.values_mut() {
                if !net.holders.contains_key(&q.address) && net.quarantine.get(&q.address).is_none() {
                    for p in &mut net.pools {
                        p.give_back(&q.address);
                    }
                }
            }
            self.deferred.push(Op::DelQuarantine(q.network, q.address));
        }
        let Some(net) = self.networks.get_mut(network) else {
            return;
        };
        while let Some(q) = net.quarantine.pop_expired(now_ms) {
            if !net.holders.contains_key(&q.address) {
                for p in &mut net.pools {
                    p.give_back(&q.address);
                }
            }
            self.deferred
                .push(Op::DelQuarantine(network.to_string(), q.address));
        }
    }

    /// Drops `key` as a holder of `ip`; the last holder leaving sends the address to
    /// quarantine (grace > 0) or back to free. Returns the ops.
    pub(super) fn unhold(
        &mut self,
        network: &str,
        pool: &str,
        key: &str,
        ip: &IpAddr,
        owner: &Owner,
        now_ms: u64,
    ) -> Vec<Op> {
        let grace_default = self.default_grace_secs;
        let Some(net) = self.networks.get_mut(network) else {
            return vec![];
        };
        let Some(hs) = net.holders.get_mut(ip) else {
            return vec![];
        };
        hs.retain(|h| h != key);
        if !hs.is_empty() {
            return vec![];
        }
        net.holders.remove(ip);
        net.out_of_range.remove(ip);
        if let Some(p) = net.pools.iter_mut().find(|p| p.spans(ip)) {
            p.held[Family::of(ip).index()] -= 1;
        }
        let grace = net.grace_ms(grace_default);
        if grace == 0 {
            // Back to whichever pool spans it now (none, if a shrink left it out of range).
            for p in &mut net.pools {
                p.give_back(ip);
            }
            return vec![];
        }
        // Quarantined whether or not a pool spans it now: a pool grown back over it later
        // must still wait out the grace (ARP caches know nothing of pool edits).
        let pool = net
            .pool_spanning(ip)
            .map_or_else(|| pool.to_string(), |pi| net.pools[pi].name.clone());
        let q = Quarantined {
            network: network.to_string(),
            pool,
            address: *ip,
            until_ms: now_ms + grace,
            previous_owner: owner.clone(),
        };
        net.quarantine.insert(q.clone());
        vec![Op::PutQuarantine(q)]
    }

    /// Releases the owner's allocation on `network`, if any.
    pub fn release(
        &mut self,
        network: &str,
        owner: &Owner,
        now_ms: u64,
    ) -> Result<Outcome<Option<Allocation>>> {
        owner.validate("owner")?;
        if !self.networks.contains_key(network) {
            return Err(Error::NotFound(format!("network {network:?} not found")));
        }
        let key = owner.key(network);
        let Some(a) = self.allocs.get(&key) else {
            return Ok((None, vec![], vec![]));
        };
        if !a.owner.uid.is_empty() && !owner.uid.is_empty() && a.owner.uid != owner.uid {
            return Err(Error::Conflict(format!(
                "owner.uid: the allocation of {} belongs to uid {:?}, not {:?}",
                a.owner, a.owner.uid, owner.uid
            )));
        }
        let Some(a) = self.allocs.remove(&key) else {
            return Ok((None, vec![], vec![]));
        };
        self.shared.remove(&a);
        let mut ops = Vec::new();
        for ip in &a.addresses {
            ops.extend(self.unhold(network, &a.pool, &key, ip, &a.owner, now_ms));
        }
        if let Some(net) = self.networks.get_mut(network)
            && let Some(pi) = net.pool(&a.pool)
        {
            net.pools[pi].allocations = net.pools[pi].allocations.saturating_sub(1);
        }
        ops.push(Op::DelAlloc(key));
        Ok((Some(a.clone()), ops, vec![Change::Deleted(a)]))
    }
}
