//! Tests of the store's invariants on the pure state (one test per invariant of
//! architecture.md §3, plus validation); a property test against a simple model
//! (`model_check.rs`); the durable ledger over a failing engine (`durable.rs`). One test per
//! invariant reads best in one file, hence its length.

mod conflict;
mod durable;
mod model_check;
mod replica;

use std::net::IpAddr;

use super::*;
use crate::store::Op;
use crate::{
    alloc::addr::Family,
    error::Error,
    model::{NetworkDef, Owner, OwnerKind, PoolDef, Port, Protocol, Purpose},
};

fn pool(name: &str, purpose: Purpose, ranges: &[&str]) -> PoolDef {
    PoolDef {
        name: name.into(),
        purpose,
        ranges: ranges.iter().map(|s| s.to_string()).collect(),
        exclusions: vec![],
        auto_assign: true,
    }
}

fn net(name: &str, pools: Vec<PoolDef>) -> NetworkDef {
    NetworkDef {
        name: name.into(),
        prefixes: vec![],
        gateways: vec![],
        dns_servers: vec![],
        vlan: 0,
        pools,
        reuse_grace_secs: Some(0),
        managed_by: String::new(),
    }
}

fn svc(cluster: &str, name: &str) -> Owner {
    Owner {
        cluster_id: cluster.into(),
        kind: OwnerKind::Service,
        namespace: "default".into(),
        name: name.into(),
        uid: String::new(),
    }
}

fn req(network: &str, owner: Owner) -> AllocateReq {
    AllocateReq {
        network: network.into(),
        owner: Some(owner),
        ..Default::default()
    }
}

fn tcp(ports: &[u16]) -> Vec<Port> {
    ports
        .iter()
        .map(|p| Port {
            protocol: Protocol::Tcp,
            port: *p,
        })
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A state with network `net-a`: VIP pool of 4 addresses, NODE pool of 4.
fn small() -> State {
    let mut st = State::new(0);
    st.upsert_network(
        net(
            "net-a",
            vec![
                pool("vip", Purpose::Vip, &["10.0.1.1-10.0.1.4"]),
                pool("nodes", Purpose::Node, &["10.0.2.1-10.0.2.4"]),
            ],
        ),
        None,
        false,
        0,
    )
    .unwrap();
    st
}

fn alloc(st: &mut State, r: AllocateReq, now: u64) -> Result<(crate::model::Allocation, bool), Error> {
    let seq = st.seq + 1;
    let ((a, created), ops, _) = st.allocate(r, seq, now)?;
    if !ops.is_empty() {
        st.seq = seq;
    }
    Ok((a, created))
}

#[test]
fn inv1_one_owner_cluster_per_address() {
    let mut st = small();
    let (a, _) = alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.1")]);
    // Another cluster asking for the same address is refused and names the holder.
    let mut r = req("net-a", svc("b", "web"));
    r.requested = vec![ip("10.0.1.1")];
    let e = alloc(&mut st, r, 0).unwrap_err();
    assert!(
        matches!(&e, Error::Conflict(m) if m.contains("another cluster") && m.contains("default/web")),
        "{e}"
    );
    // Even with a sharing key on both sides: clusters never share.
    let mut st = small();
    let mut r = req("net-a", svc("a", "x"));
    r.sharing_key = "k".into();
    r.ports = tcp(&[80]);
    alloc(&mut st, r, 0).unwrap();
    let mut r = req("net-a", svc("b", "y"));
    r.sharing_key = "k".into();
    r.ports = tcp(&[8080]);
    r.requested = vec![ip("10.0.1.1")];
    assert!(matches!(alloc(&mut st, r, 0), Err(Error::Conflict(_))));
}

#[test]
fn inv1_sharing_within_a_cluster_needs_same_key_and_disjoint_ports() {
    let mut st = small();
    let share = |name: &str, key: &str, ports: &[u16]| {
        let mut r = req("net-a", svc("a", name));
        r.sharing_key = key.into();
        r.ports = tcp(ports);
        r
    };
    let (a, _) = alloc(&mut st, share("dns-tcp", "dns", &[53]), 0).unwrap();
    // Same key, disjoint ports: joins the same address without asking for it.
    let (b, _) = alloc(&mut st, share("dns-web", "dns", &[80]), 0).unwrap();
    assert_eq!(a.addresses, b.addresses);
    // Same key, overlapping port: gets another address (never the shared one).
    let (c, _) = alloc(&mut st, share("dns-dup", "dns", &[53]), 0).unwrap();
    assert_ne!(c.addresses, a.addresses);
    // ...and asking for the shared one explicitly is refused, naming the port.
    let mut r = share("dns-dup2", "dns", &[80]);
    r.requested = a.addresses.clone();
    let e = alloc(&mut st, r, 0).unwrap_err();
    assert!(e.to_string().contains("80"), "{e}");
    // Other key: refused.
    let mut r = share("other", "other", &[9999]);
    r.requested = a.addresses.clone();
    assert!(matches!(alloc(&mut st, r, 0), Err(Error::Conflict(_))));
    // An owner that changes its key takes its address to the new key's group: a new owner of
    // that key joins it there, and the old key's next owner no longer finds it.
    let (k, _) = alloc(&mut st, share("keyed", "blue", &[7000]), 0).unwrap();
    assert_ne!(k.addresses, a.addresses);
    let (k2, _) = alloc(&mut st, share("keyed", "green", &[7000]), 0).unwrap();
    assert_eq!(k2.addresses, k.addresses, "nothing moves on a key change");
    let (g, _) = alloc(&mut st, share("green-2", "green", &[7001]), 0).unwrap();
    assert_eq!(g.addresses, k.addresses);
    let (b2, _) = alloc(&mut st, share("blue-2", "blue", &[7001]), 0).unwrap();
    assert_ne!(b2.addresses, k.addresses);
    for name in ["keyed", "green-2", "blue-2"] {
        st.release("net-a", &svc("a", name), 0).unwrap();
    }
    // The address stays held until its last holder leaves.
    st.release("net-a", &svc("a", "dns-tcp"), 0).unwrap();
    let usage = st.usage(Some("net-a"), 0).unwrap();
    assert_eq!(usage[0].used, 2, "{usage:?}");
    st.release("net-a", &svc("a", "dns-web"), 0).unwrap();
    assert_eq!(st.usage(Some("net-a"), 0).unwrap()[0].used, 1);
}

#[test]
fn inv2_allocate_is_idempotent_per_owner() {
    let mut st = small();
    let (a, created) = alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    assert!(created);
    for _ in 0..3 {
        let (b, created) = alloc(&mut st, req("net-a", svc("a", "web")), 5).unwrap();
        assert!(!created);
        assert_eq!(a, b);
    }
    // A recreated object (other uid) does not inherit by accident.
    let mut o = svc("a", "web");
    o.uid = "u1".into();
    alloc(&mut st, req("net-a", o.clone()), 0).unwrap(); // learns the uid
    o.uid = "u2".into();
    assert!(
        matches!(alloc(&mut st, req("net-a", o.clone()), 0), Err(Error::Conflict(m)) if m.contains("owner.uid"))
    );
    assert!(matches!(st.release("net-a", &o, 0), Err(Error::Conflict(_))));
}

#[test]
fn inv2_and_4_reload_keeps_every_assignment() {
    let mut st = small();
    for i in 0..3 {
        alloc(&mut st, req("net-a", svc("a", &format!("s{i}"))), 0).unwrap();
    }
    st.release("net-a", &svc("a", "s1"), 0).unwrap();
    let before = st.snapshot();
    let mut again = State::load(before.clone(), 0, 0, true).unwrap();
    assert_eq!(again.snapshot(), before);
    // The freed hole is reused first, and nothing held moves.
    let (n, _) = alloc(&mut again, req("net-a", svc("a", "new")), 0).unwrap();
    assert_eq!(n.addresses, vec![ip("10.0.1.2")]);
    for a in &before.allocations {
        assert_eq!(
            again.get_allocation("net-a", &a.owner).unwrap().addresses,
            a.addresses
        );
    }
}

#[test]
fn inv4_shrinking_a_pool_keeps_allocations_flagged() {
    let mut st = small();
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(
            alloc(&mut st, req("net-a", svc("a", &format!("s{i}"))), 0)
                .unwrap()
                .0,
        );
    }
    let shrunk = net(
        "net-a",
        vec![
            pool("vip", Purpose::Vip, &["10.0.1.1-10.0.1.2"]),
            pool("nodes", Purpose::Node, &["10.0.2.1-10.0.2.4"]),
        ],
    );
    let (u, ops, _) = st.upsert_network(shrunk, None, false, 1).unwrap();
    assert!(u.changed && !ops.is_empty());
    assert_eq!(u.out_of_range.len(), 2);
    for a in &held {
        let now = st.get_allocation("net-a", &a.owner).unwrap();
        assert_eq!(now.addresses, a.addresses, "an allocation moved");
    }
    assert!(st.is_out_of_range(&held[3]));
    assert!(!st.is_out_of_range(&held[0]));
    let u = &st.usage(Some("net-a"), 1).unwrap()[0];
    assert_eq!((u.total, u.used, u.free, u.out_of_range), (2, 2, 0, 2));
    // Releasing an out-of-range address does not put it back into the pool.
    st.release("net-a", &held[3].owner, 1).unwrap();
    assert_eq!(st.usage(Some("net-a"), 1).unwrap()[0].out_of_range, 1);
    assert!(matches!(
        alloc(&mut st, req("net-a", svc("a", "more")), 1),
        Err(Error::Exhausted(_))
    ));
    // Removing a pool that still has allocations is refused.
    let e = st
        .upsert_network(
            net(
                "net-a",
                vec![pool("nodes", Purpose::Node, &["10.0.2.1-10.0.2.4"])],
            ),
            None,
            false,
            1,
        )
        .unwrap_err();
    assert!(matches!(&e, Error::Conflict(m) if m.contains("\"vip\"")), "{e}");
}

#[test]
fn inv5_released_addresses_wait_out_the_grace_period() {
    let mut st = State::new(0);
    let mut n = net("net-a", vec![pool("vip", Purpose::Vip, &["10.0.1.1-10.0.1.1"])]);
    n.reuse_grace_secs = Some(30);
    st.upsert_network(n, None, false, 0).unwrap();
    alloc(&mut st, req("net-a", svc("a", "old")), 0).unwrap();
    let (_, ops, _) = st.release("net-a", &svc("a", "old"), 1_000).unwrap();
    assert!(
        ops.iter().any(|o| matches!(o, Op::PutQuarantine(_))),
        "the quarantine must be durable"
    );
    // Another owner must wait.
    let e = alloc(&mut st, req("net-a", svc("b", "new")), 30_999).unwrap_err();
    assert!(
        matches!(&e, Error::Exhausted(m) if m.contains("1 in reuse grace")),
        "{e}"
    );
    assert_eq!(st.usage(Some("net-a"), 30_999).unwrap()[0].quarantined, 1);
    // The previous owner may take it back early.
    let mut st2 = State::load(st.snapshot(), 0, 2_000, true).unwrap();
    let (back, _) = alloc(&mut st2, req("net-a", svc("a", "old")), 2_000).unwrap();
    assert_eq!(back.addresses, vec![ip("10.0.1.1")]);
    // After the grace period, anyone.
    let (a, _) = alloc(&mut st, req("net-a", svc("b", "new")), 31_000).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.1")]);
    // A quarantine survives a reload; an expired one is dropped on load.
    let mut st3 = State::new(0);
    let mut n = net("net-b", vec![pool("vip", Purpose::Vip, &["10.1.1.1-10.1.1.1"])]);
    n.reuse_grace_secs = Some(30);
    st3.upsert_network(n, None, false, 0).unwrap();
    alloc(&mut st3, req("net-b", svc("a", "x")), 0).unwrap();
    st3.release("net-b", &svc("a", "x"), 0).unwrap();
    let mut early = State::load(st3.snapshot(), 0, 10_000, true).unwrap();
    assert!(matches!(
        alloc(&mut early, req("net-b", svc("b", "y")), 10_000),
        Err(Error::Exhausted(_))
    ));
    let mut late = State::load(st3.snapshot(), 0, 40_000, true).unwrap();
    assert!(
        late.take_deferred()
            .iter()
            .any(|o| matches!(o, Op::DelQuarantine(..)))
    );
    assert!(alloc(&mut late, req("net-b", svc("b", "y")), 40_000).is_ok());
}

#[test]
fn inv6_free_space_stays_a_few_ranges_whatever_the_pool_size() {
    // The allocator's cost is O(log ranges); sequential allocation from any pool keeps one
    // free range, so /8 and /64 pools cost what a /24 costs.
    for cidr in ["10.0.0.0/24", "10.0.0.0/16", "10.0.0.0/8", "fd00::/64"] {
        let mut st = State::new(0);
        st.upsert_network(net("n", vec![pool("p", Purpose::Vip, &[cidr])]), None, false, 0)
            .unwrap();
        let fam = if cidr.contains(':') {
            Family::V6
        } else {
            Family::V4
        };
        let mut r = req("n", svc("a", "x"));
        r.families = vec![fam];
        for i in 0..200 {
            let mut r = r.clone();
            r.owner = Some(svc("a", &format!("s{i}")));
            alloc(&mut st, r, 0).unwrap();
        }
        assert_eq!(st.free_ranges("n", "p", fam).len(), 1, "{cidr}");
        // Releasing every other one leaves at most one range per hole.
        for i in (0..200).step_by(2) {
            st.release("n", &svc("a", &format!("s{i}")), 0).unwrap();
        }
        assert_eq!(st.free_ranges("n", "p", fam).len(), 101, "{cidr}");
    }
}

#[test]
fn overlapping_networks_and_pools_are_refused_naming_both() {
    let mut st = small();
    let e = st
        .upsert_network(
            net("net-b", vec![pool("v", Purpose::Vip, &["10.0.1.4/30"])]),
            None,
            false,
            0,
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::Overlap(m) if m.contains("net-a") && m.contains("net-b")),
        "{e}"
    );
    let e = st
        .upsert_network(
            net(
                "net-c",
                vec![
                    pool("v", Purpose::Vip, &["10.9.0.0/24"]),
                    pool("w", Purpose::Node, &["10.9.0.128/25"]),
                ],
            ),
            None,
            false,
            0,
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::Invalid { field, msg } if field == "network.pools[1].ranges[0]" && msg.contains("\"v\"")),
        "{e}"
    );
}

#[test]
fn bad_input_names_the_field_and_changes_nothing() {
    let mut st = small();
    let before = st.snapshot();
    let cases: Vec<(NetworkDef, &str)> = vec![
        (
            net("Bad_Name", vec![pool("v", Purpose::Vip, &["10.5.0.0/24"])]),
            "network.name",
        ),
        (net("n", vec![]), "network.pools"),
        (
            net("n", vec![pool("v", Purpose::Vip, &["10.5.0.9-10.5.0.1"])]),
            "network.pools[0].ranges[0]",
        ),
        (
            net("n", vec![pool("v", Purpose::Vip, &["10.5.0.1/24"])]),
            "network.pools[0].ranges[0]",
        ),
        (
            net("n", vec![pool("v", Purpose::Vip, &["10.5.0.1-fd00::1"])]),
            "network.pools[0].ranges[0]",
        ),
        (
            net("n", vec![pool("v", Purpose::Vip, &["nonsense"])]),
            "network.pools[0].ranges[0]",
        ),
        (
            net("n", vec![pool("v", Purpose::Vip, &[])]),
            "network.pools[0].ranges",
        ),
        (
            net(
                "n",
                vec![
                    pool("v", Purpose::Vip, &["10.5.0.0/24"]),
                    pool("v", Purpose::Node, &["10.6.0.0/24"]),
                ],
            ),
            "network.pools[1].name",
        ),
        (
            {
                let mut n = net("n", vec![pool("v", Purpose::Vip, &["10.5.0.0/24"])]);
                n.vlan = 4095;
                n
            },
            "network.vlan",
        ),
        (
            {
                let mut n = net("n", vec![pool("v", Purpose::Vip, &["10.5.0.0/24"])]);
                n.prefixes = vec!["10.6.0.0/16".parse().unwrap()];
                n
            },
            "network.pools[0].ranges[0]",
        ),
        (
            {
                let mut n = net("n", vec![pool("v", Purpose::Vip, &["10.5.0.0/24"])]);
                n.prefixes = vec!["10.5.0.0/16".parse().unwrap()];
                n.gateways = vec![ip("10.9.0.1")];
                n
            },
            "network.gateways[0]",
        ),
    ];
    for (def, field) in cases {
        match st.upsert_network(def.clone(), None, false, 0) {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field, "{def:?}"),
            other => panic!("{def:?}: expected invalid {field}, got {other:?}"),
        }
    }
    let bad_owner = |o: Owner, field: &str| {
        let mut st = small();
        match alloc(&mut st, req("net-a", o.clone()), 0) {
            Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field, "{o:?}"),
            other => panic!("{o:?}: expected invalid {field}, got {other:?}"),
        }
    };
    bad_owner(
        Owner {
            cluster_id: String::new(),
            ..svc("a", "x")
        },
        "owner.cluster_id",
    );
    bad_owner(
        Owner {
            namespace: String::new(),
            ..svc("a", "x")
        },
        "owner.namespace",
    );
    bad_owner(
        Owner {
            name: String::new(),
            ..svc("a", "x")
        },
        "owner.name",
    );
    bad_owner(
        Owner {
            kind: OwnerKind::Node,
            ..svc("a", "x")
        },
        "owner.namespace",
    );
    let mut r = req("net-a", svc("a", "x"));
    r.requested = vec![ip("10.0.9.9")];
    assert!(
        matches!(alloc(&mut st, r, 0), Err(Error::Invalid { field, .. }) if field == "requested_addresses[0]")
    );
    let mut r = req("net-a", svc("a", "x"));
    r.requested = vec![ip("10.0.1.1"), ip("10.0.1.2")];
    assert!(
        matches!(alloc(&mut st, r, 0), Err(Error::Invalid { field, .. }) if field == "requested_addresses[1]")
    );
    let mut r = req("net-a", svc("a", "x"));
    r.sharing_key = "k".into();
    assert!(matches!(alloc(&mut st, r, 0), Err(Error::Invalid { field, .. }) if field == "ports"));
    assert!(matches!(
        alloc(&mut st, req("nope", svc("a", "x")), 0),
        Err(Error::NotFound(_))
    ));
    let mut r = req("net-a", svc("a", "x"));
    r.families = vec![Family::V6];
    assert!(matches!(alloc(&mut st, r, 0), Err(Error::Exhausted(m)) if m.contains("IPv6")));
    assert_eq!(st.snapshot(), before);
    assert!(crate::model::check_ports("ports", &[(Protocol::Tcp, 0)]).is_err());
    assert!(crate::model::check_ports("ports", &[(Protocol::Tcp, 65536)]).is_err());
    let e = crate::model::check_ports("ports", &[(Protocol::Tcp, 80), (Protocol::Tcp, 80)]).unwrap_err();
    assert!(matches!(e, Error::Invalid { field, .. } if field == "ports[1]"));
}

#[test]
fn dual_stack_prefer_adds_the_missing_family_later() {
    let mut st = State::new(0);
    st.upsert_network(
        net("n", vec![pool("vip", Purpose::Vip, &["10.0.0.1-10.0.0.9"])]),
        None,
        false,
        0,
    )
    .unwrap();
    let mut r = req("n", svc("a", "x"));
    r.families = vec![Family::V4, Family::V6];
    // Require: fails (no IPv6 range) and changes nothing.
    assert!(matches!(alloc(&mut st, r.clone(), 0), Err(Error::Exhausted(_))));
    r.optional_extra_families = true;
    let (a, _) = alloc(&mut st, r.clone(), 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.0.1")]);
    st.upsert_network(
        net(
            "n",
            vec![pool(
                "vip",
                Purpose::Vip,
                &["10.0.0.1-10.0.0.9", "fd00::1-fd00::9"],
            )],
        ),
        None,
        false,
        0,
    )
    .unwrap();
    let (b, created) = alloc(&mut st, r.clone(), 0).unwrap();
    assert!(!created);
    assert_eq!(b.addresses, vec![ip("10.0.0.1"), ip("fd00::1")]);
    // Dropping a family on explicit request releases just that address.
    r.families = vec![Family::V6];
    let (c, _) = alloc(&mut st, r, 0).unwrap();
    assert_eq!(c.addresses, vec![ip("fd00::1")]);
    assert_eq!(st.usage(Some("n"), 0).unwrap()[0].used, 0);
}

#[test]
fn exhaustion_then_release_then_assigned() {
    let mut st = small();
    for i in 0..4 {
        alloc(&mut st, req("net-a", svc("a", &format!("s{i}"))), 0).unwrap();
    }
    let e = alloc(&mut st, req("net-a", svc("b", "late")), 0).unwrap_err();
    assert!(matches!(&e, Error::Exhausted(m) if m.contains("\"vip\"")), "{e}");
    st.release("net-a", &svc("a", "s2"), 0).unwrap();
    let (a, _) = alloc(&mut st, req("net-a", svc("b", "late")), 0).unwrap();
    assert_eq!(a.addresses, vec![ip("10.0.1.3")]);
}

#[test]
fn managed_networks_refuse_other_managers() {
    let mut st = State::new(0);
    let mut a = net("n", vec![pool("vip", Purpose::Vip, &["10.0.0.0/24"])]);
    a.managed_by = "cluster/a".into();
    st.upsert_network(a.clone(), None, false, 0).unwrap();
    let mut b = a.clone();
    b.managed_by = "cluster/b".into();
    // The same definition from another manager is fine (nothing changes).
    let (u, ops, _) = st.upsert_network(b.clone(), None, false, 0).unwrap();
    assert!(!u.changed && ops.is_empty());
    b.vlan = 9;
    assert!(
        matches!(st.upsert_network(b, None, false, 0), Err(Error::Conflict(m)) if m.contains("cluster/a"))
    );
    // Optimistic concurrency.
    assert!(matches!(
        st.upsert_network(a.clone(), Some(7), false, 0),
        Err(Error::Conflict(_))
    ));
    a.vlan = 3;
    let (u, ops, _) = st.upsert_network(a, Some(1), true, 0).unwrap();
    assert!(u.changed && ops.is_empty(), "dry run writes nothing");
    assert_eq!(st.network("n").unwrap().def.vlan, 0);
}

#[test]
fn inv5_out_of_range_releases_still_wait_out_the_grace() {
    let mut st = State::new(0);
    let mut n = net("n", vec![pool("vip", Purpose::Vip, &["10.0.1.0/24"])]);
    n.reuse_grace_secs = Some(600);
    st.upsert_network(n.clone(), None, false, 0).unwrap();
    let mut r = req("n", svc("a", "old"));
    r.requested = vec![ip("10.0.1.200")];
    alloc(&mut st, r, 0).unwrap();
    let mut shrunk = n.clone();
    shrunk.pools[0].ranges = vec!["10.0.1.0/25".into()];
    st.upsert_network(shrunk, None, false, 0).unwrap();
    let (_, ops, _) = st.release("n", &svc("a", "old"), 1_000).unwrap();
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::PutQuarantine(q) if q.address == ip("10.0.1.200")))
    );
    st.upsert_network(n, None, false, 2_000).unwrap();
    let mut r = req("n", svc("b", "new"));
    r.requested = vec![ip("10.0.1.200")];
    assert!(matches!(alloc(&mut st, r.clone(), 3_000), Err(Error::Conflict(m)) if m.contains("reuse grace")));
    assert!(alloc(&mut st, r, 601_001).is_ok(), "after the grace, anyone");
}

#[test]
fn inv5_a_force_deleted_networks_addresses_wait_out_the_grace_in_any_network() {
    let mut st = State::new(0);
    let mut a = net("net-a", vec![pool("vip", Purpose::Vip, &["10.0.1.1-10.0.1.2"])]);
    a.reuse_grace_secs = Some(30);
    st.upsert_network(a.clone(), None, false, 0).unwrap();
    alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    let (n, ops, changes) = st.delete_network("net-a", true, 1_000).unwrap();
    assert_eq!(n, 1);
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::PutQuarantine(q) if q.address == ip("10.0.1.1")))
    );
    assert!(matches!(&changes[..], [Change::Deleted(_)]));

    // A new network over the same space: 10.0.1.1 is not handed out until the grace ends,
    // also after a reload.
    let mut b = a.clone();
    b.name = "net-b".into();
    st.upsert_network(b, None, false, 2_000).unwrap();
    let mut st = State::load(st.snapshot(), 0, 3_000, true).unwrap();
    let (got, _) = alloc(&mut st, req("net-b", svc("b", "one")), 3_000).unwrap();
    assert_eq!(got.addresses, vec![ip("10.0.1.2")]);
    assert!(matches!(
        alloc(&mut st, req("net-b", svc("b", "two")), 3_000),
        Err(Error::Exhausted(_))
    ));
    let (got, _) = alloc(&mut st, req("net-b", svc("b", "two")), 31_001).unwrap();
    assert_eq!(got.addresses, vec![ip("10.0.1.1")]);
}

/// Listing by cluster (without a network) reads one key range per network; the pages must
/// still come in key order across networks whose names sort differently with the `/` that
/// ends them ("a-b/" < "a/" although "a" < "a-b"), each row once.
#[test]
fn list_by_cluster_pages_in_key_order_across_networks() {
    let mut st = State::new(0);
    for (n, r) in [
        ("a", "10.0.1.1-10.0.1.9"),
        ("a-b", "10.0.2.1-10.0.2.9"),
        ("b", "10.0.3.1-10.0.3.9"),
    ] {
        st.upsert_network(net(n, vec![pool("vip", Purpose::Vip, &[r])]), None, false, 0)
            .unwrap();
        for c in ["c1", "c2"] {
            for s in ["x", "y"] {
                alloc(&mut st, req(n, svc(c, s)), 0).unwrap();
            }
        }
    }
    // A neighbour whose name merely starts like "x".
    alloc(&mut st, req("b", svc("c1", "xy")), 0).unwrap();
    let pages = |f: &ListFilter, size: usize| {
        let (mut keys, mut token) = (Vec::new(), String::new());
        loop {
            let (rows, next) = st.list(f, size, &token).unwrap();
            keys.extend(rows.iter().map(|a| a.key()));
            if next.is_empty() {
                return keys;
            }
            token = next;
        }
    };
    let c1 = ListFilter {
        cluster_id: Some("c1".into()),
        ..ListFilter::default()
    };
    let mut want: Vec<String> = st.allocs.keys().filter(|k| k.contains("/c1/")).cloned().collect();
    want.sort();
    for size in [1, 2, 5, 100] {
        assert_eq!(pages(&c1, size), want, "page size {size}");
    }
    // A Service by cluster, kind, namespace and name: its row in each network, not "xy".
    let one = ListFilter {
        cluster_id: Some("c1".into()),
        kind: Some(OwnerKind::Service),
        namespace: Some("default".into()),
        name: Some("x".into()),
        ..ListFilter::default()
    };
    let want = [
        "a-b/c1/service/default/x",
        "a/c1/service/default/x",
        "b/c1/service/default/x",
    ];
    assert_eq!(pages(&one, 1), want);
    // The same without the kind: a namespace means a Service.
    let no_kind = ListFilter { kind: None, ..one };
    assert_eq!(pages(&no_kind, 1), want);
}

/// Load (restart and Import) takes records in any order — a backup may be edited or
/// reordered — keeps the same state, and names the record of each inconsistency.
#[test]
fn load_takes_records_in_any_order_and_names_each_inconsistency() {
    let mut st = small();
    let mut b = net("net-b", vec![pool("vip", Purpose::Vip, &["10.0.3.1-10.0.3.4"])]);
    b.prefixes = vec!["10.0.3.0/24".parse().unwrap()];
    st.upsert_network(b, None, false, 0).unwrap();
    let share = |network: &str, name: &str, port: u16| {
        let mut r = req(network, svc("a", name));
        r.sharing_key = "k".into();
        r.ports = tcp(&[port]);
        r
    };
    for (n, name, port) in [("net-a", "x", 80), ("net-a", "y", 81), ("net-b", "z", 80)] {
        alloc(&mut st, share(n, name, port), 0).unwrap();
    }
    alloc(&mut st, req("net-a", svc("b", "solo")), 0).unwrap();
    let before = st.snapshot();
    let usage = st.usage(None, 0).unwrap();

    // Reversed: the same state (a shared address's holders found out of order too).
    let mut rev = before.clone();
    rev.allocations.reverse();
    let mut again = State::load(rev.clone(), 0, 0, true).unwrap();
    assert_eq!(again.snapshot(), before);
    assert_eq!(again.usage(None, 0).unwrap(), usage);
    assert_eq!(again.shared, st.shared);

    let strict_err = |snap: crate::store::Snapshot| match State::load(snap.clone(), 0, 0, true) {
        Err(Error::Invalid { field, msg }) => {
            // Restart keeps every record and does not fail.
            let kept = State::load(snap.clone(), 0, 0, false).unwrap();
            assert!(kept.allocs.len() <= snap.allocations.len());
            format!("{field}: {msg}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    };
    // An owner twice, out of order.
    let mut dup = rev.clone();
    dup.allocations.push(before.allocations[0].clone());
    let e = strict_err(dup);
    assert!(
        e.starts_with("backup.allocations[4]") && e.contains("appears twice"),
        "{e}"
    );
    // An address of net-a's space held in net-b.
    let mut foreign = before.clone();
    foreign.allocations[3].addresses = vec![ip("10.0.1.4")];
    assert_eq!(foreign.allocations[3].network, "net-b");
    let e = strict_err(foreign);
    assert!(
        e.contains("backup.allocations[3]") && e.contains(r#"space of network "net-a""#),
        "{e}"
    );
    // An address outside every space held in two networks.
    let mut twice = before.clone();
    twice.allocations[0].addresses = vec![ip("192.0.2.1")];
    twice.allocations[3].addresses = vec![ip("192.0.2.1")];
    let e = strict_err(twice);
    assert!(
        e.contains("backup.allocations[3]") && e.contains(r#"also held in network "net-a""#),
        "{e}"
    );
    // One address held by two clusters (the shared one, plus another cluster's Service).
    let mut clash = before.clone();
    assert_eq!(clash.allocations[2].owner.cluster_id, "b");
    clash.allocations[2].addresses = clash.allocations[0].addresses.clone();
    let e = strict_err(clash);
    assert!(
        e.starts_with("backup.allocations[2]") && e.contains("another cluster"),
        "{e}"
    );
    // In its reuse grace while held (at home and abroad).
    for held in ["10.0.1.1", "192.0.2.1"] {
        let mut q = before.clone();
        q.allocations[0].addresses = vec![ip(held)];
        q.quarantined.push(crate::model::Quarantined {
            network: "net-b".into(),
            pool: "vip".into(),
            address: ip(held),
            until_ms: 1_000,
            previous_owner: svc("a", "gone"),
        });
        let e = strict_err(q);
        assert!(
            e.contains("backup.quarantined[0]") && e.contains("reuse grace and held"),
            "{e}"
        );
    }
}

#[test]
fn dry_run_says_what_allocate_would_give_and_holds_nothing() {
    let mut st = small();
    let before = format!("{:?}", st.snapshot());
    let mut r = req("net-a", svc("a", "web"));
    r.dry_run = true;
    let ((a, created), ops, changes) = st.allocate(r.clone(), 7, 0).unwrap();
    assert!(created && ops.is_empty() && changes.is_empty());
    assert_eq!((a.addresses.clone(), a.revision), (vec![ip("10.0.1.1")], 0));
    assert_eq!(
        format!("{:?}", st.snapshot()),
        before,
        "a dry run changed the state"
    );
    // What it said is what a real Allocate then gives.
    let (real, _) = alloc(&mut st, req("net-a", svc("a", "web")), 0).unwrap();
    assert_eq!(real.addresses, a.addresses);
    // For a holder: its allocation, as held, not created.
    let ((held, created), ops, _) = st.allocate(r, 9, 0).unwrap();
    assert!(!created && ops.is_empty());
    assert_eq!(held, real);
    // And for another owner: the next address.
    let mut r = req("net-a", svc("a", "db"));
    r.dry_run = true;
    assert_eq!(st.allocate(r, 9, 0).unwrap().0.0.addresses, vec![ip("10.0.1.2")]);
}
