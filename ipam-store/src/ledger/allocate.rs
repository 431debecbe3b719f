//! Allocate: one owner's addresses on one network (invariants 1, 2 and 4).
//!
//! Every address that gains a holder passes [`State::can_hold`] (the quarantine and the
//! sharing rule of `alloc::sharing`); an owner that already holds an allocation gets it back
//! unchanged unless it explicitly asks for a family more or less (idempotence; nothing moves).

use std::net::IpAddr;

use super::{AllocateReq, Change, Outcome, state::NetState, state::State, state::join};
use crate::{
    alloc::{
        addr::Family,
        sharing::{self, Claim},
    },
    error::{Error, Result},
    model::{Allocation, Owner, OwnerKind, Port, check_dns_label},
    store::Op,
};

/// The candidate side of every check: who asks, under which allocation key, sharing how.
struct Claimant<'a> {
    key: &'a str,
    owner: &'a Owner,
    sharing_key: &'a str,
    ports: &'a [Port],
}

impl Claimant<'_> {
    fn claim(&self) -> Claim<'_> {
        Claim {
            cluster_id: &self.owner.cluster_id,
            sharing_key: self.sharing_key,
            ports: self.ports,
        }
    }
}

/// A validated request: families in order and at most one requested address per family.
struct Plan {
    families: Vec<Family>,
    requested: [Option<(usize, IpAddr)>; 2],
    /// Families after the first are best-effort.
    optional_extra: bool,
}

impl Plan {
    /// Checks the request's families and requested addresses against each other.
    fn new(req: &AllocateReq) -> Result<Plan> {
        let mut families = req.families.clone();
        if families.is_empty() {
            for f in req.requested.iter().map(Family::of) {
                if !families.contains(&f) {
                    families.push(f);
                }
            }
            if families.is_empty() {
                families.push(Family::V4);
            }
        }
        for (i, f) in families.iter().enumerate() {
            if families[..i].contains(f) {
                return Err(Error::invalid(
                    format!("families[{i}]"),
                    format!("{f} is listed twice"),
                ));
            }
        }
        let mut requested: [Option<(usize, IpAddr)>; 2] = [None, None];
        for (i, ip) in req.requested.iter().enumerate() {
            let f = Family::of(ip);
            if requested[f.index()].is_some() {
                return Err(Error::invalid(
                    format!("requested_addresses[{i}]"),
                    format!("a second {f} address; at most one per family"),
                ));
            }
            if !families.contains(&f) {
                return Err(Error::invalid(
                    format!("requested_addresses[{i}]"),
                    format!("{ip} is {f}, which is not among the requested families"),
                ));
            }
            requested[f.index()] = Some((i, *ip));
        }
        Ok(Plan {
            families,
            requested,
            optional_extra: req.optional_extra_families,
        })
    }

    /// Whether the `i`th family must be served for the request to succeed.
    fn required(&self, i: usize) -> bool {
        i == 0 || !self.optional_extra
    }

    fn requested(&self, f: Family) -> Option<(usize, IpAddr)> {
        self.requested[f.index()]
    }
}

impl State {
    /// Why the claimant may not hold `ip` in `net`, or `None` when it may (it is free,
    /// quarantined for this very owner, or shareable with every current holder).
    fn can_hold(&self, net: &NetState, ip: &IpAddr, c: &Claimant<'_>) -> Option<String> {
        if let Some(q) = self.released.get(ip) {
            return Some(format!(
                "in its reuse grace period until {} ms since epoch (released by {} when network {:?} was deleted)",
                q.until_ms, q.previous_owner, q.network
            ));
        }
        if let Some(q) = net.quarantine.get(ip)
            && q.previous_owner.key(&net.rec.def.name) != c.key
        {
            return Some(format!(
                "in its reuse grace period until {} ms since epoch (released by {})",
                q.until_ms, q.previous_owner
            ));
        }
        for h in net.holders.get(ip).into_iter().flatten() {
            if h == c.key {
                continue;
            }
            if let Some(holder) = self.allocs.get(h)
                && let Some(why) = sharing::conflict(&holder.claim(), &holder.owner, &c.claim())
            {
                return Some(why);
            }
        }
        None
    }

    /// An address of `family` in pool `pi` that the claimant can share: one already held by an
    /// allocation of the same cluster with the same sharing key and disjoint ports.
    fn shareable(&self, net: &NetState, pi: usize, family: Family, c: &Claimant<'_>) -> Option<IpAddr> {
        self.shared
            .addresses(
                &net.rec.def.name,
                &c.owner.cluster_id,
                &net.pools[pi].name,
                c.sharing_key,
            )
            .filter(|ip| Family::of(ip) == family)
            .find(|ip| self.can_hold(net, ip, c).is_none())
            .copied()
    }

    /// Picks an address of `family` in pool `pi` for the claimant: the requested one, a
    /// shareable one, its own from the quarantine, or the lowest free one.
    fn pick(
        &self,
        net: &NetState,
        pi: usize,
        family: Family,
        requested: Option<(usize, IpAddr)>,
        c: &Claimant<'_>,
    ) -> Result<IpAddr> {
        let pool = &net.pools[pi];
        if let Some((i, ip)) = requested {
            if !pool.spans(&ip) {
                return Err(Error::invalid(
                    format!("requested_addresses[{i}]"),
                    format!(
                        "{ip} is not in pool {:?} of network {:?}",
                        pool.name, net.rec.def.name
                    ),
                ));
            }
            if let Some(why) = self.can_hold(net, &ip, c) {
                return Err(Error::Conflict(format!(
                    "requested_addresses[{i}]: {ip} is {why}"
                )));
            }
            return Ok(ip);
        }
        if !c.sharing_key.is_empty()
            && let Some(ip) = self.shareable(net, pi, family, c)
        {
            return Ok(ip);
        }
        // An owner that released an address and asks again within the grace period gets the
        // same one back (a quickly recreated Service keeps its VIP).
        if let Some(ip) = net
            .quarantine
            .released_by(c.key)
            .find(|ip| Family::of(ip) == family && pool.spans(ip) && !net.holders.contains_key(ip))
        {
            return Ok(*ip);
        }
        pool.first_free(family).ok_or_else(|| {
            Error::Exhausted(format!(
                "pool {:?} of network {:?} has no free {family} address ({} total, {} in reuse grace)",
                pool.name,
                net.rec.def.name,
                pool.span[family.index()].len(),
                pool.in_grace(family)
            ))
        })
    }

    /// Picks one address per family of the plan from pool `pi`, leaving out the families
    /// `skip` says are already served. A family the pool cannot serve fails the whole call
    /// when it is required or an address of it was requested, and is left out otherwise.
    fn pick_families(
        &self,
        net: &NetState,
        pi: usize,
        plan: &Plan,
        c: &Claimant<'_>,
        skip: impl Fn(Family) -> bool,
    ) -> Result<Vec<IpAddr>> {
        let pool = &net.pools[pi];
        let mut picked = Vec::with_capacity(plan.families.len());
        for (i, &f) in plan.families.iter().enumerate() {
            if skip(f) {
                continue;
            }
            if !pool.has_family(f) {
                if plan.required(i) {
                    return Err(Error::Exhausted(format!(
                        "pool {:?} of network {:?} has no {f} range",
                        pool.name, net.rec.def.name
                    )));
                }
                continue;
            }
            match self.pick(net, pi, f, plan.requested(f), c) {
                Ok(ip) => picked.push(ip),
                Err(e) if plan.required(i) || plan.requested(f).is_some() => return Err(e),
                Err(_) => {}
            }
        }
        Ok(picked)
    }

    /// Allocates (or returns the existing allocation of) an owner: see `Allocate` in the
    /// proto. Returns the allocation and whether it was created; nothing changes on error, nor
    /// with `dry_run`.
    pub fn allocate(
        &mut self,
        req: AllocateReq,
        seq: u64,
        now_ms: u64,
    ) -> Result<Outcome<(Allocation, bool)>> {
        let owner = req
            .owner
            .clone()
            .ok_or_else(|| Error::invalid("owner", "is required"))?;
        owner.validate("owner")?;
        if owner.kind == OwnerKind::UnknownHost {
            return Err(Error::invalid(
                "owner.kind",
                "unknown-host records are made by ReportConflict, not Allocate",
            ));
        }
        if req.network.is_empty() {
            return Err(Error::invalid("network", "is required"));
        }
        if !req.sharing_key.is_empty() {
            check_dns_label("sharing_key", &req.sharing_key)?;
            if req.ports.is_empty() {
                return Err(Error::invalid(
                    "ports",
                    "at least one port is required with a sharing_key",
                ));
            }
        }
        let plan = Plan::new(&req)?;
        if !self.networks.contains_key(&req.network) {
            return Err(Error::NotFound(format!("network {:?} not found", req.network)));
        }
        self.reap(&req.network, now_ms);
        let key = owner.key(&req.network);
        let c = Claimant {
            key: &key,
            owner: &owner,
            sharing_key: &req.sharing_key,
            ports: &req.ports,
        };
        if let Some(existing) = self.allocs.get(&key) {
            if req.dry_run {
                return Ok(((existing.clone(), false), vec![], vec![]));
            }
            return self.allocate_existing(existing.clone(), &req, &plan, &c, seq, now_ms);
        }

        let net = &self.networks[&req.network];
        let mut last_err = None;
        for pi in self.candidate_pools(net, &req, &plan, &owner)? {
            let picked = match self.pick_families(net, pi, &plan, &c, |_| false) {
                Ok(p) => p,
                // A full pool: the next candidate may serve.
                Err(e @ Error::Exhausted(_)) => {
                    last_err = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let alloc = Allocation {
                network: req.network.clone(),
                pool: net.pools[pi].name.clone(),
                owner: owner.clone(),
                addresses: picked,
                sharing_key: req.sharing_key.clone(),
                ports: req.ports.clone(),
                created_ms: now_ms,
                updated_ms: now_ms,
                revision: seq,
            };
            if req.dry_run {
                return Ok(((Allocation { revision: 0, ..alloc }, true), vec![], vec![]));
            }
            let mut ops = self.hold(&req.network, pi, &key, &alloc.addresses);
            ops.push(Op::PutAlloc(alloc.clone()));
            if let Some(net) = self.networks.get_mut(&req.network) {
                net.pools[pi].allocations += 1;
            }
            self.shared.add(&alloc);
            self.allocs.insert(key, alloc.clone());
            return Ok(((alloc.clone(), true), ops, vec![Change::Added(alloc)]));
        }
        Err(last_err.unwrap_or_else(|| {
            Error::Exhausted(format!(
                "network {:?}: no pool can serve the request",
                req.network
            ))
        }))
    }

    /// The pools a new allocation may come from, in definition order: the named pool, the pool
    /// spanning a requested address, or every auto-assign pool of the owner's purpose.
    fn candidate_pools(
        &self,
        net: &NetState,
        req: &AllocateReq,
        plan: &Plan,
        owner: &Owner,
    ) -> Result<Vec<usize>> {
        let purpose = req.purpose.unwrap_or(owner.kind.default_purpose());
        if let Some(name) = &req.pool {
            let pi = net.pool(name).ok_or_else(|| {
                Error::NotFound(format!("pool {name:?} not found in network {:?}", req.network))
            })?;
            if req.purpose.is_some_and(|p| p != net.pools[pi].purpose) {
                return Err(Error::invalid(
                    "purpose",
                    format!("pool {name:?} is a {} pool, not {purpose}", net.pools[pi].purpose),
                ));
            }
            return Ok(vec![pi]);
        }
        if let Some((i, ip)) = plan.requested.iter().flatten().next() {
            let pi = net.pool_spanning(ip).ok_or_else(|| {
                Error::invalid(
                    format!("requested_addresses[{i}]"),
                    format!("{ip} is not in any pool of network {:?}", req.network),
                )
            })?;
            if net.pools[pi].purpose != purpose {
                return Err(Error::invalid(
                    format!("requested_addresses[{i}]"),
                    format!(
                        "{ip} is in {} pool {:?}, not a {purpose} pool",
                        net.pools[pi].purpose, net.pools[pi].name
                    ),
                ));
            }
            return Ok(vec![pi]);
        }
        let c: Vec<usize> = (0..net.pools.len())
            .filter(|&i| net.pools[i].purpose == purpose && net.pools[i].auto_assign)
            .collect();
        if c.is_empty() {
            return Err(Error::Conflict(format!(
                "network {:?} has no auto-assign {purpose} pool",
                req.network
            )));
        }
        Ok(c)
    }

    /// Marks addresses held by `key`; returns the ops for quarantine entries it consumed.
    pub(super) fn hold(&mut self, network: &str, pi: usize, key: &str, ips: &[IpAddr]) -> Vec<Op> {
        let mut ops = Vec::new();
        let Some(net) = self.networks.get_mut(network) else {
            return ops;
        };
        for ip in ips {
            if net.quarantine.remove(ip).is_some() {
                ops.push(Op::DelQuarantine(network.to_string(), *ip));
            }
            net.pools[pi].take(ip);
            let holders = net.holders.entry(*ip).or_default();
            if holders.is_empty()
                && let Some(p) = net.pools.iter_mut().find(|p| p.spans(ip))
            {
                p.held[Family::of(ip).index()] += 1;
            }
            holders.push(key.to_string());
        }
        ops
    }

    /// The owner already holds `a`: return it, or change it only as the request explicitly
    /// asks (a family more or less, other ports or sharing key, a learned uid).
    fn allocate_existing(
        &mut self,
        mut a: Allocation,
        req: &AllocateReq,
        plan: &Plan,
        c: &Claimant<'_>,
        seq: u64,
        now_ms: u64,
    ) -> Result<Outcome<(Allocation, bool)>> {
        let owner = c.owner;
        let key = a.key();
        if !a.owner.uid.is_empty() && !owner.uid.is_empty() && a.owner.uid != owner.uid {
            return Err(Error::Conflict(format!(
                "owner.uid: {} already holds {} under uid {:?}, not {:?}; release it first",
                a.owner,
                join(&a.addresses),
                a.owner.uid,
                owner.uid
            )));
        }
        if let Some(p) = &req.pool
            && *p != a.pool
        {
            return Err(Error::Conflict(format!(
                "pool: {} already holds {} from pool {:?}; release it first",
                a.owner,
                join(&a.addresses),
                a.pool
            )));
        }
        for (i, ip) in plan.requested.iter().flatten() {
            if let Some(held) = a.address_of(Family::of(ip))
                && held != *ip
            {
                return Err(Error::Conflict(format!(
                    "requested_addresses[{i}]: {} already holds {held}, not {ip}; release it first (an allocation never moves)",
                    a.owner
                )));
            }
        }
        let net = &self.networks[&a.network];
        let pi = net
            .pool(&a.pool)
            .ok_or_else(|| Error::Storage(format!("allocation {key} names missing pool {:?}", a.pool)))?;
        // Ports or sharing key changed: every kept address must still be shareable.
        let sharing_changed = a.sharing_key != req.sharing_key || a.ports != req.ports;
        if sharing_changed {
            for ip in &a.addresses {
                if let Some(why) = self.can_hold(net, ip, c) {
                    return Err(Error::Conflict(format!("sharing_key/ports: {ip} is {why}")));
                }
            }
        }
        let dropped: Vec<IpAddr> = if req.families.is_empty() {
            vec![]
        } else {
            a.addresses
                .iter()
                .copied()
                .filter(|ip| !plan.families.contains(&Family::of(ip)))
                .collect()
        };
        let added = self.pick_families(net, pi, plan, c, |f| a.address_of(f).is_some())?;
        let uid_learned = a.owner.uid.is_empty() && !owner.uid.is_empty();
        if added.is_empty() && dropped.is_empty() && !sharing_changed && !uid_learned {
            return Ok(((a, false), vec![], vec![]));
        }
        let mut ops = Vec::new();
        for ip in &dropped {
            ops.extend(self.unhold(&a.network.clone(), &a.pool.clone(), &key, ip, owner, now_ms));
        }
        ops.extend(self.hold(&a.network.clone(), pi, &key, &added));
        a.addresses.retain(|ip| !dropped.contains(ip));
        a.addresses.extend(added);
        // Keep the request's family order.
        a.addresses.sort_by_key(|ip| {
            plan.families
                .iter()
                .position(|f| *f == Family::of(ip))
                .unwrap_or(usize::MAX)
        });
        a.sharing_key = req.sharing_key.clone();
        a.ports = req.ports.clone();
        if uid_learned {
            a.owner.uid = owner.uid.clone();
        }
        a.updated_ms = now_ms;
        a.revision = seq;
        ops.push(Op::PutAlloc(a.clone()));
        self.shared.add(&a);
        if let Some(old) = self.allocs.insert(key, a.clone()) {
            self.shared.remove(&old);
        }
        Ok(((a.clone(), false), ops, vec![Change::Modified(a)]))
    }
}
