//! Network transitions: create, edit and delete definitions without ever moving an allocation
//! (invariant 4), letting two networks' address space overlap, or letting a network claim an
//! address another network still holds or keeps in its reuse grace (invariant 1, fleet-wide).

use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use super::{
    Change, Outcome, Upserted,
    pool::PoolState,
    state::{NetState, State},
};
use crate::{
    alloc::addr::{AddrRange, from_u128},
    error::{Error, Result},
    model::{Allocation, NetworkDef, NetworkRecord, Quarantined},
    store::Op,
};

/// A range's first and last address, for ordered-map range queries.
fn bounds(r: &AddrRange) -> std::ops::RangeInclusive<IpAddr> {
    from_u128(r.family, r.start)..=from_u128(r.family, r.end)
}

/// What a definition needs before the ledger's lock is taken: everything derived from the
/// definition alone (validation, the named footprint, its merged space, the pools' spans).
/// For the largest definition the limits allow this is most of an upsert's work, and no
/// other request waits for it.
pub(super) struct Prepared {
    pub(super) footprint: Vec<(String, AddrRange)>,
    pub(super) space: Vec<AddrRange>,
    pub(super) pools: Vec<PoolState>,
}

/// Validates `def` and derives what [`State::upsert_prepared`] needs from it.
pub(super) fn prepare(def: &NetworkDef) -> Result<Prepared> {
    let parsed = def.validate()?;
    let footprint = def.footprint(&parsed);
    let space = super::space::merged(&footprint);
    let pools = def
        .pools
        .iter()
        .zip(&parsed)
        .map(|(d, p)| PoolState::new(d, p, &def.gateways))
        .collect();
    Ok(Prepared {
        footprint,
        space,
        pools,
    })
}

/// The first footprint entry holding `ip`, for messages ("space" if none does).
fn named<'a>(footprint: &'a [(String, AddrRange)], ip: &IpAddr) -> &'a str {
    footprint
        .iter()
        .find(|(_, r)| r.contains(ip))
        .map_or("space", |(d, _)| d.as_str())
}

impl State {
    /// Refuses a footprint (merged into `space`) that overlaps another network's space,
    /// naming both definitions. O(s log n) for s merged intervals, plus O(k) for the names
    /// when refusing.
    pub(super) fn check_overlap(
        &self,
        name: &str,
        footprint: &[(String, AddrRange)],
        space: &[AddrRange],
    ) -> Result<()> {
        for r in space {
            let Some(other) = self.spaces.overlapping(r, name).next() else {
                continue;
            };
            // A point both claim: inside `r` and inside one of the other's own entries.
            let theirs = self
                .networks
                .get(other)
                .and_then(|n| n.footprint.iter().find(|(_, r2)| r2.overlaps(r)));
            let (d2, point) = match theirs {
                Some((d, r2)) => (d.as_str(), from_u128(r.family, r.start.max(r2.start))),
                None => ("space", from_u128(r.family, r.start)),
            };
            let d1 = footprint
                .iter()
                .find(|(_, r1)| theirs.is_some_and(|(_, r2)| r1.overlaps(r2)))
                .map_or_else(|| named(footprint, &point), |(d, _)| d.as_str());
            return Err(Error::Overlap(format!(
                "network {name:?} {d1} overlaps network {other:?} {d2}"
            )));
        }
        Ok(())
    }

    /// Refuses a space that covers an address another network holds (say, left out of range
    /// by an edit) or keeps in its reuse grace. O(s · networks · log n) for s merged
    /// intervals.
    fn check_covers_nothing_held(
        &self,
        name: &str,
        footprint: &[(String, AddrRange)],
        space: &[AddrRange],
    ) -> Result<()> {
        for r in space {
            for (other, net) in self.networks.iter().filter(|(n, _)| n.as_str() != name) {
                if let Some((ip, keys)) = net.holders.range(bounds(r)).next() {
                    let holder = keys
                        .first()
                        .and_then(|k| self.allocs.get(k))
                        .map_or_else(|| "an owner".to_string(), |a| a.owner.to_string());
                    return Err(Error::Overlap(format!(
                        "network {name:?} {} covers {ip}, held by {holder} in network {other:?}",
                        named(footprint, ip)
                    )));
                }
                if let Some(q) = net.quarantine.in_range(bounds(r)).next() {
                    return Err(Error::Overlap(format!(
                        "network {name:?} {} covers {}, in its reuse grace in network {other:?} until {} ms since epoch (released by {})",
                        named(footprint, &q.address),
                        q.address,
                        q.until_ms,
                        q.previous_owner
                    )));
                }
            }
        }
        Ok(())
    }

    /// Returns a network.
    pub fn network(&self, name: &str) -> Result<&NetworkRecord> {
        self.networks
            .get(name)
            .map(|n| &*n.rec)
            .ok_or_else(|| Error::NotFound(format!("network {name:?} not found")))
    }

    /// All networks by name.
    pub fn networks(&self) -> Vec<NetworkRecord> {
        self.networks.values().map(|n| (*n.rec).clone()).collect()
    }

    /// Creates or replaces a network definition. Pools may grow, shrink or change; a pool
    /// with allocations may not be removed or change purpose; allocations never move.
    pub fn upsert_network(
        &mut self,
        def: NetworkDef,
        expected_version: Option<u64>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<Outcome<Upserted>> {
        let prepared = prepare(&def)?;
        self.upsert_prepared(def, prepared, expected_version, dry_run, now_ms)
    }

    /// [`State::upsert_network`] with the definition already [`prepare`]d.
    pub(super) fn upsert_prepared(
        &mut self,
        mut def: NetworkDef,
        prepared: Prepared,
        expected_version: Option<u64>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<Outcome<Upserted>> {
        let Prepared {
            footprint,
            space,
            mut pools,
        } = prepared;
        let existing = self.networks.get(&def.name);
        let current_version = existing.map_or(0, |n| n.rec.version);
        if let Some(v) = expected_version
            && v != current_version
        {
            return Err(Error::Conflict(format!(
                "network {:?} is at version {current_version}, not the expected {v}",
                def.name
            )));
        }
        if let Some(ex) = existing {
            if def.managed_by.is_empty() {
                def.managed_by = ex.rec.def.managed_by.clone();
            }
            // Another manager re-applying the same definition changes nothing.
            if ex.rec.def.same_but_manager(&def) {
                let rec = ex.rec.clone();
                return Ok((
                    Upserted {
                        network: rec,
                        changed: false,
                        created: false,
                        out_of_range: vec![],
                    },
                    vec![],
                    vec![],
                ));
            }
            let theirs = &ex.rec.def.managed_by;
            if !theirs.is_empty() && *theirs != def.managed_by {
                return Err(Error::Conflict(format!(
                    "network {:?} is managed by {theirs:?}; refusing a different definition from {:?}",
                    def.name, def.managed_by
                )));
            }
            if current_version + 1 >= super::MAX_REVISION {
                return Err(Error::Conflict(format!(
                    "network {:?} is at version {current_version}, the last one",
                    def.name
                )));
            }
            for p in &ex.pools {
                let new = def.pools.iter().find(|d| d.name == p.name);
                if p.allocations > 0 {
                    match new {
                        None => {
                            return Err(Error::Conflict(format!(
                                "pool {:?} of network {:?} still has {} allocation(s); release them before removing the pool",
                                p.name, def.name, p.allocations
                            )));
                        }
                        Some(d) if d.purpose != p.purpose => {
                            return Err(Error::Conflict(format!(
                                "pool {:?} of network {:?} still has {} allocation(s); its purpose cannot change from {} to {}",
                                p.name, def.name, p.allocations, p.purpose, d.purpose
                            )));
                        }
                        _ => {}
                    }
                }
            }
        }
        self.check_overlap(&def.name, &footprint, &space)?;
        self.check_covers_nothing_held(&def.name, &footprint, &space)?;

        let created = existing.is_none();
        // The old state's holders and quarantine carry over: moved on a real edit, copied for
        // a dry run (which must leave everything as it was).
        let old = if dry_run {
            None
        } else {
            self.networks.remove(&def.name)
        };
        let old_ref = old.as_ref().or_else(|| self.networks.get(&def.name));
        let created_ms = old_ref.map_or(now_ms, |ex| ex.rec.created_ms);
        if let Some(ex) = old_ref {
            for p in &mut pools {
                p.allocations = ex
                    .pools
                    .iter()
                    .find(|o| o.name == p.name)
                    .map_or(0, |o| o.allocations);
            }
        }
        let (holders, quarantine, old_space) = match old {
            Some(mut ex) => {
                let moved = (
                    std::mem::take(&mut ex.holders),
                    std::mem::take(&mut ex.quarantine),
                    Some(std::mem::take(&mut ex.space)),
                );
                self.retired.push(ex);
                moved
            }
            None => match self.networks.get(&def.name) {
                Some(ex) => (ex.holders.clone(), ex.quarantine.clone(), None),
                None => Default::default(),
            },
        };
        let mut net = NetState {
            rec: Arc::new(NetworkRecord {
                def,
                version: current_version + 1,
                created_ms,
                updated_ms: now_ms,
            }),
            pools,
            footprint,
            space,
            holders,
            quarantine,
            out_of_range: BTreeSet::new(),
        };
        Self::rebuild_free(&mut net, &self.allocs, &self.released);
        let out_of_range: Vec<Allocation> = {
            let keys: BTreeSet<&String> = net
                .out_of_range
                .iter()
                .filter_map(|ip| net.holders.get(ip))
                .flatten()
                .collect();
            keys.into_iter()
                .filter_map(|k| self.allocs.get(k).cloned())
                .collect()
        };
        let result = Upserted {
            network: net.rec.clone(),
            changed: true,
            created,
            out_of_range,
        };
        if dry_run {
            return Ok((result, vec![], vec![]));
        }
        let name = net.rec.def.name.clone();
        if let Some(old) = old_space {
            self.spaces.remove(&name, &old);
        }
        self.spaces.insert(&name, &net.space);
        let ops = vec![Op::PutNetwork(net.rec.clone())];
        self.networks.insert(name, net);
        Ok((result, ops, vec![]))
    }

    /// Deletes a network. With `force`, its allocations are released first (watchers see each
    /// DELETED) and their addresses, with those already in the network's quarantine, wait out
    /// the network's reuse grace in the fleet-wide quarantine: no other network hands them out
    /// before it ends.
    pub fn delete_network(&mut self, name: &str, force: bool, now_ms: u64) -> Result<Outcome<u64>> {
        let net = self
            .networks
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("network {name:?} not found")))?;
        let count: usize = net.pools.iter().map(|p| p.allocations).sum();
        let prefix = format!("{name}/");
        let keys: Vec<String> = self
            .allocs
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() && !force {
            return Err(Error::Conflict(format!(
                "network {name:?} still has {} allocation(s); release them or delete with force",
                count.max(keys.len())
            )));
        }
        let Some(net) = self.networks.remove(name) else {
            return Ok((0, vec![], vec![]));
        };
        self.spaces.remove(name, &net.space);
        let grace = net.grace_ms(self.default_grace_secs);
        let mut ops = Vec::new();
        let mut changes = Vec::new();
        for k in &keys {
            if let Some(a) = self.allocs.remove(k) {
                self.shared.remove(&a);
                ops.push(Op::DelAlloc(k.clone()));
                if grace > 0 {
                    for ip in &a.addresses {
                        // Shared addresses are released once.
                        if self.released.get(ip).is_none() {
                            let q = Quarantined {
                                network: name.to_string(),
                                pool: a.pool.clone(),
                                address: *ip,
                                until_ms: now_ms.saturating_add(grace),
                                previous_owner: a.owner.clone(),
                            };
                            ops.push(Op::PutQuarantine(q.clone()));
                            self.released.insert(q);
                        }
                    }
                }
                changes.push(Change::Deleted(a));
            }
        }
        // Stored under the same keys already: they only move in memory.
        for q in net.quarantine.values() {
            self.released.insert(q.clone());
        }
        ops.push(Op::DelNetwork(name.to_string()));
        Ok((keys.len() as u64, ops, changes))
    }
}
