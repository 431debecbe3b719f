//! The follower's `State::apply` against the leader's transitions: random sequences of
//! allocations (shared and exclusive, both families), releases in and out of the grace, pool
//! shrinks and regrowths, grace edits, force-deletes with re-creation and conflict reports; after every step
//! the follower, fed only the committed ops, equals the leader in everything it serves from.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::store::Op;

#[derive(Clone, Debug)]
enum Step {
    Alloc {
        net: u8,
        cluster: u8,
        name: u8,
        key: Option<u8>,
        port: u16,
        v6: bool,
    },
    Release {
        net: u8,
        cluster: u8,
        name: u8,
    },
    Shrink {
        net: u8,
        small: bool,
    },
    Grace {
        net: u8,
        secs: u32,
    },
    ForceDelete {
        net: u8,
    },
    /// ReportConflict on a service's address (`holder`) or on any address of the pool.
    Conflict {
        net: u8,
        cluster: u8,
        name: u8,
        addr: u8,
        v6: bool,
        holder: bool,
    },
    Reload,
    Tick,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u8..2, 0u8..2, 0u8..8, proptest::option::of(0u8..2), 1u16..3, any::<bool>())
            .prop_map(|(net, cluster, name, key, port, v6)| Step::Alloc { net, cluster, name, key, port, v6 }),
        4 => (0u8..2, 0u8..2, 0u8..8).prop_map(|(net, cluster, name)| Step::Release { net, cluster, name }),
        1 => (0u8..2, any::<bool>()).prop_map(|(net, small)| Step::Shrink { net, small }),
        1 => (0u8..2, 0u32..3).prop_map(|(net, secs)| Step::Grace { net, secs }),
        1 => (0u8..2).prop_map(|net| Step::ForceDelete { net }),
        2 => (0u8..2, 0u8..2, 0u8..8, 0u8..6, any::<bool>(), any::<bool>())
            .prop_map(|(net, cluster, name, addr, v6, holder)| Step::Conflict { net, cluster, name, addr, v6, holder }),
        1 => Just(Step::Reload),
        2 => Just(Step::Tick),
    ]
}

/// Network `n<i>`: a VIP pool of 6 IPv4 + 3 IPv6 addresses (2 + 1 when small).
fn network(i: u8, small: bool, grace: u32) -> NetworkDef {
    let (v4, v6) = if small {
        (format!("10.{i}.0.1-10.{i}.0.2"), format!("fd0{i}::1-fd0{i}::1"))
    } else {
        (format!("10.{i}.0.1-10.{i}.0.6"), format!("fd0{i}::1-fd0{i}::3"))
    };
    let mut n = net(&format!("n{i}"), vec![pool("vip", Purpose::Vip, &[&v4, &v6])]);
    n.reuse_grace_secs = Some(grace);
    n
}

/// A batch as an engine stores it and a watch returns it: the last op per record, in the
/// order of those last ops (`EtcdEngine::txn_ops`).
fn as_stored(ops: Vec<Op>) -> Vec<Op> {
    fn key(op: &Op) -> String {
        match op {
            Op::PutNetwork(n) => format!("n/{}", n.def.name),
            Op::DelNetwork(name) => format!("n/{name}"),
            Op::PutAlloc(a) => format!("a/{}", a.key()),
            Op::DelAlloc(k) => format!("a/{k}"),
            Op::PutQuarantine(q) => format!("q/{}/{}", q.network, q.address),
            Op::DelQuarantine(net, ip) => format!("q/{net}/{ip}"),
        }
    }
    let last: BTreeMap<String, usize> = ops.iter().enumerate().map(|(i, op)| (key(op), i)).collect();
    ops.into_iter()
        .enumerate()
        .filter(|(i, op)| last[&key(op)] == *i)
        .map(|(_, op)| op)
        .collect()
}

/// Everything the follower serves from, in a comparable form. Quarantine entries are
/// compared as one set: a force-delete and re-creation of a network in one batch is stored
/// as a put of the network, so the follower keeps the old grace entries in the network's own
/// quarantine where the leader moved them to the deleted networks' one — as the leader itself
/// would after a restart; either keeps the addresses from everyone until the grace ends.
fn served(st: &State) -> String {
    // (The sharing index is a hash map: compared with `==` by the caller.)
    let mut out = format!("seq {}\nallocs {:?}\nspaces {:?}\n", st.seq, st.allocs, st.spaces);
    let grace: std::collections::BTreeSet<String> = st
        .released
        .values()
        .chain(st.networks.values().flat_map(|n| n.quarantine.values()))
        .map(|q| format!("{q:?}"))
        .collect();
    out += &format!("grace {grace:?}\n");
    for (name, n) in &st.networks {
        // Holders of a shared address in any order (a reload sorts them; sharers are of one
        // pool, so the order decides nothing).
        let holders: BTreeMap<_, std::collections::BTreeSet<_>> = n
            .holders
            .iter()
            .map(|(ip, ks)| (ip, ks.iter().collect()))
            .collect();
        out += &format!(
            "net {name}: {:?} footprint {:?} holders {:?} oor {:?} pools {:?}\n",
            n.rec, n.footprint, holders, n.out_of_range, n.pools
        );
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_follower_fed_the_committed_ops_equals_the_leader(steps in proptest::collection::vec(step(), 1..80)) {
        let mut now = 1_000u64;
        let mut leader = State::new(0);
        let mut grace: BTreeMap<u8, u32> = BTreeMap::new();
        for i in 0..2 {
            leader.upsert_network(network(i, false, 1), None, false, now).unwrap();
            grace.insert(i, 1);
        }
        let mut follower = State::load(leader.snapshot(), 0, now, true).unwrap();
        let mut small: BTreeMap<u8, bool> = BTreeMap::new();
        for s in steps {
            let seq = leader.seq + 1;
            let ops: Vec<Op> = match s {
                Step::Alloc { net, cluster, name, key, port, v6 } => {
                    let mut r = req(&format!("n{net}"), svc(&format!("c{cluster}"), &format!("s{name}")));
                    if let Some(k) = key { r.sharing_key = format!("k{k}"); r.ports = tcp(&[port]); }
                    r.families = if v6 { vec![Family::V6] } else { vec![Family::V4] };
                    leader.allocate(r, seq, now).map(|o| o.1).unwrap_or_default()
                }
                Step::Release { net, cluster, name } => leader
                    .release(&format!("n{net}"), &svc(&format!("c{cluster}"), &format!("s{name}")), now)
                    .map(|o| o.1)
                    .unwrap_or_default(),
                Step::Shrink { net, small: s } => {
                    small.insert(net, s);
                    leader
                        .upsert_network(network(net, s, grace[&net]), None, false, now)
                        .map(|o| o.1)
                        .unwrap_or_default()
                }
                Step::Grace { net, secs } => {
                    grace.insert(net, secs);
                    let s = small.get(&net).copied().unwrap_or(false);
                    leader.upsert_network(network(net, s, secs), None, false, now).map(|o| o.1).unwrap_or_default()
                }
                Step::ForceDelete { net } => {
                    let mut ops = leader.delete_network(&format!("n{net}"), true, now).map(|o| o.1).unwrap_or_default();
                    let s = small.get(&net).copied().unwrap_or(false);
                    ops.extend(leader.upsert_network(network(net, s, grace[&net]), None, false, now).map(|o| o.1).unwrap_or_default());
                    ops
                }
                Step::Conflict { net, cluster, name, addr, v6, holder } => {
                    let network = format!("n{net}");
                    let owner = svc(&format!("c{cluster}"), &format!("s{name}"));
                    let family = if v6 { Family::V6 } else { Family::V4 };
                    let address = if holder {
                        leader.get_allocation(&network, &owner).ok().and_then(|a| a.address_of(family))
                    } else if v6 {
                        Some(ip(&format!("fd0{net}::{}", addr % 3 + 1)))
                    } else {
                        Some(ip(&format!("10.{net}.0.{}", addr + 1)))
                    };
                    match address {
                        Some(address) => leader
                            .report_conflict(
                                ConflictReq {
                                    network,
                                    address,
                                    mac: "52:54:00:00:00:01".into(),
                                    cluster_id: format!("c{cluster}"),
                                    holder: holder.then_some(owner),
                                },
                                seq,
                                now,
                            )
                            .map(|o| o.1)
                            .unwrap_or_default(),
                        None => vec![],
                    }
                }
                Step::Reload => {
                    leader = State::load(leader.snapshot(), 0, now, true).unwrap();
                    vec![]
                }
                Step::Tick => {
                    now += 1_000;
                    vec![]
                }
            };
            if !ops.is_empty() {
                leader.seq = leader.seq.max(seq);
            }
            let mut batch = ops;
            batch.extend(leader.take_deferred());
            follower.apply(as_stored(batch), leader.seq).unwrap();
            // Both reap what expired by now, as reads do; the leader's deletions of the
            // reaped entries reach the follower as any batch would.
            for i in 0..2u8 {
                let _ = leader.usage(Some(&format!("n{i}")), now);
                let _ = follower.usage(Some(&format!("n{i}")), now);
            }
            follower.apply(as_stored(leader.take_deferred()), leader.seq).unwrap();
            prop_assert_eq!(served(&follower), served(&leader));
            prop_assert_eq!(&follower.shared, &leader.shared);
        }
    }
}

#[test]
fn changes_say_added_modified_and_deleted() {
    let mut leader = small();
    let mut follower = State::load(leader.snapshot(), 0, 0, true).unwrap();
    let mut feed = |leader: &mut State, ops: Vec<Op>| follower.apply(ops, leader.seq).unwrap();
    let (_, ops, _) = leader.allocate(req("net-a", svc("a", "web")), 1, 0).unwrap();
    let c = feed(&mut leader, ops);
    assert!(
        matches!(&c[..], [Change::Added(a)] if a.owner.name == "web"),
        "{c:?}"
    );
    let mut r = req("net-a", svc("a", "web"));
    r.ports = tcp(&[80]);
    let (_, ops, _) = leader.allocate(r, 2, 0).unwrap();
    let c = feed(&mut leader, ops);
    assert!(
        matches!(&c[..], [Change::Modified(a)] if a.ports == tcp(&[80])),
        "{c:?}"
    );
    let (_, ops, _) = leader.release("net-a", &svc("a", "web"), 0).unwrap();
    let c = feed(&mut leader, ops);
    assert!(
        matches!(&c[..], [Change::Deleted(a)] if a.owner.name == "web"),
        "{c:?}"
    );
}

#[test]
fn a_network_record_the_leader_could_not_have_written_is_an_error() {
    let mut follower = small();
    let mut bad = follower.network("net-a").unwrap().clone();
    bad.def.pools[0].ranges = vec!["not-a-range".into()];
    let e = follower.apply(vec![Op::PutNetwork(bad.into())], 9).unwrap_err();
    assert!(e.to_string().contains("replicated network \"net-a\""), "{e}");
}
