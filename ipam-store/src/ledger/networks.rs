//! Network transitions: create, edit and delete definitions without ever moving an allocation
//! (invariant 4) or letting two networks' address space overlap.

use std::collections::BTreeSet;

use super::{
    Change, Outcome, Upserted,
    pool::PoolState,
    state::{NetState, State},
};
use crate::{
    error::{Error, Result},
    model::{Allocation, NetworkDef, NetworkRecord, ParsedPool},
    store::Op,
};

impl State {
    pub(super) fn check_overlap(&self, def: &NetworkDef, parsed: &[ParsedPool]) -> Result<()> {
        let mine = def.footprint(parsed);
        for (name, other) in &self.networks {
            if *name == def.name {
                continue;
            }
            let theirs = other
                .rec
                .def
                .footprint(&other.rec.def.validate().unwrap_or_default());
            for (d1, r1) in &mine {
                for (d2, r2) in &theirs {
                    if r1.overlaps(r2) {
                        return Err(Error::Overlap(format!(
                            "network {:?} {d1} overlaps network {name:?} {d2}",
                            def.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns a network.
    pub fn network(&self, name: &str) -> Result<&NetworkRecord> {
        self.networks
            .get(name)
            .map(|n| &n.rec)
            .ok_or_else(|| Error::NotFound(format!("network {name:?} not found")))
    }

    /// All networks by name.
    pub fn networks(&self) -> Vec<NetworkRecord> {
        self.networks.values().map(|n| n.rec.clone()).collect()
    }

    /// Creates or replaces a network definition. See the module doc for what may change.
    pub fn upsert_network(
        &mut self,
        mut def: NetworkDef,
        expected_version: Option<u64>,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<Outcome<Upserted>> {
        let parsed = def.validate()?;
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
            let same = NetworkDef {
                managed_by: ex.rec.def.managed_by.clone(),
                ..def.clone()
            };
            if ex.rec.def == same {
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
        self.check_overlap(&def, &parsed)?;

        let mut pools: Vec<PoolState> = def
            .pools
            .iter()
            .zip(&parsed)
            .map(|(d, p)| PoolState::new(d, p, &def.gateways))
            .collect();
        let (holders, quarantine, created_ms) = match self.networks.get(&def.name) {
            Some(ex) => {
                for p in &mut pools {
                    p.allocations = ex
                        .pools
                        .iter()
                        .find(|o| o.name == p.name)
                        .map_or(0, |o| o.allocations);
                }
                (ex.holders.clone(), ex.quarantine.clone(), ex.rec.created_ms)
            }
            None => Default::default(),
        };
        let mut net = NetState {
            rec: NetworkRecord {
                def,
                version: current_version + 1,
                created_ms: if existing.is_some() { created_ms } else { now_ms },
                updated_ms: now_ms,
            },
            pools: std::mem::take(&mut pools),
            holders,
            quarantine,
            out_of_range: BTreeSet::new(),
        };
        Self::rebuild_free(&mut net, &self.allocs);
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
            created: existing.is_none(),
            out_of_range,
        };
        if dry_run {
            return Ok((result, vec![], vec![]));
        }
        let ops = vec![Op::PutNetwork(net.rec.clone())];
        self.networks.insert(net.rec.def.name.clone(), net);
        Ok((result, ops, vec![]))
    }

    /// Deletes a network; with `force`, releases its allocations (no quarantine: the network
    /// is gone).
    pub fn delete_network(&mut self, name: &str, force: bool) -> Result<Outcome<u64>> {
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
        let mut ops = Vec::new();
        let mut changes = Vec::new();
        for k in &keys {
            if let Some(a) = self.allocs.remove(k) {
                ops.push(Op::DelAlloc(k.clone()));
                changes.push(Change::Deleted(a));
            }
        }
        for ip in net.quarantine.keys() {
            ops.push(Op::DelQuarantine(name.to_string(), *ip));
        }
        ops.push(Op::DelNetwork(name.to_string()));
        Ok((keys.len() as u64, ops, changes))
    }
}
