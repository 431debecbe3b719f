//! Cairn store benchmarks: printed figures, not timed tests (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p cairn-ipam --bench store              # full run (minutes)
//! cargo bench -p cairn-ipam --bench store -- --quick   # CI smoke (seconds)
//! ```
//!
//! Sections (select with `--only alloc,engine,grpc,rss,restart,mtls,web,etcd,fleet,neighbour`; `engine` is the in-process
//! `SledEngine::commit` cost printed within section 2):
//! 1. `alloc`: allocation cost on `State` directly (no I/O), per pool size and fill.
//! 2. `grpc`: Allocate throughput and latency with durable ack against a real `cairn-ipam
//!    serve` child (built by cargo in the bench profile, i.e. release), beside the disk's
//!    measured fsync latency.
//! 3. `rss`: the server's resident memory holding 100k allocations.
//! 4. `restart`: spawn-to-serving time on a data dir holding 1M allocations.
//! 5. `mtls`: Allocate at 64 in flight over mutual TLS beside plaintext, alternating servers
//!    (plaintext, mTLS, plaintext, mTLS) in one run; certificates from `cairn-ipam certs`.
//! 6. `web`: the web view's pages and JSON with 100k allocations (one request at a time, a new
//!    connection each, as a browser's first load), and paging through everything.
//! 7. `etcd`: Allocate throughput and latency at 1, 16 and 64 in flight on a 3-member etcd
//!    cluster on loopback beside sled, alternating, in one run; then a new leader's takeover
//!    time (spawn → serving) with 100k allocations in etcd; and a follower with the restart
//!    section's count: spawn → replica loaded, its RSS, leader's ack → readable on it.
//! 8. `fleet`: one store, 1,000 simulated clusters, each with its own connection and its own
//!    WatchAllocations filtered to its cluster: an API-server VIP, 3 node addresses and 96
//!    Services each (100k allocations on one shared network), then 30% churn; throughput,
//!    latency, watch delay (transition → event at the owning cluster), RSS, CPU, duplicates.
//! 9. `neighbour`: Allocate at 1 in flight alone, then beside a client sending the largest
//!    UpsertNetwork the limits allow in a loop (committed, then dry-run).
//!
//! Other flags: `--dir DIR` (work dir, default a temp dir; the fsync probe and the data dirs
//! live there), `--secs S` (seconds per gRPC level), `--server-bin PATH`, `--cache-mib N`
//! (passed to the server), `--client-threads N`, `--keep` (keep the work dir), `--wait-quiet S`
//! (before each timed gRPC row and restart, wait up to S seconds until the rest of the machine
//! uses < 0.3 cores; default 120, 0 with --quick).
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use cairn_ipam::{
    alloc::addr::Family,
    ledger::{AllocateReq, Ledger, NoObserver, State},
    model::{Allocation, NetworkDef, NetworkRecord, Owner, OwnerKind, PoolDef, Port, Protocol, Purpose},
    store::{Engine, Op, etcd::EtcdEngine, etcd::EtcdOptions, sled_engine::SledEngine},
};
use cairn_proto::v1::{self as pb, ipam_service_client::IpamServiceClient};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;

#[path = "../src/store/etcd_cluster.rs"]
mod etcd_cluster;

// ============================================================================================
// Options
// ============================================================================================

struct Args {
    quick: bool,
    only: Vec<String>,
    dir: Option<PathBuf>,
    secs: f64,
    server_bin: PathBuf,
    cache_mib: Option<u64>,
    client_threads: usize,
    keep: bool,
    /// Longest wait for a quiet machine before each timed gRPC row and restart.
    quiet: Duration,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut a = Args {
            quick: false,
            only: vec![],
            dir: None,
            secs: 0.0,
            server_bin: PathBuf::from(env!("CARGO_BIN_EXE_cairn-ipam")),
            cache_mib: None,
            client_threads: 1,
            keep: false,
            quiet: Duration::MAX,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--quick" => a.quick = true,
                "--only" => a.only = val()?.split(',').map(str::to_string).collect(),
                "--dir" => a.dir = Some(PathBuf::from(val()?)),
                "--secs" => a.secs = val()?.parse()?,
                "--server-bin" => a.server_bin = PathBuf::from(val()?),
                "--cache-mib" => a.cache_mib = Some(val()?.parse()?),
                "--client-threads" => a.client_threads = val()?.parse()?,
                "--keep" => a.keep = true,
                "--wait-quiet" => a.quiet = Duration::from_secs_f64(val()?.parse()?),
                // Passed by `cargo bench`.
                "--bench" => {}
                "-h" | "--help" => {
                    println!(
                        "{}",
                        include_str!("store.rs")
                            .lines()
                            .take(19)
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        if a.quiet == Duration::MAX {
            a.quiet = if a.quick {
                Duration::ZERO
            } else {
                Duration::from_secs(120)
            };
        }
        if a.secs == 0.0 {
            a.secs = if a.quick { 1.0 } else { 10.0 };
        }
        Ok(a)
    }

    fn want(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

/// Sizes of one run.
struct Sizes {
    /// "1M" fill of section 1 (the /8 and /64 rows).
    big_fill: u64,
    /// Timed allocate/release pairs per row of section 1.
    samples: usize,
    /// Quarantined entries in the reuse-grace row of section 1.
    quarantined: u64,
    /// Allocations held for the RSS figure.
    rss_allocs: u64,
    /// Allocations on disk for the restart figure.
    restart_allocs: u64,
    /// Restarts timed.
    restarts: usize,
    /// fsync probe samples.
    fsyncs: usize,
    /// Allocations behind the web view's figures.
    web_allocs: u64,
    /// Timed requests per web view row.
    web_samples: usize,
    /// Simulated clusters of the fleet section.
    fleet_clusters: usize,
    /// Services per simulated cluster.
    fleet_services: usize,
}

impl Sizes {
    fn of(quick: bool) -> Self {
        if quick {
            Sizes {
                big_fill: 20_000,
                samples: 2_000,
                quarantined: 500,
                rss_allocs: 2_000,
                restart_allocs: 10_000,
                restarts: 1,
                fsyncs: 50,
                web_allocs: 2_000,
                web_samples: 20,
                fleet_clusters: 50,
                fleet_services: 6,
            }
        } else {
            Sizes {
                big_fill: 1_000_000,
                samples: 100_000,
                quarantined: 100_000,
                rss_allocs: 100_000,
                restart_allocs: 1_000_000,
                restarts: 3,
                fsyncs: 300,
                web_allocs: 100_000,
                web_samples: 200,
                fleet_clusters: 1_000,
                fleet_services: 96,
            }
        }
    }
}

// ============================================================================================
// Small helpers
// ============================================================================================

/// Sorted samples (nanoseconds), exact percentiles.
struct Samples(Vec<u64>);

impl Samples {
    fn new(mut v: Vec<u64>) -> Self {
        v.sort_unstable();
        Samples(v)
    }
    fn pct(&self, p: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        let i = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }
    fn mean(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.iter().map(|v| *v as f64).sum::<f64>() / self.0.len() as f64
    }
    fn max(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }
}

fn ms(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e6)
}

/// splitmix64: deterministic, dependency-free randomness for picking victims.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The 1/5/15-minute load averages (other work on the machine skews every figure).
fn loadavg() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let f: Vec<&str> = l.split_whitespace().take(3).collect();
    format!("(load average now: {})", f.join(" "))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: &str, clk_tck: f64) -> f64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised comm: state is field 3; utime 14, stime 15.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(14) + t(15)) / clk_tck
}

/// CPU nanoseconds used so far by the live threads of a process (/proc/PID/task/*/schedstat).
fn threads_cpu_ns(pid: &str) -> u64 {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// Waits (at most `max`) until the rest of the machine uses under 0.3 cores over 2 s, so other
/// work (concurrent builds) skews a measurement less. Returns a note for the output.
fn wait_quiet(max: Duration) -> String {
    if max.is_zero() {
        return String::new();
    }
    let tck = clk_tck();
    let t = Instant::now();
    loop {
        let b0 = machine_busy_secs(tck);
        std::thread::sleep(Duration::from_secs(2));
        let busy = (machine_busy_secs(tck) - b0) / 2.0;
        if busy < 0.3 {
            return format!(
                "(waited {:.0} s for a quiet machine: {busy:.2} cores busy)",
                t.elapsed().as_secs_f64()
            );
        }
        if t.elapsed() >= max {
            return format!(
                "(machine not quiet after {:.0} s: {busy:.2} cores busy by others; measuring anyway)",
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// CPU seconds the whole machine has been busy (all cores; not idle, not iowait).
fn machine_busy_secs(clk_tck: f64) -> f64 {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().next() else { return 0.0 };
    let v: Vec<f64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / clk_tck
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn du_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += du_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn print_env(work: &Path, args: &Args) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    // The mount holding the work dir (longest matching mount point).
    let canon = fs::canonicalize(work).unwrap_or_else(|_| work.to_path_buf());
    let mount = fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|s| {
            s.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() >= 3 && canon.starts_with(f[1]))
                        .then(|| (f[1].len(), format!("{} on {} ({})", f[0], f[1], f[2])))
                })
                .max_by_key(|(n, _)| *n)
                .map(|(_, m)| m)
        })
        .unwrap_or_default();
    println!(
        "# Cairn store benchmarks{}",
        if args.quick {
            " (--quick: smoke sizes, figures not meaningful)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "- CPU: {cpu}, {cores} cores available; {}",
        mem.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    println!(
        "- kernel {}; work dir {} on {mount}",
        kernel.trim(),
        work.display()
    );
    println!("- server binary: {}", args.server_bin.display());
    println!();
}

// ============================================================================================
// Section 1: allocation cost in process
// ============================================================================================

const NOW_MS: u64 = 1_700_000_000_000;

fn network_def(range: &str, grace: Option<u32>) -> NetworkDef {
    NetworkDef {
        name: "bench".into(),
        prefixes: vec![],
        gateways: vec![],
        dns_servers: vec![],
        vlan: 0,
        pools: vec![PoolDef {
            name: "vip".into(),
            purpose: Purpose::Vip,
            ranges: vec![range.into()],
            exclusions: vec![],
            auto_assign: true,
        }],
        reuse_grace_secs: grace,
        managed_by: String::new(),
    }
}

fn owner(i: u64) -> Owner {
    Owner {
        cluster_id: "bench".into(),
        kind: OwnerKind::Service,
        namespace: "ns".into(),
        name: format!("svc-{i}"),
        uid: String::new(),
    }
}

fn alloc_req(i: u64, family: Family) -> AllocateReq {
    AllocateReq {
        network: "bench".into(),
        owner: Some(owner(i)),
        families: vec![family],
        ..AllocateReq::default()
    }
}

/// An in-process ledger state with one pool.
struct Bench {
    st: State,
    family: Family,
    /// Owner ids currently holding an address.
    held: Vec<u64>,
    next_id: u64,
}

impl Bench {
    fn new(range: &str, family: Family, grace: Option<u32>) -> anyhow::Result<Self> {
        let mut st = State::new(0);
        st.upsert_network(network_def(range, grace), None, false, NOW_MS)?;
        Ok(Bench {
            st,
            family,
            held: vec![],
            next_id: 0,
        })
    }

    fn allocate(&mut self) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let req = alloc_req(id, self.family);
        let seq = self.st.seq + 1;
        let t = Instant::now();
        let r = self.st.allocate(req, seq, NOW_MS);
        let dt = t.elapsed().as_nanos() as u64;
        r?;
        self.st.seq = seq;
        self.held.push(id);
        Ok(dt)
    }

    /// Releases the holder at index `j` of `held`.
    fn release_at(&mut self, j: usize, now_ms: u64) -> anyhow::Result<u64> {
        let id = self.held.swap_remove(j);
        let o = owner(id);
        let t = Instant::now();
        let r = self.st.release("bench", &o, now_ms);
        let dt = t.elapsed().as_nanos() as u64;
        r?;
        Ok(dt)
    }

    fn fill(&mut self, n: u64) -> anyhow::Result<Duration> {
        let t = Instant::now();
        for _ in 0..n {
            self.allocate()?;
        }
        Ok(t.elapsed())
    }

    fn free_ranges(&self) -> usize {
        self.st.free_ranges("bench", "vip", self.family).len()
    }

    /// `samples` timed pairs that keep the fill level: at 0 held, allocate then release it;
    /// otherwise release a random holder then allocate a new owner.
    /// Times one `allocate` per request (each must succeed), committing each.
    fn timed_allocs(&mut self, reqs: impl Iterator<Item = AllocateReq>) -> anyhow::Result<Samples> {
        let mut v = Vec::new();
        for req in reqs {
            let seq = self.st.seq + 1;
            let t = Instant::now();
            let r = self.st.allocate(req, seq, NOW_MS);
            v.push(t.elapsed().as_nanos() as u64);
            r?;
            self.st.seq = seq;
        }
        Ok(Samples::new(v))
    }

    fn churn(
        &mut self,
        samples: usize,
        rng: &mut Rng,
        release_now_ms: u64,
    ) -> anyhow::Result<(Samples, Samples)> {
        let mut alloc = Vec::with_capacity(samples);
        let mut rel = Vec::with_capacity(samples);
        for _ in 0..samples {
            if self.held.is_empty() {
                alloc.push(self.allocate()?);
                rel.push(self.release_at(0, release_now_ms)?);
            } else {
                let j = rng.below(self.held.len());
                rel.push(self.release_at(j, release_now_ms)?);
                alloc.push(self.allocate()?);
            }
        }
        Ok((Samples::new(alloc), Samples::new(rel)))
    }
}

fn bench_alloc(sz: &Sizes) -> anyhow::Result<()> {
    println!("## 1. Allocation cost in process (`State`, no I/O)");
    println!();
    println!(
        "Each row: {} timed pairs at a steady fill (release a random holder, allocate a new owner; \
         at 0 held: allocate, then release it). Reuse grace 0 unless noted. Times in ns \
         (each includes ~20-40 ns of `Instant::now()` overhead).",
        sz.samples
    );
    println!();
    println!(
        "| pool | fill (held) | free ranges | alloc p50 | alloc p99 | alloc mean | alloc max | release p50 | release p99 | build |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let big = sz.big_fill;
    let big_label = if big == 1_000_000 {
        "1M".to_string()
    } else {
        big.to_string()
    };
    struct Row {
        pool: &'static str,
        range: &'static str,
        family: Family,
        levels: Vec<(String, u64, bool)>,
    }
    let rows = [
        Row {
            pool: "/24 IPv4",
            range: "10.0.0.0/24",
            family: Family::V4,
            levels: vec![("empty".into(), 0, false), ("half".into(), 127, false)],
        },
        Row {
            pool: "/16 IPv4",
            range: "10.0.0.0/16",
            family: Family::V4,
            levels: vec![("empty".into(), 0, false), ("half".into(), 32_767, false)],
        },
        Row {
            pool: "/8 IPv4",
            range: "10.0.0.0/8",
            family: Family::V4,
            levels: vec![
                ("empty".into(), 0, false),
                (big_label.clone(), big, false),
                (format!("{big_label}, every 2nd released"), big, true),
            ],
        },
        Row {
            pool: "/64 IPv6",
            range: "fd00::/64",
            family: Family::V6,
            levels: vec![
                ("empty".into(), 0, false),
                (big_label.clone(), big, false),
                (format!("{big_label}, every 2nd released"), big, true),
            ],
        },
    ];
    let mut rng = Rng(42);
    for r in &rows {
        for (label, n, fragment) in &r.levels {
            let mut b = Bench::new(r.range, r.family, None)?;
            let took = b.fill(*n)?;
            // Memory per allocation: section 3 (a fresh process per component).
            let mut build = if *n > 0 {
                format!(
                    "{n} allocs in {:.2} s ({:.0} ns/alloc)",
                    took.as_secs_f64(),
                    took.as_nanos() as f64 / *n as f64
                )
            } else {
                "-".into()
            };
            if *fragment {
                // Release the holders of every second address: the free set becomes n/2 holes.
                let t = Instant::now();
                let ids: Vec<u64> = b.held.iter().copied().filter(|i| i % 2 == 1).collect();
                for id in ids {
                    b.st.release("bench", &owner(id), NOW_MS)?;
                }
                b.held.retain(|i| i % 2 == 0);
                build.push_str(&format!(
                    "; {} released in {:.2} s",
                    n / 2,
                    t.elapsed().as_secs_f64()
                ));
            }
            let (a, rel) = b.churn(sz.samples, &mut rng, NOW_MS)?;
            let held = b.held.len();
            println!(
                "| {} | {label} ({held}) | {} | {} | {} | {:.0} | {} | {} | {} | {build} |",
                r.pool,
                b.free_ranges(),
                a.pct(50.0),
                a.pct(99.0),
                a.mean(),
                a.max(),
                rel.pct(50.0),
                rel.pct(99.0),
            );
        }
    }
    println!();

    // Paths beside the free-range set: reuse grace (quarantine), sharing keys, retries.
    println!(
        "Other Allocate paths on a /8 IPv4 pool holding {big_label} allocations of one cluster \
         (times in ns; fewer samples where an operation is slow):"
    );
    println!();
    println!("| case | alloc p50 | alloc p99 | alloc mean | release p50 | release p99 | samples |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let samples = (sz.samples / 10).max(100);
    for q in [0, sz.quarantined] {
        let mut b = Bench::new("10.0.0.0/8", Family::V4, Some(30))?;
        b.fill(big)?;
        for _ in 0..q {
            let j = rng.below(b.held.len());
            b.release_at(j, NOW_MS)?;
        }
        let (a, rel) = b.churn(samples, &mut rng, NOW_MS)?;
        println!(
            "| reuse grace 30 s, {q} → {} addresses in grace (churn) | {} | {} | {:.0} | {} | {} | {samples} |",
            q as usize + samples,
            a.pct(50.0),
            a.pct(99.0),
            a.mean(),
            rel.pct(50.0),
            rel.pct(99.0),
        );
    }
    {
        // Idempotent retry: Allocate for an owner that already holds an address.
        let mut b = Bench::new("10.0.0.0/8", Family::V4, None)?;
        b.fill(big)?;
        let mut v = Vec::with_capacity(sz.samples);
        for _ in 0..sz.samples {
            let id = b.held[rng.below(b.held.len())];
            let req = alloc_req(id, Family::V4);
            let seq = b.st.seq + 1;
            let t = Instant::now();
            let r = b.st.allocate(req, seq, NOW_MS);
            v.push(t.elapsed().as_nanos() as u64);
            r?;
        }
        let a = Samples::new(v);
        println!(
            "| retry by an owner that holds an address (no change) | {} | {} | {:.0} | - | - | {} |",
            a.pct(50.0),
            a.pct(99.0),
            a.mean(),
            sz.samples
        );
        // Requested address: a new owner asks for a specific free address.
        let n = sz.samples / 10;
        let a = b.timed_allocs((0..n as u64).map(|i| {
            let mut req = alloc_req(u64::MAX / 2 + i, Family::V4);
            // Far above the fill (the lowest addresses), so free.
            req.requested = vec![IpAddr::V4(Ipv4Addr::from(0x0A80_0000 + i as u32))];
            req
        }))?;
        println!(
            "| requested address (free), new owner | {} | {} | {:.0} | - | - | {n} |",
            a.pct(50.0),
            a.pct(99.0),
            a.mean(),
        );
        // Sharing key: new owners of the same cluster join a shared address (disjoint ports).
        // Their names sort after the {big_label} existing owners of the cluster. Groups of 8
        // owners per key (an address shared by a few Services, the usual case), then every
        // owner on one key and one address (the worst case: each join checks every holder).
        for (round, (label, per_key)) in [("groups of 8 per key", 8), ("all on one key", usize::MAX)]
            .into_iter()
            .enumerate()
        {
            let n = (samples / 10).max(20);
            let a = b.timed_allocs((0..n).map(|i| {
                let mut req = alloc_req(0, Family::V4);
                req.owner = Some(Owner {
                    name: format!("web{round}-{i}"),
                    ..owner(0)
                });
                req.sharing_key = format!("web{round}-{}", i / per_key.min(n));
                req.ports = vec![Port {
                    protocol: Protocol::Tcp,
                    port: 1000 + i as u16,
                }];
                req
            }))?;
            println!(
                "| sharing key: new owner joins a shared address ({label}) | {} | {} | {:.0} | - | - | {n} |",
                a.pct(50.0),
                a.pct(99.0),
                a.mean(),
            );
        }
    }
    println!();
    Ok(())
}

// ============================================================================================
// Server child process
// ============================================================================================

struct Server {
    child: Option<Child>,
    pid: String,
    grpc: String,
    metrics: String,
    log: PathBuf,
    /// Spawn to addr file.
    ready: Duration,
    /// Cores the rest of the machine kept busy while the server started.
    others: f64,
    /// Client files when the server runs mutual TLS.
    tls: Option<cairn_proto::tls::ClientTlsFiles>,
}

impl Server {
    fn start(args: &Args, data_dir: &Path, log: &Path) -> anyhow::Result<Self> {
        Server::start_with(args, data_dir, log, None)
    }

    /// With `pki` (a `cairn-ipam certs` directory holding server and cloud certificates):
    /// mutual TLS only, clients connect as the cloud.
    fn start_with(args: &Args, data_dir: &Path, log: &Path, pki: Option<&Path>) -> anyhow::Result<Self> {
        Server::start_args(args, data_dir, log, pki, &[])
    }

    /// With `extra` serve flags (e.g. `--backend etcd …`).
    fn start_args(
        args: &Args,
        data_dir: &Path,
        log: &Path,
        pki: Option<&Path>,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let addr_file = data_dir.with_extension("addr");
        let _ = fs::remove_file(&addr_file);
        let logf = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(&args.server_bin);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .args(["--default-reuse-grace", "0s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf);
        if let Some(c) = args.cache_mib {
            cmd.args(["--cache-mib", &c.to_string()]);
        }
        cmd.args(extra);
        if let Some(d) = pki {
            cmd.arg("--tls-cert")
                .arg(d.join("server.pem"))
                .arg("--tls-key")
                .arg(d.join("server-key.pem"))
                .arg("--client-ca")
                .arg(d.join("ca.pem"));
        }
        let tls = pki.map(|d| cairn_proto::tls::ClientTlsFiles {
            ca: Some(d.join("ca.pem")),
            cert: Some(d.join("cloud.pem")),
            key: Some(d.join("cloud-key.pem")),
        });
        let tck = clk_tck();
        let busy0 = machine_busy_secs(tck);
        let t = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", args.server_bin.display()))?;
        let text = loop {
            if let Ok(s) = fs::read_to_string(&addr_file) {
                break s;
            }
            if let Some(st) = child.try_wait()? {
                bail!("server exited with {st} before serving; see {}", log.display());
            }
            if t.elapsed() > Duration::from_secs(300) {
                let _ = child.kill();
                bail!("server not serving after 300 s; see {}", log.display());
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        let ready = t.elapsed();
        let own = cpu_secs(&child.id().to_string(), tck);
        let others = ((machine_busy_secs(tck) - busy0 - own) / ready.as_secs_f64()).max(0.0);
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).map(str::to_string))
                .unwrap_or_default()
        };
        Ok(Server {
            pid: child.id().to_string(),
            child: Some(child),
            grpc: get("grpc="),
            metrics: get("metrics="),
            log: log.to_path_buf(),
            ready,
            others,
            tls,
        })
    }

    fn rss_kib(&self) -> u64 {
        proc_status_kib(&self.pid, "VmRSS").unwrap_or(0)
    }

    fn hwm_kib(&self) -> u64 {
        proc_status_kib(&self.pid, "VmHWM").unwrap_or(0)
    }

    async fn clients(&self, n: usize) -> anyhow::Result<Vec<IpamServiceClient<Channel>>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let uri = format!("http://{}", self.grpc);
            let ep = match &self.tls {
                Some(t) => t.endpoint(&uri)?,
                None => Channel::from_shared(uri)?,
            };
            let ch = ep.tcp_nodelay(true).connect().await?;
            v.push(IpamServiceClient::new(ch));
        }
        Ok(v)
    }

    /// The Prometheus text of /metrics.
    async fn scrape(&self) -> anyhow::Result<Metrics> {
        let mut s = tokio::net::TcpStream::connect(&self.metrics).await?;
        s.write_all(
            format!(
                "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.metrics
            )
            .as_bytes(),
        )
        .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok(Metrics::parse(&body))
    }

    /// SIGTERM, then wait (graceful: the server syncs and exits).
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").args(["-TERM", &self.pid]).status()?;
            let t = Instant::now();
            while c.try_wait()?.is_none() {
                if t.elapsed() > Duration::from_secs(60) {
                    c.kill()?;
                    c.wait()?;
                    bail!("server {} ignored SIGTERM for 60 s; killed", self.pid);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// SIGKILL (no shutdown path at all).
    fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// `load_ms` of the last "ledger loaded" line in the log.
    fn load_ms(&self) -> Option<u64> {
        let s = fs::read_to_string(&self.log).ok()?;
        let l = s.lines().rev().find(|l| l.contains("ledger loaded"))?;
        let v = l.split("load_ms=").nth(1)?;
        v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The figures we read from /metrics (cumulative).
#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    batch_sum: f64,
    batch_count: f64,
    commit_sum: f64,
    commit_count: f64,
    /// Cumulative buckets of commit_batch_requests (le, count).
    batch_buckets: [(f64, f64); 13],
}

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut m = Metrics::default();
        let mut nb = 0;
        for l in text.lines() {
            let mut f = l.split_whitespace();
            let (Some(k), Some(v)) = (f.next(), f.next()) else {
                continue;
            };
            let v: f64 = v.parse().unwrap_or(0.0);
            match k {
                "cairn_ipam_commit_batch_requests_sum" => m.batch_sum = v,
                "cairn_ipam_commit_batch_requests_count" => m.batch_count = v,
                "cairn_ipam_commit_duration_seconds_sum" => m.commit_sum = v,
                "cairn_ipam_commit_duration_seconds_count" => m.commit_count = v,
                _ if k.starts_with("cairn_ipam_commit_batch_requests_bucket{le=\"")
                    && nb < m.batch_buckets.len() =>
                {
                    let le = k
                        .trim_start_matches("cairn_ipam_commit_batch_requests_bucket{le=\"")
                        .trim_end_matches("\"}");
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(0.0)
                    };
                    m.batch_buckets[nb] = (le, v);
                    nb += 1;
                }
                _ => {}
            }
        }
        m
    }

    /// Mean batch size, mean commit time (ms) and the median batch's bucket bound since `before`.
    fn since(&self, before: &Metrics) -> (f64, f64, String) {
        let batches = self.batch_count - before.batch_count;
        let mean_batch = if batches > 0.0 {
            (self.batch_sum - before.batch_sum) / batches
        } else {
            0.0
        };
        let commits = self.commit_count - before.commit_count;
        let mean_commit = if commits > 0.0 {
            (self.commit_sum - before.commit_sum) * 1e3 / commits
        } else {
            0.0
        };
        let half = batches / 2.0;
        let p50 = self
            .batch_buckets
            .iter()
            .zip(before.batch_buckets.iter())
            .find(|((_, c), (_, b))| c - b >= half && half > 0.0)
            .map(|((le, _), _)| {
                if le.is_infinite() {
                    ">2048".to_string()
                } else {
                    format!("≤{le}")
                }
            })
            .unwrap_or_else(|| "-".into());
        (mean_batch, mean_commit, p50)
    }
}

fn pb_network(range: &str) -> pb::Network {
    pb::Network {
        name: "bench".into(),
        pools: vec![pb::Pool {
            name: "vip".into(),
            purpose: pb::PoolPurpose::Vip as i32,
            ranges: vec![range.into()],
            exclusions: vec![],
            auto_assign: Some(true),
        }],
        reuse_grace_seconds: Some(0),
        ..Default::default()
    }
}

async fn upsert(c: &mut IpamServiceClient<Channel>) -> anyhow::Result<()> {
    c.upsert_network(pb::UpsertNetworkRequest {
        network: Some(pb_network("10.0.0.0/8")),
        expected_version: None,
        dry_run: false,
    })
    .await?;
    Ok(())
}

fn pb_alloc(i: u64) -> pb::AllocateRequest {
    pb::AllocateRequest {
        network: "bench".into(),
        owner: Some(pb::Owner {
            cluster_id: "bench".into(),
            kind: pb::OwnerKind::Service as i32,
            namespace: "ns".into(),
            name: format!("svc-{i}"),
            uid: String::new(),
        }),
        ..Default::default()
    }
}

/// Result of one closed-loop run.
struct Load {
    done: u64,
    errors: u64,
    elapsed: Duration,
    lat: Samples,
}

/// `inflight` workers over `clients` issue Allocates for fresh owners (ids from `next`) until
/// `count` are done or `dur` has passed; samples after `warmup` are kept.
async fn load(
    clients: &[IpamServiceClient<Channel>],
    inflight: usize,
    next: Arc<AtomicU64>,
    count: Option<u64>,
    warmup: Duration,
    dur: Duration,
) -> Load {
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + dur;
    let limit = count.map(|c| next.load(Ordering::Relaxed) + c);
    let errors = Arc::new(AtomicU64::new(0));
    // CAIRN_BENCH_STALLS=1: print every request slower than 10 ms (to find periodic stalls).
    let stalls = std::env::var_os("CAIRN_BENCH_STALLS").is_some();
    let mut tasks = Vec::with_capacity(inflight);
    for w in 0..inflight {
        let mut c = clients[w % clients.len()].clone();
        let next = next.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 14);
            loop {
                let now = Instant::now();
                if count.is_none() && now >= stop_at {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|l| i >= l) {
                    break;
                }
                let t = Instant::now();
                let r = c.allocate(pb_alloc(i)).await;
                let end = Instant::now();
                if stalls && end - t > Duration::from_millis(10) {
                    eprintln!(
                        "stall: worker {w} request started at +{:.3} s took {:.1} ms",
                        (t - start).as_secs_f64(),
                        (end - t).as_secs_f64() * 1e3
                    );
                }
                match r {
                    Ok(_) if count.is_some() || t >= measure_from => lat.push((end - t).as_nanos() as u64),
                    Ok(_) => {}
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("Allocate failed: {e}");
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await {
            all.extend(v);
        }
    }
    let elapsed = if count.is_some() {
        start.elapsed()
    } else {
        Instant::now() - measure_from
    };
    Load {
        done: all.len() as u64,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        lat: Samples::new(all),
    }
}

/// write + fsync of a small append, in `dir`.
#[derive(Clone, Copy, PartialEq)]
enum Probe {
    /// Append 128 bytes, fsync (the brief's reference: file size changes, so metadata too).
    AppendFsync,
    /// Append 128 bytes, fdatasync (size still changes).
    AppendFdatasync,
    /// Overwrite 128 bytes inside a preallocated, already-synced file, fdatasync (what a log
    /// with preallocated segments pays).
    OverwriteFdatasync,
}

/// Write + sync of a small record, in `dir`.
fn fsync_probe(dir: &Path, n: usize, kind: Probe) -> anyhow::Result<Samples> {
    use std::os::unix::fs::FileExt as _;
    let p = dir.join("fsync-probe");
    let _ = fs::remove_file(&p);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(kind != Probe::OverwriteFdatasync)
        .write(true)
        .open(&p)?;
    let buf = [0x5au8; 128];
    if kind == Probe::OverwriteFdatasync {
        f.write_all(&vec![0u8; n * 128])?;
        f.sync_all()?;
    }
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        match kind {
            Probe::AppendFsync => {
                f.write_all(&buf)?;
                f.sync_all()?;
            }
            Probe::AppendFdatasync => {
                f.write_all(&buf)?;
                f.sync_data()?;
            }
            Probe::OverwriteFdatasync => {
                f.write_all_at(&buf, (i * 128) as u64)?;
                f.sync_data()?;
            }
        }
        v.push(t.elapsed().as_nanos() as u64);
    }
    drop(f);
    let _ = fs::remove_file(&p);
    Ok(Samples::new(v))
}

/// The durable-commit cost below gRPC: `SledEngine::commit` of batches of `b` new allocations,
/// as shipped (sled's `flush`) and followed by an `fdatasync` of sled's log file.
fn bench_engine(sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    println!(
        "Engine commit in process (`SledEngine::commit` = `apply_batch` + `Db::flush`), {} samples per row, \
         each a batch of b new allocations; \"+fdatasync\" adds `File::sync_data` on sled's log file `<dir>/db`. \
         CPU = all threads of the process (sled's I/O pool included), from /proc/self/task/*/schedstat:",
        sz.fsyncs
    );
    println!();
    println!(
        "| b (allocs/batch) | commit p50 ms | commit p99 ms | CPU µs/commit | +fdatasync p50 ms | +fdatasync p99 ms | CPU µs/commit |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let dir = work.join("engine-data");
    let engine = SledEngine::open(&dir, 32 << 20)?;
    let log = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))?;
    let mut st = State::new(0);
    let (_, ops, _) = st.upsert_network(network_def("10.0.0.0/8", Some(0)), None, false, NOW_MS)?;
    engine.commit(&ops, 1)?;
    st.seq = 1;
    let mut id = 0u64;
    let mut batch = |st: &mut State, b: usize| -> anyhow::Result<Vec<Op>> {
        let mut ops = Vec::new();
        for _ in 0..b {
            let seq = st.seq + 1;
            let (_, o, _) = st.allocate(alloc_req(id, Family::V4), seq, NOW_MS)?;
            id += 1;
            st.seq = seq;
            ops.extend(o);
        }
        Ok(ops)
    };
    for b in [1usize, 16, 64] {
        let mut row = Vec::new();
        for sync in [false, true] {
            let mut v = Vec::with_capacity(sz.fsyncs);
            let mut cpu = 0u64;
            for _ in 0..sz.fsyncs {
                let ops = batch(&mut st, b)?;
                let c = threads_cpu_ns("self");
                let t = Instant::now();
                engine.commit(&ops, st.seq)?;
                if sync {
                    log.sync_data()?;
                }
                v.push(t.elapsed().as_nanos() as u64);
                cpu += threads_cpu_ns("self").saturating_sub(c);
            }
            let v = Samples::new(v);
            row.push(format!(
                "{} | {} | {:.0}",
                ms(v.pct(50.0)),
                ms(v.pct(99.0)),
                cpu as f64 / 1e3 / sz.fsyncs as f64
            ));
        }
        println!("| {b} | {} | {} |", row[0], row[1]);
    }
    println!();
    drop(engine);
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

async fn bench_grpc(args: &Args, sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    println!("## 2. gRPC Allocate with durable ack (loopback, real `cairn-ipam serve` child)");
    println!();
    let data = work.join("grpc-data");
    fs::create_dir_all(&data)?;
    println!(
        "Disk, same directory, {} samples each of a 128-byte write + sync, in ms:",
        sz.fsyncs
    );
    println!();
    println!("| probe | p50 | p99 | mean | max |");
    println!("|---|---:|---:|---:|---:|");
    let mut fs_all = None;
    for (name, kind) in [
        ("append + fsync", Probe::AppendFsync),
        ("append + fdatasync", Probe::AppendFdatasync),
        ("overwrite in place + fdatasync", Probe::OverwriteFdatasync),
    ] {
        let r = fsync_probe(work, sz.fsyncs, kind)?;
        println!(
            "| {name} | {} | {} | {:.2} | {} |",
            ms(r.pct(50.0)),
            ms(r.pct(99.0)),
            r.mean() / 1e6,
            ms(r.max())
        );
        fs_all.get_or_insert(r);
    }
    let fs_all = fs_all.context("no probe")?;
    println!();
    if args.want("engine") {
        bench_engine(sz, work)?;
    }
    if !args.want("grpc") {
        return Ok(());
    }
    let mut srv = Server::start(args, &data, &work.join("grpc-server.log"))?;
    let tck = clk_tck();
    let me = std::process::id().to_string();
    let clients = srv.clients(4).await?;
    upsert(&mut clients[0].clone()).await?;
    let next = Arc::new(AtomicU64::new(0));
    let dur = Duration::from_secs_f64(args.secs);
    let warm = Duration::from_secs_f64((args.secs / 10.0).min(1.0));
    println!(
        "Closed loop: N workers each send Allocate for a fresh owner (a /8 pool, grace 0) and wait for the reply; \
         {:.0} s measured per row after {:.1} s warm-up; connections = min(N, 4). \
         Bound = in-flight / fsync p50 (each fsync acknowledging every request in flight).",
        dur.as_secs_f64(),
        warm.as_secs_f64()
    );
    println!();
    println!(
        "| in flight | conns | allocs/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | batch mean | batch p50 | commit mean ms | bound allocs/s | server CPU | client CPU | other CPU |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    for inflight in [1usize, 16, 64] {
        notes.push(format!("{inflight} in flight: {}", wait_quiet(args.quiet)));
        let conns = inflight.min(4);
        let m0 = srv.scrape().await?;
        let (s0, c0, b0) = (
            cpu_secs(&srv.pid, tck),
            cpu_secs(&me, tck),
            machine_busy_secs(tck),
        );
        let t0 = Instant::now();
        let r = load(&clients[..conns], inflight, next.clone(), None, warm, dur).await;
        let wall = t0.elapsed().as_secs_f64();
        let (s1, c1, b1) = (
            cpu_secs(&srv.pid, tck),
            cpu_secs(&me, tck),
            machine_busy_secs(tck),
        );
        let m1 = srv.scrape().await?;
        let (batch, commit, batch_p50) = m1.since(&m0);
        let bound = inflight as f64 / (fs_all.pct(50.0) as f64 / 1e9);
        println!(
            "| {inflight} | {conns} | {:.0} | {} | {} | {} | {} | {} | {batch:.1} | {batch_p50} | {commit:.2} | {bound:.0} | {:.0}% | {:.0}% | {:.0}% |",
            r.done as f64 / r.elapsed.as_secs_f64(),
            ms(r.lat.pct(50.0)),
            ms(r.lat.pct(99.0)),
            ms(r.lat.pct(99.9)),
            ms(r.lat.max()),
            r.errors,
            (s1 - s0) / wall * 100.0,
            (c1 - c0) / wall * 100.0,
            ((b1 - b0) - (s1 - s0) - (c1 - c0)).max(0.0) / wall * 100.0,
        );
    }
    println!();
    for n in notes.iter().filter(|n| !n.ends_with(": ")) {
        println!("- {n}");
    }
    println!();
    println!(
        "(CPU: 100% = one core, over the whole row including warm-up; the client shares the machine's cores with the server; other = the rest of the machine (other builds), which competes with both. \
         Batch = requests acknowledged by one commit, from `cairn_ipam_commit_batch_requests`; \
         commit = apply + fsync of one batch, from `cairn_ipam_commit_duration_seconds`.)"
    );
    println!();
    println!(
        "Server after the runs: {} allocations, VmRSS {} MiB, data dir {} MiB.",
        next.load(Ordering::Relaxed),
        mib(srv.rss_kib()),
        mib(du_bytes(&data) / 1024)
    );
    println!();
    srv.stop()?;
    Ok(())
}

// ============================================================================================
// Section 5: mutual TLS beside plaintext
// ============================================================================================

async fn bench_mtls(args: &Args, work: &Path) -> anyhow::Result<()> {
    println!("## 5. Allocate over mutual TLS beside plaintext (64 in flight, 4 connections)");
    println!();
    let pki = work.join("pki");
    for a in [
        &["init", "--dir"][..],
        &["issue", "--server", "--ip", "127.0.0.1", "--dir"],
        &["issue", "--cloud", "--dir"],
    ] {
        let st = Command::new(&args.server_bin)
            .arg("certs")
            .args(a)
            .arg(&pki)
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("cairn-ipam certs {a:?} failed");
        }
    }
    let dur = Duration::from_secs_f64(args.secs);
    let warm = Duration::from_secs_f64((args.secs / 10.0).min(1.0));
    let tck = clk_tck();
    println!(
        "Each row: a fresh server and data dir, {:.0} s measured after {:.1} s warm-up; TLS 1.3 \
         (rustls, ring), client certificate of the cloud role, so every call also passes the \
         authorization layer. Rows alternate so drift on the machine hits both modes.",
        dur.as_secs_f64(),
        warm.as_secs_f64()
    );
    println!();
    println!("| round | transport | allocs/s | p50 ms | p99 ms | max ms | errors | server CPU | machine |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---|");
    let mut rates = [Vec::new(), Vec::new()];
    for round in 1..=2 {
        for (i, tls) in [false, true].into_iter().enumerate() {
            let data = work.join(format!("mtls-{round}-{i}"));
            fs::create_dir_all(&data)?;
            let mut srv = Server::start_with(
                args,
                &data,
                &work.join(format!("mtls-{round}-{i}.log")),
                tls.then_some(pki.as_path()),
            )?;
            let clients = srv.clients(4).await?;
            upsert(&mut clients[0].clone()).await?;
            let note = wait_quiet(args.quiet);
            let s0 = cpu_secs(&srv.pid, tck);
            let t0 = Instant::now();
            let r = load(&clients, 64, Arc::new(AtomicU64::new(0)), None, warm, dur).await;
            let wall = t0.elapsed().as_secs_f64();
            let s1 = cpu_secs(&srv.pid, tck);
            let rate = r.done as f64 / r.elapsed.as_secs_f64();
            rates[i].push(rate);
            println!(
                "| {round} | {} | {rate:.0} | {} | {} | {} | {} | {:.0}% | {note} |",
                if tls { "mTLS" } else { "plaintext" },
                ms(r.lat.pct(50.0)),
                ms(r.lat.pct(99.0)),
                ms(r.lat.max()),
                r.errors,
                (s1 - s0) / wall * 100.0,
            );
            srv.stop()?;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (plain, tls) = (mean(&rates[0]), mean(&rates[1]));
    println!();
    println!(
        "mTLS throughput cost: {:.1}% ({tls:.0} vs {plain:.0} allocs/s, means of the rounds; target ≤ 10%).",
        (1.0 - tls / plain.max(1.0)) * 100.0
    );
    println!();
    Ok(())
}

// ============================================================================================
// Section 3: RSS
// ============================================================================================

async fn bench_rss(args: &Args, sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    println!("## 3. Server memory (VmRSS from /proc/PID/status)");
    println!();
    let data = work.join("rss-data");
    fs::create_dir_all(&data)?;
    let log = work.join("rss-server.log");
    let mut srv = Server::start(args, &data, &log)?;
    let clients = srv.clients(4).await?;
    upsert(&mut clients[0].clone()).await?;
    let empty = srv.rss_kib();
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let r = load(
        &clients,
        64,
        next,
        Some(sz.rss_allocs),
        Duration::ZERO,
        Duration::ZERO,
    )
    .await;
    let took = t.elapsed();
    if r.errors > 0 {
        bail!("{} Allocate errors while filling", r.errors);
    }
    // Let sled's background flusher settle.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let full = srv.rss_kib();
    let hwm = srv.hwm_kib();
    srv.stop()?;
    let disk = du_bytes(&data);
    let srv2 = Server::start(args, &data, &log)?;
    // One read so the ledger is exercised after load.
    let mut c = srv2.clients(1).await?;
    c[0].get_usage(pb::GetUsageRequest {
        network: String::new(),
    })
    .await?;
    let reloaded = srv2.rss_kib();
    let reloaded_hwm = srv2.hwm_kib();
    drop(srv2);
    let n = sz.rss_allocs;
    println!("| state | allocations | VmRSS MiB | VmHWM MiB | per allocation over empty |");
    println!("|---|---:|---:|---:|---:|");
    println!("| fresh server, one network | 0 | {} | - | - |", mib(empty));
    println!(
        "| after {n} Allocates via gRPC (64 in flight, {:.1} s) | {n} | {} | {} | {:.0} B |",
        took.as_secs_f64(),
        mib(full),
        mib(hwm),
        (full.saturating_sub(empty) * 1024) as f64 / n as f64
    );
    println!(
        "| restarted on the same data dir | {n} | {} | {} | {:.0} B |",
        mib(reloaded),
        mib(reloaded_hwm),
        (reloaded.saturating_sub(empty) * 1024) as f64 / n as f64
    );
    println!();
    println!("Data dir on disk: {} MiB for {n} allocations.", mib(disk / 1024));
    println!();
    rss_breakdown(sz, work, args.cache_mib.unwrap_or(32))?;
    Ok(())
}

/// Child mode `--mem-probe KIND N DIR`: builds one component alone in a fresh process and
/// prints `name=KiB` lines (VmRSS at each step), so the parent can attribute memory.
fn mem_probe(kind: &str, n: u64, dir: &Path, cache_mib: u64) -> anyhow::Result<()> {
    let cache = cache_mib << 20;
    let rss = |step: &str| println!("{step}={}", proc_status_kib("self", "VmRSS").unwrap_or(0));
    rss("start");
    match kind {
        "state" => {
            let mut b = Bench::new("10.0.0.0/8", Family::V4, None)?;
            b.fill(n)?;
            rss("end");
            drop(b);
        }
        "sled-write" => {
            // Records made directly (no `State`, whose freed memory would stay in RSS).
            let engine = SledEngine::open(dir, cache)?;
            let mut ops = vec![Op::PutNetwork(Arc::new(NetworkRecord {
                def: network_def("10.0.0.0/8", Some(0)),
                version: 1,
                created_ms: NOW_MS,
                updated_ms: NOW_MS,
            }))];
            for i in 0..n {
                ops.push(Op::PutAlloc(Allocation {
                    network: "bench".into(),
                    pool: "vip".into(),
                    owner: owner(i),
                    addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0A00_0001 + i as u32))],
                    sharing_key: String::new(),
                    ports: vec![],
                    created_ms: NOW_MS,
                    updated_ms: NOW_MS,
                    revision: i + 2,
                }));
                if ops.len() >= 16 {
                    engine.commit(&ops, i + 2)?;
                    ops.clear();
                }
            }
            engine.commit(&ops, n + 2)?;
            rss("end");
        }
        "sled-load" => {
            let engine = SledEngine::open(dir, cache)?;
            rss("open");
            let snap = engine.load()?;
            rss("loaded");
            drop(snap);
            rss("end");
        }
        "ledger" => {
            let engine = Arc::new(SledEngine::open(dir, cache)?);
            let ledger = Ledger::open(engine, 0, Arc::new(NoObserver))?;
            rss("end");
            drop(ledger);
        }
        "load-phases" => {
            // What `Ledger::open` does, timed step by step (microseconds).
            let t = Instant::now();
            let engine = SledEngine::open(dir, cache)?;
            println!("open_us={}", t.elapsed().as_micros());
            let t = Instant::now();
            let snap = engine.load()?;
            println!("scan_us={}", t.elapsed().as_micros());
            rss("loaded");
            let t = Instant::now();
            let st = State::load(snap, 0, NOW_MS, false)?;
            println!("state_us={}", t.elapsed().as_micros());
            rss("end");
            drop(st);
        }
        other => bail!("unknown --mem-probe kind {other:?}"),
    }
    println!("hwm={}", proc_status_kib("self", "VmHWM").unwrap_or(0));
    Ok(())
}

/// Runs `mem_probe` in a child process; returns its `name=KiB` lines.
fn run_probe(
    kind: &str,
    n: u64,
    dir: &Path,
    cache_mib: u64,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--mem-probe", kind, &n.to_string()])
        .arg(dir)
        .arg(cache_mib.to_string())
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("--mem-probe {kind} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        })
        .collect())
}

/// Where the server's memory goes: each component alone, in its own process.
fn rss_breakdown(sz: &Sizes, work: &Path, cache_mib: u64) -> anyhow::Result<()> {
    let n = sz.rss_allocs;
    let built = work.join("probe-built");
    build_store(&built, n)?;
    println!(
        "Components alone, each in a fresh process (the bench binary re-run with `--mem-probe`), \
         {n} allocations, sled cache {cache_mib} MiB; VmHWM is the probe process's peak:"
    );
    println!();
    println!("| component | VmRSS MiB over process start | VmHWM MiB | B per allocation |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, m: &std::collections::BTreeMap<String, u64>, step: &str| {
        let d = m
            .get(step)
            .copied()
            .unwrap_or(0)
            .saturating_sub(m.get("start").copied().unwrap_or(0));
        let hwm = if step == "end" {
            mib(m.get("hwm").copied().unwrap_or(0))
        } else {
            "-".into()
        };
        println!(
            "| {name} | {} | {hwm} | {:.0} |",
            mib(d),
            (d * 1024) as f64 / n as f64
        );
    };
    row(
        "`State` (in-memory ledger: maps + free-range sets)",
        &run_probe("state", n, work, cache_mib)?,
        "end",
    );
    row(
        "sled, after writing them (`SledEngine::commit`, 16 records per batch)",
        &run_probe("sled-write", n, &work.join("probe-write"), cache_mib)?,
        "end",
    );
    let m = run_probe("sled-load", n, &built, cache_mib)?;
    row("sled, opened", &m, "open");
    row("sled, opened + `load()` snapshot held", &m, "loaded");
    row("sled, opened + snapshot loaded and dropped", &m, "end");
    row(
        "`Ledger::open` (sled + `State`, what `serve` does)",
        &run_probe("ledger", n, &built, cache_mib)?,
        "end",
    );
    println!();
    let _ = fs::remove_dir_all(work.join("probe-write"));
    let _ = fs::remove_dir_all(&built);
    Ok(())
}

// ============================================================================================
// Section 8: the fleet
// ============================================================================================

fn fleet_owner(cluster: usize, kind: pb::OwnerKind, name: String) -> pb::Owner {
    pb::Owner {
        cluster_id: format!("c{cluster:04}"),
        kind: kind as i32,
        namespace: if kind == pb::OwnerKind::Service {
            "default".into()
        } else {
            String::new()
        },
        name,
        uid: String::new(),
    }
}

/// What one phase measured.
struct FleetPhase {
    done: u64,
    errors: u64,
    wall: Duration,
    lat: Samples,
}

/// Every cluster at once, each sending its `reqs` one at a time on its own connection.
async fn fleet_phase(clients: &[IpamServiceClient<Channel>], reqs: Vec<Vec<FleetReq>>) -> FleetPhase {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (c, rs) in clients.iter().zip(reqs) {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::with_capacity(rs.len()), 0u64);
            for r in rs {
                let t = Instant::now();
                let ok = match r {
                    FleetReq::Alloc(owner) => c
                        .allocate(pb::AllocateRequest {
                            network: "fleet".into(),
                            owner: Some(owner),
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    FleetReq::Release(owner) => c
                        .release(pb::ReleaseRequest {
                            network: "fleet".into(),
                            owner: Some(owner),
                        })
                        .await
                        .is_ok(),
                };
                lat.push(t.elapsed().as_nanos() as u64);
                errors += u64::from(!ok);
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    FleetPhase {
        done: all.len() as u64,
        errors,
        wall: t.elapsed(),
        lat: Samples::new(all),
    }
}

enum FleetReq {
    Alloc(pb::Owner),
    Release(pb::Owner),
}

async fn bench_fleet(args: &Args, sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    let (nc, ns) = (sz.fleet_clusters, sz.fleet_services);
    println!("## 8. The fleet: {nc} clusters on one store");
    println!();
    let data = work.join("fleet-data");
    fs::create_dir_all(&data)?;
    let mut srv = Server::start(args, &data, &work.join("fleet.log"))?;
    let mut c0 = srv.clients(1).await?.remove(0);
    c0.upsert_network(pb::UpsertNetworkRequest {
        network: Some(pb::Network {
            name: "fleet".into(),
            prefixes: vec!["10.0.0.0/14".into()],
            pools: vec![
                pb::Pool {
                    name: "vip".into(),
                    purpose: pb::PoolPurpose::Vip as i32,
                    ranges: vec!["10.0.0.0/15".into()],
                    ..Default::default()
                },
                pb::Pool {
                    name: "nodes".into(),
                    purpose: pb::PoolPurpose::Node as i32,
                    ranges: vec!["10.2.0.0/16".into()],
                    ..Default::default()
                },
            ],
            reuse_grace_seconds: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    // One connection and one filtered watch per cluster; all synced before any load.
    let clients = srv.clients(nc).await?;
    let delays = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let received = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicU64::new(0));
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::channel::<()>(nc);
    let mut watchers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        let (delays, received, synced_tx) = (delays.clone(), received.clone(), synced_tx.clone());
        let aborted = aborted.clone();
        watchers.push(tokio::spawn(async move {
            let Ok(r) = c
                .watch_allocations(pb::WatchAllocationsRequest {
                    network: "fleet".into(),
                    cluster_id: format!("c{i:04}"),
                })
                .await
            else {
                return;
            };
            let mut stream = r.into_inner();
            loop {
                let ev = match stream.message().await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(s) => {
                        if s.code() == tonic::Code::Aborted {
                            aborted.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                };
                if ev.r#type == pb::WatchEventType::Synced as i32 {
                    let _ = synced_tx.send(()).await;
                } else if ev.r#type == pb::WatchEventType::Added as i32 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    if let Some(ts) = ev.allocation.and_then(|a| a.updated_at) {
                        let at = Duration::new(ts.seconds.max(0) as u64, ts.nanos.max(0) as u32);
                        delays
                            .lock()
                            .unwrap()
                            .push(now.saturating_sub(at).as_nanos() as u64);
                    }
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    drop(synced_tx);
    for _ in 0..nc {
        synced_rx.recv().await.context("a watch ended before SYNCED")?;
    }
    let rss0 = srv.rss_kib();
    let tck = clk_tck();
    println!(
        "One `cairn-ipam serve` (release, sled), network `fleet` (VIP pool 10.0.0.0/15 — 100k VIPs do \
         not fit a /16 — and node pool 10.2.0.0/16, grace 0). {nc} clusters, each with its own \
         HTTP/2 connection and its own WatchAllocations filtered to its cluster (all synced first), \
         send their requests one at a time, all clusters at once ({nc} in flight): first an \
         API-server VIP, 3 node addresses and {ns} Services each, then churn: 30% of each \
         cluster's Services released and as many new ones allocated. Watch delay: the \
         allocation's `updated_at` (set in the transition, before the commit) to the ADDED event \
         arriving at the owning cluster's watch."
    );
    println!();
    println!("| phase | requests | errors | seconds | requests/s | p50 ms | p99 ms | max ms | server CPU |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let fill: Vec<Vec<FleetReq>> = (0..nc)
        .map(|c| {
            let mut v = vec![FleetReq::Alloc(fleet_owner(
                c,
                pb::OwnerKind::ApiServer,
                "api".into(),
            ))];
            v.extend(
                (0..3).map(|n| FleetReq::Alloc(fleet_owner(c, pb::OwnerKind::Node, format!("node-{n}")))),
            );
            v.extend(
                (0..ns).map(|s| FleetReq::Alloc(fleet_owner(c, pb::OwnerKind::Service, format!("svc-{s}")))),
            );
            v
        })
        .collect();
    let churn_n = ns * 3 / 10;
    let churn: Vec<Vec<FleetReq>> = (0..nc)
        .map(|c| {
            let mut v = Vec::new();
            for s in 0..churn_n {
                v.push(FleetReq::Release(fleet_owner(
                    c,
                    pb::OwnerKind::Service,
                    format!("svc-{s}"),
                )));
                v.push(FleetReq::Alloc(fleet_owner(
                    c,
                    pb::OwnerKind::Service,
                    format!("svc-new-{s}"),
                )));
            }
            v
        })
        .collect();
    let mut added_expected = 0u64;
    for (label, reqs) in [("fill", fill), ("30% churn", churn)] {
        added_expected += reqs
            .iter()
            .flatten()
            .filter(|r| matches!(r, FleetReq::Alloc(_)))
            .count() as u64;
        let cpu0 = cpu_secs(&srv.pid, tck);
        let p = fleet_phase(&clients, reqs).await;
        let cpu = cpu_secs(&srv.pid, tck) - cpu0;
        println!(
            "| {label} | {} | {} | {:.1} | {:.0} | {} | {} | {} | {:.0}% |",
            p.done,
            p.errors,
            p.wall.as_secs_f64(),
            p.done as f64 / p.wall.as_secs_f64(),
            ms(p.lat.pct(50.0)),
            ms(p.lat.pct(99.0)),
            ms(p.lat.max()),
            cpu / p.wall.as_secs_f64() * 100.0
        );
    }
    // Every ADDED event reaches its cluster (bounded wait), then the watch figures.
    let t = Instant::now();
    while received.load(Ordering::Relaxed) < added_expected && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = received.load(Ordering::Relaxed);
    let d = Samples::new(std::mem::take(&mut *delays.lock().unwrap()));
    // Duplicates: every address once.
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut dups, mut token) = (0u64, 0u64, String::new());
    loop {
        let page = c0
            .list_allocations(pb::ListAllocationsRequest {
                network: "fleet".into(),
                page_size: 10_000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for a in &page.allocations {
            total += 1;
            for ip in &a.addresses {
                dups += u64::from(!seen.insert(ip.clone()));
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    println!();
    println!(
        "Watch: {got} of {added_expected} ADDED events delivered to their clusters ({} of {nc} \
         watches ended ABORTED for falling behind and were not resumed); delay p50 {} ms, \
         p99 {} ms, max {} ms. Held at the end: {total} allocations, {dups} addresses with two \
         owners. Server VmRSS {} MiB with {nc} connections and watches before the load, {} MiB \
         after (VmHWM {} MiB).",
        aborted.load(Ordering::Relaxed),
        ms(d.pct(50.0)),
        ms(d.pct(99.0)),
        ms(d.max()),
        mib(rss0),
        mib(srv.rss_kib()),
        mib(srv.hwm_kib()),
    );
    println!();
    for w in watchers {
        w.abort();
    }
    srv.stop()?;
    if dups > 0 {
        bail!("{dups} addresses with two owners");
    }
    Ok(())
}

// ============================================================================================
// Section 7: etcd beside sled
// ============================================================================================

/// Waits until a freshly started etcd-backed server leads (its Allocate path is open).
async fn until_serving(srv: &Server, deadline: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        let ch = Channel::from_shared(format!("http://{}", srv.grpc))?
            .connect()
            .await?;
        let r = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "cairn.ipam.v1.IpamService".into(),
            })
            .await;
        if r.is_ok_and(|r| {
            r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > deadline {
            bail!(
                "the etcd-backed server did not lead within {deadline:?}; see {}",
                srv.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn bench_etcd(args: &Args, sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    println!("## 7. etcd beside sled");
    println!();
    let etcd = etcd_cluster::EtcdCluster::start(3, &cairn_ipam::store::etcd::server_flags());
    let endpoints = etcd.endpoints().join(",");
    let dur = Duration::from_secs_f64(args.secs);
    let warm = Duration::from_secs_f64((args.secs / 10.0).min(1.0));
    let tck = clk_tck();
    println!(
        "3 etcd members (`{}`, v3.6, release) on loopback in the work dir's file system, real \
         fsync; each row a fresh `cairn-ipam serve` (release) and a fresh sled data dir or etcd \
         prefix; {:.0} s measured after {:.1} s warm-up; min(N, 4) connections. Rows alternate \
         sled and etcd so drift on the machine hits both.",
        etcd_cluster::etcd_binary().display(),
        dur.as_secs_f64(),
        warm.as_secs_f64()
    );
    println!();
    println!("| in flight | engine | allocs/s | p50 ms | p99 ms | max ms | errors | server CPU | machine |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for inflight in [1usize, 16, 64] {
        for engine in ["sled", "etcd"] {
            let name = format!("etcd-bench-{inflight}-{engine}");
            let data = work.join(&name);
            fs::create_dir_all(&data)?;
            let extra: Vec<String> = if engine == "etcd" {
                vec![
                    "--backend".into(),
                    "etcd".into(),
                    "--etcd-endpoints".into(),
                    endpoints.clone(),
                    "--etcd-prefix".into(),
                    format!("/{name}"),
                ]
            } else {
                vec![]
            };
            let mut srv = Server::start_args(args, &data, &work.join(format!("{name}.log")), None, &extra)?;
            if engine == "etcd" {
                until_serving(&srv, Duration::from_secs(60)).await?;
            }
            let clients = srv.clients(inflight.min(4)).await?;
            upsert(&mut clients[0].clone()).await?;
            let note = wait_quiet(args.quiet);
            let s0 = cpu_secs(&srv.pid, tck);
            let t0 = Instant::now();
            let r = load(&clients, inflight, Arc::new(AtomicU64::new(0)), None, warm, dur).await;
            let wall = t0.elapsed().as_secs_f64();
            let s1 = cpu_secs(&srv.pid, tck);
            println!(
                "| {inflight} | {engine} | {:.0} | {} | {} | {} | {} | {:.0}% | {note} |",
                r.done as f64 / r.elapsed.as_secs_f64(),
                ms(r.lat.pct(50.0)),
                ms(r.lat.pct(99.0)),
                ms(r.lat.max()),
                r.errors,
                (s1 - s0) / wall * 100.0,
            );
            srv.stop()?;
        }
    }
    println!();
    // Takeover at scale: what a new leader does before it serves is load the ledger from etcd.
    let n = sz.web_allocs;
    let mut opts = EtcdOptions::new(etcd.endpoints());
    opts.prefix = "/etcd-bench-takeover".into();
    let engine = EtcdEngine::connect(&opts)?;
    let t = Instant::now();
    write_allocs(&engine, n, 10_000)?;
    let written = t.elapsed();
    drop(engine);
    let data = work.join("etcd-takeover");
    fs::create_dir_all(&data)?;
    let extra = vec![
        "--backend".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        endpoints.clone(),
        "--etcd-prefix".into(),
        "/etcd-bench-takeover".into(),
    ];
    let mut takeovers = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut srv = Server::start_args(args, &data, &work.join("etcd-takeover.log"), None, &extra)?;
        until_serving(&srv, Duration::from_secs(300)).await?;
        takeovers.push(t.elapsed());
        srv.stop()?;
    }
    println!(
        "Takeover with {n} allocations in etcd (written in {:.1} s with the library, 10,000 ops per \
         transaction): spawn → leading and serving in {} (3 starts, each after the previous one's \
         SIGTERM, which resigns the lease; a failover after a crash adds the dead leader's lease).",
        written.as_secs_f64(),
        takeovers
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    bench_follower(args, sz, work, &etcd.endpoints(), &endpoints).await
}

/// A follower with the restart section's allocation count in etcd: spawn → its replica loaded
/// (it answers reads), its memory, and how long a commit of the leader takes to reach it.
async fn bench_follower(
    args: &Args,
    sz: &Sizes,
    work: &Path,
    etcd_endpoints: &[String],
    endpoints: &str,
) -> anyhow::Result<()> {
    let n = sz.restart_allocs;
    let mut opts = EtcdOptions::new(etcd_endpoints.to_vec());
    opts.prefix = "/etcd-bench-follow".into();
    let engine = EtcdEngine::connect(&opts)?;
    let t = Instant::now();
    write_allocs(&engine, n, 10_000)?;
    let written = t.elapsed();
    drop(engine);
    let extra = vec![
        "--backend".into(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        endpoints.to_string(),
        "--etcd-prefix".into(),
        "/etcd-bench-follow".into(),
    ];
    let (ld, fd) = (work.join("etcd-follow-leader"), work.join("etcd-follow-follower"));
    fs::create_dir_all(&ld)?;
    fs::create_dir_all(&fd)?;
    let t = Instant::now();
    let mut leader = Server::start_args(args, &ld, &work.join("etcd-follow.log"), None, &extra)?;
    until_serving(&leader, Duration::from_secs(600)).await?;
    let takeover = t.elapsed();
    let t = Instant::now();
    let mut follower = Server::start_args(args, &fd, &work.join("etcd-follow.log"), None, &extra)?;
    let mut fc = follower.clients(1).await?.remove(0);
    // Reads are refused until the replica is loaded.
    loop {
        if fc.get_usage(pb::GetUsageRequest::default()).await.is_ok() {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "the follower did not load its replica in 600 s; see {}",
                follower.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let loaded = t.elapsed();
    let rss = follower.rss_kib() / 1024;
    let mut lc = leader.clients(1).await?.remove(0);
    let mut delays = Vec::new();
    for i in 0..50 {
        lc.allocate(pb_alloc(n + 10 + i)).await?;
        let acked = Instant::now();
        let get = pb::GetAllocationRequest {
            network: "bench".into(),
            owner: pb_alloc(n + 10 + i).owner,
        };
        while fc.get_allocation(get.clone()).await.is_err() {
            if acked.elapsed() > Duration::from_secs(30) {
                bail!(
                    "a commit did not reach the follower in 30 s; see {}",
                    follower.log.display()
                );
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        delays.push(acked.elapsed().as_nanos() as u64);
    }
    let delays = Samples::new(delays);
    println!(
        "Follower with {n} allocations in etcd (written in {:.1} s with the library): the leader \
         took over in {:.2} s; a second replica went from spawn to its replica loaded (answering \
         reads) in {:.2} s, VmRSS {rss} MiB; a leader's acknowledged Allocate was readable on the \
         follower after p50 {} ms, max {} ms (50 sequential Allocates, polled every 0.2 ms).",
        written.as_secs_f64(),
        takeover.as_secs_f64(),
        loaded.as_secs_f64(),
        ms(delays.pct(50.0)),
        ms(delays.max()),
    );
    println!();
    follower.stop()?;
    leader.stop()?;
    Ok(())
}

// ============================================================================================
// Section 9: a neighbour sending the largest request the limits allow
// ============================================================================================

/// The largest network definition the limits allow: 64 pools of 1,024 ranges (/30s) and 1,024
/// exclusions each, in 172.16.0.0/14; `variant` moves every exclusion, so each upsert is a
/// real change.
fn largest_network(variant: u32) -> pb::Network {
    let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 0));
    let ip = |v: u32| std::net::Ipv4Addr::from(v).to_string();
    pb::Network {
        name: "largest".into(),
        pools: (0..64u32)
            .map(|p| pb::Pool {
                name: format!("pool-{p}"),
                purpose: pb::PoolPurpose::Vip as i32,
                ranges: (0..1024u32)
                    .map(|r| format!("{}/30", ip(base + p * 4096 + r * 4)))
                    .collect(),
                exclusions: (0..1024u32)
                    .map(|r| ip(base + p * 4096 + r * 4 + 1 + variant % 2))
                    .collect(),
                auto_assign: Some(true),
            })
            .collect(),
        reuse_grace_seconds: Some(0),
        ..Default::default()
    }
}

/// Allocate latency at 1 in flight alone, then beside a client sending the largest
/// UpsertNetwork the limits allow in a loop (issue 11's target: p99 ≤ 10 ms beside it).
async fn bench_neighbour(args: &Args, work: &Path) -> anyhow::Result<()> {
    use prost::Message as _;
    println!("## 9. Allocate beside the largest request the limits allow");
    println!();
    let data = work.join("neighbour-data");
    fs::create_dir_all(&data)?;
    let mut srv = Server::start(args, &data, &work.join("neighbour.log"))?;
    let clients = srv.clients(2).await?;
    let mut c = clients[0].clone();
    upsert(&mut c).await?;
    let heavy_req = |v: u32, dry_run: bool| pb::UpsertNetworkRequest {
        network: Some(largest_network(v)),
        expected_version: None,
        dry_run,
    };
    let bytes = heavy_req(0, false).encoded_len();
    let mut h = clients[1].clone();
    let t = Instant::now();
    h.upsert_network(heavy_req(0, false)).await?;
    let first = t.elapsed();
    let dur = Duration::from_secs_f64(args.secs);
    let next = Arc::new(AtomicU64::new(0));
    let quiet = wait_quiet(args.quiet);
    let alone = load(&clients[..1], 1, next.clone(), None, Duration::from_secs(1), dur).await;
    let mut rows = vec![("alone".to_string(), alone)];
    let mut heavies = Vec::new();
    for dry_run in [false, true] {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // On its own thread and runtime: building and encoding 2.2 MB must not delay the
        // measured client's tasks (the benchmark's runtime has one worker by default).
        let heavy = {
            let (stop, mut h) = (stop.clone(), h.clone());
            std::thread::spawn(move || -> anyhow::Result<Samples> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(async move {
                    let mut lat = Vec::new();
                    let mut v = 1;
                    while !stop.load(Ordering::Relaxed) {
                        let req = heavy_req(v, dry_run);
                        let t = Instant::now();
                        if h.upsert_network(req).await.is_ok() {
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                        v += 1;
                    }
                    Samples::new(lat)
                }))
            })
        };
        let beside = load(&clients[..1], 1, next.clone(), None, Duration::from_secs(1), dur).await;
        stop.store(true, Ordering::Relaxed);
        let what = if dry_run {
            "beside the largest UpsertNetwork, `dry_run` (validated, not committed)"
        } else {
            "beside the largest UpsertNetwork (committed)"
        };
        rows.push((what.to_string(), beside));
        let heavy = heavy
            .join()
            .map_err(|_| anyhow::anyhow!("the heavy client's thread panicked"))??;
        heavies.push((what, heavy));
    }
    println!(
        "One `cairn-ipam serve` (release, sled, fdatasync), Allocate for fresh owners at 1 in flight \
         for {} s after 1 s warm-up, alone and then while a second connection sends, in a loop, the \
         largest UpsertNetwork the limits allow: 64 pools × (1,024 ranges + 1,024 exclusions), \
         {:.1} MB encoded, every one a real change (the exclusions move). {quiet}",
        args.secs,
        bytes as f64 / 1e6,
    );
    println!();
    println!("| Allocate | allocs/s | p50 ms | p99 ms | max ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (what, r) in &rows {
        println!(
            "| {what} | {:.0} | {} | {} | {} | {} |",
            r.done as f64 / r.elapsed.as_secs_f64(),
            ms(r.lat.pct(50.0)),
            ms(r.lat.pct(99.0)),
            ms(r.lat.max()),
            r.errors
        );
    }
    println!();
    println!(
        "The largest UpsertNetwork: first (create) {:.1} ms; {}.",
        first.as_secs_f64() * 1e3,
        heavies
            .iter()
            .map(|(what, h)| format!(
                "{what}: {} done, p50 {} ms, max {} ms each",
                h.0.len(),
                ms(h.pct(50.0)),
                ms(h.max())
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!();
    srv.stop()?;
    Ok(())
}

// ============================================================================================
// Section 6: web view
// ============================================================================================

/// One HTTP/1.1 GET on a new connection: status and body.
fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read as _;
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header")?;
    let code = head.split(' ').nth(1).context("no status")?.parse()?;
    Ok((code, body.to_string()))
}

fn bench_web(args: &Args, sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    let n = sz.web_allocs;
    println!("## 6. Web view with {n} allocations");
    println!();
    let data = work.join("web-data");
    build_store(&data, n)?;
    let srv = Server::start(args, &data, &work.join("web-server.log"))?;
    let m = srv.metrics.clone();
    let mid = n / 2;
    let (_, body) = http_get(&m, &format!("/api/v1/allocations?name=svc-{mid}"))?;
    let j: serde_json::Value = serde_json::from_str(&body)?;
    let ip = j["allocations"][0]["addresses"][0]
        .as_str()
        .context("no address")?
        .to_string();
    let key = j["allocations"][0]["key"]
        .as_str()
        .context("no key")?
        .replace('/', "%2F");
    let rows: Vec<(String, String)> = vec![
        ("overview `/ui/`".into(), "/ui/".into()),
        (
            "networks JSON `/api/v1/networks`".into(),
            "/api/v1/networks".into(),
        ),
        (
            "network page `/ui/networks/bench` (first 100 rows)".into(),
            "/ui/networks/bench".into(),
        ),
        (
            "table, a middle page (100 rows, by token)".into(),
            format!("/ui/allocations?page_token={key}"),
        ),
        (
            "JSON, a middle page of 1,000".into(),
            format!("/api/v1/allocations?page_size=1000&page_token={key}"),
        ),
        (
            "who holds an address, JSON".into(),
            format!("/api/v1/addresses/{ip}"),
        ),
        (
            "who holds an address, page `/ui/search`".into(),
            format!("/ui/search?q={ip}"),
        ),
        (
            "table filtered by address (holder index)".into(),
            format!("/ui/allocations?address={ip}"),
        ),
        (
            "one Service by cluster, namespace and name".into(),
            format!("/api/v1/allocations?cluster=bench&namespace=ns&name=svc-{mid}"),
        ),
    ];
    println!("| request | p50 ms | p99 ms | max ms | bytes |");
    println!("|---|---:|---:|---:|---:|");
    for (label, path) in rows {
        let mut bytes = 0;
        for _ in 0..5 {
            let (code, body) = http_get(&m, &path)?;
            if code != 200 {
                bail!("GET {path}: {code}: {body}");
            }
            bytes = body.len();
        }
        let mut v = Vec::with_capacity(sz.web_samples);
        for _ in 0..sz.web_samples {
            let t = Instant::now();
            http_get(&m, &path)?;
            v.push(t.elapsed().as_nanos() as u64);
        }
        let s = Samples::new(v);
        println!(
            "| {label} | {} | {} | {} | {bytes} |",
            ms(s.pct(50.0)),
            ms(s.pct(99.0)),
            ms(s.max())
        );
    }
    // Everything, page after page, as a script exporting through the JSON would.
    let t = Instant::now();
    let (mut token, mut seen, mut pages) = (String::new(), 0usize, 0usize);
    loop {
        let (_, body) = http_get(
            &m,
            &format!("/api/v1/allocations?page_size=1000&page_token={token}"),
        )?;
        let j: serde_json::Value = serde_json::from_str(&body)?;
        seen += j["allocations"].as_array().map_or(0, Vec::len);
        pages += 1;
        token = j["next_page_token"]
            .as_str()
            .unwrap_or_default()
            .replace('/', "%2F");
        if token.is_empty() {
            break;
        }
    }
    if seen as u64 != n {
        bail!("paging saw {seen} allocations, not {n}");
    }
    println!();
    println!(
        "Paging through all {n} in {pages} JSON pages of 1,000: {:.2} s. Server VmRSS after: {} MiB.",
        t.elapsed().as_secs_f64(),
        mib(srv.rss_kib())
    );
    println!();
    drop(srv);
    Ok(())
}

// ============================================================================================
// Section 4: restart
// ============================================================================================

/// Writes `n` allocations to a fresh data dir with the library: `State` computes the records
/// and `SledEngine::commit` stores them in batches, exactly as the server's committer would.
fn build_store(dir: &Path, n: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let engine = SledEngine::open(dir, 32 << 20)?;
    write_allocs(&engine, n, 10_000)?;
    drop(engine);
    Ok(t.elapsed())
}

/// Commits one network and `n` allocations to `engine`, `ops_per_commit` ops at a time.
fn write_allocs(engine: &dyn Engine, n: u64, ops_per_commit: usize) -> anyhow::Result<()> {
    let mut st = State::new(0);
    let (_, mut ops, _) = st.upsert_network(network_def("10.0.0.0/8", Some(0)), None, false, NOW_MS)?;
    st.seq = 1;
    for i in 0..n {
        let seq = st.seq + 1;
        let (_, o, _) = st.allocate(alloc_req(i, Family::V4), seq, NOW_MS)?;
        st.seq = seq;
        ops.extend(o);
        if ops.len() >= ops_per_commit {
            engine.commit(&ops, st.seq)?;
            ops.clear();
        }
    }
    engine.commit(&ops, st.seq)?;
    Ok(())
}

async fn bench_restart(args: &Args, sz: &Sizes, work: &Path) -> anyhow::Result<()> {
    let n = sz.restart_allocs;
    let label = if n == 1_000_000 {
        "1M".to_string()
    } else {
        n.to_string()
    };
    println!("## 4. Restart with {label} allocations");
    println!();
    let data = work.join("restart-data");
    fs::create_dir_all(&data)?;
    let built = build_store(&data, n)?;
    println!(
        "Data dir built in process (library: `State::allocate` records committed with `SledEngine::commit` in batches of 10,000 ops) \
         in {:.1} s; {} MiB on disk. Ready = spawn of `cairn-ipam serve` until its --addr-file exists (serving); \
         load = the server's own `ledger loaded load_ms`.",
        built.as_secs_f64(),
        mib(du_bytes(&data) / 1024)
    );
    println!();
    println!(
        "| start | previous stop | ready s | load s | VmRSS MiB after | VmHWM MiB | others' cores during start |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut notes = Vec::new();
    let log = work.join("restart-server.log");
    let mut prev = "(built by library)".to_string();
    for i in 0..sz.restarts {
        notes.push(format!("start {}: {}", i + 1, wait_quiet(args.quiet)));
        let mut srv = Server::start(args, &data, &log)?;
        println!(
            "| {} | {prev} | {:.2} | {} | {} | {} | {:.2} |",
            i + 1,
            srv.ready.as_secs_f64(),
            srv.load_ms()
                .map_or("?".into(), |v| format!("{:.2}", v as f64 / 1e3)),
            mib(srv.rss_kib()),
            mib(srv.hwm_kib()),
            srv.others,
        );
        srv.stop()?;
        prev = "SIGTERM".into();
    }
    // A crash: write through gRPC, then SIGKILL, then start again.
    {
        let mut srv = Server::start(args, &data, &log)?;
        let clients = srv.clients(4).await?;
        let next = Arc::new(AtomicU64::new(n));
        load(&clients, 64, next, Some(1_000), Duration::ZERO, Duration::ZERO).await;
        drop(clients);
        srv.kill9()?;
    }
    notes.push(format!("start {}: {}", sz.restarts + 1, wait_quiet(args.quiet)));
    let mut srv = Server::start(args, &data, &log)?;
    println!(
        "| {} | SIGKILL after 1,000 more Allocates | {:.2} | {} | {} | {} | {:.2} |",
        sz.restarts + 1,
        srv.ready.as_secs_f64(),
        srv.load_ms()
            .map_or("?".into(), |v| format!("{:.2}", v as f64 / 1e3)),
        mib(srv.rss_kib()),
        mib(srv.hwm_kib()),
        srv.others,
    );
    srv.stop()?;
    println!();
    for n in notes.iter().filter(|n| !n.ends_with(": ")) {
        println!("- {n}");
    }
    println!();
    let m = run_probe("load-phases", n, &data, args.cache_mib.unwrap_or(32))?;
    let secs = |k: &str| m.get(k).map_or(0.0, |v| *v as f64 / 1e6);
    println!(
        "Load phases, in a fresh process on the same data dir: `SledEngine::open` {:.2} s, \
         `Engine::load` (scan + decode into a `Snapshot`) {:.2} s, `State::load` (rebuild maps and free sets) {:.2} s; \
         VmRSS {} MiB with the snapshot, {} MiB after `State::load`, peak {} MiB.",
        secs("open_us"),
        secs("scan_us"),
        secs("state_us"),
        mib(m.get("loaded").copied().unwrap_or(0)),
        mib(m.get("end").copied().unwrap_or(0)),
        mib(m.get("hwm").copied().unwrap_or(0)),
    );
    println!();
    Ok(())
}

// ============================================================================================

fn main() -> anyhow::Result<()> {
    {
        let a: Vec<String> = std::env::args().collect();
        if a.len() == 6 && a[1] == "--mem-probe" {
            return mem_probe(&a[2], a[3].parse()?, Path::new(&a[4]), a[5].parse()?);
        }
    }
    let args = Args::parse()?;
    let sz = Sizes::of(args.quick);
    let work = match &args.dir {
        Some(d) => {
            fs::create_dir_all(d)?;
            tempfile::Builder::new().prefix("cairn-bench-").tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("cairn-bench-").tempdir()?,
    };
    let work_path = work.path().to_path_buf();
    // Removed on exit unless --keep.
    let _cleanup = if args.keep {
        eprintln!("keeping {}", work.keep().display());
        None
    } else {
        Some(work)
    };
    print_env(&work_path, &args);
    println!("{}\n", loadavg());
    let started = Instant::now();
    if args.want("alloc") {
        bench_alloc(&sz)?;
        println!("{}\n", loadavg());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    if args.want("grpc") || args.want("engine") {
        rt.block_on(bench_grpc(&args, &sz, &work_path))?;
        println!("{}\n", loadavg());
    }
    if args.want("rss") {
        rt.block_on(bench_rss(&args, &sz, &work_path))?;
        println!("{}\n", loadavg());
    }
    if args.want("restart") {
        rt.block_on(bench_restart(&args, &sz, &work_path))?;
        println!("{}\n", loadavg());
    }
    if args.want("mtls") {
        rt.block_on(bench_mtls(&args, &work_path))?;
        println!("{}\n", loadavg());
    }
    if args.want("web") {
        bench_web(&args, &sz, &work_path)?;
        println!("{}\n", loadavg());
    }
    if args.want("etcd") {
        rt.block_on(bench_etcd(&args, &sz, &work_path))?;
        println!("{}\n", loadavg());
    }
    if args.want("fleet") {
        rt.block_on(bench_fleet(&args, &sz, &work_path))?;
        println!("{}\n", loadavg());
    }
    if args.want("neighbour") {
        rt.block_on(bench_neighbour(&args, &work_path))?;
        println!("{}\n", loadavg());
    }
    println!("(total {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}
