//! Storage engines behind one small trait, so a second engine (etcd, for HA) can slot in and
//! share the same test suite (`tests` below runs against every engine).
//!
//! Contract: `commit` applies a batch atomically and returns only once it is durable (on disk,
//! fsynced); `load` returns exactly what the committed batches left, in any order.

use crate::{
    error::Result,
    ledger::state::{Op, Snapshot},
};

pub mod sled_engine;

/// A durable key-value home for the ledger's records.
pub trait Engine: Send + Sync + 'static {
    /// Everything stored.
    fn load(&self) -> Result<Snapshot>;
    /// Applies `ops` atomically and durably, and records `seq` as the last commit sequence.
    fn commit(&self, ops: &[Op], seq: u64) -> Result<()>;
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;
}

#[cfg(test)]
pub(crate) mod suite {
    //! The engine-agnostic test suite.
    use std::net::IpAddr;

    use super::Engine;
    use crate::{
        ledger::state::Op,
        model::{Allocation, NetworkDef, NetworkRecord, Owner, OwnerKind, PoolDef, Purpose, Quarantined},
    };

    fn net(name: &str) -> NetworkRecord {
        NetworkRecord {
            def: NetworkDef {
                name: name.into(),
                prefixes: vec!["10.0.0.0/16".parse().unwrap()],
                gateways: vec![],
                dns_servers: vec![],
                vlan: 7,
                pools: vec![PoolDef {
                    name: "vip".into(),
                    purpose: Purpose::Vip,
                    ranges: vec!["10.0.1.0/24".into()],
                    exclusions: vec![],
                    auto_assign: true,
                }],
                reuse_grace_secs: Some(5),
                managed_by: String::new(),
            },
            version: 1,
            created_ms: 1,
            updated_ms: 2,
        }
    }

    fn alloc(name: &str, ip: &str) -> Allocation {
        Allocation {
            network: "n".into(),
            pool: "vip".into(),
            owner: Owner {
                cluster_id: "a".into(),
                kind: OwnerKind::Service,
                namespace: "ns".into(),
                name: name.into(),
                uid: "u".into(),
            },
            addresses: vec![ip.parse().unwrap()],
            sharing_key: String::new(),
            ports: vec![],
            created_ms: 3,
            updated_ms: 4,
            revision: 9,
        }
    }

    /// Put, overwrite, delete and reload across every record kind.
    pub(crate) fn round_trip(e: &dyn Engine) {
        let a1 = alloc("one", "10.0.1.1");
        let a2 = alloc("two", "10.0.1.2");
        let q = Quarantined {
            network: "n".into(),
            pool: "vip".into(),
            address: "10.0.1.3".parse().unwrap(),
            until_ms: 99,
            previous_owner: a1.owner.clone(),
        };
        e.commit(
            &[
                Op::PutNetwork(net("n")),
                Op::PutNetwork(net("m")),
                Op::PutAlloc(a1.clone()),
                Op::PutAlloc(a2.clone()),
                Op::PutQuarantine(q.clone()),
            ],
            1,
        )
        .unwrap();
        let mut a2b = a2.clone();
        a2b.addresses.push("fd00::2".parse::<IpAddr>().unwrap());
        e.commit(
            &[
                Op::DelNetwork("m".into()),
                Op::DelAlloc(a1.key()),
                Op::PutAlloc(a2b.clone()),
            ],
            2,
        )
        .unwrap();
        let s = e.load().unwrap();
        assert_eq!(s.networks, vec![net("n")]);
        assert_eq!(s.allocations, vec![a2b]);
        assert_eq!(s.quarantined, vec![q.clone()]);
        assert_eq!(s.seq, 2);
        e.commit(&[Op::DelQuarantine("n".into(), q.address)], 3).unwrap();
        assert!(e.load().unwrap().quarantined.is_empty());
    }
}
