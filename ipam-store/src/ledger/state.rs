//! The ledger's in-memory state: networks with their pools' free space, allocations by owner
//! key, the reuse-grace quarantine, and the fleet-wide index of whose address space is
//! whose; plus loading it from stored records. The transitions on it live beside this file,
//! one concern each (see the module doc of `ledger`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{pool::PoolState, quarantine::Quarantine, shared::Shared, space::Spaces};
use crate::{
    alloc::{
        addr::{AddrRange, Family},
        sharing,
    },
    error::{Error, Result},
    model::{Allocation, MAX_REUSE_GRACE_SECS, NetworkRecord},
    store::{Op, Snapshot},
};

/// Revisions, sequences and versions stay below this: far beyond any real count, and far
/// enough from `u64::MAX` that no increment can overflow.
pub const MAX_REVISION: u64 = 1 << 62;

/// One network's runtime state.
#[derive(Debug)]
pub(super) struct NetState {
    /// Shared with the commit's op and the reply: the largest definition is megabytes, too
    /// much to copy under the ledger's lock.
    pub(super) rec: Arc<NetworkRecord>,
    pub(super) pools: Vec<PoolState>,
    /// What the network claims (prefixes and whole pool ranges), named for error messages.
    pub(super) footprint: Vec<(String, AddrRange)>,
    /// The footprint merged into disjoint intervals (what `spaces` holds for it).
    pub(super) space: Vec<AddrRange>,
    /// address -> keys of the allocations holding it (more than one only when shared);
    /// ordered, so "is anything held in this range" is one range query.
    pub(super) holders: BTreeMap<IpAddr, Vec<String>>,
    pub(super) quarantine: Quarantine,
    /// Held addresses outside their pool's span.
    pub(super) out_of_range: BTreeSet<IpAddr>,
}

impl NetState {
    pub(super) fn pool(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    pub(super) fn pool_spanning(&self, ip: &IpAddr) -> Option<usize> {
        self.pools.iter().position(|p| p.spans(ip))
    }

    pub(super) fn grace_ms(&self, default_secs: u32) -> u64 {
        u64::from(self.rec.def.reuse_grace_secs.unwrap_or(default_secs)) * 1000
    }
}

/// The whole ledger in memory.
#[derive(Debug)]
pub struct State {
    pub(super) networks: BTreeMap<String, NetState>,
    pub(super) allocs: BTreeMap<String, Allocation>,
    /// `allocs`' addresses held under a sharing key, by (network, cluster, pool, key).
    pub(super) shared: Shared,
    /// Every network's address space, merged per network (disjoint across networks).
    pub(super) spaces: Spaces,
    /// Addresses of force-deleted networks in their reuse grace: no network hands them out
    /// until it ends.
    pub(super) released: Quarantine,
    /// Last assigned commit sequence.
    pub seq: u64,
    pub(super) default_grace_secs: u32,
    /// Ops with no reply waiting on them (reaped quarantine entries), committed with the next
    /// batch. Losing them is harmless: expired entries are ignored on load.
    pub(super) deferred: Vec<Op>,
    /// Network states a transition replaced, dropped by the caller after it releases the
    /// ledger's lock (a large definition takes milliseconds to free).
    pub(super) retired: Vec<NetState>,
}

impl State {
    /// An empty ledger.
    pub fn new(default_grace_secs: u32) -> Self {
        State {
            networks: BTreeMap::new(),
            allocs: BTreeMap::new(),
            shared: Shared::default(),
            spaces: Spaces::default(),
            released: Quarantine::default(),
            seq: 0,
            default_grace_secs,
            deferred: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// Rebuilds the state from stored records. With `strict` (Import), the records must pass
    /// every invariant of the ledger and every value range (overlapping networks, an address
    /// held twice or inside another network's space, an owner twice, revisions, versions and
    /// grace deadlines out of range, an allocation of an unknown network or pool): the first
    /// failure is an error naming the record. Without it (restart), inconsistencies are logged
    /// and every record is kept, since dropping data would be worse than serving it flagged.
    pub fn load(mut snap: Snapshot, default_grace_secs: u32, now_ms: u64, strict: bool) -> Result<Self> {
        let allocations = std::mem::take(&mut snap.allocations);
        Self::load_streamed(snap, allocations, default_grace_secs, now_ms, strict)
    }

    /// [`State::load`] with the allocations taken from an iterator as they come (a restart
    /// reads them from the engine while this builds the state; `head` has every record but
    /// them, its `allocations` is ignored). Allocations in key order, as engines return them,
    /// are bulk-built; any order is accepted.
    pub fn load_streamed(
        snap: Snapshot,
        allocations: impl IntoIterator<Item = Allocation>,
        default_grace_secs: u32,
        now_ms: u64,
        strict: bool,
    ) -> Result<Self> {
        let mut st = State::new(default_grace_secs);
        let complain = |field: String, msg: String| -> Result<()> {
            if strict {
                // Import: the request's field is `backup`.
                return Err(Error::invalid(format!("backup.{field}"), msg));
            }
            tracing::error!("inconsistent store record kept as is: {field}: {msg}");
            Ok(())
        };
        if snap.seq >= MAX_REVISION {
            complain("seq".into(), format!("{} is not below {MAX_REVISION}", snap.seq))?;
        }
        st.seq = snap.seq;
        for (i, rec) in snap.networks.into_iter().enumerate() {
            let field = format!("networks[{i}]");
            if rec.version >= MAX_REVISION {
                complain(
                    format!("{field}.version"),
                    format!("{} is not below {MAX_REVISION}", rec.version),
                )?;
            }
            let parsed = match rec.def.validate() {
                Ok(p) => p,
                Err(e) => {
                    complain(field, format!("network {:?}: {e}", rec.def.name))?;
                    continue;
                }
            };
            if st.networks.contains_key(&rec.def.name) {
                complain(field, format!("network {:?} appears twice", rec.def.name))?;
                continue;
            }
            let footprint = rec.def.footprint(&parsed);
            let space = super::space::merged(&footprint);
            if let Err(e) = st.check_overlap(&rec.def.name, &footprint, &space) {
                complain(field, e.to_string())?;
            }
            st.spaces.insert(&rec.def.name, &space);
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
                    rec: rec.into(),
                    pools,
                    footprint,
                    space,
                    holders: BTreeMap::new(),
                    quarantine: Quarantine::default(),
                    out_of_range: BTreeSet::new(),
                },
            );
        }
        // Addresses held outside their own network's space, and by which network. Spaces are
        // disjoint, so an address two networks hold lies outside the space of at least one of
        // them: the second holder is caught either here (both outside) or by `owner_of` (it
        // lies in the other's space). Addresses at home — all of them, normally — need no entry.
        let mut abroad: HashMap<IpAddr, String> = HashMap::new();
        // Snapshots come in key order, so `allocs` is built in one bulk pass at the end.
        let allocations = allocations.into_iter();
        let mut allocs: Vec<(String, Allocation)> = Vec::with_capacity(allocations.size_hint().0);
        for (i, a) in allocations.enumerate() {
            let field = format!("allocations[{i}]");
            if a.revision >= MAX_REVISION {
                complain(
                    format!("{field}.revision"),
                    format!("{} is not below {MAX_REVISION}", a.revision),
                )?;
            }
            st.seq = st.seq.max(a.revision);
            let key = a.key();
            let in_order = allocs.last().is_none_or(|(k, _)| *k < key);
            if !in_order && Self::kept(&st.allocs, &allocs, &key).is_some() {
                complain(field, format!("owner {key} appears twice"))?;
                continue;
            }
            for ip in &a.addresses {
                match st.spaces.owner_of(ip) {
                    Some(n) if n == a.network => continue,
                    Some(other) => complain(
                        field.clone(),
                        format!("{ip} of {key} lies in the space of network {other:?}"),
                    )?,
                    None => {}
                }
                if let Some(other) = abroad.get(ip).filter(|n| **n != a.network) {
                    complain(
                        field.clone(),
                        format!("{ip} of {key} is also held in network {other:?}"),
                    )?;
                }
                abroad.insert(*ip, a.network.clone());
            }
            let Some(net) = st.networks.get_mut(&a.network) else {
                complain(field, format!("{key} names unknown network {:?}", a.network))?;
                Self::keep(&mut st.allocs, &mut allocs, in_order, key, a);
                continue;
            };
            let pi = net.pool(&a.pool);
            match pi {
                Some(pi) => net.pools[pi].allocations += 1,
                None => complain(field.clone(), format!("{key} names unknown pool {:?}", a.pool))?,
            }
            for ip in &a.addresses {
                let holders = net.holders.entry(*ip).or_default();
                if holders.is_empty() {
                    // The first holder's pool decides, as in `rebuild_free`.
                    if !pi.is_some_and(|pi| net.pools[pi].spans(ip)) {
                        net.out_of_range.insert(*ip);
                    }
                } else {
                    for h in holders.iter() {
                        if let Some(other) = Self::kept(&st.allocs, &allocs, h)
                            && let Some(why) = sharing::conflict(&other.claim(), &other.owner, &a.claim())
                        {
                            complain(field.clone(), format!("{ip} of {key}: {why}"))?;
                        }
                    }
                }
                holders.push(key.clone());
            }
            Self::keep(&mut st.allocs, &mut allocs, in_order, key, a);
        }
        // Sorted and unique: a bulk build, no per-key search.
        let bulk = std::mem::take(&mut st.allocs);
        st.allocs = allocs.into_iter().collect();
        st.allocs.extend(bulk);
        let latest = now_ms.saturating_add(u64::from(MAX_REUSE_GRACE_SECS) * 1000);
        for (i, q) in snap.quarantined.into_iter().enumerate() {
            let field = format!("quarantined[{i}]");
            if q.until_ms <= now_ms {
                // Expired while the store was down: free again; delete the record later.
                st.deferred.push(Op::DelQuarantine(q.network.clone(), q.address));
                continue;
            }
            if q.until_ms > latest {
                complain(
                    format!("{field}.until"),
                    format!(
                        "{} ms since epoch is more than the longest reuse grace ({MAX_REUSE_GRACE_SECS} s) away",
                        q.until_ms
                    ),
                )?;
            }
            let home = st.spaces.owner_of(&q.address);
            let held_at_home = home.filter(|n| {
                st.networks
                    .get(*n)
                    .is_some_and(|net| net.holders.contains_key(&q.address))
            });
            if let Some(n) = held_at_home.or_else(|| abroad.get(&q.address).map(String::as_str)) {
                complain(
                    field,
                    format!("{} is in its reuse grace and held in network {n:?}", q.address),
                )?;
                continue;
            }
            match st.networks.get_mut(&q.network) {
                Some(net) => {
                    if net.quarantine.get(&q.address).is_some() {
                        complain(field, format!("{} is in the quarantine twice", q.address))?;
                    }
                    net.quarantine.insert(q);
                }
                // The network was force-deleted while the address was in its grace.
                None => {
                    if st.released.get(&q.address).is_some() {
                        complain(field, format!("{} is in the quarantine twice", q.address))?;
                    }
                    st.released.insert(q);
                }
            }
        }
        for a in st.allocs.values() {
            st.shared.add(a);
        }
        let released = &st.released;
        for net in st.networks.values_mut() {
            Self::recount_free(net, released);
        }
        Ok(st)
    }

    /// An allocation read by `load`: onto the sorted run for the bulk build, or (out of key
    /// order, which a snapshot never is) straight into the map.
    fn keep(
        map: &mut BTreeMap<String, Allocation>,
        run: &mut Vec<(String, Allocation)>,
        in_order: bool,
        key: String,
        a: Allocation,
    ) {
        if in_order {
            run.push((key, a));
        } else {
            map.insert(key, a);
        }
    }

    /// The allocation `load` kept under `key` so far, O(log n).
    fn kept<'a>(
        map: &'a BTreeMap<String, Allocation>,
        run: &'a [(String, Allocation)],
        key: &str,
    ) -> Option<&'a Allocation> {
        map.get(key).or_else(|| {
            run.binary_search_by(|(k, _)| k.as_str().cmp(key))
                .ok()
                .map(|i| &run[i].1)
        })
    }

    /// Recomputes every pool's free set and held counts from spans, holders and quarantines
    /// (the network's own and that of deleted networks). O(h log n) for h held addresses.
    fn recount_free(net: &mut NetState, released: &Quarantine) {
        for p in &mut net.pools {
            p.free = p.span.clone();
            p.held = [0, 0];
        }
        for ip in net.holders.keys() {
            for p in &mut net.pools {
                // Free starts equal to the span and each address is taken once.
                if p.take(ip) {
                    p.held[Family::of(ip).index()] += 1;
                }
            }
        }
        for ip in net.quarantine.keys().chain(released.keys()) {
            for p in &mut net.pools {
                p.take(ip);
            }
        }
    }

    /// Recomputes every pool's free set and the out-of-range set from spans, holders and
    /// quarantines (the network's own and that of deleted networks). O(h log n) for h held
    /// addresses.
    pub(super) fn rebuild_free(
        net: &mut NetState,
        allocs: &BTreeMap<String, Allocation>,
        released: &Quarantine,
    ) {
        Self::recount_free(net, released);
        net.out_of_range.clear();
        for (ip, keys) in &net.holders {
            let pool = keys.first().and_then(|k| allocs.get(k)).map(|a| a.pool.as_str());
            let in_own_pool = pool
                .and_then(|n| net.pools.iter().find(|p| p.name == n))
                .is_some_and(|p| p.spans(ip));
            if !in_own_pool {
                net.out_of_range.insert(*ip);
            }
        }
    }

    /// Everything, as records.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            networks: self.networks.values().map(|n| (*n.rec).clone()).collect(),
            allocations: self.allocs.values().cloned().collect(),
            quarantined: self
                .networks
                .values()
                .flat_map(|n| n.quarantine.values().cloned())
                .chain(self.released.values().cloned())
                .collect(),
            seq: self.seq,
        }
    }

    /// True when the ledger holds nothing.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.allocs.is_empty()
    }

    /// Network states replaced since the last call, for the caller to drop outside its lock.
    pub(super) fn take_retired(&mut self) -> Vec<NetState> {
        std::mem::take(&mut self.retired)
    }

    /// Ops that were deferred; the caller commits them with its batch.
    pub fn take_deferred(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.deferred)
    }
}

pub(super) fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}
