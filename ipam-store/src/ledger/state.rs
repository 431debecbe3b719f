//! The ledger's in-memory state: networks with their pools' free space, allocations by owner
//! key, and the reuse-grace quarantine; plus loading it from stored records. The transitions
//! on it live beside this file, one concern each (see the module doc of `ledger`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::{pool::PoolState, quarantine::Quarantine};
use crate::{
    alloc::sharing,
    error::{Error, Result},
    model::{Allocation, NetworkRecord},
    store::{Op, Snapshot},
};

/// One network's runtime state.
#[derive(Debug)]
pub(super) struct NetState {
    pub(super) rec: NetworkRecord,
    pub(super) pools: Vec<PoolState>,
    /// address -> keys of the allocations holding it (more than one only when shared).
    pub(super) holders: HashMap<IpAddr, Vec<String>>,
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
    /// Last assigned commit sequence.
    pub seq: u64,
    pub(super) default_grace_secs: u32,
    /// Ops with no reply waiting on them (reaped quarantine entries), committed with the next
    /// batch. Losing them is harmless: expired entries are ignored on load.
    pub(super) deferred: Vec<Op>,
}

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
                        && let Some(why) = sharing::conflict(&other.claim(), &other.owner, &a.claim())
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
    pub(super) fn rebuild_free(net: &mut NetState, allocs: &BTreeMap<String, Allocation>) {
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
}

pub(super) fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}
