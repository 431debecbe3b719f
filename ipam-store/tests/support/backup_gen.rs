//! A valid generated backup of any size, for the backup tests and for
//! `make reliability-backup` (`examples/gen_backup.rs`). Self-contained: no test harness.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{SystemTime, UNIX_EPOCH},
};

use cairn_proto::v1 as pb;

fn pool(name: &str, purpose: pb::PoolPurpose, ranges: &[&str]) -> pb::Pool {
    pb::Pool {
        name: name.into(),
        purpose: purpose as i32,
        ranges: ranges.iter().map(ToString::to_string).collect(),
        exclusions: vec![],
        auto_assign: None,
    }
}

fn network(name: &str, prefixes: &[&str], pools: Vec<pb::Pool>) -> pb::Network {
    pb::Network {
        name: name.into(),
        prefixes: prefixes.iter().map(ToString::to_string).collect(),
        pools,
        ..Default::default()
    }
}

fn owner(cluster: &str, kind: pb::OwnerKind, namespace: &str, name: &str) -> pb::Owner {
    pb::Owner {
        cluster_id: cluster.into(),
        kind: kind as i32,
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
    }
}

fn svc(cluster: &str, name: &str) -> pb::Owner {
    owner(cluster, pb::OwnerKind::Service, "default", name)
}

fn tcp(port: u32) -> pb::PortSpec {
    pb::PortSpec {
        protocol: pb::Protocol::Tcp as i32,
        port,
    }
}

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn at(seconds: i64) -> Option<cairn_proto::Timestamp> {
    Some(cairn_proto::Timestamp { seconds, nanos: 0 })
}

fn v4(base: Ipv4Addr, i: usize) -> String {
    Ipv4Addr::from(u32::from(base) + i as u32).to_string()
}

/// A valid backup of `n` allocations (services, nodes, some dual-stack, one shared address)
/// and `n / 60` quarantined addresses in their grace, over two networks.
pub(crate) fn generated_backup(n: usize) -> pb::ExportResponse {
    let mut big = network(
        "big",
        &["10.64.0.0/10", "fd00:64::/64"],
        vec![
            pool("vip", pb::PoolPurpose::Vip, &["10.64.0.0/11", "fd00:64::/112"]),
            pool("nodes", pb::PoolPurpose::Node, &["10.96.0.0/12"]),
        ],
    );
    big.reuse_grace_seconds = Some(3600);
    big.managed_by = "cloud".into();
    let small = network(
        "small",
        &["10.200.0.0/16"],
        vec![pool("vip", pb::PoolPurpose::Vip, &["10.200.1.0/24"])],
    );
    let created = at(1_700_000_000);
    let mut networks = vec![big, small];
    for n in &mut networks {
        n.version = 1;
        n.created_at = created;
        n.updated_at = created;
    }
    let mut allocations: Vec<pb::Allocation> = (0..n)
        .map(|i| {
            let (pool, owner, mut addresses) = if i % 10 == 0 {
                let o = owner(
                    &format!("c{}", i % 3),
                    pb::OwnerKind::Node,
                    "",
                    &format!("node-{i}"),
                );
                ("nodes", o, vec![v4(Ipv4Addr::new(10, 96, 0, 1), i)])
            } else {
                let mut o = owner(
                    &format!("c{}", i % 3),
                    pb::OwnerKind::Service,
                    &format!("ns-{}", i % 7),
                    &format!("svc-{i}"),
                );
                o.uid = format!("uid-{i}");
                ("vip", o, vec![v4(Ipv4Addr::new(10, 64, 0, 1), i)])
            };
            if i % 100 == 1 {
                let v6 = u128::from("fd00:64::2".parse::<Ipv6Addr>().unwrap()) + (i / 100) as u128;
                addresses.push(Ipv6Addr::from(v6).to_string());
            }
            pb::Allocation {
                network: "big".into(),
                pool: pool.into(),
                owner: Some(owner),
                addresses,
                state: pb::AllocationState::Active as i32,
                created_at: created,
                updated_at: created,
                revision: i as u64 + 1,
                ..Default::default()
            }
        })
        .collect();
    for (name, port) in [("web", 80), ("web-tls", 443)] {
        let mut a = allocations[1].clone();
        a.owner = Some(svc("c0", name));
        a.addresses = vec!["10.95.255.200".into()];
        a.sharing_key = "shared".into();
        a.ports = vec![tcp(port)];
        a.revision = n as u64 + 1;
        allocations.push(a);
    }
    let mut small_alloc = allocations[1].clone();
    small_alloc.network = "small".into();
    small_alloc.addresses = vec!["10.200.1.7".into()];
    allocations.push(small_alloc);
    let quarantined = (0..n / 60)
        .map(|j| pb::QuarantinedAddress {
            network: "big".into(),
            pool: "vip".into(),
            address: v4(Ipv4Addr::new(10, 94, 0, 1), j),
            until: at(now_s() + 3000),
            previous_owner: Some(svc("c1", &format!("gone-{j}"))),
        })
        .collect();
    pb::ExportResponse {
        networks,
        allocations,
        quarantined,
        exported_at: at(now_s()),
    }
}
