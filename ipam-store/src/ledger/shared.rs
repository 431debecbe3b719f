//! Addresses held under a sharing key (invariant 1's sharing), indexed by the group that may
//! join them: (network, cluster, pool, sharing key). A new owner with a sharing key looks at
//! the addresses of its own group only, O(log n + k) for k addresses of that group, instead of
//! walking every allocation its cluster holds on the network.
//!
//! Contract: the index is a function of `State::allocs` — every transition that inserts,
//! replaces or removes an allocation calls [`Shared::add`] / [`Shared::remove`] with it. It
//! only narrows the candidates; whether the claimant may join is still decided by
//! `State::can_hold`.
//!
//! The same hooks count the unknown-host records (`OwnerKind::UnknownHost`) per network, pool
//! and family, so usage reports them in O(1).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use crate::{
    alloc::addr::Family,
    model::{Allocation, OwnerKind},
};

/// (network, cluster, pool, sharing key) joined by '/' — none of them may contain '/' (they
/// are validated DNS labels and cluster ids) → address → how many of the group's allocations
/// hold it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Shared {
    groups: HashMap<String, BTreeMap<IpAddr, u32>>,
    /// (network, pool) → unknown-host records' addresses per family (index = `Family::index`).
    unknown: HashMap<(String, String), [u128; 2]>,
}

fn group(network: &str, cluster: &str, pool: &str, sharing_key: &str) -> String {
    format!("{network}/{cluster}/{pool}/{sharing_key}")
}

impl Shared {
    /// Indexes `a`'s addresses under its group (nothing without a sharing key).
    pub(super) fn add(&mut self, a: &Allocation) {
        if a.owner.kind == OwnerKind::UnknownHost {
            let n = self
                .unknown
                .entry((a.network.clone(), a.pool.clone()))
                .or_default();
            for ip in &a.addresses {
                n[Family::of(ip).index()] += 1;
            }
        }
        if a.sharing_key.is_empty() {
            return;
        }
        let g = self
            .groups
            .entry(group(&a.network, &a.owner.cluster_id, &a.pool, &a.sharing_key))
            .or_default();
        for ip in &a.addresses {
            *g.entry(*ip).or_default() += 1;
        }
    }

    /// Takes `a`'s addresses out of its group, as [`Shared::add`] put them in.
    pub(super) fn remove(&mut self, a: &Allocation) {
        if a.owner.kind == OwnerKind::UnknownHost {
            let k = (a.network.clone(), a.pool.clone());
            if let Some(n) = self.unknown.get_mut(&k) {
                for ip in &a.addresses {
                    let f = Family::of(ip).index();
                    n[f] = n[f].saturating_sub(1);
                }
                if *n == [0, 0] {
                    self.unknown.remove(&k);
                }
            }
        }
        if a.sharing_key.is_empty() {
            return;
        }
        let k = group(&a.network, &a.owner.cluster_id, &a.pool, &a.sharing_key);
        let Some(g) = self.groups.get_mut(&k) else {
            return;
        };
        for ip in &a.addresses {
            if let Some(n) = g.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    g.remove(ip);
                }
            }
        }
        if g.is_empty() {
            self.groups.remove(&k);
        }
    }

    /// Addresses of `family` held by unknown-host records from `pool` of `network`.
    pub(super) fn unknown_hosts(&self, network: &str, pool: &str, family: Family) -> u128 {
        self.unknown
            .get(&(network.to_string(), pool.to_string()))
            .map_or(0, |n| n[family.index()])
    }

    /// The index of `allocs` built from scratch (tests compare the kept one against it).
    #[cfg(test)]
    pub(super) fn of<'a>(allocs: impl IntoIterator<Item = &'a Allocation>) -> Self {
        let mut s = Shared::default();
        for a in allocs {
            s.add(a);
        }
        s
    }

    /// The addresses held under `sharing_key` by allocations of `cluster` from `pool` of
    /// `network`, in address order.
    pub(super) fn addresses(
        &self,
        network: &str,
        cluster: &str,
        pool: &str,
        sharing_key: &str,
    ) -> impl Iterator<Item = &IpAddr> {
        self.groups
            .get(&group(network, cluster, pool, sharing_key))
            .into_iter()
            .flat_map(BTreeMap::keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Owner, OwnerKind};

    fn alloc(name: &str, key: &str, ips: &[&str]) -> Allocation {
        Allocation {
            network: "n".into(),
            pool: "vip".into(),
            owner: Owner {
                cluster_id: "c1".into(),
                kind: OwnerKind::Service,
                namespace: "ns".into(),
                name: name.into(),
                uid: String::new(),
            },
            addresses: ips.iter().map(|s| s.parse().unwrap()).collect(),
            sharing_key: key.into(),
            ports: vec![],
            created_ms: 0,
            updated_ms: 0,
            revision: 1,
        }
    }

    fn listed(s: &Shared, key: &str) -> Vec<String> {
        s.addresses("n", "c1", "vip", key)
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn counts_holders_per_address_and_forgets_empty_groups() {
        let mut s = Shared::default();
        let a = alloc("a", "web", &["10.0.0.2", "fd00::2"]);
        let b = alloc("b", "web", &["10.0.0.2"]);
        let c = alloc("c", "", &["10.0.0.9"]);
        s.add(&a);
        s.add(&b);
        s.add(&c);
        assert_eq!(listed(&s, "web"), ["10.0.0.2", "fd00::2"]);
        assert!(listed(&s, "").is_empty(), "exclusive holders are not indexed");
        s.remove(&a);
        assert_eq!(listed(&s, "web"), ["10.0.0.2"], "b still holds it");
        s.remove(&b);
        assert!(listed(&s, "web").is_empty());
        assert!(s.groups.is_empty());
        assert!(s.addresses("n", "c2", "vip", "web").next().is_none());
    }
}
