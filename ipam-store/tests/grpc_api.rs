//! Every `cairn.ipam.v1.IpamService` RPC through a real `cairn-ipam serve` process on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use cairn_proto::v1 as pb;
use common::*;
use futures::StreamExt as _;
use tonic::Code;

fn upsert_req(n: pb::Network) -> pb::UpsertNetworkRequest {
    pb::UpsertNetworkRequest {
        network: Some(n),
        expected_version: None,
        dry_run: false,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn in_range(a: &str, lo: &str, hi: &str) -> bool {
    let (a, lo, hi) = (ip(a), ip(lo), ip(hi));
    match (a, lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(lo), IpAddr::V4(hi)) => lo <= a && a <= hi,
        (IpAddr::V6(a), IpAddr::V6(lo), IpAddr::V6(hi)) => lo <= a && a <= hi,
        _ => false,
    }
}

// === networks ===

#[tokio::test]
async fn upsert_network_reports_created_changed_unchanged_and_dry_run_writes_nothing() {
    let srv = Server::start().await;
    let mut c = srv.client().await;

    // dry_run of a new network: reported as created, nothing stored.
    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(net_a("net-a")),
            expected_version: None,
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.created && r.changed, "{r:?}");
    assert_status(
        c.get_network(pb::GetNetworkRequest { name: "net-a".into() })
            .await,
        Code::NotFound,
        &["net-a"],
    );

    let r = upsert(&mut c, net_a("net-a")).await;
    assert!(r.created && r.changed, "{r:?}");
    let n = r.network.unwrap();
    assert_eq!(n.version, 1);
    assert_eq!(n.gateways, vec!["10.20.0.1"]);
    assert_eq!(n.pools.len(), 2);
    assert!(n.created_at.is_some() && n.updated_at.is_some());

    let r = upsert(&mut c, net_a("net-a")).await;
    assert!(
        !r.created && !r.changed,
        "identical upsert must be unchanged: {r:?}"
    );
    assert_eq!(r.network.unwrap().version, 1);

    let mut changed = net_a("net-a");
    changed.vlan = 21;
    // dry_run of a change: reported, not stored.
    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(changed.clone()),
            expected_version: None,
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created && r.changed, "{r:?}");
    assert_eq!(r.network.as_ref().unwrap().vlan, 21);
    let got = c
        .get_network(pb::GetNetworkRequest { name: "net-a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.vlan, got.version), (20, 1), "dry_run wrote: {got:?}");

    let r = upsert(&mut c, changed).await;
    assert!(!r.created && r.changed, "{r:?}");
    assert_eq!(r.network.as_ref().unwrap().version, 2);
    let got = c
        .get_network(pb::GetNetworkRequest { name: "net-a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.vlan, got.version), (21, 2));
}

#[tokio::test]
async fn upsert_network_expected_version_mismatch_is_failed_precondition() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let with_version = |n: pb::Network, v: u64| pb::UpsertNetworkRequest {
        network: Some(n),
        expected_version: Some(v),
        dry_run: false,
    };
    // 0 = must not exist.
    c.upsert_network(with_version(net_a("net-a"), 0)).await.unwrap();
    assert_status(
        c.upsert_network(with_version(net_a("net-a"), 0)).await,
        Code::FailedPrecondition,
        &["version"],
    );
    let mut n = net_a("net-a");
    n.vlan = 30;
    assert_status(
        c.upsert_network(with_version(n.clone(), 7)).await,
        Code::FailedPrecondition,
        &["version 1", "7"],
    );
    let r = c
        .upsert_network(with_version(n.clone(), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.network.unwrap().version, 2);
    // The old version is stale now.
    n.vlan = 31;
    assert_status(
        c.upsert_network(with_version(n, 1)).await,
        Code::FailedPrecondition,
        &["version 2"],
    );
    let got = c
        .get_network(pb::GetNetworkRequest { name: "net-a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.vlan, got.version), (30, 2));
}

#[tokio::test]
async fn upsert_network_by_another_manager_is_failed_precondition() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut n = net_a("net-a");
    n.managed_by = "cloud".into();
    upsert(&mut c, n.clone()).await;

    let mut theirs = n.clone();
    theirs.managed_by = "cluster/a".into();
    theirs.vlan = 99;
    assert_status(
        c.upsert_network(upsert_req(theirs.clone())).await,
        Code::FailedPrecondition,
        &["net-a", "\"cloud\"", "cluster/a"],
    );
    // The same definition re-applied by another manager changes nothing and is no conflict.
    theirs.vlan = n.vlan;
    let r = c.upsert_network(upsert_req(theirs)).await.unwrap().into_inner();
    assert!(!r.changed && !r.created, "{r:?}");
    assert_eq!(
        r.network.unwrap().managed_by,
        "cloud",
        "the manager was taken over"
    );
    let got = c
        .get_network(pb::GetNetworkRequest { name: "net-a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.managed_by.as_str(), got.vlan, got.version), ("cloud", 20, 1));

    // The manager itself may change it; empty managed_by means "whoever manages it now".
    let mut mine = n.clone();
    mine.vlan = 22;
    assert!(upsert(&mut c, mine).await.changed);
    let mut anon = n;
    anon.managed_by.clear();
    anon.vlan = 22;
    let r = upsert(&mut c, anon).await;
    assert!(
        !r.changed,
        "empty managed_by + same definition is unchanged: {r:?}"
    );
    assert_eq!(r.network.unwrap().managed_by, "cloud");
}

#[tokio::test]
async fn overlapping_networks_are_already_exists_naming_both() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    // A pool range inside net-a's prefix.
    let b = network(
        "net-b",
        &[],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.5.0/24"])],
    );
    assert_status(
        c.upsert_network(upsert_req(b)).await,
        Code::AlreadyExists,
        &["\"net-b\"", "\"net-a\"", "10.20.5.0/24", "10.20.0.0/16"],
    );
    // An overlapping prefix, IPv6.
    let b6 = network(
        "net-b",
        &["fd00:20::/48"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["fd00:20:0:99::/120"])],
    );
    assert_status(
        c.upsert_network(upsert_req(b6)).await,
        Code::AlreadyExists,
        &["\"net-b\"", "\"net-a\""],
    );
    let r = c
        .list_networks(pb::ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.networks.len(), 1, "the refused network was stored");
    // Disjoint is fine.
    let ok = network(
        "net-b",
        &["10.21.0.0/16"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.21.1.0/24"])],
    );
    assert!(upsert(&mut c, ok).await.created);
}

#[tokio::test]
async fn malformed_networks_are_invalid_argument_naming_the_field() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let cases: Vec<(&str, pb::Network, &[&str])> = vec![
        (
            "malformed CIDR",
            {
                let mut n = net_a("net-a");
                n.pools[0].ranges[0] = "10.20.1.0/33".into();
                n
            },
            &["network.pools[0].ranges[0]", "10.20.1.0/33"],
        ),
        (
            "malformed prefix",
            {
                let mut n = net_a("net-a");
                n.prefixes[0] = "10.20.0.0/1x".into();
                n
            },
            &["network.prefixes[0]"],
        ),
        (
            "start > end",
            {
                let mut n = net_a("net-a");
                n.pools[1].ranges = vec!["10.20.2.9-10.20.2.1".into()];
                n
            },
            &[
                "network.pools[1].ranges[0]",
                "start 10.20.2.9 is greater than end 10.20.2.1",
            ],
        ),
        (
            "mixed families in one range",
            {
                let mut n = net_a("net-a");
                n.pools[1].ranges = vec!["10.20.2.1-fd00:20::9".into()];
                n
            },
            &["network.pools[1].ranges[0]", "mixes IPv4 and IPv6"],
        ),
        (
            "gateway of a family with another prefix",
            {
                let mut n = net_a("net-a");
                n.gateways = vec!["10.99.0.1".into()];
                n
            },
            &["network.gateways[0]", "outside prefix 10.20.0.0/16"],
        ),
        (
            "two prefixes of one family",
            {
                let mut n = net_a("net-a");
                n.prefixes.push("10.30.0.0/16".into());
                n
            },
            &["network.prefixes[2]", "IPv4"],
        ),
        (
            "host bits in a prefix",
            {
                let mut n = net_a("net-a");
                n.prefixes[0] = "10.20.0.5/16".into();
                n
            },
            &["network.prefixes[0]", "host bits", "10.20.0.0/16"],
        ),
        (
            "host bits in a pool CIDR",
            {
                let mut n = net_a("net-a");
                n.pools[0].ranges[0] = "10.20.1.7/24".into();
                n
            },
            &["network.pools[0].ranges[0]", "host bits", "10.20.1.0/24"],
        ),
        (
            "range outside the prefix",
            {
                let mut n = net_a("net-a");
                n.pools[1].ranges = vec!["10.21.2.0/24".into()];
                n
            },
            &["network.pools[1].ranges[0]", "outside prefix"],
        ),
        (
            "overlapping pools",
            {
                let mut n = net_a("net-a");
                n.pools[1].ranges = vec!["10.20.1.128/25".into()];
                n
            },
            &["network.pools[1].ranges[0]", "network.pools[0].ranges[0]"],
        ),
        (
            "missing purpose",
            {
                let mut n = net_a("net-a");
                n.pools[1].purpose = 0;
                n
            },
            &["network.pools[1].purpose"],
        ),
        (
            "bad exclusion",
            {
                let mut n = net_a("net-a");
                n.pools[0].exclusions = vec!["10.20.1.x".into()];
                n
            },
            &["network.pools[0].exclusions[0]"],
        ),
        (
            // Found by this suite: 2^128 addresses overflowed the pool's u128 count (a panic in
            // the request handler of a debug build; wrong usage counts in release).
            "a pool of all IPv6",
            network(
                "net-a",
                &[],
                vec![pool(
                    "vip",
                    pb::PoolPurpose::Vip,
                    &["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"],
                )],
            ),
            // All of IPv6 includes IPv4-mapped space, refused first.
            &["network.pools[0].ranges[0]", "IPv4-mapped"],
        ),
        (
            "a pool of all IPv6 in two halves",
            network(
                "net-a",
                &[],
                vec![pool(
                    "vip",
                    pb::PoolPurpose::Vip,
                    &[
                        "10.0.0.0/8",
                        "::-7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                        "8000::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                    ],
                )],
            ),
            // IPv4-mapped space (in the first half) is refused before the count overflows.
            &["network.pools[0].ranges[1]", "IPv4-mapped"],
        ),
        (
            "vlan out of range",
            {
                let mut n = net_a("net-a");
                n.vlan = 5000;
                n
            },
            &["network.vlan", "5000"],
        ),
        ("bad name", net_a("Net_A"), &["network.name"]),
        ("no pools", network("net-a", &[], vec![]), &["network.pools"]),
        (
            "pool without ranges",
            network("net-a", &[], vec![pool("vip", pb::PoolPurpose::Vip, &[])]),
            &["network.pools[0].ranges"],
        ),
    ];
    for (what, n, needles) in cases {
        let r = c.upsert_network(upsert_req(n)).await;
        match &r {
            Err(s) if s.code() == Code::InvalidArgument => {
                for needle in needles {
                    assert!(
                        s.message().contains(needle),
                        "{what}: message {:?} does not name {needle:?}",
                        s.message()
                    );
                }
            }
            other => panic!("{what}: expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
    // A missing network.
    assert_status(
        c.upsert_network(pb::UpsertNetworkRequest::default()).await,
        Code::InvalidArgument,
        &["network"],
    );
    let r = c
        .list_networks(pb::ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(r.networks.is_empty(), "a refused network was stored: {r:?}");
}

#[tokio::test]
async fn get_list_and_delete_network() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-z")).await;
    let b = network(
        "net-b",
        &["10.21.0.0/16"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.21.1.0/24"])],
    );
    upsert(&mut c, b).await;
    let got = c
        .get_network(pb::GetNetworkRequest { name: "net-z".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "net-z");
    assert_eq!(got.prefixes, vec!["10.20.0.0/16", "fd00:20::/64"]);
    assert_eq!(got.dns_servers, vec!["10.20.0.2"]);
    assert_eq!(got.pools[1].auto_assign, Some(true));
    assert_status(
        c.get_network(pb::GetNetworkRequest { name: "nope".into() }).await,
        Code::NotFound,
        &["nope"],
    );
    assert_status(
        c.get_network(pb::GetNetworkRequest {
            name: "Bad Name".into(),
        })
        .await,
        Code::InvalidArgument,
        &["name"],
    );
    let names: Vec<String> = c
        .list_networks(pb::ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner()
        .networks
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, vec!["net-b", "net-z"], "ordered by name");

    let a = allocate(&mut c, alloc_req("net-z", svc("a", "web"))).await;
    assert_status(
        c.delete_network(pb::DeleteNetworkRequest {
            name: "net-z".into(),
            force: false,
        })
        .await,
        Code::FailedPrecondition,
        &["net-z", "1 allocation"],
    );
    // Still there, allocation intact.
    let still = c
        .get_allocation(pb::GetAllocationRequest {
            network: "net-z".into(),
            owner: Some(svc("a", "web")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.addresses, a.addresses);

    let r = c
        .delete_network(pb::DeleteNetworkRequest {
            name: "net-z".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.released, 1);
    assert_status(
        c.get_network(pb::GetNetworkRequest { name: "net-z".into() })
            .await,
        Code::NotFound,
        &["net-z"],
    );
    assert!(
        list_all(&mut c, pb::ListAllocationsRequest::default())
            .await
            .is_empty()
    );
    // Empty network: deleted without force.
    let r = c
        .delete_network(pb::DeleteNetworkRequest {
            name: "net-b".into(),
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.released, 0);
    assert_status(
        c.delete_network(pb::DeleteNetworkRequest {
            name: "net-b".into(),
            force: false,
        })
        .await,
        Code::NotFound,
        &["net-b"],
    );
    // The name and its addresses are free for a new definition.
    assert!(upsert(&mut c, net_a("net-z")).await.created);
}

// === allocations ===

#[tokio::test]
async fn allocate_is_idempotent_per_owner() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let r1 = c
        .allocate(alloc_req("net-a", svc("a", "web")))
        .await
        .unwrap()
        .into_inner();
    assert!(r1.created);
    let a1 = r1.allocation.unwrap();
    assert_eq!(a1.pool, "vip");
    assert_eq!(a1.addresses.len(), 1);
    assert!(in_range(&a1.addresses[0], "10.20.1.1", "10.20.1.254"), "{a1:?}");
    assert_eq!(a1.state(), pb::AllocationState::Active);
    for _ in 0..3 {
        let r = c
            .allocate(alloc_req("net-a", svc("a", "web")))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.created, "a retry must not create: {r:?}");
        let a = r.allocation.unwrap();
        assert_eq!(a.addresses, a1.addresses);
        assert_eq!(a.revision, a1.revision, "a retry changed nothing");
    }
    let g = c
        .get_allocation(pb::GetAllocationRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "web")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g, a1);
    // Another owner gets another address; a node gets one from the node pool.
    let other = allocate(&mut c, alloc_req("net-a", svc("a", "db"))).await;
    assert_ne!(other.addresses, a1.addresses);
    let n = allocate(&mut c, alloc_req("net-a", node("a", "node-1"))).await;
    assert_eq!(n.pool, "nodes");
    assert!(in_range(&n.addresses[0], "10.20.2.1", "10.20.2.254"), "{n:?}");
    // The gateway is never handed out: the node pool's gateway is outside it, but the first
    // VIP is 10.20.1.1, never 10.20.1.0 (network address of a /24).
    assert_ne!(a1.addresses[0], "10.20.1.0");
    // GetAllocation of an owner holding nothing.
    assert_status(
        c.get_allocation(pb::GetAllocationRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "nothing")),
        })
        .await,
        Code::NotFound,
        &["nothing"],
    );
}

#[tokio::test]
async fn allocate_dual_stack_in_family_order() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let mut req = alloc_req("net-a", svc("a", "dual"));
    req.families = vec![pb::IpFamily::Ipv6 as i32, pb::IpFamily::Ipv4 as i32];
    let a = allocate(&mut c, req.clone()).await;
    assert_eq!(a.addresses.len(), 2, "{a:?}");
    assert!(
        in_range(&a.addresses[0], "fd00:20::1:0", "fd00:20::1:ffff"),
        "{a:?}"
    );
    assert!(in_range(&a.addresses[1], "10.20.1.1", "10.20.1.254"), "{a:?}");
    // Idempotent too.
    assert_eq!(allocate(&mut c, req).await.addresses, a.addresses);

    // PreferDualStack from a pool with no IPv6 range: IPv4 only, no error.
    let mut req = alloc_req("net-a", node("a", "n1"));
    req.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
    req.optional_extra_families = true;
    let n = allocate(&mut c, req.clone()).await;
    assert_eq!(n.addresses.len(), 1, "{n:?}");
    // RequireDualStack from that pool: RESOURCE_EXHAUSTED naming the missing family.
    req.owner = Some(node("a", "n2"));
    req.optional_extra_families = false;
    assert_status(c.allocate(req).await, Code::ResourceExhausted, &["IPv6"]);
    // A family listed twice.
    let mut req = alloc_req("net-a", svc("a", "twice"));
    req.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv4 as i32];
    assert_status(c.allocate(req).await, Code::InvalidArgument, &["families[1]"]);
}

#[tokio::test]
async fn allocate_requested_addresses() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;

    let mut req = alloc_req("net-a", svc("a", "web"));
    req.requested_addresses = vec!["10.20.1.77".into()];
    let a = allocate(&mut c, req).await;
    assert_eq!(a.addresses, vec!["10.20.1.77"]);

    // Held by another cluster: FAILED_PRECONDITION naming the holder.
    let mut req = alloc_req("net-a", svc("b", "web"));
    req.requested_addresses = vec!["10.20.1.77".into()];
    assert_status(
        c.allocate(req).await,
        Code::FailedPrecondition,
        &[
            "requested_addresses[0]",
            "10.20.1.77",
            "another cluster",
            "cluster a",
        ],
    );
    // Held by another owner of the same cluster without sharing.
    let mut req = alloc_req("net-a", svc("a", "other"));
    req.requested_addresses = vec!["10.20.1.77".into()];
    assert_status(
        c.allocate(req).await,
        Code::FailedPrecondition,
        &["10.20.1.77", "exclusively"],
    );
    // Outside the pool.
    let mut req = alloc_req("net-a", svc("a", "far"));
    req.requested_addresses = vec!["10.20.9.9".into()];
    assert_status(
        c.allocate(req).await,
        Code::InvalidArgument,
        &["requested_addresses[0]", "10.20.9.9"],
    );
    let mut req = alloc_req("net-a", svc("a", "far"));
    req.pool = "vip".into();
    req.requested_addresses = vec!["10.20.2.5".into()];
    assert_status(
        c.allocate(req).await,
        Code::InvalidArgument,
        &["requested_addresses[0]", "\"vip\""],
    );
    // Not an address.
    let mut req = alloc_req("net-a", svc("a", "far"));
    req.requested_addresses = vec!["10.20.1.x".into()];
    assert_status(
        c.allocate(req).await,
        Code::InvalidArgument,
        &["requested_addresses[0]"],
    );
    // A family that was not requested.
    let mut req = alloc_req("net-a", svc("a", "far"));
    req.families = vec![pb::IpFamily::Ipv4 as i32];
    req.requested_addresses = vec!["fd00:20::1:5".into()];
    assert_status(
        c.allocate(req).await,
        Code::InvalidArgument,
        &["requested_addresses[0]", "IPv6"],
    );
    // The owner asking for a different address than it holds: an allocation never moves.
    let mut req = alloc_req("net-a", svc("a", "web"));
    req.requested_addresses = vec!["10.20.1.78".into()];
    assert_status(
        c.allocate(req).await,
        Code::FailedPrecondition,
        &["10.20.1.77", "never moves"],
    );
    // Requested dual-stack pair.
    let mut req = alloc_req("net-a", svc("b", "pair"));
    req.requested_addresses = vec!["fd00:20::1:9".into(), "10.20.1.9".into()];
    let p = allocate(&mut c, req).await;
    assert_eq!(p.addresses, vec!["fd00:20::1:9", "10.20.1.9"]);
    // Auto allocation skips what was requested by others.
    let auto: Vec<pb::Allocation> = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(allocate(&mut c, alloc_req("net-a", svc("b", &format!("s{i}")))).await);
        }
        v
    };
    for x in &auto {
        assert!(
            !["10.20.1.77", "10.20.1.9"].contains(&x.addresses[0].as_str()),
            "{x:?}"
        );
    }
}

#[tokio::test]
async fn allocate_unknown_network_or_pool_is_not_found() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    assert_status(
        c.allocate(alloc_req("net-nope", svc("a", "web"))).await,
        Code::NotFound,
        &["net-nope"],
    );
    let mut req = alloc_req("net-a", svc("a", "web"));
    req.pool = "nope".into();
    assert_status(c.allocate(req).await, Code::NotFound, &["nope"]);
    assert_status(
        c.release(pb::ReleaseRequest {
            network: "net-nope".into(),
            owner: Some(svc("a", "web")),
        })
        .await,
        Code::NotFound,
        &["net-nope"],
    );
    assert_status(
        c.get_allocation(pb::GetAllocationRequest {
            network: "net-nope".into(),
            owner: Some(svc("a", "web")),
        })
        .await,
        Code::NotFound,
        &["net-nope"],
    );
}

#[tokio::test]
async fn allocate_missing_or_bad_owner_fields_are_invalid_argument() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let mut none = alloc_req("net-a", svc("a", "x"));
    none.owner = None;
    let cases: Vec<(pb::AllocateRequest, &str)> = vec![
        (none, "owner"),
        (alloc_req("net-a", svc("", "web")), "owner.cluster_id"),
        (alloc_req("net-a", svc("Bad_Cluster", "web")), "owner.cluster_id"),
        (
            alloc_req("net-a", owner("a", pb::OwnerKind::Unspecified, "", "web")),
            "owner.kind",
        ),
        (
            alloc_req("net-a", owner("a", pb::OwnerKind::Service, "", "web")),
            "owner.namespace",
        ),
        (alloc_req("net-a", svc("a", "")), "owner.name"),
        (
            alloc_req("net-a", owner("a", pb::OwnerKind::Node, "kube-system", "n1")),
            "owner.namespace",
        ),
        (
            {
                let mut o = svc("a", "web");
                o.uid = "a/b".into();
                alloc_req("net-a", o)
            },
            "owner.uid",
        ),
        (alloc_req("", svc("a", "web")), "network"),
        (
            {
                let mut r = alloc_req("net-a", svc("a", "web"));
                r.families = vec![0];
                r
            },
            "families[0]",
        ),
    ];
    for (req, field) in cases {
        let r = c.allocate(req.clone()).await;
        match &r {
            Err(s) if s.code() == Code::InvalidArgument => assert!(
                s.message().starts_with(field),
                "{req:?}: message {:?} does not start with {field:?}",
                s.message()
            ),
            other => panic!("{req:?}: expected INVALID_ARGUMENT naming {field}, got {other:?}"),
        }
    }
    assert!(
        list_all(&mut c, pb::ListAllocationsRequest::default())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn allocate_bad_ports_are_invalid_argument_naming_the_field() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let with_ports = |ports: Vec<pb::PortSpec>| {
        let mut r = alloc_req("net-a", svc("a", "web"));
        r.sharing_key = "web".into();
        r.ports = ports;
        r
    };
    assert_status(
        c.allocate(with_ports(vec![tcp(0)])).await,
        Code::InvalidArgument,
        &["ports[0].port", "0 is not in 1..65535"],
    );
    assert_status(
        c.allocate(with_ports(vec![tcp(80), tcp(65536)])).await,
        Code::InvalidArgument,
        &["ports[1].port", "65536"],
    );
    assert_status(
        c.allocate(with_ports(vec![tcp(80), tcp(443), tcp(80)])).await,
        Code::InvalidArgument,
        &["ports[2]", "duplicate"],
    );
    assert_status(
        c.allocate(with_ports(vec![pb::PortSpec {
            protocol: 0,
            port: 80,
        }]))
        .await,
        Code::InvalidArgument,
        &["ports[0].protocol"],
    );
    assert_status(
        c.allocate(with_ports(vec![])).await,
        Code::InvalidArgument,
        &["ports"],
    );
    let mut bad_key = with_ports(vec![tcp(80)]);
    bad_key.sharing_key = "Not A Key".into();
    assert_status(c.allocate(bad_key).await, Code::InvalidArgument, &["sharing_key"]);
    // The same port on two protocols is not a duplicate.
    let mut ok = with_ports(vec![
        tcp(53),
        pb::PortSpec {
            protocol: pb::Protocol::Udp as i32,
            port: 53,
        },
        tcp(65535),
    ]);
    ok.owner = Some(svc("a", "dns"));
    let a = allocate(&mut c, ok).await;
    assert_eq!(a.ports.len(), 3);
}

#[tokio::test]
async fn allocate_from_a_full_pool_is_resource_exhausted() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut n = network(
        "tiny",
        &["10.30.0.0/24"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.30.0.10-10.30.0.13"])],
    );
    n.pools[0].exclusions = vec!["10.30.0.11".into()];
    upsert(&mut c, n).await;
    let mut got = BTreeSet::new();
    for i in 0..3 {
        let a = allocate(&mut c, alloc_req("tiny", svc("a", &format!("s{i}")))).await;
        got.insert(a.addresses[0].clone());
    }
    assert_eq!(
        got,
        ["10.30.0.10", "10.30.0.12", "10.30.0.13"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>(),
        "the exclusion was handed out"
    );
    assert_status(
        c.allocate(alloc_req("tiny", svc("b", "late"))).await,
        Code::ResourceExhausted,
        &["\"vip\"", "\"tiny\""],
    );
    // An existing owner still gets its allocation back.
    let again = allocate(&mut c, alloc_req("tiny", svc("a", "s0"))).await;
    assert_eq!(again.addresses[0], "10.30.0.10");
    // Freed (no grace): the next owner gets it.
    c.release(pb::ReleaseRequest {
        network: "tiny".into(),
        owner: Some(svc("a", "s1")),
    })
    .await
    .unwrap();
    let late = allocate(&mut c, alloc_req("tiny", svc("b", "late"))).await;
    assert_eq!(late.addresses[0], "10.30.0.12");
}

#[tokio::test]
async fn sharing_only_within_one_cluster_with_same_key_and_disjoint_ports() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let shared = |cluster: &str, name: &str, key: &str, ports: Vec<pb::PortSpec>| {
        let mut r = alloc_req("net-a", svc(cluster, name));
        r.sharing_key = key.into();
        r.ports = ports;
        r
    };
    let a1 = allocate(&mut c, shared("a", "http", "web", vec![tcp(80)])).await;
    let x = a1.addresses[0].clone();
    // Same cluster, same key, disjoint ports: shares the address without asking for it.
    let a2 = allocate(&mut c, shared("a", "https", "web", vec![tcp(443)])).await;
    assert_eq!(
        a2.addresses,
        vec![x.clone()],
        "same key + disjoint ports should share"
    );
    // Same cluster, same key, overlapping port, asking for the address: refused.
    let mut r = shared("a", "http2", "web", vec![tcp(8080), tcp(80)]);
    r.requested_addresses = vec![x.clone()];
    assert_status(c.allocate(r).await, Code::FailedPrecondition, &[&x, "80"]);
    // ...and without asking: gets another address.
    let a3 = allocate(&mut c, shared("a", "http3", "web", vec![tcp(80)])).await;
    assert_ne!(a3.addresses[0], x);
    // Same cluster, different key.
    let mut r = shared("a", "other", "other", vec![tcp(9000)]);
    r.requested_addresses = vec![x.clone()];
    assert_status(
        c.allocate(r).await,
        Code::FailedPrecondition,
        &[&x, "different sharing key"],
    );
    // Same cluster, no key.
    let mut r = alloc_req("net-a", svc("a", "plain"));
    r.requested_addresses = vec![x.clone()];
    assert_status(c.allocate(r).await, Code::FailedPrecondition, &[&x]);
    // Another cluster with the same key and disjoint ports: never.
    let mut r = shared("b", "http", "web", vec![tcp(8443)]);
    r.requested_addresses = vec![x.clone()];
    assert_status(
        c.allocate(r).await,
        Code::FailedPrecondition,
        &[&x, "another cluster"],
    );
    let b1 = allocate(&mut c, shared("b", "http", "web", vec![tcp(8443)])).await;
    assert_ne!(b1.addresses[0], x, "another cluster was given a shared address");

    let holders = list_all(
        &mut c,
        pb::ListAllocationsRequest {
            address: x.clone(),
            ..Default::default()
        },
    )
    .await;
    let names: BTreeSet<(String, String)> = holders
        .iter()
        .map(|a| {
            let o = a.owner.as_ref().unwrap();
            (o.cluster_id.clone(), o.name.clone())
        })
        .collect();
    assert_eq!(
        names,
        [("a", "http"), ("a", "https")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    );

    // Changing one holder's ports to collide with the other is refused; disjoint is fine.
    assert_status(
        c.allocate(shared("a", "https", "web", vec![tcp(80)])).await,
        Code::FailedPrecondition,
        &["sharing_key/ports"],
    );
    let a2b = allocate(&mut c, shared("a", "https", "web", vec![tcp(443), tcp(8443)])).await;
    assert_eq!(a2b.addresses, vec![x.clone()]);
    // Releasing one holder keeps the address with the other.
    let r = c
        .release(pb::ReleaseRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "http")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.released);
    let left = list_all(
        &mut c,
        pb::ListAllocationsRequest {
            address: x.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].owner.as_ref().unwrap().name, "https");
    // ...so another cluster still cannot take it.
    let mut r = alloc_req("net-a", svc("b", "grab"));
    r.requested_addresses = vec![x.clone()];
    assert_status(
        c.allocate(r).await,
        Code::FailedPrecondition,
        &["another cluster"],
    );
}

#[tokio::test]
async fn release_is_idempotent() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let a = allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;
    let rel = || pb::ReleaseRequest {
        network: "net-a".into(),
        owner: Some(svc("a", "web")),
    };
    let r = c.release(rel()).await.unwrap().into_inner();
    assert!(r.released);
    assert_eq!(r.allocation.unwrap().addresses, a.addresses);
    for _ in 0..2 {
        let r = c.release(rel()).await.unwrap().into_inner();
        assert!(!r.released && r.allocation.is_none(), "{r:?}");
    }
    assert_status(
        c.get_allocation(pb::GetAllocationRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "web")),
        })
        .await,
        Code::NotFound,
        &[],
    );
    // Never held at all.
    let r = c
        .release(pb::ReleaseRequest {
            network: "net-a".into(),
            owner: Some(node("a", "never")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.released);
    assert_status(
        c.release(pb::ReleaseRequest {
            network: "".into(),
            owner: Some(svc("a", "web")),
        })
        .await,
        Code::InvalidArgument,
        &["network"],
    );
    assert_status(
        c.release(pb::ReleaseRequest {
            network: "net-a".into(),
            owner: None,
        })
        .await,
        Code::InvalidArgument,
        &["owner"],
    );
}

#[tokio::test]
async fn owner_uid_mismatch_is_failed_precondition() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let mut o = svc("a", "web");
    o.uid = "uid-1".into();
    let a = allocate(&mut c, alloc_req("net-a", o.clone())).await;
    let mut o2 = o.clone();
    o2.uid = "uid-2".into();
    assert_status(
        c.allocate(alloc_req("net-a", o2.clone())).await,
        Code::FailedPrecondition,
        &["owner.uid", "uid-1", "uid-2"],
    );
    assert_status(
        c.release(pb::ReleaseRequest {
            network: "net-a".into(),
            owner: Some(o2),
        })
        .await,
        Code::FailedPrecondition,
        &["uid-1"],
    );
    // No uid matches any uid.
    let mut anon = o.clone();
    anon.uid.clear();
    assert_eq!(
        allocate(&mut c, alloc_req("net-a", anon)).await.addresses,
        a.addresses
    );
}

#[tokio::test]
async fn list_allocations_filters_and_paginates() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let b = network(
        "net-b",
        &["10.21.0.0/16"],
        vec![
            pool("vip", pb::PoolPurpose::Vip, &["10.21.1.0/24"]),
            pool("nodes", pb::PoolPurpose::Node, &["10.21.2.0/24"]),
        ],
    );
    upsert(&mut c, b).await;
    // (network, owner) for 2 networks x 2 clusters x (7 services + 4 nodes + 1 API server).
    let mut all = Vec::new();
    for net in ["net-a", "net-b"] {
        for cl in ["alpha", "beta"] {
            for i in 0..7 {
                all.push(allocate(&mut c, alloc_req(net, svc(cl, &format!("svc-{i}")))).await);
            }
            for i in 0..4 {
                all.push(allocate(&mut c, alloc_req(net, node(cl, &format!("node-{i}")))).await);
            }
            all.push(
                allocate(
                    &mut c,
                    alloc_req(net, owner(cl, pb::OwnerKind::ApiServer, "", "kube-apiserver")),
                )
                .await,
            );
        }
    }
    assert_eq!(all.len(), 48);
    let key = |a: &pb::Allocation| {
        let o = a.owner.as_ref().unwrap();
        (
            a.network.clone(),
            o.cluster_id.clone(),
            o.kind,
            o.namespace.clone(),
            o.name.clone(),
        )
    };

    // Unfiltered, one page.
    let r = c
        .list_allocations(pb::ListAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.allocations.len(), 48);
    assert!(r.next_page_token.is_empty());

    // Pages of 5: every allocation exactly once, in one stable order, 10 pages.
    let mut seen = Vec::new();
    let mut req = pb::ListAllocationsRequest {
        page_size: 5,
        ..Default::default()
    };
    let mut pages = 0;
    loop {
        let r = c.list_allocations(req.clone()).await.unwrap().into_inner();
        pages += 1;
        assert!(r.allocations.len() <= 5);
        seen.extend(r.allocations);
        if r.next_page_token.is_empty() {
            break;
        }
        req.page_token = r.next_page_token;
        assert!(pages < 100, "pagination does not end");
    }
    assert_eq!(seen.len(), 48);
    assert!(pages >= 10, "{pages} pages of 5 for 48 allocations");
    let seen_keys: Vec<_> = seen.iter().map(key).collect();
    let unique: BTreeSet<_> = seen_keys.iter().cloned().collect();
    assert_eq!(unique.len(), 48, "duplicates across pages");
    assert_eq!(
        seen.iter().map(key).collect::<Vec<_>>(),
        r.allocations.iter().map(key).collect::<Vec<_>>(),
        "paged order differs from the single-page order"
    );

    // Filters, each with pagination across pages.
    let count = |mut req: pb::ListAllocationsRequest| {
        req.page_size = 3;
        req
    };
    let net_b = list_all(
        &mut c,
        count(pb::ListAllocationsRequest {
            network: "net-b".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(net_b.len(), 24);
    assert!(net_b.iter().all(|a| a.network == "net-b"));
    let beta = list_all(
        &mut c,
        count(pb::ListAllocationsRequest {
            cluster_id: "beta".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(beta.len(), 24);
    assert!(
        beta.iter()
            .all(|a| a.owner.as_ref().unwrap().cluster_id == "beta")
    );
    let a_beta_nodes = list_all(
        &mut c,
        count(pb::ListAllocationsRequest {
            network: "net-a".into(),
            cluster_id: "beta".into(),
            kind: pb::OwnerKind::Node as i32,
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(a_beta_nodes.len(), 4);
    assert!(
        a_beta_nodes
            .iter()
            .all(|a| a.pool == "nodes" && a.network == "net-a")
    );
    let vip_pool = list_all(
        &mut c,
        count(pb::ListAllocationsRequest {
            pool: "vip".into(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(vip_pool.len(), 32, "services + API servers draw from vip");
    let apis = list_all(
        &mut c,
        count(pb::ListAllocationsRequest {
            kind: pb::OwnerKind::ApiServer as i32,
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(apis.len(), 4);
    let target = &all[13];
    let by_addr = list_all(
        &mut c,
        pb::ListAllocationsRequest {
            address: target.addresses[0].clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_addr.len(), 1);
    assert_eq!(key(&by_addr[0]), key(target));

    // Bad filters.
    assert_status(
        c.list_allocations(pb::ListAllocationsRequest {
            page_size: 10_001,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["page_size"],
    );
    assert_status(
        c.list_allocations(pb::ListAllocationsRequest {
            address: "nope".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["address"],
    );
    assert_status(
        c.list_allocations(pb::ListAllocationsRequest {
            network: "net-nope".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &["net-nope"],
    );
    assert_status(
        c.list_allocations(pb::ListAllocationsRequest {
            kind: 42,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["kind"],
    );
}

async fn next_event(s: &mut tonic::Streaming<pb::WatchAllocationsResponse>) -> pb::WatchAllocationsResponse {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("no watch event within 10s")
        .expect("watch stream ended")
        .expect("watch stream failed")
}

fn ev_summary(e: &pb::WatchAllocationsResponse) -> (pb::WatchEventType, String) {
    (
        e.r#type(),
        e.allocation
            .as_ref()
            .map(|a| a.owner.as_ref().unwrap().name.clone())
            .unwrap_or_default(),
    )
}

#[tokio::test]
async fn watch_allocations_sends_snapshot_synced_then_changes_in_order() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let e1 = allocate(&mut c, alloc_req("net-a", svc("a", "one"))).await;
    let e2 = allocate(&mut c, alloc_req("net-a", node("a", "two"))).await;
    allocate(&mut c, alloc_req("net-a", svc("b", "theirs"))).await;

    let mut all = c
        .watch_allocations(pb::WatchAllocationsRequest {
            network: "net-a".into(),
            cluster_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut only_a = c
        .watch_allocations(pb::WatchAllocationsRequest {
            network: "net-a".into(),
            cluster_id: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // Snapshot: EXISTING for each (any order), then SYNCED.
    let mut snap = BTreeSet::new();
    let synced = loop {
        let e = next_event(&mut all).await;
        match e.r#type() {
            pb::WatchEventType::Existing => {
                snap.insert(ev_summary(&e).1);
            }
            pb::WatchEventType::Synced => break e,
            other => panic!("unexpected {other:?} before SYNCED"),
        }
    };
    assert_eq!(
        snap,
        ["one", "two", "theirs"].into_iter().map(String::from).collect()
    );
    assert!(synced.allocation.is_none());
    assert!(synced.revision >= e2.revision.max(e1.revision));
    let mut snap_a = BTreeSet::new();
    loop {
        let e = next_event(&mut only_a).await;
        match e.r#type() {
            pb::WatchEventType::Existing => {
                assert_eq!(
                    e.allocation.as_ref().unwrap().owner.as_ref().unwrap().cluster_id,
                    "a"
                );
                snap_a.insert(ev_summary(&e).1);
            }
            pb::WatchEventType::Synced => break,
            other => panic!("unexpected {other:?} before SYNCED"),
        }
    }
    assert_eq!(snap_a, ["one", "two"].into_iter().map(String::from).collect());

    // Changes: ADDED, MODIFIED (a new family), ADDED by cluster b, DELETED, DELETED.
    let added = allocate(&mut c, alloc_req("net-a", svc("a", "three"))).await;
    let mut dual = alloc_req("net-a", svc("a", "one"));
    dual.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
    let modified = allocate(&mut c, dual).await;
    assert_eq!(modified.addresses.len(), 2);
    assert_eq!(modified.addresses[0], e1.addresses[0], "the IPv4 address moved");
    allocate(&mut c, alloc_req("net-a", svc("b", "four"))).await;
    for (cl, name) in [("a", "three"), ("b", "theirs")] {
        let r = c
            .release(pb::ReleaseRequest {
                network: "net-a".into(),
                owner: Some(svc(cl, name)),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.released);
    }
    // Idempotent retries produce no events.
    allocate(&mut c, alloc_req("net-a", svc("a", "two-b"))).await;

    use pb::WatchEventType::{Added, Deleted, Modified};
    let want_all = [
        (Added, "three"),
        (Modified, "one"),
        (Added, "four"),
        (Deleted, "three"),
        (Deleted, "theirs"),
        (Added, "two-b"),
    ];
    let mut last_rev = synced.revision;
    for (i, (ty, name)) in want_all.iter().enumerate() {
        let e = next_event(&mut all).await;
        assert_eq!(
            ev_summary(&e),
            (*ty, name.to_string()),
            "event {i} of the unfiltered watch"
        );
        assert!(
            e.revision > last_rev,
            "revisions must increase: {} after {last_rev}",
            e.revision
        );
        last_rev = e.revision;
        if *ty == Added && *name == "three" {
            assert_eq!(e.allocation.as_ref().unwrap().addresses, added.addresses);
        }
        if *ty == Modified {
            assert_eq!(e.allocation.as_ref().unwrap().addresses, modified.addresses);
        }
    }
    let want_a = [
        (Added, "three"),
        (Modified, "one"),
        (Deleted, "three"),
        (Added, "two-b"),
    ];
    for (i, (ty, name)) in want_a.iter().enumerate() {
        let e = next_event(&mut only_a).await;
        assert_eq!(
            ev_summary(&e),
            (*ty, name.to_string()),
            "event {i} of the cluster-a watch"
        );
    }
    // Nothing else is pending on either stream.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), all.next())
            .await
            .is_err(),
        "unexpected extra event"
    );
}

// === usage, backup, grace, pool edits, restart ===

fn usage_of<'a>(u: &'a pb::GetUsageResponse, net: &str, pool: &str, fam: pb::IpFamily) -> &'a pb::PoolUsage {
    u.pools
        .iter()
        .find(|p| p.network == net && p.pool == pool && p.family == fam as i32)
        .unwrap_or_else(|| panic!("no usage row for {net}/{pool}/{fam:?} in {u:?}"))
}

fn counts(p: &pb::PoolUsage) -> [u128; 5] {
    [&p.total, &p.used, &p.free, &p.quarantined, &p.out_of_range].map(|s| s.parse().unwrap())
}

async fn usage(c: &mut Client, net: &str) -> pb::GetUsageResponse {
    c.get_usage(pb::GetUsageRequest { network: net.into() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn get_usage_counts_per_pool_and_family() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let mut q = network(
        "net-q",
        &["10.50.0.0/24"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.50.0.0/28"])],
    );
    q.pools[0].exclusions = vec!["10.50.0.5-10.50.0.6".into()];
    q.reuse_grace_seconds = Some(600);
    upsert(&mut c, q).await;

    let u = usage(&mut c, "net-a").await;
    assert_eq!(u.pools.len(), 3, "vip v4, vip v6, nodes v4: {u:?}");
    assert_eq!(
        counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv4)),
        [254, 0, 254, 0, 0]
    );
    assert_eq!(
        counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv6)),
        [65535, 0, 65535, 0, 0] // a /112 less its subnet-router anycast address
    );
    assert_eq!(
        usage_of(&u, "net-a", "nodes", pb::IpFamily::Ipv4).purpose,
        pb::PoolPurpose::Node as i32
    );

    for i in 0..3 {
        allocate(&mut c, alloc_req("net-a", svc("a", &format!("s{i}")))).await;
    }
    let mut dual = alloc_req("net-a", svc("b", "dual"));
    dual.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
    allocate(&mut c, dual).await;
    allocate(&mut c, alloc_req("net-a", node("a", "n1"))).await;
    allocate(&mut c, alloc_req("net-a", node("b", "n1"))).await;
    let u = usage(&mut c, "net-a").await;
    assert_eq!(
        counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv4)),
        [254, 4, 250, 0, 0]
    );
    assert_eq!(
        counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv6)),
        [65535, 1, 65534, 0, 0]
    );
    assert_eq!(
        counts(usage_of(&u, "net-a", "nodes", pb::IpFamily::Ipv4)),
        [254, 2, 252, 0, 0]
    );

    // /28 minus network, broadcast and 2 exclusions = 12; one held, one in grace.
    allocate(&mut c, alloc_req("net-q", svc("a", "keep"))).await;
    allocate(&mut c, alloc_req("net-q", svc("a", "gone"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-q".into(),
        owner: Some(svc("a", "gone")),
    })
    .await
    .unwrap();
    let u = usage(&mut c, "net-q").await;
    assert_eq!(u.pools.len(), 1, "only the named network: {u:?}");
    assert_eq!(
        counts(usage_of(&u, "net-q", "vip", pb::IpFamily::Ipv4)),
        [12, 1, 10, 1, 0]
    );
    // Every network when none is named.
    assert_eq!(usage(&mut c, "").await.pools.len(), 4);
    assert_status(
        c.get_usage(pb::GetUsageRequest {
            network: "nope".into(),
        })
        .await,
        Code::NotFound,
        &["nope"],
    );
}

/// Export with the volatile timestamp cleared.
async fn export(c: &mut Client) -> pb::ExportResponse {
    let mut e = c.export(pb::ExportRequest {}).await.unwrap().into_inner();
    assert!(e.exported_at.is_some());
    e.exported_at = None;
    e
}

/// A store with a bit of everything: managed network, dual-stack, shared, nodes, API
/// servers, an out-of-range allocation and a quarantined address.
async fn populate(c: &mut Client) {
    let mut a = net_a("net-a");
    a.managed_by = "cloud".into();
    upsert(c, a.clone()).await;
    let mut q = network(
        "net-q",
        &["10.50.0.0/24"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.50.0.10-10.50.0.11"])],
    );
    q.reuse_grace_seconds = Some(600);
    upsert(c, q).await;
    for cl in ["alpha", "beta"] {
        allocate(
            c,
            alloc_req("net-a", owner(cl, pb::OwnerKind::ApiServer, "", "kube-apiserver")),
        )
        .await;
        for i in 0..3 {
            allocate(c, alloc_req("net-a", node(cl, &format!("node-{i}")))).await;
        }
        let mut d = alloc_req("net-a", svc(cl, "dual"));
        d.families = vec![pb::IpFamily::Ipv6 as i32, pb::IpFamily::Ipv4 as i32];
        let mut o = svc(cl, "dual");
        o.uid = format!("uid-{cl}");
        d.owner = Some(o);
        allocate(c, d).await;
        for (name, port) in [("http", 80), ("https", 443)] {
            let mut s = alloc_req("net-a", svc(cl, name));
            s.sharing_key = "web".into();
            s.ports = vec![tcp(port)];
            allocate(c, s).await;
        }
    }
    let mut high = alloc_req("net-a", svc("alpha", "high"));
    high.requested_addresses = vec!["10.20.1.250".into()];
    allocate(c, high).await;
    // Shrink: 10.20.1.250 is now out of range.
    a.pools[0].ranges[0] = "10.20.1.0/25".into();
    let r = upsert(c, a).await;
    assert_eq!(r.out_of_range.len(), 1);
    allocate(c, alloc_req("net-q", svc("alpha", "held"))).await;
    allocate(c, alloc_req("net-q", svc("alpha", "released"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-q".into(),
        owner: Some(svc("alpha", "released")),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn export_import_round_trip_into_a_fresh_server() {
    let src = Server::start().await;
    let mut c = src.client().await;
    populate(&mut c).await;
    let before = export(&mut c).await;
    assert_eq!(before.networks.len(), 2);
    assert_eq!(before.allocations.len(), 2 * 7 + 2);
    assert_eq!(before.quarantined.len(), 1);
    assert_eq!(before.quarantined[0].address, "10.50.0.11");
    let oor: Vec<_> = before
        .allocations
        .iter()
        .filter(|a| a.state() == pb::AllocationState::OutOfRange)
        .collect();
    assert_eq!(oor.len(), 1);
    assert_eq!(oor[0].addresses, vec!["10.20.1.250"]);

    let dst = Server::start().await;
    let mut d = dst.client().await;
    let r = d
        .import(pb::ImportRequest {
            backup: Some(before.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.networks, r.allocations), (2, 16));
    let after = export(&mut d).await;
    assert_eq!(after, before, "export → import → export is not the identity");

    // The restored store behaves like the original: idempotent owners, quarantine, sharing.
    let mut o = svc("beta", "dual");
    o.uid = "uid-beta".into();
    let r = d.allocate(alloc_req("net-a", o)).await.unwrap().into_inner();
    assert!(!r.created);
    let orig = before
        .allocations
        .iter()
        .find(|a| a.owner.as_ref().unwrap().cluster_id == "beta" && a.owner.as_ref().unwrap().name == "dual")
        .unwrap();
    assert_eq!(r.allocation.unwrap().addresses, orig.addresses);
    assert_status(
        d.allocate(alloc_req("net-q", svc("beta", "late"))).await,
        Code::ResourceExhausted,
        &["1 in reuse grace"],
    );
    let back = allocate(&mut d, alloc_req("net-q", svc("alpha", "released"))).await;
    assert_eq!(
        back.addresses,
        vec!["10.50.0.11"],
        "the previous owner gets it back"
    );

    // Import only into an empty store.
    assert_status(
        d.import(pb::ImportRequest {
            backup: Some(before.clone()),
        })
        .await,
        Code::FailedPrecondition,
        &["not empty"],
    );
    assert_status(
        d.import(pb::ImportRequest { backup: None }).await,
        Code::InvalidArgument,
        &["backup"],
    );
}

#[tokio::test]
async fn import_refuses_an_inconsistent_backup_and_writes_nothing() {
    let src = Server::start().await;
    let mut c = src.client().await;
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;
    allocate(&mut c, alloc_req("net-a", svc("b", "web"))).await;
    let good = export(&mut c).await;

    let dst = Server::start().await;
    let mut d = dst.client().await;
    // The same address held by two clusters.
    let mut doubly = good.clone();
    doubly.allocations[1].addresses = doubly.allocations[0].addresses.clone();
    assert_status(
        d.import(pb::ImportRequest { backup: Some(doubly) }).await,
        Code::InvalidArgument,
        &["backup", &good.allocations[0].addresses[0], "another cluster"],
    );
    // Overlapping networks.
    let mut overlap = good.clone();
    let mut twin = overlap.networks[0].clone();
    twin.name = "net-twin".into();
    overlap.networks.push(twin);
    assert_status(
        d.import(pb::ImportRequest {
            backup: Some(overlap),
        })
        .await,
        Code::InvalidArgument,
        &["backup", "net-twin", "net-a"],
    );
    // A malformed allocation names its path.
    let mut bad = good.clone();
    bad.allocations[1].addresses = vec!["not-an-ip".into()];
    assert_status(
        d.import(pb::ImportRequest { backup: Some(bad) }).await,
        Code::InvalidArgument,
        &["backup.allocations[1].addresses[0]"],
    );
    let empty = export(&mut d).await;
    assert!(
        empty.networks.is_empty() && empty.allocations.is_empty(),
        "a refused import wrote: {empty:?}"
    );
    // The good one still imports.
    d.import(pb::ImportRequest {
        backup: Some(good.clone()),
    })
    .await
    .unwrap();
    assert_eq!(export(&mut d).await, good);
}

#[tokio::test]
async fn reuse_grace_holds_released_addresses_from_other_owners() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let grace = Duration::from_secs(2);
    let mut n = network(
        "net-g",
        &["10.40.0.0/24"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.40.0.5"])],
    );
    n.reuse_grace_seconds = Some(2);
    upsert(&mut c, n).await;
    let a = allocate(&mut c, alloc_req("net-g", svc("a", "first"))).await;
    assert_eq!(a.addresses, vec!["10.40.0.5"]);
    let rel = pb::ReleaseRequest {
        network: "net-g".into(),
        owner: Some(svc("a", "first")),
    };

    // Released: another owner is refused during the grace period, even asking for it.
    let t0 = Instant::now();
    assert!(c.release(rel.clone()).await.unwrap().into_inner().released);
    let r = c.allocate(alloc_req("net-g", svc("b", "second"))).await;
    let refused_at = t0.elapsed();
    assert!(
        refused_at < grace,
        "the machine is too slow for this test ({refused_at:?})"
    );
    assert_status(r, Code::ResourceExhausted, &["1 in reuse grace"]);
    let mut want = alloc_req("net-g", svc("a", "other"));
    want.requested_addresses = vec!["10.40.0.5".into()];
    assert_status(
        c.allocate(want).await,
        Code::FailedPrecondition,
        &["10.40.0.5", "reuse grace"],
    );
    let u = usage(&mut c, "net-g").await;
    assert_eq!(
        counts(usage_of(&u, "net-g", "vip", pb::IpFamily::Ipv4)),
        [1, 0, 0, 1, 0]
    );

    // The previous owner gets it straight back.
    let back = c
        .allocate(alloc_req("net-g", svc("a", "first")))
        .await
        .unwrap()
        .into_inner();
    assert!(back.created);
    assert_eq!(back.allocation.unwrap().addresses, vec!["10.40.0.5"]);
    assert!(t0.elapsed() < grace, "the machine is too slow for this test");

    // Released again: poll another owner until it gets the address; never before the grace.
    let t1 = Instant::now();
    assert!(c.release(rel).await.unwrap().into_inner().released);
    let mut refusals = 0;
    let got = loop {
        match c.allocate(alloc_req("net-g", svc("b", "second"))).await {
            Ok(r) => break (r.into_inner().allocation.unwrap(), t1.elapsed()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                refusals += 1;
            }
        }
        assert!(
            t1.elapsed() < Duration::from_secs(30),
            "never handed out after the grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.0.addresses, vec!["10.40.0.5"]);
    assert!(refusals > 0, "no refusal was observed during the grace period");
    assert!(
        got.1 >= grace,
        "handed to another owner {:?} after release, before the {grace:?} grace",
        got.1
    );
    let u = usage(&mut c, "net-g").await;
    assert_eq!(
        counts(usage_of(&u, "net-g", "vip", pb::IpFamily::Ipv4)),
        [1, 1, 0, 0, 0]
    );
}

#[tokio::test]
async fn server_default_reuse_grace_applies_to_networks_without_one() {
    let srv = Server::start_with(&["--default-reuse-grace", "1m"]).await;
    let mut c = srv.client().await;
    let n = network(
        "net-d",
        &["10.41.0.0/24"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.41.0.5"])],
    );
    upsert(&mut c, n.clone()).await;
    allocate(&mut c, alloc_req("net-d", svc("a", "x"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-d".into(),
        owner: Some(svc("a", "x")),
    })
    .await
    .unwrap();
    assert_status(
        c.allocate(alloc_req("net-d", svc("b", "y"))).await,
        Code::ResourceExhausted,
        &["reuse grace"],
    );
    // Setting 0 on the network overrides the default; the entry already in grace stays.
    let mut zero = n;
    zero.reuse_grace_seconds = Some(0);
    upsert(&mut c, zero).await;
    allocate(&mut c, alloc_req("net-d", svc("a", "x"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-d".into(),
        owner: Some(svc("a", "x")),
    })
    .await
    .unwrap();
    assert_eq!(
        allocate(&mut c, alloc_req("net-d", svc("b", "y")))
            .await
            .addresses,
        vec!["10.41.0.5"]
    );
}

#[tokio::test]
async fn pool_shrink_keeps_allocations_flagged_out_of_range() {
    let mut srv = Server::start().await;
    let mut c = srv.client().await;
    let mut n = net_a("net-a");
    upsert(&mut c, n.clone()).await;
    let mut high = alloc_req("net-a", svc("a", "high"));
    high.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
    high.requested_addresses = vec!["10.20.1.200".into()];
    let h = allocate(&mut c, high).await;
    let mut low = alloc_req("net-a", svc("a", "low"));
    low.requested_addresses = vec!["10.20.1.10".into()];
    allocate(&mut c, low).await;
    let get = |name: &str| pb::GetAllocationRequest {
        network: "net-a".into(),
        owner: Some(svc("a", name)),
    };

    n.pools[0].ranges[0] = "10.20.1.0/25".into();
    let r = upsert(&mut c, n.clone()).await;
    assert!(r.changed);
    assert_eq!(r.out_of_range.len(), 1, "{r:?}");
    assert_eq!(r.out_of_range[0].owner.as_ref().unwrap().name, "high");
    assert_eq!(r.out_of_range[0].state(), pb::AllocationState::OutOfRange);

    let g = c.get_allocation(get("high")).await.unwrap().into_inner();
    assert_eq!(g.addresses, h.addresses, "a pool edit moved an allocation");
    assert_eq!(g.state(), pb::AllocationState::OutOfRange);
    let l = c.get_allocation(get("low")).await.unwrap().into_inner();
    assert_eq!(l.state(), pb::AllocationState::Active);
    let listed = list_all(&mut c, pb::ListAllocationsRequest::default()).await;
    assert_eq!(
        listed
            .iter()
            .filter(|a| a.state() == pb::AllocationState::OutOfRange)
            .count(),
        1
    );
    let u = usage(&mut c, "net-a").await;
    // 10.20.1.1-126 in range; low held; high out of range (not part of total).
    assert_eq!(
        counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv4)),
        [126, 1, 125, 0, 1]
    );
    assert_eq!(counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv6))[4], 0);
    // The owner keeps getting it; nobody else can ask for it (not in the pool).
    let mut retry = alloc_req("net-a", svc("a", "high"));
    retry.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
    let again = c.allocate(retry).await.unwrap().into_inner();
    assert!(!again.created);
    let again = again.allocation.unwrap();
    assert_eq!(again.addresses, h.addresses);
    assert_eq!(again.state(), pb::AllocationState::OutOfRange);
    let mut steal = alloc_req("net-a", svc("b", "steal"));
    steal.requested_addresses = vec!["10.20.1.200".into()];
    assert!(c.allocate(steal).await.is_err());

    // Removing or repurposing a pool with allocations is refused.
    let mut no_vip = n.clone();
    no_vip.pools.remove(0);
    assert_status(
        c.upsert_network(upsert_req(no_vip)).await,
        Code::FailedPrecondition,
        &["\"vip\"", "2 allocation"],
    );
    let mut repurposed = n.clone();
    repurposed.pools[0].purpose = pb::PoolPurpose::Node as i32;
    assert_status(
        c.upsert_network(upsert_req(repurposed)).await,
        Code::FailedPrecondition,
        &["purpose"],
    );

    // Survives a restart flagged and unmoved.
    assert!(srv.terminate().await.success());
    srv.restart().await;
    let mut c = srv.client().await;
    let g = c.get_allocation(get("high")).await.unwrap().into_inner();
    assert_eq!(
        (g.addresses.clone(), g.state()),
        (h.addresses.clone(), pb::AllocationState::OutOfRange)
    );
    let u = usage(&mut c, "net-a").await;
    assert_eq!(counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv4))[4], 1);

    // Growing the pool back makes it active again.
    n.pools[0].ranges[0] = "10.20.1.0/24".into();
    let r = upsert(&mut c, n).await;
    assert!(r.out_of_range.is_empty());
    let g = c.get_allocation(get("high")).await.unwrap().into_inner();
    assert_eq!(
        (g.state(), g.addresses),
        (pb::AllocationState::Active, h.addresses)
    );
    let u = usage(&mut c, "net-a").await;
    assert_eq!(
        counts(usage_of(&u, "net-a", "vip", pb::IpFamily::Ipv4)),
        [254, 2, 252, 0, 0]
    );
}

/// owner key -> (addresses, revision, created_at seconds, state).
type Assignments = BTreeMap<String, (Vec<String>, u64, i64, i32)>;

async fn assignments(c: &mut Client) -> Assignments {
    list_all(c, pb::ListAllocationsRequest::default())
        .await
        .into_iter()
        .map(|a| {
            let o = a.owner.clone().unwrap();
            (
                format!(
                    "{}/{}/{}/{}/{}",
                    a.network, o.cluster_id, o.kind, o.namespace, o.name
                ),
                (a.addresses, a.revision, a.created_at.unwrap().seconds, a.state),
            )
        })
        .collect()
}

#[tokio::test]
async fn restart_never_changes_an_assignment() {
    let mut srv = Server::start().await;
    let mut c = srv.client().await;
    populate(&mut c).await;
    for i in 0..20 {
        let mut r = alloc_req(
            "net-a",
            svc(if i % 2 == 0 { "alpha" } else { "beta" }, &format!("bulk-{i}")),
        );
        if i % 3 == 0 {
            r.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
        }
        allocate(&mut c, r).await;
    }
    let before = assignments(&mut c).await;
    let backup = export(&mut c).await;
    assert_eq!(before.len(), 36);

    for how in ["SIGTERM", "SIGKILL"] {
        if how == "SIGTERM" {
            let st = srv.terminate().await;
            assert!(st.success(), "SIGTERM exit status {st}");
            assert!(srv.log_text().contains("every acknowledged write is on disk"));
        } else {
            srv.kill();
        }
        srv.restart().await;
        let mut c = srv.client().await;
        assert_eq!(
            assignments(&mut c).await,
            before,
            "assignments changed across a {how} restart"
        );
        assert_eq!(
            export(&mut c).await,
            backup,
            "stored state changed across a {how} restart"
        );
        // Every owner asking again gets the same, without a write.
        for a in &backup.allocations {
            let o = a.owner.clone().unwrap();
            let mut req = alloc_req(&a.network, o);
            req.sharing_key = a.sharing_key.clone();
            req.ports = a.ports.clone();
            let r = c.allocate(req).await.unwrap().into_inner();
            assert!(!r.created, "{how}: {a:?} was created again");
            assert_eq!(r.allocation.unwrap().addresses, a.addresses, "{how}: {a:?} moved");
        }
        // The quarantined address is still held from other owners.
        assert_status(
            c.allocate(alloc_req("net-q", svc("beta", "late"))).await,
            Code::ResourceExhausted,
            &["reuse grace"],
        );
        assert_eq!(export(&mut c).await, backup);
    }
    // New allocations avoid everything held.
    let mut c = srv.client().await;
    let held: BTreeSet<String> = before.values().flat_map(|v| v.0.clone()).collect();
    for i in 0..10 {
        let a = allocate(&mut c, alloc_req("net-a", svc("gamma", &format!("new-{i}")))).await;
        assert!(!held.contains(&a.addresses[0]), "{a:?} took a held address");
    }
}

// === probes of less travelled paths ===

#[tokio::test]
async fn pool_selection_honours_purpose_auto_assign_families_and_gateways() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut manual = pool("manual", pb::PoolPurpose::Vip, &["10.60.0.0/29"]);
    manual.auto_assign = Some(false);
    let n = pb::Network {
        name: "net-p".into(),
        prefixes: vec!["10.60.0.0/16".into(), "fd00:60::/64".into()],
        // Inside the v4 auto pool: never handed out.
        gateways: vec!["10.60.1.1".into()],
        pools: vec![
            manual,
            pool("v4only", pb::PoolPurpose::Vip, &["10.60.1.0/30"]),
            pool(
                "dual",
                pb::PoolPurpose::Vip,
                &["10.60.2.0/24", "fd00:60::2:0/120"],
            ),
            pool("nodes", pb::PoolPurpose::Node, &["10.60.3.0/24"]),
        ],
        ..Default::default()
    };
    upsert(&mut c, n).await;
    // /30 minus network, broadcast and the gateway: exactly one address, 10.60.1.2.
    let a = allocate(&mut c, alloc_req("net-p", svc("a", "s1"))).await;
    assert_eq!(
        (a.pool.as_str(), a.addresses[0].as_str()),
        ("v4only", "10.60.1.2")
    );
    // The first auto pool is full: the next auto VIP pool serves (never the manual one).
    let b = allocate(&mut c, alloc_req("net-p", svc("a", "s2"))).await;
    assert_eq!(b.pool, "dual", "{b:?}");
    // Dual-stack goes to the first pool that has both families.
    let mut d = alloc_req("net-p", svc("a", "s3"));
    d.families = vec![pb::IpFamily::Ipv6 as i32, pb::IpFamily::Ipv4 as i32];
    let d = allocate(&mut c, d).await;
    assert_eq!(d.pool, "dual");
    // The manual pool only by name.
    let mut m = alloc_req("net-p", svc("a", "s4"));
    m.pool = "manual".into();
    let m = allocate(&mut c, m).await;
    assert_eq!(
        (m.pool.as_str(), m.addresses[0].as_str()),
        ("manual", "10.60.0.1")
    );
    // API servers draw VIPs, nodes draw node addresses; an explicit purpose must match.
    let api = allocate(
        &mut c,
        alloc_req(
            "net-p",
            owner("a", pb::OwnerKind::ApiServer, "", "kube-apiserver"),
        ),
    )
    .await;
    assert_eq!(api.pool, "dual");
    assert_eq!(
        allocate(&mut c, alloc_req("net-p", node("a", "n1"))).await.pool,
        "nodes"
    );
    let mut wrong = alloc_req("net-p", svc("a", "s5"));
    wrong.pool = "nodes".into();
    wrong.purpose = pb::PoolPurpose::Vip as i32;
    assert_status(c.allocate(wrong).await, Code::InvalidArgument, &["purpose"]);
    let mut wrong = alloc_req("net-p", svc("a", "s6"));
    wrong.requested_addresses = vec!["10.60.3.7".into()];
    assert_status(
        c.allocate(wrong).await,
        Code::InvalidArgument,
        &["requested_addresses[0]", "NODE pool"],
    );
    let mut gw = alloc_req("net-p", svc("a", "s7"));
    gw.requested_addresses = vec!["10.60.1.1".into()];
    assert!(c.allocate(gw).await.is_err(), "the gateway was handed out");
    // An asked-for pool that is full does not spill over.
    let mut full = alloc_req("net-p", svc("b", "s8"));
    full.pool = "v4only".into();
    assert_status(c.allocate(full).await, Code::ResourceExhausted, &["\"v4only\""]);
}

#[tokio::test]
async fn an_optional_family_is_added_later_without_moving_the_first() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut n = network(
        "net-o",
        &["10.70.0.0/16", "fd00:70::/64"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.70.1.0/24"])],
    );
    upsert(&mut c, n.clone()).await;
    let mut req = alloc_req("net-o", svc("a", "web"));
    req.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
    req.optional_extra_families = true;
    let first = allocate(&mut c, req.clone()).await;
    assert_eq!(first.addresses.len(), 1);
    // The pool gains an IPv6 range: the next Allocate adds the family, the IPv4 stays.
    n.pools[0].ranges.push("fd00:70::1:0/120".into());
    upsert(&mut c, n).await;
    let r = c.allocate(req.clone()).await.unwrap().into_inner();
    assert!(!r.created);
    let second = r.allocation.unwrap();
    assert_eq!(second.addresses.len(), 2, "{second:?}");
    assert_eq!(second.addresses[0], first.addresses[0], "the IPv4 address moved");
    assert!(second.revision > first.revision);
    // Asking for IPv4 only drops the IPv6 address; asking for both again re-adds one.
    let mut v4 = req.clone();
    v4.families = vec![pb::IpFamily::Ipv4 as i32];
    let third = allocate(&mut c, v4).await;
    assert_eq!(third.addresses, vec![first.addresses[0].clone()]);
    let fourth = allocate(&mut c, req).await;
    assert_eq!(fourth.addresses[0], first.addresses[0]);
    assert_eq!(fourth.addresses.len(), 2);
}

#[tokio::test]
async fn delete_network_force_streams_deleted_events() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    for i in 0..3 {
        allocate(&mut c, alloc_req("net-a", svc("a", &format!("s{i}")))).await;
    }
    let mut w = c
        .watch_allocations(pb::WatchAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    loop {
        if next_event(&mut w).await.r#type() == pb::WatchEventType::Synced {
            break;
        }
    }
    let r = c
        .delete_network(pb::DeleteNetworkRequest {
            name: "net-a".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.released, 3);
    let mut deleted = BTreeSet::new();
    for _ in 0..3 {
        let e = next_event(&mut w).await;
        assert_eq!(e.r#type(), pb::WatchEventType::Deleted, "{e:?}");
        deleted.insert(ev_summary(&e).1);
    }
    assert_eq!(
        deleted,
        ["s0", "s1", "s2"].into_iter().map(String::from).collect()
    );
}

#[tokio::test]
async fn revisions_keep_increasing_across_restart_and_import() {
    let mut srv = Server::start().await;
    let mut c = srv.client().await;
    populate(&mut c).await;
    let max_before = list_all(&mut c, pb::ListAllocationsRequest::default())
        .await
        .iter()
        .map(|a| a.revision)
        .max()
        .unwrap();
    let backup = export(&mut c).await;
    srv.kill();
    srv.restart().await;
    let mut c = srv.client().await;
    let mut w = c
        .watch_allocations(pb::WatchAllocationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let synced = loop {
        let e = next_event(&mut w).await;
        if e.r#type() == pb::WatchEventType::Synced {
            break e;
        }
        assert!(e.revision <= max_before);
    };
    assert!(
        synced.revision >= max_before,
        "SYNCED {} < {max_before}",
        synced.revision
    );
    let a = allocate(&mut c, alloc_req("net-a", svc("alpha", "after-restart"))).await;
    assert!(
        a.revision > synced.revision,
        "{} after a restart at {}",
        a.revision,
        synced.revision
    );
    let e = next_event(&mut w).await;
    assert_eq!(e.r#type(), pb::WatchEventType::Added);
    assert_eq!(e.revision, a.revision);

    // Imported allocations keep their revisions; later writes go above them.
    let fresh = Server::start().await;
    let mut f = fresh.client().await;
    f.import(pb::ImportRequest { backup: Some(backup) })
        .await
        .unwrap();
    let b = allocate(&mut f, alloc_req("net-a", svc("alpha", "after-import"))).await;
    assert!(
        b.revision > max_before,
        "{} after importing revisions up to {max_before}",
        b.revision
    );
}

/// A plain HTTP/1.0 GET on loopback; returns (status line, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn metrics_and_health_endpoints_serve() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;
    let _ = c.allocate(alloc_req("net-nope", svc("a", "web"))).await;
    let m = srv.metrics.expect("no metrics address in the addr file");
    let (status, body) = http_get(m, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");
    let (status, _) = http_get(m, "/readyz").await;
    assert!(status.contains("200"), "{status}");
    let (status, body) = http_get(m, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for want in [
        "cairn_ipam_rpc_requests",
        "method=\"Allocate\"",
        "code=\"not_found\"",
        "cairn_ipam_commits",
    ] {
        assert!(body.contains(want), "{want} missing from /metrics:\n{body}");
    }
}

#[tokio::test]
async fn sigterm_ends_open_watches_and_exits_cleanly() {
    // Found by this suite: a graceful shutdown waited for every open WatchAllocations stream,
    // which never ends by itself, so SIGTERM hung as long as any watcher was connected.
    let mut srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;
    let mut watches = Vec::new();
    for cluster in ["", "a", "b"] {
        let mut w = c
            .watch_allocations(pb::WatchAllocationsRequest {
                network: String::new(),
                cluster_id: cluster.into(),
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            if next_event(&mut w).await.r#type() == pb::WatchEventType::Synced {
                break;
            }
        }
        watches.push(w);
    }
    let t = Instant::now();
    let st = srv.terminate().await;
    assert!(st.success(), "exit status {st}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    for mut w in watches {
        match tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
        {
            Some(Err(s)) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
            None => {}
            Some(Ok(e)) => panic!("an event after shutdown: {e:?}"),
        }
    }
    srv.restart().await;
    let mut c = srv.client().await;
    assert_eq!(
        list_all(&mut c, pb::ListAllocationsRequest::default())
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn huge_pools_are_normal_and_counted_exactly() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let n = network(
        "big",
        &[],
        vec![
            pool("vip", pb::PoolPurpose::Vip, &["10.0.0.0/8", "fd00::/64"]),
            // A quarter of IPv6 (::/1 would contain :: and IPv4-mapped space, refused).
            pool("half", pb::PoolPurpose::Node, &["4000::/2"]),
        ],
    );
    upsert(&mut c, n).await;
    let t = Instant::now();
    for i in 0..50 {
        let mut r = alloc_req("big", svc("a", &format!("s{i}")));
        r.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
        allocate(&mut c, r).await;
    }
    let mut r = alloc_req("big", node("a", "n"));
    r.families = vec![pb::IpFamily::Ipv6 as i32];
    allocate(&mut c, r).await;
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "51 allocations took {:?}",
        t.elapsed()
    );
    let u = usage(&mut c, "big").await;
    assert_eq!(
        counts(usage_of(&u, "big", "vip", pb::IpFamily::Ipv4)),
        [16_777_214, 50, 16_777_164, 0, 0]
    );
    assert_eq!(
        counts(usage_of(&u, "big", "vip", pb::IpFamily::Ipv6)),
        // The subnet-router anycast address (the first) is left out.
        [(1 << 64) - 1, 50, (1 << 64) - 51, 0, 0]
    );
    assert_eq!(
        counts(usage_of(&u, "big", "half", pb::IpFamily::Ipv6)),
        [(1 << 126) - 1, 1, (1 << 126) - 2, 0, 0]
    );
}

#[tokio::test]
async fn a_grace_period_that_ends_while_the_server_is_down_frees_the_address() {
    let mut srv = Server::start().await;
    let mut c = srv.client().await;
    let grace = Duration::from_secs(2);
    let mut n = network(
        "net-g",
        &["10.40.0.0/24"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.40.0.5"])],
    );
    n.reuse_grace_seconds = Some(2);
    upsert(&mut c, n).await;
    allocate(&mut c, alloc_req("net-g", svc("a", "first"))).await;
    let t0 = Instant::now();
    c.release(pb::ReleaseRequest {
        network: "net-g".into(),
        owner: Some(svc("a", "first")),
    })
    .await
    .unwrap();
    // Crash inside the grace period; the quarantine entry must survive it...
    srv.kill();
    srv.restart().await;
    let mut c = srv.client().await;
    let mut refusals = 0;
    let (got, at) = loop {
        match c.allocate(alloc_req("net-g", svc("b", "second"))).await {
            Ok(r) => break (r.into_inner().allocation.unwrap(), t0.elapsed()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                assert!(s.message().contains("reuse grace"), "{}", s.message());
                refusals += 1;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never handed out after the grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        at >= grace,
        "handed out {at:?} after release, inside the {grace:?} grace (after a crash)"
    );
    assert_eq!(got.addresses, vec!["10.40.0.5"]);
    assert!(
        refusals > 0,
        "no refusal was observed after the restart, inside the grace"
    );
    // ...and, once expired, it is not resurrected by the next restart.
    srv.kill();
    srv.restart().await;
    let mut c = srv.client().await;
    let u = usage(&mut c, "net-g").await;
    assert_eq!(
        counts(usage_of(&u, "net-g", "vip", pb::IpFamily::Ipv4)),
        [1, 1, 0, 0, 0]
    );
    let e = export(&mut c).await;
    assert!(e.quarantined.is_empty(), "{:?}", e.quarantined);
    assert_eq!(e.allocations.len(), 1);
}

#[tokio::test]
async fn concurrent_requests_for_one_address_have_exactly_one_winner() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    // 24 owners in 3 clusters race for 10.20.1.99, on 4 connections.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(srv.client().await);
    }
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut c = clients[i % 4].clone();
        tasks.push(tokio::spawn(async move {
            let cluster = ["a", "b", "c"][i % 3];
            let mut r = alloc_req("net-a", svc(cluster, &format!("race-{i}")));
            r.requested_addresses = vec!["10.20.1.99".into()];
            c.allocate(r).await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => winners.push(r.into_inner().allocation.unwrap()),
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message()),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let held = list_all(
        &mut c,
        pb::ListAllocationsRequest {
            address: "10.20.1.99".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(held, winners);

    // Concurrent sharers of one cluster and key, disjoint ports: all on one address; another
    // cluster's sharers with the same key racing alongside never join it.
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let mut c = clients[i as usize % 4].clone();
        tasks.push(tokio::spawn(async move {
            let cluster = if i % 2 == 0 { "a" } else { "b" };
            let mut r = alloc_req("net-a", svc(cluster, &format!("share-{i}")));
            r.sharing_key = "web".into();
            r.ports = vec![tcp(1000 + i)];
            (
                cluster,
                c.allocate(r).await.unwrap().into_inner().allocation.unwrap(),
            )
        }));
    }
    let mut by_cluster: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for t in tasks {
        let (cl, a) = t.await.unwrap();
        by_cluster.entry(cl).or_default().insert(a.addresses[0].clone());
    }
    assert_eq!(
        by_cluster["a"].len(),
        1,
        "cluster a's sharers got {:?}",
        by_cluster["a"]
    );
    assert_eq!(
        by_cluster["b"].len(),
        1,
        "cluster b's sharers got {:?}",
        by_cluster["b"]
    );
    assert_ne!(by_cluster["a"], by_cluster["b"], "two clusters share an address");
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_ended_with_aborted_and_the_others_get_everything() {
    // The documented slow-watcher rule, on a real server: a client that stops reading holds
    // neither the ledger nor the other watchers back; once it falls --watch-buffer commit
    // batches behind, its stream ends with ABORTED ("watch again"), and a new watch works.
    let srv = Server::start_with(&["--watch-buffer", "16"]).await;
    let mut c = srv.client().await;
    let mut net = net_a("net-w");
    net.pools = vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.16.0/20"])];
    upsert(&mut c, net).await;

    // The slow reader: its own connection with small HTTP/2 windows, so it buffers little.
    let ch = tonic::transport::Endpoint::from_shared(srv.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut slow_client = pb::ipam_service_client::IpamServiceClient::new(ch);
    let watch = |network: &str| pb::WatchAllocationsRequest {
        network: network.into(),
        cluster_id: String::new(),
    };
    let mut slow = slow_client
        .watch_allocations(watch("net-w"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut slow).await.r#type(), pb::WatchEventType::Synced);

    // The reader that keeps up, counting ADDED events on its own task.
    let mut fast = c.watch_allocations(watch("net-w")).await.unwrap().into_inner();
    assert_eq!(next_event(&mut fast).await.r#type(), pb::WatchEventType::Synced);
    const N: usize = 4_000;
    let reader = tokio::spawn(async move {
        let mut revisions = Vec::with_capacity(N);
        while revisions.len() < N {
            let e = next_event(&mut fast).await;
            assert_eq!(e.r#type(), pb::WatchEventType::Added);
            revisions.push(e.revision);
        }
        revisions
    });

    // One commit batch per Allocate (each awaited); long names make each event ~200 bytes,
    // so N of them are far more than the server's HTTP/2 send buffer, the stream's channel
    // and the 16-batch ring together.
    let ns = "n".repeat(63);
    for i in 0..N {
        let name = format!("{i:0>63}");
        allocate(
            &mut c,
            alloc_req("net-w", owner("a", pb::OwnerKind::Service, &ns, &name)),
        )
        .await;
    }
    let revisions = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reading watcher got every event within 60 s")
        .unwrap();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "events in commit order"
    );

    // The slow reader resumes: what was buffered, then ABORTED, then the end.
    let mut delivered = 0;
    let status = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("the slow watch moves within 10 s");
        match next {
            Some(Ok(e)) => {
                assert_eq!(e.r#type(), pb::WatchEventType::Added);
                delivered += 1;
            }
            Some(Err(s)) => break s,
            None => panic!("the slow watch ended without a status after {delivered} events"),
        }
    };
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("behind; watch again"),
        "{}",
        status.message()
    );
    assert!(
        delivered < N,
        "the slow watcher was cut off ({delivered} of {N} delivered)"
    );

    // Watching again starts from a full snapshot.
    let mut again = slow_client
        .watch_allocations(watch("net-w"))
        .await
        .unwrap()
        .into_inner();
    let mut existing = 0;
    while next_event(&mut again).await.r#type() == pb::WatchEventType::Existing {
        existing += 1;
    }
    assert_eq!(existing, N);
}

#[tokio::test]
async fn watches_beyond_max_watchers_are_resource_exhausted_naming_the_limit() {
    let srv = Server::start_with(&["--max-watchers", "2"]).await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let req = || pb::WatchAllocationsRequest {
        network: String::new(),
        cluster_id: String::new(),
    };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut w = c.watch_allocations(req()).await.unwrap().into_inner();
        assert_eq!(next_event(&mut w).await.r#type(), pb::WatchEventType::Synced);
        open.push(w);
    }
    let e = c.watch_allocations(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-watchers 2"), "{}", e.message());
    // A watch that ends gives its place back.
    drop(open.pop());
    let mut again = eventually("a watch once another ended", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            c.watch_allocations(req())
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    })
    .await;
    assert_eq!(next_event(&mut again).await.r#type(), pb::WatchEventType::Synced);
}
