//! An in-memory engine: the reference the engine suite holds every other engine to, and a
//! backing for tests and benchmarks of the layers above. Nothing survives the process; clones
//! share one store, so "reopening" is cloning.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use super::{Engine, Op, Snapshot};
use crate::{
    error::Result,
    model::{Allocation, NetworkRecord, Quarantined},
};

#[derive(Default)]
struct Inner {
    networks: BTreeMap<String, NetworkRecord>,
    allocations: BTreeMap<String, Allocation>,
    quarantined: BTreeMap<(String, IpAddr), Quarantined>,
    seq: u64,
}

/// Records in ordered maps behind a mutex.
#[derive(Clone, Default)]
pub struct MemoryEngine {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryEngine {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every commit applies fully before the guard drops; a panic cannot leave half a batch.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Engine for MemoryEngine {
    fn load(&self) -> Result<Snapshot> {
        let g = self.lock();
        Ok(Snapshot {
            networks: g.networks.values().cloned().collect(),
            allocations: g.allocations.values().cloned().collect(),
            quarantined: g.quarantined.values().cloned().collect(),
            seq: g.seq,
        })
    }

    fn commit(&self, ops: &[Op], seq: u64) -> Result<()> {
        let mut g = self.lock();
        for op in ops {
            match op {
                Op::PutNetwork(n) => {
                    g.networks.insert(n.def.name.clone(), (**n).clone());
                }
                Op::DelNetwork(name) => {
                    g.networks.remove(name);
                }
                Op::PutAlloc(a) => {
                    g.allocations.insert(a.key(), a.clone());
                }
                Op::DelAlloc(k) => {
                    g.allocations.remove(k);
                }
                Op::PutQuarantine(q) => {
                    g.quarantined.insert((q.network.clone(), q.address), q.clone());
                }
                Op::DelQuarantine(net, ip) => {
                    g.quarantined.remove(&(net.clone(), *ip));
                }
            }
        }
        g.seq = seq;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::engine_suite!(|| {
        let e = MemoryEngine::new();
        move || Box::new(e.clone()) as Box<dyn Engine>
    });
}
