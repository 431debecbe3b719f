//! Reads: one allocation, pages of them, watch snapshots, usage per pool and family.

use std::ops::Bound;

use std::net::IpAddr;

use super::{AddressInfo, ListFilter, Usage, state::State};
use crate::{
    alloc::addr::{AddrRange, Family},
    error::{Error, Result},
    model::{Allocation, Owner, OwnerKind},
};

const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;

/// The longest key prefix that `f` fixes within `network`.
fn narrow(network: &str, f: &ListFilter) -> String {
    let mut p = format!("{network}/");
    let Some(c) = &f.cluster_id else { return p };
    p.push_str(c);
    p.push('/');
    // A namespace implies a Service: other kinds' keys have an empty one.
    let service = f.namespace.as_ref().is_some_and(|n| !n.is_empty());
    let Some(k) = f.kind.or(service.then_some(OwnerKind::Service)) else {
        return p;
    };
    p.push_str(k.as_str());
    p.push('/');
    let ns = match (k, &f.namespace) {
        (OwnerKind::Service, Some(ns)) => ns.as_str(),
        (OwnerKind::Service, None) => return p,
        _ => "",
    };
    p.push_str(ns);
    p.push('/');
    if let Some(n) = &f.name {
        p.push_str(n);
    }
    p
}

impl State {
    /// The owner's allocation.
    pub fn get_allocation(&self, network: &str, owner: &Owner) -> Result<Allocation> {
        owner.validate("owner")?;
        self.network(network)?;
        self.allocs
            .get(&owner.key(network))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("{owner} holds no allocation on network {network:?}")))
    }

    /// A page of allocations after `page_token` (a key), and the next token.
    pub fn list(
        &self,
        f: &ListFilter,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<Allocation>, String)> {
        if let Some(n) = &f.network {
            self.network(n)?;
        }
        let size = match page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => return Err(Error::invalid("page_size", format!("{n} exceeds {MAX_PAGE}"))),
            n => n,
        };
        if let Some(ip) = f.address {
            return Ok(self.list_holding(ip, f, size, page_token));
        }
        // Narrow the scan to key prefixes where the filters allow: one per network when a
        // cluster is named (`network/cluster/[kind/[namespace/[name]]]`), so a cluster's,
        // namespace's or Service's rows cost a range read per network, not a scan of the
        // ledger. Prefixes are walked in key order, so page tokens work across them.
        let mut prefixes: Vec<String> = match (&f.network, &f.cluster_id) {
            (Some(n), _) => vec![narrow(n, f)],
            (None, Some(_)) => self.networks.keys().map(|n| narrow(n, f)).collect(),
            (None, None) => vec![String::new()],
        };
        prefixes.sort();
        let mut out = Vec::new();
        for prefix in &prefixes {
            let start = if page_token.is_empty() || page_token < prefix.as_str() {
                Bound::Included(prefix.clone())
            } else if page_token.starts_with(prefix.as_str()) {
                Bound::Excluded(page_token.to_string())
            } else {
                // The token is past every key with this prefix.
                continue;
            };
            for (k, a) in self.allocs.range((start, Bound::Unbounded)) {
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                if !f.matches(a) {
                    continue;
                }
                if out.len() == size {
                    let next = out.last().map(Allocation::key).unwrap_or_default();
                    return Ok((out, next));
                }
                out.push(a.clone());
            }
        }
        Ok((out, String::new()))
    }

    /// [`State::list`] by address: through each network's holder index, not a scan.
    fn list_holding(
        &self,
        ip: IpAddr,
        f: &ListFilter,
        size: usize,
        page_token: &str,
    ) -> (Vec<Allocation>, String) {
        let mut keys: Vec<&String> = self
            .networks
            .values()
            .filter_map(|n| n.holders.get(&ip))
            .flatten()
            .filter(|k| page_token.is_empty() || k.as_str() > page_token)
            .collect();
        keys.sort();
        let mut matching = keys
            .into_iter()
            .filter_map(|k| self.allocs.get(k))
            .filter(|a| f.matches(a));
        let out: Vec<Allocation> = matching.by_ref().take(size).cloned().collect();
        let next = match (out.len() == size, matching.next()) {
            (true, Some(_)) => out.last().map(Allocation::key).unwrap_or_default(),
            _ => String::new(),
        };
        (out, next)
    }

    /// Who holds `ip`, in which network and pool, and whether it waits out a reuse grace.
    /// Proportional to the number of networks, not of allocations.
    pub fn lookup(&self, ip: IpAddr) -> AddressInfo {
        let ip = ip.to_canonical();
        let network = self.spaces.owner_of(&ip).map(str::to_string);
        let pool = network
            .as_ref()
            .and_then(|n| self.networks.get(n))
            .and_then(|n| n.pool_spanning(&ip).map(|i| n.pools[i].name.clone()));
        let mut keys: Vec<&String> = self
            .networks
            .values()
            .filter_map(|n| n.holders.get(&ip))
            .flatten()
            .collect();
        keys.sort();
        let grace = self
            .networks
            .values()
            .find_map(|n| n.quarantine.get(&ip))
            .or_else(|| self.released.get(&ip))
            .cloned();
        AddressInfo {
            address: ip,
            network,
            pool,
            holders: keys
                .into_iter()
                .filter_map(|k| self.allocs.get(k))
                .cloned()
                .collect(),
            grace,
        }
    }

    /// Every allocation matching `f` (for watch snapshots).
    pub fn matching(&self, f: &ListFilter) -> Vec<Allocation> {
        self.allocs.values().filter(|a| f.matches(a)).cloned().collect()
    }

    /// Usage per pool and family, for one network or all.
    pub fn usage(&mut self, network: Option<&str>, now_ms: u64) -> Result<Vec<Usage>> {
        let names: Vec<String> = match network {
            Some(n) => {
                self.network(n)?;
                vec![n.to_string()]
            }
            None => self.networks.keys().cloned().collect(),
        };
        let mut out = Vec::new();
        for name in names {
            self.reap(&name, now_ms);
            let net = &self.networks[&name];
            for p in &net.pools {
                for f in Family::ALL {
                    if !p.has_family(f) {
                        continue;
                    }
                    let total = p.span[f.index()].len();
                    let free = p.free[f.index()].len();
                    // O(1): the transitions keep the held count.
                    let quarantined = p.in_grace(f);
                    let out_of_range = net
                        .out_of_range
                        .iter()
                        .filter(|ip| Family::of(ip) == f)
                        .filter(|ip| {
                            net.holders
                                .get(*ip)
                                .and_then(|h| h.first())
                                .and_then(|k| self.allocs.get(k))
                                .is_some_and(|a| a.pool == p.name)
                        })
                        .count() as u128;
                    out.push(Usage {
                        network: name.clone(),
                        pool: p.name.clone(),
                        purpose: p.purpose,
                        family: f,
                        total,
                        used: total - free - quarantined,
                        free,
                        quarantined,
                        out_of_range,
                        unknown_hosts: self.shared.unknown_hosts(&name, &p.name, f),
                    });
                }
            }
        }
        Ok(out)
    }

    /// True when `ip` of `a` lies outside its pool's current ranges.
    pub fn is_out_of_range(&self, a: &Allocation) -> bool {
        self.networks
            .get(&a.network)
            .is_some_and(|n| a.addresses.iter().any(|ip| n.out_of_range.contains(ip)))
    }

    /// Number of allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// Free addresses of one pool and family, for tests and diagnostics.
    pub fn free_ranges(&self, network: &str, pool: &str, family: Family) -> Vec<AddrRange> {
        self.networks
            .get(network)
            .and_then(|n| n.pools.iter().find(|p| p.name == pool))
            .map(|p| {
                p.free[family.index()]
                    .iter()
                    .map(|(s, e)| AddrRange {
                        family,
                        start: s,
                        end: e,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}
