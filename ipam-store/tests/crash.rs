//! Crash test (invariants 1–3 of architecture.md §3): a real `cairn-ipam serve` takes
//! concurrent allocations and releases from several clusters and is killed with SIGKILL at a
//! random moment, then restarted on the same data directory. After every restart:
//! - every acknowledged allocation is present with the same addresses and revision,
//! - every acknowledged release is gone,
//! - an operation whose reply was lost is either fully applied or not at all,
//! - no address is held by two owners, nothing unknown appears, and usage agrees with the
//!   allocations (the free space was rebuilt correctly),
//! - on a network with a one-hour reuse grace, an address only ever goes back to the owner
//!   that first held it, and every released address is still quarantined for its owner
//!   (acknowledged quarantine entries survive the kill too).
//!
//! `CAIRN_CRASH_CYCLES=N` runs N cycles (default 50); `CAIRN_CRASH_SEED=S` fixes the seed of
//! the random choices (timing still varies).
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use cairn_proto::v1 as pb;
use common::*;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use tonic::Code;

const WORKERS: usize = 12;
const OWNERS_PER_WORKER: usize = 8;
const CLUSTERS: [&str; 3] = ["alpha", "beta", "gamma"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Allocate,
    Release,
}

/// The network whose released addresses wait an hour before reuse.
const GRACE_NET: &str = "net-q";

/// One owner, driven by exactly one worker, so its history is sequential.
#[derive(Clone, Debug)]
struct Slot {
    network: &'static str,
    owner: pb::Owner,
    dual: bool,
    /// The last acknowledged state: addresses and revision, or nothing.
    acked: Option<(Vec<String>, u64)>,
    /// An operation whose reply was lost (the server died under it).
    pending: Option<Pending>,
}

impl Slot {
    fn key(&self) -> String {
        let o = &self.owner;
        owner_key(self.network, o)
    }

    fn request(&self) -> pb::AllocateRequest {
        let mut r = alloc_req(self.network, self.owner.clone());
        if self.dual {
            r.families = vec![pb::IpFamily::Ipv4 as i32, pb::IpFamily::Ipv6 as i32];
        }
        r
    }
}

fn owner_key(network: &str, o: &pb::Owner) -> String {
    format!("{network}/{}/{}/{}/{}", o.cluster_id, o.kind, o.namespace, o.name)
}

#[derive(Debug, Default)]
struct Stats {
    allocs_acked: u64,
    allocs_idempotent: u64,
    releases_acked: u64,
    releases_noop: u64,
    refused: u64,
    lost_replies: u64,
    lost_applied: u64,
    lost_not_applied: u64,
    max_held: usize,
    max_quarantined: usize,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.allocs_acked += o.allocs_acked;
        self.allocs_idempotent += o.allocs_idempotent;
        self.releases_acked += o.releases_acked;
        self.releases_noop += o.releases_noop;
        self.refused += o.refused;
        self.lost_replies += o.lost_replies;
    }
}

/// Codes a live server answers with, after writing nothing.
fn definitive(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::ResourceExhausted
    )
}

/// Drives its slots until the server goes away; returns them with what it saw.
async fn worker(
    mut c: Client,
    mut slots: Vec<Slot>,
    mut rng: StdRng,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<Slot>, Stats, Vec<String>, Vec<(String, String)>) {
    let mut st = Stats::default();
    let mut violations = Vec::new();
    // (address, owner key) of every acknowledged holding on the grace network.
    let mut seen = Vec::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let i = rng.random_range(0..slots.len());
        let s = &mut slots[i];
        // Mostly releases of what is held; sometimes a release of nothing (must be a no-op).
        let release = if s.acked.is_some() {
            rng.random_bool(0.6)
        } else {
            rng.random_bool(0.1)
        };
        let res = if release {
            let req = pb::ReleaseRequest {
                network: s.network.into(),
                owner: Some(s.owner.clone()),
            };
            tokio::time::timeout(Duration::from_secs(20), c.release(req))
                .await
                .map(|r| r.map(|r| (None, Some(r.into_inner()))))
        } else {
            tokio::time::timeout(Duration::from_secs(20), c.allocate(s.request()))
                .await
                .map(|r| r.map(|r| (Some(r.into_inner()), None)))
        };
        let res = match res {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("no reply within 20s")),
        };
        match res {
            Ok((Some(r), _)) => {
                let a = r.allocation.unwrap();
                let got = (a.addresses.clone(), a.revision);
                match &s.acked {
                    Some(held) => {
                        st.allocs_idempotent += 1;
                        if r.created || *held != got {
                            violations.push(format!(
                                "{}: a retried Allocate returned {got:?} (created={}), not the held {held:?}",
                                s.key(),
                                r.created
                            ));
                        }
                    }
                    None => {
                        st.allocs_acked += 1;
                        if !r.created {
                            violations.push(format!("{}: a new allocation came back created=false", s.key()));
                        }
                        let want = if s.dual { 2 } else { 1 };
                        if a.addresses.len() != want {
                            violations.push(format!(
                                "{}: {} address(es), not {want}",
                                s.key(),
                                a.addresses.len()
                            ));
                        }
                    }
                }
                if s.network == GRACE_NET {
                    seen.extend(a.addresses.iter().map(|ip| (ip.clone(), s.key())));
                }
                s.acked = Some(got);
            }
            Ok((None, Some(r))) => {
                match (&s.acked, r.released) {
                    (Some((addrs, _)), true) => {
                        st.releases_acked += 1;
                        let rel = r.allocation.map(|a| a.addresses).unwrap_or_default();
                        if rel != *addrs {
                            violations.push(format!("{}: released {rel:?}, but held {addrs:?}", s.key()));
                        }
                    }
                    (None, false) => st.releases_noop += 1,
                    (held, released) => violations.push(format!(
                        "{}: release said released={released} while the acknowledged state is {held:?}",
                        s.key()
                    )),
                }
                s.acked = None;
            }
            Ok(_) => unreachable!(),
            Err(e) if definitive(e.code()) => {
                st.refused += 1;
                violations.push(format!(
                    "{}: unexpected refusal {:?}: {}",
                    s.key(),
                    e.code(),
                    e.message()
                ));
            }
            Err(_) => {
                // The server died under this call: its outcome is unknown until the restart.
                st.lost_replies += 1;
                s.pending = Some(if release {
                    Pending::Release
                } else {
                    Pending::Allocate
                });
                break;
            }
        }
    }
    (slots, st, violations, seen)
}

/// Compares what the restarted server holds with what was acknowledged; resolves lost replies.
async fn verify(
    c: &mut Client,
    slots: &mut [Slot],
    st: &mut Stats,
    sticky: &mut HashMap<String, String>,
    cycle: usize,
) -> Vec<String> {
    let mut bad = Vec::new();
    let listed = list_all(
        c,
        pb::ListAllocationsRequest {
            page_size: 37,
            ..Default::default()
        },
    )
    .await;
    let mut held: BTreeMap<String, (Vec<String>, u64)> = BTreeMap::new();
    let mut by_addr: HashMap<String, String> = HashMap::new();
    for a in &listed {
        let o = a.owner.as_ref().unwrap();
        let key = owner_key(&a.network, o);
        for ip in &a.addresses {
            if let Some(other) = by_addr.insert(ip.clone(), key.clone()) {
                bad.push(format!("cycle {cycle}: {ip} is held by both {other} and {key}"));
            }
        }
        if a.state() != pb::AllocationState::Active {
            bad.push(format!("cycle {cycle}: {key} is {:?}", a.state()));
        }
        held.insert(key, (a.addresses.clone(), a.revision));
    }
    st.max_held = st.max_held.max(held.len());
    for s in slots.iter_mut() {
        let key = s.key();
        let now = held.remove(&key);
        let ok = match (s.pending.take(), &s.acked, &now) {
            (None, a, n) => a == n,
            (Some(Pending::Allocate), None, n) => {
                if n.is_some() {
                    st.lost_applied += 1;
                } else {
                    st.lost_not_applied += 1;
                }
                n.as_ref()
                    .is_none_or(|(addrs, _)| addrs.len() == if s.dual { 2 } else { 1 })
            }
            (Some(Pending::Allocate), Some(a), n) => {
                st.lost_not_applied += 1;
                Some(a) == n.as_ref()
            }
            (Some(Pending::Release), Some(a), n) => {
                if n.is_none() {
                    st.lost_applied += 1;
                } else {
                    st.lost_not_applied += 1;
                }
                n.as_ref().is_none_or(|n| n == a)
            }
            (Some(Pending::Release), None, n) => n.is_none(),
        };
        if !ok {
            bad.push(format!(
                "cycle {cycle}: {key}: acknowledged {:?}, but the restarted server holds {now:?}",
                s.acked
            ));
        }
        s.acked = now;
    }
    for (key, v) in held {
        bad.push(format!(
            "cycle {cycle}: the server holds {key} = {v:?}, which nobody acquired"
        ));
    }
    // On the grace network an address belongs to its first holder for the whole test: held by
    // it, or quarantined for it.
    let backup = c.export(pb::ExportRequest {}).await.unwrap().into_inner();
    for a in listed.iter().filter(|a| a.network == GRACE_NET) {
        let key = owner_key(&a.network, a.owner.as_ref().unwrap());
        for ip in &a.addresses {
            let first = sticky.entry(ip.clone()).or_insert_with(|| key.clone());
            if *first != key {
                bad.push(format!(
                    "cycle {cycle}: {ip} was first held by {first}, now by {key} within its grace"
                ));
            }
        }
    }
    let mut quarantined = 0;
    for q in &backup.quarantined {
        quarantined += 1;
        let key = owner_key(&q.network, q.previous_owner.as_ref().unwrap());
        match sticky.get(&q.address) {
            Some(first) if *first == key => {}
            other => bad.push(format!(
                "cycle {cycle}: {} is quarantined for {key}, but its first holder was {other:?}",
                q.address
            )),
        }
    }
    st.max_quarantined = st.max_quarantined.max(quarantined);
    for (ip, key) in sticky.iter() {
        let held = by_addr.get(ip) == Some(key);
        let in_grace = backup
            .quarantined
            .iter()
            .any(|q| q.address == *ip && owner_key(&q.network, q.previous_owner.as_ref().unwrap()) == *key);
        if !held && !in_grace {
            bad.push(format!(
                "cycle {cycle}: {ip} of {key} is neither held nor quarantined: an acknowledged release lost its grace"
            ));
        }
    }
    // Usage must agree with the allocations: the free sets were rebuilt from them.
    let u = c
        .get_usage(pb::GetUsageRequest {
            network: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let count = |net: &str, pool: &str, v6: bool| {
        listed
            .iter()
            .filter(|a| a.network == net && a.pool == pool)
            .flat_map(|a| &a.addresses)
            .filter(|ip| ip.contains(':') == v6)
            .count()
    };
    for p in &u.pools {
        let v6 = p.family == pb::IpFamily::Ipv6 as i32;
        let want = count(&p.network, &p.pool, v6);
        let used: usize = p.used.parse().unwrap();
        let total: u128 = p.total.parse().unwrap();
        let free: u128 = p.free.parse().unwrap();
        let q: u128 = p.quarantined.parse().unwrap();
        if used != want || total != used as u128 + free + q {
            bad.push(format!(
                "cycle {cycle}: usage of {}/{}/{:?} says used={used} free={free} quarantined={q} total={total}, but {want} address(es) are held",
                p.network,
                p.pool,
                p.family()
            ));
        }
    }
    bad
}

fn make_slots() -> Vec<Vec<Slot>> {
    (0..WORKERS)
        .map(|w| {
            (0..OWNERS_PER_WORKER)
                .map(|i| {
                    let cluster = CLUSTERS[(w + i) % CLUSTERS.len()];
                    let (network, owner, dual) = match i % 4 {
                        0 => ("net-a", node(cluster, &format!("node-w{w}-{i}")), false),
                        1 => ("net-a", svc(cluster, &format!("dual-w{w}-{i}")), true),
                        2 => ("net-a", svc(cluster, &format!("svc-w{w}-{i}")), false),
                        _ => (GRACE_NET, svc(cluster, &format!("svc-w{w}-{i}")), false),
                    };
                    Slot {
                        network,
                        owner,
                        dual,
                        acked: None,
                        pending: None,
                    }
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_concurrent_load_loses_no_acknowledged_write() {
    let cycles: usize = std::env::var("CAIRN_CRASH_CYCLES")
        .ok()
        .map(|v| v.parse().expect("CAIRN_CRASH_CYCLES is not a number"))
        .unwrap_or(50);
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .map(|v| v.parse().expect("CAIRN_CRASH_SEED is not a number"))
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("crash test: {cycles} cycles, seed {seed} (CAIRN_CRASH_SEED={seed} to repeat the choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let mut srv = Server::start().await;
    {
        let mut c = srv.client().await;
        upsert(&mut c, net_a("net-a")).await;
        // 30 addresses for the 24 owners of the grace network: each keeps one for good.
        let mut q = network(
            GRACE_NET,
            &["10.30.0.0/24"],
            vec![pool("vip", pb::PoolPurpose::Vip, &["10.30.0.0/27"])],
        );
        q.reuse_grace_seconds = Some(3600);
        upsert(&mut c, q).await;
    }
    let mut sticky: HashMap<String, String> = HashMap::new();
    let mut groups = make_slots();
    let mut total = Stats::default();
    let mut violations: Vec<String> = Vec::new();
    let mut kill_delays = Vec::new();

    for cycle in 0..cycles {
        let c = srv.client().await;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Vec::new();
        for slots in std::mem::take(&mut groups) {
            let wr = StdRng::seed_from_u64(rng.random::<u64>());
            tasks.push(tokio::spawn(worker(c.clone(), slots, wr, stop_rx.clone())));
        }
        // The crash: at a random moment of the load.
        let delay = Duration::from_millis(rng.random_range(5..=200));
        kill_delays.push(delay.as_millis() as u64);
        tokio::time::sleep(delay).await;
        srv.kill();
        let _ = stop_tx.send(true);
        let mut cycle_stats = Stats::default();
        for t in tasks {
            let (slots, st, v, seen) = t.await.unwrap();
            groups.push(slots);
            for (ip, key) in seen {
                let first = sticky.entry(ip.clone()).or_insert_with(|| key.clone());
                if *first != key {
                    violations.push(format!(
                        "cycle {cycle}: {ip} was first held by {first}, then handed to {key} within its grace"
                    ));
                }
            }
            cycle_stats.add(&st);
            violations.extend(v.into_iter().map(|v| format!("cycle {cycle}: {v}")));
        }
        total.add(&cycle_stats);

        srv.restart().await;
        let mut c = srv.client().await;
        let mut all: Vec<Slot> = groups.iter().flatten().cloned().collect();
        let v = verify(&mut c, &mut all, &mut total, &mut sticky, cycle).await;
        violations.extend(v);
        // Put the resolved slots back into their groups.
        let mut it = all.into_iter();
        for g in &mut groups {
            for s in g.iter_mut() {
                *s = it.next().unwrap();
            }
        }
        assert!(
            violations.is_empty(),
            "after {} cycle(s):\n{}\n{}",
            cycle + 1,
            violations.join("\n"),
            srv.log_tail(40)
        );
    }
    let held: usize = groups.iter().flatten().filter(|s| s.acked.is_some()).count();
    kill_delays.sort_unstable();
    eprintln!(
        "crash test: {cycles} kill -9 cycles in {:.1?}, seed {seed}: {} allocations and {} releases acknowledged, \
         {} idempotent retries, {} no-op releases; {} replies lost to the kill ({} applied, {} not); \
         at most {} allocations held, {held} at the end, at most {} addresses in grace; kill delays {}..{} ms (median {}); \
         no violation",
        started.elapsed(),
        total.allocs_acked,
        total.releases_acked,
        total.allocs_idempotent,
        total.releases_noop,
        total.lost_replies,
        total.lost_applied,
        total.lost_not_applied,
        total.max_held,
        total.max_quarantined,
        kill_delays.first().unwrap_or(&0),
        kill_delays.last().unwrap_or(&0),
        kill_delays.get(kill_delays.len() / 2).unwrap_or(&0),
    );
    assert!(
        total.allocs_acked > cycles as u64 && total.releases_acked > 0,
        "the load was too light to mean anything: {total:?}"
    );
    assert!(
        total.lost_replies > 0,
        "no kill ever landed during a request: {total:?}"
    );
}
