//! HA store: three `cairn-ipam serve --backend etcd` replicas on a real 3-member etcd cluster
//! on loopback. One leads; the others answer writes UNAVAILABLE naming it (and are not
//! ready), and reads and watches from their replica of the ledger, which follows the
//! leader's commits through an etcd watch — also across a change of leader. Killing
//! the leader -9 hands the ledger to another replica with nothing lost; a leader paused
//! (SIGSTOP) past its lease is replaced, and when it resumes its in-flight write is fenced off
//! in etcd — refused, not doubled — and it stops. Under two clusters' concurrent load through
//! a failover-aware client, with the leader killed repeatedly (and in one round an etcd member
//! killed and restarted too): 0 duplicate addresses, 0 lost acknowledged allocations, 0
//! resurrected releases. `CAIRN_HA_KILLS` sets the number of kills (default 3; `make
//! reliability` runs 20 and prints the failover times).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../src/store/etcd_cluster.rs"]
mod etcd_cluster;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::{Duration, Instant},
};

use cairn_ipam::store::etcd::server_flags;
use cairn_proto::v1 as pb;
use common::*;
use etcd_cluster::EtcdCluster;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

fn replica_flags(etcd: &EtcdCluster) -> Vec<String> {
    replica_flags_lease(etcd, "2s")
}

fn replica_flags_lease(etcd: &EtcdCluster, lease: &str) -> Vec<String> {
    [
        "--default-reuse-grace",
        "0s",
        "--backend",
        "etcd",
        "--etcd-endpoints",
        &etcd.endpoints().join(","),
        "--etcd-prefix",
        "/ha",
        "--leader-lease",
        lease,
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

async fn replicas(etcd: &EtcdCluster) -> Vec<Server> {
    replicas_with(replica_flags(etcd)).await
}

async fn replicas_with(flags: Vec<String>) -> Vec<Server> {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(Server::start_replica(&flags).await);
    }
    v
}

/// The index of the one replica that leads, once exactly one does.
async fn leader(rs: &mut [Server]) -> usize {
    let until = Instant::now() + FAILOVER_DEADLINE;
    loop {
        let mut serving = Vec::new();
        for (i, r) in rs.iter_mut().enumerate() {
            if r.is_running() && r.is_serving().await {
                serving.push(i);
            }
        }
        if serving.len() == 1 {
            return serving[0];
        }
        assert!(serving.len() <= 1, "two replicas lead at once: {serving:?}");
        assert!(
            Instant::now() < until,
            "no replica leads after {FAILOVER_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Bytes received and not yet read by the process listening on loopback `port`, over its
/// established connections (`/proc/net/tcp`'s rx_queue).
fn unread_bytes_on(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .sum()
}

/// The addresses cluster a's Service `name` holds on net-a (panics when it holds none).
async fn held(c: &mut Client, name: &str) -> Vec<String> {
    c.get_allocation(pb::GetAllocationRequest {
        network: "net-a".into(),
        owner: Some(svc("a", name)),
    })
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"))
    .into_inner()
    .addresses
}

fn signal(r: &Server, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(r.pid() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

#[tokio::test]
async fn one_replica_leads_the_others_name_it_and_a_kill_hands_over_everything() {
    let etcd = EtcdCluster::start(3, &server_flags());
    let mut rs = replicas(&etcd).await;
    let l = leader(&mut rs).await;
    let mut c = rs[l].client().await;
    upsert(&mut c, net_a("net-a")).await;
    let before = allocate(&mut c, alloc_req("net-a", svc("a", "web"))).await;

    for (i, r) in rs.iter().enumerate().filter(|(i, _)| *i != l) {
        let mut f = r.client().await;
        let e = f
            .allocate(alloc_req("net-a", svc("a", "other")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "replica {i}: {e}");
        assert!(
            e.message().contains(&rs[l].endpoint()),
            "replica {i}: {}",
            e.message()
        );
        assert_eq!(
            e.metadata().get("cairn-leader").unwrap().to_str().unwrap(),
            rs[l].endpoint()
        );
        assert_eq!(
            http_status(r.metrics.unwrap(), "/readyz").await,
            503,
            "replica {i}"
        );
        assert_eq!(
            http_status(r.metrics.unwrap(), "/healthz").await,
            200,
            "replica {i}"
        );
    }
    assert_eq!(http_status(rs[l].metrics.unwrap(), "/readyz").await, 200);

    rs[l].kill();
    let n = leader(&mut rs).await;
    assert_ne!(n, l);
    let mut c = rs[n].client().await;
    assert_eq!(held(&mut c, "web").await, before.addresses);
    let next = allocate(&mut c, alloc_req("net-a", svc("a", "after"))).await;
    assert_ne!(next.addresses, before.addresses);
    // The CLI given every replica finds the new leader on its own (the dead one refuses).
    let all = rs.iter().map(Server::endpoint).collect::<Vec<_>>().join(",");
    let out = tokio::process::Command::new(bin())
        .args([
            "--endpoint",
            &all,
            "alloc",
            "create",
            "--network",
            "net-a",
            "--cluster",
            "a",
        ])
        .args(["--kind", "service", "--namespace", "default", "--name", "via-cli"])
        .env_remove("CAIRN_IPAM_ENDPOINT")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = c
        .get_allocation(pb::GetAllocationRequest {
            network: "net-a".into(),
            owner: Some(svc("a", "via-cli")),
        })
        .await;
    assert!(got.is_ok(), "{got:?}");
    // The killed replica comes back as a follower of the new leader.
    rs[l].restart().await;
    let e = rs[l]
        .client()
        .await
        .allocate(alloc_req("net-a", svc("a", "x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert_eq!(leader(&mut rs).await, n);
}

#[tokio::test]
async fn a_paused_leader_is_fenced_off_when_it_resumes() {
    let etcd = EtcdCluster::start(3, &server_flags());
    let mut rs = replicas(&etcd).await;
    let old = leader(&mut rs).await;
    let mut c = rs[old].client().await;
    upsert(&mut c, net_a("net-a")).await;
    allocate(&mut c, alloc_req("net-a", svc("a", "first"))).await;

    signal(&rs[old], rustix::process::Signal::STOP);
    // Another replica takes over once the paused leader's lease expires...
    let new = eventually(
        "a new leader while the old one is paused",
        FAILOVER_DEADLINE,
        || {
            let rs = &rs;
            async move {
                for (i, r) in rs.iter().enumerate().filter(|(i, _)| *i != old) {
                    if r.is_serving().await {
                        return Some(i);
                    }
                }
                None
            }
        },
    )
    .await;
    // ...and hands out the next free address.
    let mut nc = rs[new].client().await;
    let taken = allocate(&mut nc, alloc_req("net-a", svc("b", "on-new-leader"))).await;

    // A write sent to the paused leader: its memory still has that address free.
    let mut stale = c.clone();
    let in_flight = tokio::spawn(async move {
        stale
            .allocate(alloc_req("net-a", svc("c", "on-old-leader")))
            .await
    });
    // The request must be waiting in the paused process's socket before it resumes.
    let port = rs[old].addr.port();
    eventually(
        "the write to reach the paused leader's socket",
        Duration::from_secs(30),
        || async move { (unread_bytes_on(port) > 0).then_some(()) },
    )
    .await;
    signal(&rs[old], rustix::process::Signal::CONT);
    let r = tokio::time::timeout(Duration::from_secs(60), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(
        r.is_err(),
        "the deposed leader acknowledged a write: {:?}",
        r.unwrap()
    );

    // It stops (a restart would make it a follower), saying why.
    let until = Instant::now() + Duration::from_secs(60);
    while rs[old].is_running() {
        assert!(Instant::now() < until, "the deposed leader kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = rs[old].log_text();
    eprintln!("{}", rs[old].log_tail(12));
    assert!(
        log.contains("fenced") || log.contains("lost the leader lease"),
        "{}",
        rs[old].log_tail(30)
    );

    // Nothing doubled: the new leader's ledger has each address once, and not the refused one.
    let all = list_all(&mut nc, pb::ListAllocationsRequest::default()).await;
    let mut by_addr: HashMap<String, Vec<String>> = HashMap::new();
    for a in &all {
        for ip in &a.addresses {
            by_addr
                .entry(ip.clone())
                .or_default()
                .push(a.owner.as_ref().unwrap().name.clone());
        }
    }
    assert!(by_addr.values().all(|v| v.len() == 1), "{by_addr:?}");
    assert!(
        all.iter()
            .all(|a| a.owner.as_ref().unwrap().name != "on-old-leader")
    );
    assert_eq!(by_addr[&taken.addresses[0]], ["on-new-leader"]);
}

/// Finds the leader among `rs` and returns a client of it (what a failover-aware client does).
async fn leader_client(rs: &mut [Server]) -> Client {
    let i = leader(rs).await;
    rs[i].client().await
}

#[tokio::test]
async fn concurrent_clusters_through_repeated_leader_kills_lose_and_double_nothing() {
    let mut etcd = EtcdCluster::start(3, &server_flags());
    let mut rs = replicas(&etcd).await;
    let mut c = leader_client(&mut rs).await;
    // Room for every round's allocations (13 held per round).
    upsert(
        &mut c,
        network(
            "net-a",
            &["10.20.0.0/16"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.20.16.0/20"])],
        ),
    )
    .await;
    // Acknowledged state, as the clients saw it: owner -> addresses (None = released).
    let mut acked: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    let kills = std::env::var("CAIRN_HA_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut failovers = Vec::new();
    for round in 0..kills {
        // In the second round an etcd member is down too (killed -9, restarted after it).
        let member_down = round == 1;
        if member_down {
            etcd.kill(2);
        }
        let mut c = leader_client(&mut rs).await;
        // Two clusters, concurrently: each allocates 10 and releases every third.
        let mut tasks = Vec::new();
        for cluster in ["a", "b"] {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..10 {
                    let name = format!("r{round}-{i}");
                    let a = allocate(&mut c, alloc_req("net-a", svc(cluster, &name))).await;
                    out.push((format!("{cluster}/{name}"), Some(a.addresses)));
                    if i % 3 == 0 {
                        c.release(pb::ReleaseRequest {
                            network: "net-a".into(),
                            owner: Some(svc(cluster, &name)),
                        })
                        .await
                        .unwrap();
                        out.push((format!("{cluster}/{name}"), None));
                    }
                }
                out
            }));
        }
        for t in tasks {
            for (k, v) in t.await.unwrap() {
                acked.insert(k, v);
            }
        }
        if member_down {
            etcd.restart(2);
        }
        // Kill the leader -9 and time until another one takes an Allocate.
        let l = leader(&mut rs).await;
        rs[l].kill();
        let t = Instant::now();
        loop {
            let n = leader(&mut rs).await;
            let mut nc = rs[n].client().await;
            if nc
                .allocate(alloc_req("net-a", svc("probe", &format!("p{round}"))))
                .await
                .is_ok()
            {
                break;
            }
        }
        failovers.push(t.elapsed());
        acked.insert(format!("probe/p{round}"), Some(vec![]));
        rs[l].restart().await;
        let _ = &mut c;
    }
    let mut sorted = failovers.clone();
    sorted.sort();
    eprintln!(
        "failover over {} kills -9 of the leader (lease 2 s), kill -> first Allocate acknowledged by the next leader: p50 {:?}, max {:?}, all {:?}",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        failovers
    );

    let mut c = leader_client(&mut rs).await;
    let all = list_all(&mut c, pb::ListAllocationsRequest::default()).await;
    let held: HashMap<String, Vec<String>> = all
        .iter()
        .map(|a| {
            let o = a.owner.as_ref().unwrap();
            (format!("{}/{}", o.cluster_id, o.name), a.addresses.clone())
        })
        .collect();
    for (k, v) in &acked {
        match v {
            Some(addrs) if k.starts_with("probe/") => assert!(held.contains_key(k), "lost {k}"),
            Some(addrs) => assert_eq!(held.get(k), Some(addrs), "acknowledged {k} lost or moved"),
            None => assert!(!held.contains_key(k), "released {k} came back"),
        }
    }
    let mut owners: HashMap<&String, usize> = HashMap::new();
    for a in &all {
        for ip in &a.addresses {
            *owners.entry(ip).or_default() += 1;
        }
    }
    assert!(owners.values().all(|n| *n == 1), "an address has two owners");
}

/// A leader stopped with SIGTERM (a rolling update, a drain) resigns: the leader key is gone
/// (or already another replica's) the moment it has exited — long before its 30 s lease would
/// have expired — and another replica takes the writes with everything acknowledged.
#[tokio::test]
async fn a_leader_stopped_with_sigterm_resigns_at_once() {
    let etcd = EtcdCluster::start(3, &server_flags());
    let mut rs = replicas_with(replica_flags_lease(&etcd, "30s")).await;
    let l = leader(&mut rs).await;
    let mut c = rs[l].client().await;
    upsert(&mut c, net_a("net-a")).await;
    let kept = allocate(&mut c, alloc_req("net-a", svc("a", "kept"))).await;
    let st = rs[l].terminate().await;
    assert!(st.success(), "{st}\n{}", rs[l].log_tail(20));
    let mut opts = cairn_ipam::store::etcd::EtcdOptions::new(etcd.endpoints());
    opts.prefix = "/ha".into();
    let probe = tokio::task::spawn_blocking(move || {
        cairn_ipam::store::etcd::EtcdEngine::connect(&opts)
            .unwrap()
            .leader()
            .unwrap()
    })
    .await
    .unwrap();
    assert_ne!(
        probe.as_deref(),
        Some(rs[l].endpoint().as_str()),
        "the stopped leader still holds the key"
    );
    let n = leader(&mut rs).await;
    assert_ne!(n, l);
    let mut c = rs[n].client().await;
    assert_eq!(held(&mut c, "kept").await, kept.addresses);
}

/// The leader keeps its lease while etcd members die one at a time (quorum stays): its
/// keep-alive stream moves to a live member instead of giving leadership up. Each member is
/// killed -9 in turn (so one of them carried the keep-alive), and for twice the lease the
/// leader keeps acknowledging Allocates and stays the only leader.
#[tokio::test]
async fn the_leader_keeps_its_lease_through_etcd_member_deaths() {
    let mut etcd = EtcdCluster::start(3, &server_flags());
    let mut rs = replicas(&etcd).await;
    let l = leader(&mut rs).await;
    let mut c = rs[l].client().await;
    upsert(&mut c, net_a("net-a")).await;
    let mut n = 0;
    for m in 0..3 {
        etcd.kill(m);
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            n += 1;
            let owner = svc("a", &format!("m{m}-{n}"));
            let r = c.allocate(alloc_req("net-a", owner.clone())).await;
            assert!(r.is_ok(), "etcd member {m} down: {r:?}\n{}", rs[l].log_tail(20));
            let r = c
                .release(pb::ReleaseRequest {
                    network: "net-a".into(),
                    owner: Some(owner),
                })
                .await;
            assert!(r.is_ok(), "etcd member {m} down: {r:?}\n{}", rs[l].log_tail(20));
        }
        assert_eq!(
            leader(&mut rs).await,
            l,
            "leadership moved when etcd member {m} died"
        );
        etcd.restart(m);
    }
}

/// The next event of `w` within 10 s, as (type, owner name).
async fn next_change(
    w: &mut tonic::Streaming<pb::WatchAllocationsResponse>,
) -> (pb::WatchEventType, String, u64) {
    let e = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(w))
        .await
        .expect("a watch event within 10 s")
        .expect("the watch goes on")
        .expect("the watch is not ended");
    let name = e
        .allocation
        .as_ref()
        .and_then(|a| a.owner.as_ref())
        .map(|o| o.name.clone())
        .unwrap_or_default();
    (e.r#type(), name, e.revision)
}

#[tokio::test]
async fn followers_answer_reads_and_their_watch_sees_every_change_in_order_across_a_leader_change() {
    let etcd = EtcdCluster::start(3, &server_flags());
    let mut rs = replicas(&etcd).await;
    let l = leader(&mut rs).await;
    let (f, other) = match l {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    let mut c = rs[l].client().await;
    upsert(&mut c, net_a("net-a")).await;
    let one = allocate(&mut c, alloc_req("net-a", svc("a", "one"))).await;

    // Reads on a follower come from its replica, which follows the leader's commits.
    let mut fc = rs[f].client().await;
    eventually("the follower answers the read", Duration::from_secs(10), || {
        let mut fc = fc.clone();
        let want = one.addresses.clone();
        async move {
            let got = fc
                .get_allocation(pb::GetAllocationRequest {
                    network: "net-a".into(),
                    owner: Some(svc("a", "one")),
                })
                .await
                .ok()?;
            (got.into_inner().addresses == want).then_some(())
        }
    })
    .await;
    let nets = fc
        .list_networks(pb::ListNetworksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nets.networks.len(), 1);
    let usage = fc
        .get_usage(pb::GetUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!usage.pools.is_empty(), "{usage:?}");
    // Writes it still refuses, naming the leader; it is still not ready.
    let e = fc
        .allocate(alloc_req("net-a", svc("a", "nope")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains(&rs[l].endpoint()), "{}", e.message());
    assert_eq!(http_status(rs[f].metrics.unwrap(), "/readyz").await, 503);

    // A watch on the follower: the snapshot, then changes the leader commits.
    let mut w = fc
        .watch_allocations(pb::WatchAllocationsRequest {
            network: "net-a".into(),
            cluster_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = Vec::new();
    loop {
        let (ty, name, _) = next_change(&mut w).await;
        if ty == pb::WatchEventType::Synced {
            break;
        }
        assert_eq!(ty, pb::WatchEventType::Existing);
        snapshot.push(name);
    }
    assert_eq!(snapshot, ["one"]);
    allocate(&mut c, alloc_req("net-a", svc("a", "two"))).await;
    allocate(&mut c, alloc_req("net-a", svc("a", "three"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-a".into(),
        owner: Some(svc("a", "one")),
    })
    .await
    .unwrap();

    // The leader dies while the watched follower is paused, so the third replica takes over
    // and the watched one stays a follower through the change.
    signal(&rs[f], rustix::process::Signal::STOP);
    rs[l].kill();
    let other_ep = rs[other].endpoint();
    eventually("the third replica leads", FAILOVER_DEADLINE, || {
        let r = &rs[other];
        async move { r.is_serving().await.then_some(()) }
    })
    .await;
    signal(&rs[f], rustix::process::Signal::CONT);
    let mut c = rs[other].client().await;
    allocate(&mut c, alloc_req("net-a", svc("a", "four"))).await;
    c.release(pb::ReleaseRequest {
        network: "net-a".into(),
        owner: Some(svc("a", "two")),
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    let mut last = 0;
    for _ in 0..5 {
        let (ty, name, rev) = next_change(&mut w).await;
        assert!(rev > last, "revisions in commit order: {rev} after {last}");
        last = rev;
        seen.push((ty, name));
    }
    use pb::WatchEventType::{Added, Deleted};
    let want: Vec<(pb::WatchEventType, String)> = [
        (Added, "two"),
        (Added, "three"),
        (Deleted, "one"),
        (Added, "four"),
        (Deleted, "two"),
    ]
    .into_iter()
    .map(|(t, n)| (t, n.to_string()))
    .collect();
    assert_eq!(seen, want);
    // And its reads now follow the new leader's commits; its refusals name the new leader.
    assert_eq!(held(&mut fc, "four").await.len(), 1);
    let e = fc
        .allocate(alloc_req("net-a", svc("a", "nope")))
        .await
        .unwrap_err();
    assert!(e.message().contains(&other_ep), "{}", e.message());
}
