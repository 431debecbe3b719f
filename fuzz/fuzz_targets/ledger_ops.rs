//! `ledger_ops`: arbitrary sequences of ledger transitions on the pure `ledger::State` —
//! network upserts over a few IPv4 /28s and IPv6 /124s (edits that move, shrink, split and
//! re-purpose pools; dry runs), deletes (forced or not), allocations (families, requested
//! addresses, sharing keys and ports, three clusters), releases, reloads (`State::load`,
//! lenient), imports (`State::load`, strict) and time passing — checked after every step
//! against a model, independent of the ledger's own bookkeeping:
//! - no address is held by two clusters, or in two networks; holders of one address share
//!   one cluster, one non-empty sharing key and disjoint ports;
//! - the ledger's allocations are exactly the model's: they change only by their owner's
//!   Allocate, and disappear only by their owner's Release or a forced delete of the network;
//! - an address released with a reuse grace (by Release or a forced delete) is not handed to
//!   another owner before the grace ends;
//! - a refused transition or a dry run changes nothing (but may reap expired grace entries);
//! - a reload returns the same records, and a strict load (Import) of any snapshot the
//!   state produced succeeds.
#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use arbitrary::Arbitrary;
use cairn_ipam::{
    Error,
    ledger::{AllocateReq, State},
    model::{self, NetworkDef, Owner, OwnerKind, PoolDef, Protocol, Purpose},
    store::Snapshot,
};
use libfuzzer_sys::fuzz_target;

const NETWORKS: u8 = 3;
const BLOCKS: u8 = 3;
const CLUSTERS: u8 = 3;
const NAMES: u8 = 6;
const START_MS: u64 = 1_700_000_000_000;

/// How much of one /28 (or /124) a pool takes.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Shape {
    None,
    Whole,
    Low,
    High,
}

#[derive(Arbitrary, Debug)]
struct PoolGen {
    node: bool,
    v4: [Shape; BLOCKS as usize],
    v6: [Shape; BLOCKS as usize],
    exclude: Option<u8>,
    auto_assign: bool,
}

#[derive(Arbitrary, Debug)]
enum Fam {
    V4,
    V6,
    Dual,
    DualOptional,
    V6V4,
    Default,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Upsert {
        net: u8,
        pools: Vec<PoolGen>,
        prefixes: u8,
        grace: u8,
        dry_run: bool,
    },
    Delete {
        net: u8,
        force: bool,
    },
    Alloc {
        net: u8,
        cluster: u8,
        name: u8,
        fam: Fam,
        pool: Option<u8>,
        requested: Vec<u8>,
        key: Option<u8>,
        ports: Vec<u8>,
    },
    Release {
        net: u8,
        cluster: u8,
        name: u8,
    },
    Reload,
    Import,
    Advance {
        secs: u8,
    },
}

fn v4(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, i % (16 * BLOCKS)])
}

fn v6(i: u8) -> IpAddr {
    IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i % (16 * BLOCKS))])
}

fn ranges(shapes: &[Shape], ip: fn(u8) -> IpAddr, bits: u8, out: &mut Vec<String>) {
    for (b, s) in (0u8..).zip(shapes) {
        let base = 16 * b;
        match s {
            Shape::None => {}
            Shape::Whole => out.push(format!("{}/{bits}", ip(base))),
            Shape::Low => out.push(format!("{}-{}", ip(base), ip(base + 7))),
            Shape::High => out.push(format!("{}-{}", ip(base + 8), ip(base + 15))),
        }
    }
}

fn network_def(net: u8, pools: &[PoolGen], prefixes: u8, grace: u8) -> NetworkDef {
    let pools = pools
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, p)| {
            let mut rs = Vec::new();
            ranges(&p.v4, v4, 28, &mut rs);
            ranges(&p.v6, v6, 124, &mut rs);
            PoolDef {
                name: format!("p{i}"),
                purpose: if p.node { Purpose::Node } else { Purpose::Vip },
                ranges: rs,
                exclusions: p.exclude.map(|e| vec![v4(e).to_string()]).unwrap_or_default(),
                auto_assign: p.auto_assign,
            }
        })
        .collect();
    NetworkDef {
        name: format!("n{net}"),
        prefixes: (0..BLOCKS)
            .filter(|b| prefixes & (1 << b) != 0)
            .map(|b| format!("{}/28", v4(16 * b)).parse().expect("prefix"))
            .collect(),
        gateways: vec![],
        dns_servers: vec![],
        vlan: 0,
        pools,
        reuse_grace_secs: Some(match grace % 4 {
            0 => 0,
            1 => 1,
            2 => 30,
            _ => 600,
        }),
        managed_by: String::new(),
    }
}

fn owner(cluster: u8, name: u8) -> Owner {
    Owner {
        cluster_id: format!("c{}", cluster % CLUSTERS),
        kind: OwnerKind::Service,
        namespace: "default".into(),
        name: format!("s{}", name % NAMES),
        uid: String::new(),
    }
}

/// An owner across networks (its key minus the network).
type Who = (String, String);

fn who(o: &Owner) -> Who {
    (o.cluster_id.clone(), o.name.clone())
}

struct Model {
    now: u64,
    /// Owner key -> addresses, as the ledger returned them.
    allocs: BTreeMap<String, Vec<IpAddr>>,
    /// Released address -> (grace end, who released it).
    grace: BTreeMap<IpAddr, (u64, Who)>,
    /// Network name -> its reuse grace in ms.
    grace_ms: BTreeMap<String, u64>,
}

impl Model {
    fn held(&self) -> BTreeSet<IpAddr> {
        self.allocs.values().flatten().copied().collect()
    }

    /// Puts the addresses no one holds any more into their grace.
    fn released(&mut self, addrs: &[IpAddr], by: &Owner, grace_ms: u64) {
        let held = self.held();
        for ip in addrs {
            if !held.contains(ip) && grace_ms > 0 {
                self.grace.insert(*ip, (self.now + grace_ms, who(by)));
            }
        }
    }
}

/// Applies a transition the way `Ledger::mutate` does: the next sequence, bumped only when
/// there is something to commit.
fn mutate<T>(
    st: &mut State,
    f: impl FnOnce(&mut State, u64) -> Result<cairn_ipam::ledger::Outcome<T>, Error>,
) -> Result<T, Error> {
    let seq = st.seq + 1;
    let (out, ops, _) = f(st, seq)?;
    if !ops.is_empty() {
        st.seq = st.seq.max(seq);
    }
    st.take_deferred();
    Ok(out)
}

/// The records, less quarantine entries whose grace has ended: any transition, even a
/// refused one, may reap those (they are free again either way).
fn live(mut s: Snapshot, now: u64) -> Snapshot {
    s.quarantined.retain(|q| q.until_ms > now);
    s
}

fn check(st: &State, m: &Model, step: &Op) {
    let snap = st.snapshot();
    // The ledger's allocations are exactly the model's.
    let got: BTreeMap<String, Vec<IpAddr>> =
        snap.allocations.iter().map(|a| (a.key(), a.addresses.clone())).collect();
    assert_eq!(got, m.allocs, "allocations differ from the model after {step:?}");
    // One owner cluster per address, fleet-wide; sharing only by the rule.
    let mut by_ip: BTreeMap<IpAddr, Vec<&model::Allocation>> = BTreeMap::new();
    for a in &snap.allocations {
        for ip in &a.addresses {
            by_ip.entry(*ip).or_default().push(a);
        }
    }
    for (ip, hs) in &by_ip {
        for (i, x) in hs.iter().enumerate() {
            for y in &hs[i + 1..] {
                let ok = x.network == y.network
                    && x.owner.cluster_id == y.owner.cluster_id
                    && !x.sharing_key.is_empty()
                    && x.sharing_key == y.sharing_key
                    && x.ports.iter().all(|p| !y.ports.contains(p));
                assert!(ok, "{ip} held by {} and {} after {step:?}", x.key(), y.key());
            }
        }
    }
}

fn run(ops: Vec<Op>) {
    let mut st = State::new(0);
    let mut m = Model {
        now: START_MS,
        allocs: BTreeMap::new(),
        grace: BTreeMap::new(),
        grace_ms: BTreeMap::new(),
    };
    for op in ops.into_iter().take(64) {
        let before: Snapshot = st.snapshot();
        match &op {
            Op::Upsert {
                net,
                pools,
                prefixes,
                grace,
                dry_run,
            } => {
                let def = network_def(net % NETWORKS, pools, *prefixes, *grace);
                let name = def.name.clone();
                let grace_ms = u64::from(def.reuse_grace_secs.unwrap_or(0)) * 1000;
                let now = m.now;
                let r = mutate(&mut st, |s, _| s.upsert_network(def, None, *dry_run, now));
                if r.is_err() || *dry_run {
                    assert_eq!(live(st.snapshot(), m.now), live(before.clone(), m.now), "{op:?} ({r:?}) changed the state");
                } else {
                    m.grace_ms.insert(name, grace_ms);
                }
            }
            Op::Delete { net, force } => {
                let name = format!("n{}", net % NETWORKS);
                let now = m.now;
                match mutate(&mut st, |s, _| s.delete_network(&name, *force, now)) {
                    Ok(_) => {
                        let grace_ms = m.grace_ms.remove(&name).unwrap_or(0);
                        let gone: Vec<model::Allocation> = before
                            .allocations
                            .iter()
                            .filter(|a| a.network == name)
                            .cloned()
                            .collect();
                        assert!(*force || gone.is_empty(), "{op:?} deleted allocations without force");
                        for a in &gone {
                            m.allocs.remove(&a.key());
                        }
                        for a in &gone {
                            m.released(&a.addresses, &a.owner, grace_ms);
                        }
                    }
                    Err(_) => assert_eq!(live(st.snapshot(), m.now), live(before.clone(), m.now), "{op:?} failed and changed the state"),
                }
            }
            Op::Alloc {
                net,
                cluster,
                name,
                fam,
                pool,
                requested,
                key,
                ports,
            } => {
                use cairn_ipam::alloc::addr::Family::{V4, V6};
                let o = owner(*cluster, *name);
                let families = match fam {
                    Fam::V4 => vec![V4],
                    Fam::V6 => vec![V6],
                    Fam::Dual | Fam::DualOptional => vec![V4, V6],
                    Fam::V6V4 => vec![V6, V4],
                    Fam::Default => vec![],
                };
                let ports: Vec<(Protocol, u32)> = ports
                    .iter()
                    .take(3)
                    .map(|p| (if p & 0x80 == 0 { Protocol::Tcp } else { Protocol::Udp }, u32::from(p % 4 + 1)))
                    .collect();
                let Ok(ports) = model::check_ports("ports", &ports) else { continue };
                let req = AllocateReq {
                    network: format!("n{}", net % NETWORKS),
                    owner: Some(o.clone()),
                    pool: pool.map(|p| format!("p{}", p % 3)),
                    purpose: None,
                    families,
                    optional_extra_families: matches!(fam, Fam::DualOptional | Fam::V6V4),
                    requested: requested
                        .iter()
                        .take(2)
                        .map(|r| if r & 0x80 == 0 { v4(*r) } else { v6(*r) })
                        .collect(),
                    sharing_key: key.map(|k| format!("k{}", k % 2)).unwrap_or_default(),
                    ports,
                };
                let k = o.key(&req.network);
                let now = m.now;
                match mutate(&mut st, |s, seq| s.allocate(req, seq, now)) {
                    Ok((a, _)) => {
                        let prev = m.allocs.get(&k).cloned().unwrap_or_default();
                        let held_by_others: BTreeSet<IpAddr> = m
                            .allocs
                            .iter()
                            .filter(|(kk, _)| **kk != k)
                            .flat_map(|(_, v)| v.iter().copied())
                            .collect();
                        for ip in &a.addresses {
                            if prev.contains(ip) || held_by_others.contains(ip) {
                                continue;
                            }
                            if let Some((until, by)) = m.grace.get(ip) {
                                assert!(
                                    m.now >= *until || *by == who(&o),
                                    "{ip} released by {by:?} until {until} handed to {k} at {}",
                                    m.now
                                );
                            }
                            m.grace.remove(ip);
                        }
                        let dropped: Vec<IpAddr> =
                            prev.iter().filter(|ip| !a.addresses.contains(ip)).copied().collect();
                        m.allocs.insert(k, a.addresses.clone());
                        let g = m.grace_ms.get(&a.network).copied().unwrap_or(0);
                        m.released(&dropped, &o, g);
                    }
                    Err(_) => assert_eq!(live(st.snapshot(), m.now), live(before.clone(), m.now), "{op:?} failed and changed the state"),
                }
            }
            Op::Release { net, cluster, name } => {
                let o = owner(*cluster, *name);
                let n = format!("n{}", net % NETWORKS);
                let now = m.now;
                match mutate(&mut st, |s, _| s.release(&n, &o, now)) {
                    Ok(r) => {
                        let had = m.allocs.remove(&o.key(&n));
                        assert_eq!(r.is_some(), had.is_some(), "{op:?}");
                        if let Some(addrs) = had {
                            let g = m.grace_ms.get(&n).copied().unwrap_or(0);
                            m.released(&addrs, &o, g);
                        }
                    }
                    Err(_) => assert_eq!(live(st.snapshot(), m.now), live(before.clone(), m.now), "{op:?} failed and changed the state"),
                }
            }
            Op::Reload => {
                st = match State::load(before.clone(), 0, m.now, false) {
                    Ok(s) => s,
                    Err(e) => panic!("reload failed: {e}"),
                };
                let after = st.snapshot();
                assert_eq!(after.allocations, before.allocations, "reload changed allocations");
                assert_eq!(after.networks, before.networks, "reload changed networks");
            }
            Op::Import => {
                st = match State::load(before.clone(), 0, m.now, true) {
                    Ok(s) => s,
                    Err(e) => panic!("strict load of the state's own snapshot failed: {e}"),
                };
                assert_eq!(st.snapshot().allocations, before.allocations, "import changed allocations");
            }
            Op::Advance { secs } => {
                m.now += u64::from(*secs % 64) * 1000;
            }
        }
        check(&st, &m, &op);
    }
}

fuzz_target!(|ops: Vec<Op>| run(ops));
