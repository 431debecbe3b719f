//! The ledger's in-memory state and every invariant of the store, as pure transitions.
//!
//! Each mutating method first checks everything and only then changes anything, so an error
//! leaves the state untouched; on success it returns the storage operations that make the
//! change durable and the changes watchers see. The caller (`Ledger`) commits the operations
//! before it replies.
//!
//! Invariants (architecture.md §3), and where they are kept:
//! 1. One owner cluster per address; sharing only within one cluster, same key, disjoint ports:
//!    every path that adds a holder goes through [`State::can_hold`] (→ `alloc::sharing`).
//! 2. Allocate is idempotent per owner: [`State::allocate`] looks the owner key up first and
//!    returns what it holds; the same key is rebuilt from disk on restart.
//! 3. Durability: not here; `Ledger` waits for the commit of the returned ops.
//! 4. Nothing moves: no method ever changes an existing allocation's addresses except its
//!    owner's explicit request (dropping a family); pool edits only recompute free space and
//!    flag held addresses outside the new ranges as out of range.
//! 5. Reuse grace: a released address goes to `quarantine`, not to `free`, until its time.
//! 6. O(log n) allocation: free space is a `RangeSet` per pool and family.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    ops::Bound,
};

use crate::{
    alloc::{
        addr::{AddrRange, Family, to_u128},
        pool::PoolState,
        sharing,
    },
    error::{Error, Result},
    model::{
        Allocation, NetworkDef, NetworkRecord, Owner, OwnerKind, Port, Purpose, Quarantined, check_dns_label,
    },
};

/// A storage operation, applied atomically with the others of its batch.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Create or replace a network.
    PutNetwork(NetworkRecord),
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
}

impl ListFilter {
    /// True when `a` passes every filter.
    pub fn matches(&self, a: &Allocation) -> bool {
        self.network.as_ref().is_none_or(|n| *n == a.network)
            && self.pool.as_ref().is_none_or(|p| *p == a.pool)
            && self.cluster_id.as_ref().is_none_or(|c| *c == a.owner.cluster_id)
            && self.kind.is_none_or(|k| k == a.owner.kind)
            && self.address.is_none_or(|ip| a.addresses.contains(&ip))
    }
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
}

/// Result of UpsertNetwork.
#[derive(Clone, Debug)]
pub struct Upserted {
    /// The record as stored (or as it would be).
    pub network: NetworkRecord,
    /// The definition differed.
    pub changed: bool,
    /// It did not exist.
    pub created: bool,
    /// Allocations left outside every range.
    pub out_of_range: Vec<Allocation>,
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

/// Released addresses in their reuse grace period, indexed by address, by expiry (to reap in
/// order) and by previous owner (so an owner's own address is found in O(log n), not by a
/// scan: a busy network can hold tens of thousands).
#[derive(Clone, Debug, Default)]
struct Quarantine {
    by_addr: BTreeMap<IpAddr, Quarantined>,
    expiry: BTreeSet<(u64, IpAddr)>,
    by_owner: HashMap<String, BTreeSet<IpAddr>>,
}

impl Quarantine {
    fn insert(&mut self, q: Quarantined) {
        self.remove(&q.address);
        self.expiry.insert((q.until_ms, q.address));
        self.by_owner
            .entry(q.previous_owner.key(&q.network))
            .or_default()
            .insert(q.address);
        self.by_addr.insert(q.address, q);
    }

    fn remove(&mut self, ip: &IpAddr) -> Option<Quarantined> {
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
    fn pop_expired(&mut self, now_ms: u64) -> Option<IpAddr> {
        let &(until, ip) = self.expiry.first()?;
        if until > now_ms {
            return None;
        }
        self.remove(&ip);
        Some(ip)
    }

    fn get(&self, ip: &IpAddr) -> Option<&Quarantined> {
        self.by_addr.get(ip)
    }

    /// Addresses the owner with allocation key `key` released.
    fn released_by(&self, key: &str) -> impl Iterator<Item = &IpAddr> {
        self.by_owner.get(key).into_iter().flatten()
    }

    fn keys(&self) -> impl Iterator<Item = &IpAddr> {
        self.by_addr.keys()
    }

    fn values(&self) -> impl Iterator<Item = &Quarantined> {
        self.by_addr.values()
    }
}

/// One network's runtime state.
#[derive(Debug)]
struct NetState {
    rec: NetworkRecord,
    pools: Vec<PoolState>,
    /// address -> keys of the allocations holding it (more than one only when shared).
    holders: HashMap<IpAddr, Vec<String>>,
    quarantine: Quarantine,
    /// Held addresses outside their pool's span.
    out_of_range: BTreeSet<IpAddr>,
}

impl NetState {
    fn pool(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    fn pool_spanning(&self, ip: &IpAddr) -> Option<usize> {
        self.pools.iter().position(|p| p.spans(ip))
    }

    fn grace_ms(&self, default_secs: u32) -> u64 {
        u64::from(self.rec.def.reuse_grace_secs.unwrap_or(default_secs)) * 1000
    }
}

/// The whole ledger in memory.
#[derive(Debug)]
pub struct State {
    networks: BTreeMap<String, NetState>,
    allocs: BTreeMap<String, Allocation>,
    /// Last assigned commit sequence.
    pub seq: u64,
    default_grace_secs: u32,
    /// Ops with no reply waiting on them (reaped quarantine entries), committed with the next
    /// batch. Losing them is harmless: expired entries are ignored on load.
    deferred: Vec<Op>,
}

const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;

impl State {
    /// An empty ledger.
    pub fn new(default_grace_secs: u32) -> Self {
        State {
            networks: BTreeMap::new(),
            allocs: BTreeMap::new(),
            seq: 0,
            default_grace_secs,
            deferred: Vec::new(),
        }
    }

    /// Rebuilds the state from stored records. With `strict`, any inconsistency (overlapping
    /// networks, an address held twice against the sharing rule, an allocation of an unknown
    /// network or pool) is an error; without it (restart), inconsistencies are logged and every
    /// record is kept, since dropping data would be worse than serving it flagged.
    pub fn load(snap: Snapshot, default_grace_secs: u32, now_ms: u64, strict: bool) -> Result<Self> {
        let mut st = State::new(default_grace_secs);
        st.seq = snap.seq;
        let complain = |msg: String| -> Result<()> {
            if strict {
                return Err(Error::invalid("backup", msg));
            }
            tracing::error!("inconsistent store record kept as is: {msg}");
            Ok(())
        };
        for rec in snap.networks {
            let parsed = match rec.def.validate() {
                Ok(p) => p,
                Err(e) => {
                    complain(format!("network {:?}: {e}", rec.def.name))?;
                    continue;
                }
            };
            if let Err(e) = st.check_overlap(&rec.def, &parsed) {
                complain(e.to_string())?;
            }
            let pools = rec
                .def
                .pools
                .iter()
                .zip(&parsed)
                .map(|(d, p)| PoolState::new(d, p, &rec.def.gateways))
                .collect();
            st.networks.insert(
                rec.def.name.clone(),
                NetState {
                    rec,
                    pools,
                    holders: HashMap::new(),
                    quarantine: Quarantine::default(),
                    out_of_range: BTreeSet::new(),
                },
            );
        }
        for a in snap.allocations {
            st.seq = st.seq.max(a.revision);
            let key = a.key();
            let Some(net) = st.networks.get_mut(&a.network) else {
                complain(format!("allocation {key} names unknown network {:?}", a.network))?;
                st.allocs.insert(key, a);
                continue;
            };
            match net.pool(&a.pool) {
                Some(pi) => net.pools[pi].allocations += 1,
                None => complain(format!("allocation {key} names unknown pool {:?}", a.pool))?,
            }
            for ip in &a.addresses {
                let holders = net.holders.entry(*ip).or_default();
                for h in holders.iter() {
                    if let Some(other) = st.allocs.get(h)
                        && let Some(why) = sharing::conflict(other, &a.owner, &a.sharing_key, &a.ports)
                    {
                        complain(format!("{ip} of {key}: {why}"))?;
                    }
                }
                holders.push(key.clone());
            }
            st.allocs.insert(key, a);
        }
        for q in snap.quarantined {
            if q.until_ms <= now_ms {
                // Expired while the store was down: free again; delete the record later.
                st.deferred.push(Op::DelQuarantine(q.network.clone(), q.address));
                continue;
            }
            if let Some(net) = st.networks.get_mut(&q.network) {
                net.quarantine.insert(q);
            }
        }
        for net in st.networks.values_mut() {
            Self::rebuild_free(net, &st.allocs);
        }
        Ok(st)
    }

    /// Recomputes every pool's free set and the out-of-range set from spans, holders and
    /// quarantine. O(h log n) for h held addresses.
    fn rebuild_free(net: &mut NetState, allocs: &BTreeMap<String, Allocation>) {
        for p in &mut net.pools {
            p.free = p.span.clone();
        }
        net.out_of_range.clear();
        for (ip, keys) in &net.holders {
            for p in &mut net.pools {
                p.take(ip);
            }
            let pool = keys.first().and_then(|k| allocs.get(k)).map(|a| a.pool.as_str());
            let in_own_pool = pool
                .and_then(|n| net.pools.iter().find(|p| p.name == n))
                .is_some_and(|p| p.spans(ip));
            if !in_own_pool {
                net.out_of_range.insert(*ip);
            }
        }
        for ip in net.quarantine.keys() {
            for p in &mut net.pools {
                p.take(ip);
            }
        }
    }

    /// Everything, as records.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            networks: self.networks.values().map(|n| n.rec.clone()).collect(),
            allocations: self.allocs.values().cloned().collect(),
            quarantined: self
                .networks
                .values()
                .flat_map(|n| n.quarantine.values().cloned())
                .collect(),
            seq: self.seq,
        }
    }

    /// True when the ledger holds nothing.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.allocs.is_empty()
    }

    /// Ops that were deferred; the caller commits them with its batch.
    pub fn take_deferred(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.deferred)
    }

    // === networks ===

    fn check_overlap(&self, def: &NetworkDef, parsed: &[crate::model::ParsedPool]) -> Result<()> {
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

    // === allocations ===

    /// Moves expired quarantine entries of `network` back to their pools' free sets.
    pub fn reap(&mut self, network: &str, now_ms: u64) {
        let Some(net) = self.networks.get_mut(network) else {
            return;
        };
        while let Some(ip) = net.quarantine.pop_expired(now_ms) {
            if !net.holders.contains_key(&ip) {
                for p in &mut net.pools {
                    p.give_back(&ip);
                }
            }
            self.deferred.push(Op::DelQuarantine(network.to_string(), ip));
        }
    }

    /// Why `owner` may not hold `ip` in `net`, or `None` when it may (it is free, quarantined
    /// for this very owner, or shareable with every current holder).
    fn can_hold(
        &self,
        net: &NetState,
        ip: &IpAddr,
        key: &str,
        owner: &Owner,
        sharing_key: &str,
        ports: &[Port],
    ) -> Option<String> {
        if let Some(q) = net.quarantine.get(ip)
            && q.previous_owner.key(&net.rec.def.name) != key
        {
            return Some(format!(
                "in its reuse grace period until {} ms since epoch (released by {})",
                q.until_ms, q.previous_owner
            ));
        }
        for h in net.holders.get(ip).into_iter().flatten() {
            if h == key {
                continue;
            }
            if let Some(holder) = self.allocs.get(h)
                && let Some(why) = sharing::conflict(holder, owner, sharing_key, ports)
            {
                return Some(why);
            }
        }
        None
    }

    /// An address of `family` in pool `pi` that `owner` can share: one already held by an
    /// allocation of the same cluster with the same sharing key and disjoint ports.
    #[allow(clippy::too_many_arguments)]
    fn shareable(
        &self,
        net: &NetState,
        pi: usize,
        family: Family,
        key: &str,
        owner: &Owner,
        sharing_key: &str,
        ports: &[Port],
    ) -> Option<IpAddr> {
        let prefix = format!("{}/{}/", net.rec.def.name, owner.cluster_id);
        self.allocs
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, a)| *k != key && a.sharing_key == sharing_key && a.pool == net.pools[pi].name)
            .filter_map(|(_, a)| a.address_of(family))
            .find(|ip| self.can_hold(net, ip, key, owner, sharing_key, ports).is_none())
    }

    /// Picks an address of `family` in pool `pi` for the owner: the requested one, a shareable
    /// one, or the lowest free one.
    #[allow(clippy::too_many_arguments)]
    fn pick(
        &self,
        net: &NetState,
        pi: usize,
        family: Family,
        requested: Option<(usize, IpAddr)>,
        key: &str,
        owner: &Owner,
        sharing_key: &str,
        ports: &[Port],
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
            if let Some(why) = self.can_hold(net, &ip, key, owner, sharing_key, ports) {
                return Err(Error::Conflict(format!(
                    "requested_addresses[{i}]: {ip} is {why}"
                )));
            }
            return Ok(ip);
        }
        if !sharing_key.is_empty()
            && let Some(ip) = self.shareable(net, pi, family, key, owner, sharing_key, ports)
        {
            return Ok(ip);
        }
        // An owner that released an address and asks again within the grace period gets the
        // same one back (a quickly recreated Service keeps its VIP).
        if let Some(ip) = net
            .quarantine
            .released_by(key)
            .find(|ip| Family::of(ip) == family && pool.spans(ip) && !net.holders.contains_key(ip))
        {
            return Ok(*ip);
        }
        pool.first_free(family).ok_or_else(|| {
            let q = net
                .quarantine
                .keys()
                .filter(|ip| Family::of(ip) == family && pool.spans(ip))
                .count();
            Error::Exhausted(format!(
                "pool {:?} of network {:?} has no free {family} address ({} total, {} in reuse grace)",
                pool.name,
                net.rec.def.name,
                pool.span[family.index()].len(),
                q
            ))
        })
    }

    /// Allocates (or returns the existing allocation of) an owner. See the proto for semantics.
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
        if !self.networks.contains_key(&req.network) {
            return Err(Error::NotFound(format!("network {:?} not found", req.network)));
        }
        self.reap(&req.network, now_ms);
        let net = &self.networks[&req.network];
        let key = owner.key(&req.network);
        let required = |i: usize| i == 0 || !req.optional_extra_families;

        if let Some(existing) = self.allocs.get(&key) {
            return self.allocate_existing(
                existing.clone(),
                &req,
                &owner,
                &families,
                requested,
                required,
                seq,
                now_ms,
            );
        }

        // Candidate pools, in definition order.
        let purpose = req.purpose.unwrap_or(owner.kind.default_purpose());
        let candidates: Vec<usize> = if let Some(name) = &req.pool {
            let pi = net.pool(name).ok_or_else(|| {
                Error::NotFound(format!("pool {name:?} not found in network {:?}", req.network))
            })?;
            if req.purpose.is_some_and(|p| p != net.pools[pi].purpose) {
                return Err(Error::invalid(
                    "purpose",
                    format!("pool {name:?} is a {} pool, not {purpose}", net.pools[pi].purpose),
                ));
            }
            vec![pi]
        } else if let Some((i, ip)) = requested.iter().flatten().next() {
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
            vec![pi]
        } else {
            let c: Vec<usize> = (0..net.pools.len())
                .filter(|&i| net.pools[i].purpose == purpose && net.pools[i].auto_assign)
                .collect();
            if c.is_empty() {
                return Err(Error::Conflict(format!(
                    "network {:?} has no auto-assign {purpose} pool",
                    req.network
                )));
            }
            c
        };

        let mut last_err = None;
        'pools: for &pi in &candidates {
            let mut picked = Vec::with_capacity(families.len());
            for (i, f) in families.iter().enumerate() {
                if !net.pools[pi].has_family(*f) {
                    if required(i) {
                        last_err = Some(Error::Exhausted(format!(
                            "pool {:?} of network {:?} has no {f} range",
                            net.pools[pi].name, req.network
                        )));
                        continue 'pools;
                    }
                    continue;
                }
                match self.pick(
                    net,
                    pi,
                    *f,
                    requested[f.index()],
                    &key,
                    &owner,
                    &req.sharing_key,
                    &req.ports,
                ) {
                    Ok(ip) => picked.push(ip),
                    Err(e) if required(i) || requested[f.index()].is_some() => {
                        if matches!(e, Error::Exhausted(_)) {
                            last_err = Some(e);
                            continue 'pools;
                        }
                        return Err(e);
                    }
                    Err(_) => {}
                }
            }
            let pool_name = net.pools[pi].name.clone();
            let alloc = Allocation {
                network: req.network.clone(),
                pool: pool_name,
                owner: owner.clone(),
                addresses: picked,
                sharing_key: req.sharing_key.clone(),
                ports: req.ports.clone(),
                created_ms: now_ms,
                updated_ms: now_ms,
                revision: seq,
            };
            let mut ops = self.hold(&req.network, pi, &key, &alloc.addresses);
            ops.push(Op::PutAlloc(alloc.clone()));
            if let Some(net) = self.networks.get_mut(&req.network) {
                net.pools[pi].allocations += 1;
            }
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

    /// Marks addresses held by `key`; returns the ops for quarantine entries it consumed.
    fn hold(&mut self, network: &str, pi: usize, key: &str, ips: &[IpAddr]) -> Vec<Op> {
        let mut ops = Vec::new();
        let Some(net) = self.networks.get_mut(network) else {
            return ops;
        };
        for ip in ips {
            if net.quarantine.remove(ip).is_some() {
                ops.push(Op::DelQuarantine(network.to_string(), *ip));
            }
            net.pools[pi].take(ip);
            net.holders.entry(*ip).or_default().push(key.to_string());
        }
        ops
    }

    /// Drops `key` as a holder of `ip`; the last holder leaving sends the address to
    /// quarantine (grace > 0) or back to free. Returns the ops.
    fn unhold(
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

    #[allow(clippy::too_many_arguments)]
    fn allocate_existing(
        &mut self,
        mut a: Allocation,
        req: &AllocateReq,
        owner: &Owner,
        families: &[Family],
        requested: [Option<(usize, IpAddr)>; 2],
        required: impl Fn(usize) -> bool,
        seq: u64,
        now_ms: u64,
    ) -> Result<Outcome<(Allocation, bool)>> {
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
        for (i, ip) in requested.iter().flatten() {
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
                if let Some(why) = self.can_hold(net, ip, &key, owner, &req.sharing_key, &req.ports) {
                    return Err(Error::Conflict(format!("sharing_key/ports: {ip} is {why}")));
                }
            }
        }
        let explicit_families = !req.families.is_empty();
        let dropped: Vec<IpAddr> = if explicit_families {
            a.addresses
                .iter()
                .copied()
                .filter(|ip| !families.contains(&Family::of(ip)))
                .collect()
        } else {
            vec![]
        };
        let mut added = Vec::new();
        for (i, f) in families.iter().enumerate() {
            if a.address_of(*f).is_some() {
                continue;
            }
            if !net.pools[pi].has_family(*f) {
                if required(i) {
                    return Err(Error::Exhausted(format!(
                        "pool {:?} of network {:?} has no {f} range",
                        a.pool, a.network
                    )));
                }
                continue;
            }
            match self.pick(
                net,
                pi,
                *f,
                requested[f.index()],
                &key,
                owner,
                &req.sharing_key,
                &req.ports,
            ) {
                Ok(ip) => added.push(ip),
                Err(e) if required(i) || requested[f.index()].is_some() => return Err(e),
                Err(_) => {}
            }
        }
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
            families
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
        self.allocs.insert(key, a.clone());
        Ok(((a.clone(), false), ops, vec![Change::Modified(a)]))
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
        // Narrow the scan by key prefix where the filters allow.
        let prefix = match (&f.network, &f.cluster_id) {
            (Some(n), Some(c)) => format!("{n}/{c}/"),
            (Some(n), None) => format!("{n}/"),
            _ => String::new(),
        };
        let start = if page_token.is_empty() {
            Bound::Included(prefix.clone())
        } else {
            Bound::Excluded(page_token.to_string())
        };
        let mut out = Vec::new();
        let mut next = String::new();
        for (k, a) in self.allocs.range((start, Bound::Unbounded)) {
            if !k.starts_with(&prefix) {
                break;
            }
            if !f.matches(a) {
                continue;
            }
            if out.len() == size {
                next = out.last().map(Allocation::key).unwrap_or_default();
                break;
            }
            out.push(a.clone());
        }
        Ok((out, next))
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
                    let quarantined = net
                        .quarantine
                        .keys()
                        .filter(|ip| Family::of(ip) == f && p.spans(ip))
                        .count() as u128;
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

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The integer form of an address (re-exported for tests).
pub fn addr_value(ip: &IpAddr) -> u128 {
    to_u128(ip)
}
