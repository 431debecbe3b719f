//! The engine suite: one set of tests every engine runs (garage's `db/test.rs` is the model).
//!
//! An engine's test module calls [`engine_suite!`](crate::engine_suite) with a factory: a
//! closure that sets up an empty store and returns an *opener*, which opens (or re-opens) that
//! same store each time it is called. A suite test drops an engine before opening it again.

use std::net::IpAddr;

use super::{Engine, Op};
use crate::model::{Allocation, NetworkDef, NetworkRecord, Owner, OwnerKind, PoolDef, Purpose, Quarantined};

/// Generates one `#[test]` per suite case for the engine the factory makes.
#[macro_export]
#[doc(hidden)]
macro_rules! engine_suite {
    ($factory:expr) => {
        mod suite {
            #[allow(unused_imports)]
            use super::*;
            $crate::engine_suite!(@cases $factory;
                empty_store_loads_empty,
                round_trip,
                reopen_keeps_everything,
                ops_apply_in_batch_order,
                overwrite_and_missing_delete,
                sequence_is_the_last_committed,
                quarantine_is_keyed_by_network_and_address,
                large_batch,
                streamed_load_is_load,
            );
        }
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let open = ($factory)();
                $crate::store::suite::$case(&open);
            }
        )*
    };
}

/// Opens (again) the store under test.
pub(crate) type Opener<'a> = &'a dyn Fn() -> Box<dyn Engine>;

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

fn quarantined(net: &str, ip: &str) -> Quarantined {
    Quarantined {
        network: net.into(),
        pool: "vip".into(),
        address: ip.parse().unwrap(),
        until_ms: 99,
        previous_owner: alloc("gone", ip).owner,
    }
}

fn sorted(mut v: Vec<Allocation>) -> Vec<Allocation> {
    v.sort_by_key(Allocation::key);
    v
}

/// A new store holds nothing, at sequence 0.
pub(crate) fn empty_store_loads_empty(open: Opener<'_>) {
    let s = open().load().unwrap();
    assert!(s.networks.is_empty() && s.allocations.is_empty() && s.quarantined.is_empty());
    assert_eq!(s.seq, 0);
}

/// Put, overwrite, delete and reload across every record kind.
pub(crate) fn round_trip(open: Opener<'_>) {
    let e = open();
    let a1 = alloc("one", "10.0.1.1");
    let a2 = alloc("two", "10.0.1.2");
    let q = quarantined("n", "10.0.1.3");
    e.commit(
        &[
            Op::PutNetwork(net("n").into()),
            Op::PutNetwork(net("m").into()),
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

/// What was committed is there after the engine is closed and opened again.
pub(crate) fn reopen_keeps_everything(open: Opener<'_>) {
    let (a, q) = (alloc("one", "10.0.1.1"), quarantined("n", "10.0.1.9"));
    {
        let e = open();
        e.commit(
            &[
                Op::PutNetwork(net("n").into()),
                Op::PutAlloc(a.clone()),
                Op::PutQuarantine(q.clone()),
            ],
            4,
        )
        .unwrap();
    }
    let s = open().load().unwrap();
    assert_eq!(s.networks, vec![net("n")]);
    assert_eq!(s.allocations, vec![a]);
    assert_eq!(s.quarantined, vec![q]);
    assert_eq!(s.seq, 4);
}

/// Ops of one batch apply in order: put-then-delete leaves nothing, delete-then-put the value.
pub(crate) fn ops_apply_in_batch_order(open: Opener<'_>) {
    let e = open();
    let (a, b) = (alloc("a", "10.0.1.1"), alloc("b", "10.0.1.2"));
    e.commit(&[Op::PutAlloc(b.clone())], 1).unwrap();
    e.commit(
        &[
            Op::PutAlloc(a.clone()),
            Op::DelAlloc(a.key()),
            Op::DelAlloc(b.key()),
            Op::PutAlloc(b.clone()),
        ],
        2,
    )
    .unwrap();
    assert_eq!(e.load().unwrap().allocations, vec![b]);
}

/// A put replaces the record under the same key; deleting a missing key is no error.
pub(crate) fn overwrite_and_missing_delete(open: Opener<'_>) {
    let e = open();
    let a = alloc("a", "10.0.1.1");
    let mut a2 = a.clone();
    a2.addresses = vec!["10.0.1.7".parse().unwrap()];
    a2.revision = 10;
    e.commit(&[Op::PutAlloc(a), Op::PutAlloc(a2.clone())], 1).unwrap();
    e.commit(
        &[
            Op::DelAlloc("n/nobody".into()),
            Op::DelNetwork("none".into()),
            Op::DelQuarantine("none".into(), "10.9.9.9".parse().unwrap()),
        ],
        2,
    )
    .unwrap();
    let s = e.load().unwrap();
    assert_eq!(s.allocations, vec![a2]);
    assert_eq!(s.seq, 2);
}

/// The stored sequence is the last commit's, also for a batch of no ops.
pub(crate) fn sequence_is_the_last_committed(open: Opener<'_>) {
    let e = open();
    e.commit(&[Op::PutNetwork(net("n").into())], 41).unwrap();
    e.commit(&[], 42).unwrap();
    assert_eq!(e.load().unwrap().seq, 42);
}

/// The same address quarantined in two networks is two records.
pub(crate) fn quarantine_is_keyed_by_network_and_address(open: Opener<'_>) {
    let e = open();
    let (q1, q2) = (quarantined("n", "10.0.1.3"), quarantined("m", "10.0.1.3"));
    e.commit(&[Op::PutQuarantine(q1.clone()), Op::PutQuarantine(q2.clone())], 1)
        .unwrap();
    let mut got = e.load().unwrap().quarantined;
    got.sort_by(|a, b| a.network.cmp(&b.network));
    assert_eq!(got, vec![q2.clone(), q1]);
    e.commit(&[Op::DelQuarantine("n".into(), q2.address)], 2).unwrap();
    assert_eq!(e.load().unwrap().quarantined, vec![q2]);
}

/// Ten thousand records in one batch all come back.
pub(crate) fn large_batch(open: Opener<'_>) {
    let e = open();
    let all: Vec<Allocation> = (0..10_000u32)
        .map(|i| {
            alloc(
                &format!("svc-{i}"),
                &std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(),
            )
        })
        .collect();
    let ops: Vec<Op> = all.iter().cloned().map(Op::PutAlloc).collect();
    e.commit(&ops, 1).unwrap();
    assert_eq!(sorted(e.load().unwrap().allocations), sorted(all));
}

/// `load_streamed` hands over what `load` returns: the head first (every record but the
/// allocations), then every allocation once, across as many chunks as the engine makes.
pub(crate) fn streamed_load_is_load(open: Opener<'_>) {
    let e = open();
    let mut ops = vec![
        Op::PutNetwork(net("n").into()),
        Op::PutQuarantine(quarantined("n", "10.0.200.1")),
    ];
    ops.extend((0..10_000u32).map(|i| {
        Op::PutAlloc(alloc(
            &format!("svc-{i}"),
            &std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string(),
        ))
    }));
    e.commit(&ops, 7).unwrap();
    let whole = e.load().unwrap();
    let head = std::cell::RefCell::new(None);
    let mut got = Vec::new();
    let mut chunks = 0;
    e.load_streamed(
        &mut |h| {
            assert!(head.replace(Some(h)).is_none(), "head sent twice");
            Ok(())
        },
        &mut |c| {
            assert!(head.borrow().is_some(), "allocations before the head");
            chunks += 1;
            got.extend(c);
            Ok(())
        },
    )
    .unwrap();
    let head = head.into_inner().expect("no head");
    assert!(head.allocations.is_empty());
    assert_eq!(
        (&head.networks, &head.quarantined, head.seq),
        (&whole.networks, &whole.quarantined, 7)
    );
    assert!(chunks >= 1);
    assert_eq!(sorted(got), sorted(whole.allocations));
    // A sink's error stops the load and is returned.
    let err = e
        .load_streamed(&mut |_| Ok(()), &mut |_| {
            Err(crate::Error::Storage("sink full".into()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("sink full"), "{err}");
}
