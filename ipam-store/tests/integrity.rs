//! One owner per address across the whole fleet, against hostile, huge and corrupt input
//! (issue 11): each test against a real `cairn-ipam` process, each one failing on the store
//! as it was before the fleet-wide address index.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn_proto::v1 as pb;
use common::*;
use tonic::Code;

/// net-a with its VIP pool moved away from 10.20.0.0/16 (to 10.30.0.0/16).
fn moved(name: &str) -> pb::Network {
    let mut n = net_a(name);
    n.prefixes = vec!["10.30.0.0/16".into()];
    n.gateways = vec![];
    n.dns_servers = vec![];
    n.pools = vec![
        pool("vip", pb::PoolPurpose::Vip, &["10.30.1.0/24"]),
        pool("nodes", pb::PoolPurpose::Node, &["10.30.2.0/24"]),
    ];
    n
}

fn requested(network: &str, owner: pb::Owner, ip: &str) -> pb::AllocateRequest {
    let mut r = alloc_req(network, owner);
    r.requested_addresses = vec![ip.into()];
    r
}

/// The seed's failure across networks: a network moved away from an address it still holds,
/// then a second network created on the old space, must not hand that address to another
/// cluster.
#[tokio::test]
async fn an_address_held_out_of_range_cannot_be_claimed_by_another_network() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, requested("net-a", svc("a", "web"), "10.20.1.10")).await;
    upsert(&mut c, moved("net-a")).await; // 10.20.1.10 is now OUT_OF_RANGE, still held by a

    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(net_a("net-b")),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::AlreadyExists, &["10.20.1.10", "net-a", "cluster a"]);
    // Nothing of net-b was written.
    assert_status(
        c.get_network(pb::GetNetworkRequest { name: "net-b".into() })
            .await,
        Code::NotFound,
        &[],
    );
}

/// Moving a network onto an address another network still holds is refused the same way.
#[tokio::test]
async fn a_network_edit_cannot_cover_an_address_held_by_another_network() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, requested("net-a", svc("a", "web"), "10.20.1.10")).await;
    upsert(&mut c, moved("net-a")).await;
    upsert(
        &mut c,
        network(
            "net-b",
            &["10.40.0.0/16"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.40.1.0/24"])],
        ),
    )
    .await;
    let mut edit = network(
        "net-b",
        &[],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.1.0/28"])],
    );
    edit.prefixes = vec![];
    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(edit),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::AlreadyExists, &["10.20.1.10", "net-a"]);
}

/// IPv4-mapped IPv6 addresses are another spelling of an IPv4 address: refused everywhere an
/// address is given, naming the field.
#[tokio::test]
async fn ipv4_mapped_ipv6_is_refused_naming_the_field() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    upsert(&mut c, net_a("net-a")).await;
    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(network(
                "net-m",
                &[],
                vec![pool("vip", pb::PoolPurpose::Vip, &["::ffff:10.20.1.0/120"])],
            )),
            ..Default::default()
        })
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["network.pools[0].ranges[0]", "IPv4-mapped"],
    );
    let r = c
        .allocate(requested("net-a", svc("a", "web"), "::ffff:10.20.1.5"))
        .await;
    assert_status(
        r,
        Code::InvalidArgument,
        &["requested_addresses[0]", "IPv4-mapped"],
    );
}

/// Pools never contain the unspecified, a multicast or the limited-broadcast address.
#[tokio::test]
async fn pools_with_special_addresses_are_refused() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    for (range, what) in [
        ("0.0.0.0-0.0.0.7", "unspecified"),
        ("224.0.0.0/24", "multicast"),
        ("255.255.255.240-255.255.255.255", "broadcast"),
        ("::/120", "unspecified"),
        ("ff02::/120", "multicast"),
    ] {
        let r = c
            .upsert_network(pb::UpsertNetworkRequest {
                network: Some(network(
                    "net-s",
                    &[],
                    vec![pool("vip", pb::PoolPurpose::Vip, &[range])],
                )),
                ..Default::default()
            })
            .await;
        assert_status(r, Code::InvalidArgument, &["network.pools[0].ranges[0]", what]);
    }
}

/// A force-deleted network's addresses still wait out the reuse grace, and watchers are told
/// the owners lost them.
#[tokio::test]
async fn force_delete_keeps_the_grace_and_tells_watchers() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let mut n = network(
        "net-a",
        &[],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.1.1-10.20.1.2"])],
    );
    n.reuse_grace_seconds = Some(600);
    upsert(&mut c, n).await;
    allocate(&mut c, requested("net-a", svc("a", "web"), "10.20.1.1")).await;
    let mut w = c
        .watch_allocations(pb::WatchAllocationsRequest {
            cluster_id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if e.r#type() == pb::WatchEventType::Synced {
            break;
        }
    }
    c.delete_network(pb::DeleteNetworkRequest {
        name: "net-a".into(),
        force: true,
    })
    .await
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.r#type(), pb::WatchEventType::Deleted, "{e:?}");
    assert_eq!(e.allocation.unwrap().addresses, vec!["10.20.1.1".to_string()]);

    // The same space as a new network: the released address is still in its grace.
    let mut n = network(
        "net-b",
        &[],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.1.1-10.20.1.2"])],
    );
    n.reuse_grace_seconds = Some(600);
    upsert(&mut c, n).await;
    assert_status(
        c.allocate(requested("net-b", svc("b", "web"), "10.20.1.1")).await,
        Code::FailedPrecondition,
        &["reuse grace"],
    );
    let got = allocate(&mut c, alloc_req("net-b", svc("b", "other"))).await;
    assert_eq!(got.addresses, vec!["10.20.1.2".to_string()]);
    // The grace survives a crash.
    let mut srv = srv;
    srv.kill();
    srv.restart().await;
    let mut c = srv.client().await;
    assert_status(
        c.allocate(requested("net-b", svc("b", "web"), "10.20.1.1")).await,
        Code::FailedPrecondition,
        &["reuse grace"],
    );
}

fn backup_alloc(network: &str, cluster: &str, name: &str, ip: &str, revision: u64) -> pb::Allocation {
    pb::Allocation {
        network: network.into(),
        pool: "vip".into(),
        owner: Some(svc(cluster, name)),
        addresses: vec![ip.into()],
        revision,
        ..Default::default()
    }
}

fn two_networks() -> Vec<pb::Network> {
    vec![
        network(
            "net-a",
            &["10.20.0.0/16"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.1.0/24"])],
        ),
        network(
            "net-b",
            &["10.30.0.0/16"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.30.1.0/24"])],
        ),
    ]
}

async fn import(c: &mut Client, backup: pb::ExportResponse) -> Result<pb::ImportResponse, tonic::Status> {
    c.import(pb::ImportRequest { backup: Some(backup) })
        .await
        .map(tonic::Response::into_inner)
}

/// Import validates the whole backup against every invariant and value range before writing
/// anything.
#[tokio::test]
async fn import_refuses_corrupt_backups_and_writes_nothing() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let year_9999 = cairn_proto::Timestamp {
        seconds: 253_402_300_799,
        nanos: 0,
    };
    let cases: Vec<(&str, pb::ExportResponse, Vec<&str>)> = vec![
        (
            "an address held in two networks",
            pb::ExportResponse {
                networks: two_networks(),
                allocations: vec![
                    backup_alloc("net-a", "a", "web", "10.20.1.5", 1),
                    backup_alloc("net-b", "b", "web", "10.20.1.5", 2),
                ],
                ..Default::default()
            },
            vec!["10.20.1.5", "net-a", "net-b"],
        ),
        (
            "an address inside another network",
            pb::ExportResponse {
                networks: two_networks(),
                allocations: vec![backup_alloc("net-b", "b", "web", "10.20.1.9", 1)],
                ..Default::default()
            },
            vec!["10.20.1.9", "net-a"],
        ),
        (
            "one owner twice",
            pb::ExportResponse {
                networks: two_networks(),
                allocations: vec![
                    backup_alloc("net-a", "a", "web", "10.20.1.5", 1),
                    backup_alloc("net-a", "a", "web", "10.20.1.6", 2),
                ],
                ..Default::default()
            },
            vec!["allocations[1]", "twice"],
        ),
        (
            "a revision at the end of u64",
            pb::ExportResponse {
                networks: two_networks(),
                allocations: vec![backup_alloc("net-a", "a", "web", "10.20.1.5", u64::MAX)],
                ..Default::default()
            },
            vec!["allocations[0].revision"],
        ),
        (
            "a grace deadline in the year 9999",
            pb::ExportResponse {
                networks: two_networks(),
                quarantined: vec![pb::QuarantinedAddress {
                    network: "net-a".into(),
                    pool: "vip".into(),
                    address: "10.20.1.7".into(),
                    until: Some(year_9999),
                    previous_owner: Some(svc("a", "old")),
                }],
                ..Default::default()
            },
            vec!["quarantined[0].until"],
        ),
    ];
    for (what, backup, needles) in cases {
        let r = import(&mut c, backup).await;
        match &r {
            Err(s) if s.code() == Code::InvalidArgument => {
                for n in &needles {
                    assert!(s.message().contains(n), "{what}: {:?} lacks {n:?}", s.message());
                }
            }
            other => panic!("{what}: expected INVALID_ARGUMENT, got {other:?}"),
        }
        let nets = c
            .list_networks(pb::ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(nets.networks.is_empty(), "{what}: something was written");
    }
    // The store still works: the next mutation succeeds.
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;
}

/// Echoed input is truncated: a 100 kB name does not come back as a 100 kB message.
#[tokio::test]
async fn error_messages_do_not_echo_unbounded_input() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let huge = "x".repeat(100_000);
    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(network(
                &huge,
                &[],
                vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.1.0/24"])],
            )),
            ..Default::default()
        })
        .await;
    let s = r.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("network.name"), "{}", &s.message()[..200]);
    assert!(s.message().len() < 2048, "{} bytes", s.message().len());
}

/// Limits on request size are enforced with INVALID_ARGUMENT naming the limit.
#[tokio::test]
async fn ranges_beyond_the_limit_are_refused_naming_it() {
    let srv = Server::start().await;
    let mut c = srv.client().await;
    let ranges: Vec<String> = (0..5000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + 4 * i);
            format!("{ip}-{ip}")
        })
        .collect();
    let refs: Vec<&str> = ranges.iter().map(String::as_str).collect();
    let r = c
        .upsert_network(pb::UpsertNetworkRequest {
            network: Some(network(
                "net-big",
                &[],
                vec![pool("vip", pb::PoolPurpose::Vip, &refs)],
            )),
            ..Default::default()
        })
        .await;
    assert_status(r, Code::InvalidArgument, &["network.pools[0].ranges", "at most"]);
}
