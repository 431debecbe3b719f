//! Controller benchmark: bursts of `type: LoadBalancer` Services on a real control plane (etcd +
//! kube-apiserver from `e2e/tools/build.sh`) served by a real `cairn-ipam` + `cairn-ccm`, and the
//! same bursts served by the MetalLB controller and kube-vip-cloud-provider as peers. Printed
//! figures, not timed tests (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p cairn-ccm --bench burst              # full run: Cairn + every built peer
//! cargo bench -p cairn-ccm --bench burst -- --quick   # smoke: Cairn only, 5 singles, bursts of 20
//! cargo test -p cairn-ccm --bench burst -- --quick    # the same in the debug profile (CI)
//! e2e/tools/build.sh metallb && e2e/tools/build.sh kube-vip-cloud-provider   # the peers
//! ```
//!
//! Every (system, scenario) pair gets a fresh control plane, store and controller. Scenarios:
//! - `single`: one Service at a time on an idle controller, create→ingress, `--singles` times;
//! - `burst`: `--sizes` Services created `--inflight` at a time; time until all are assigned,
//!   per-Service create→ingress p50/p99, also counted from the create call's return;
//! - `backlog`: the `--sizes` Services exist before the controller starts (a restart, a
//!   fail-over, a migration), so only the controller's throughput counts: spawn → all assigned.
//!
//! "Assigned" is observed by one watch on Services, never by polling each: an ingress IP for
//! Cairn and MetalLB, the `kube-vip.io/loadbalancerIPs` annotation for kube-vip-cloud-provider
//! (its node daemon, not run here, writes the ingress). The controller's API requests are
//! counted from the apiserver's audit log: the controller runs as its own ServiceAccount, and
//! `apiserver_request_total` has no client label.
//!
//! Flags: `--quick`, `--systems cairn,metallb,kube-vip` (default: Cairn + the built peers;
//! Cairn only with --quick), `--scenarios single,burst,backlog`, `--sizes 1000,5000`,
//! `--singles 50`, `--inflight 32`, `--deadline S` (per burst; default 60 + N/10 s, at most
//! 120 s for kube-vip),
//! `--ccm-arg ARG` (repeatable, appended to cairn-ccm's flags), `--kube-vip-arg ARG`
//! (repeatable, e.g. `--concurrent-service-syncs=16`; default: as shipped), `--ccm-bin PATH`,
//! `--ipam-bin PATH` (default: `cargo build -p cairn-ipam` in this benchmark's profile),
//! `--wait-quiet S` (before each measured phase, wait up to S s until the rest of the machine
//! uses < 0.3 cores; default 20, 0 with --quick), `--json PATH`, `--keep`.
//!
//! `--fleet N [--fleet-services S]` runs only the fleet instead: one store, N control planes
//! each with its own `cairn-ccm` bound to one network the cloud defined, S Services created in
//! every cluster at once (needs `CAIRN_E2E_MAX_PLANES` ≥ N; `make bench` runs N = 8).
//!
//! Peers bind wildcard addresses they cannot be told otherwise (MetalLB's metrics and health
//! servers), so whenever a peer runs, the whole benchmark re-executes itself in a private
//! network namespace (`unshare --net`) whose only interface is loopback.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use cairn_e2e::{ControlPlane, Options, bin_dir, eventually, workspace_root};
use futures::{StreamExt, stream};
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Node, Pod, Service},
        rbac::v1::ClusterRoleBinding,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::sync::Notify;

/// Namespace of the measured Services.
const NS: &str = "bench";
/// The VIP range every system gets: 8,192 addresses.
const RANGE: &str = "10.20.0.0-10.20.31.255";
const RANGE_FIRST: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 0);
const RANGE_LAST: Ipv4Addr = Ipv4Addr::new(10, 20, 31, 255);
/// The controllers' identity (audited; the bench itself is the admin user, not audited).
const CTL_NS: &str = "kube-system";
const CTL_SA: &str = "lb-controller";
const METALLB_NS: &str = "metallb-system";
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: [\"system:serviceaccount:kube-system:lb-controller\"]
- level: None
";

// ============================================================================================
// Options
// ============================================================================================

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Cairn,
    MetalLb,
    KubeVip,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Cairn => "Cairn",
            System::MetalLb => "MetalLB",
            System::KubeVip => "kube-vip-cloud-provider",
        }
    }
    fn key(self) -> &'static str {
        match self {
            System::Cairn => "cairn",
            System::MetalLb => "metallb",
            System::KubeVip => "kube-vip",
        }
    }
    /// Component name of the controller process in the control plane.
    fn component(self) -> &'static str {
        match self {
            System::Cairn => "cairn-ccm",
            System::MetalLb => "metallb-controller",
            System::KubeVip => "kube-vip-ccm",
        }
    }
    /// The binary a peer needs in the tools dir, and the build.sh target that makes it.
    fn peer_binary(self) -> Option<(&'static str, &'static str)> {
        match self {
            System::Cairn => None,
            System::MetalLb => Some(("metallb-controller", "metallb")),
            System::KubeVip => Some(("kube-vip-cloud-provider", "kube-vip-cloud-provider")),
        }
    }
}

struct Args {
    quick: bool,
    systems: Vec<System>,
    scenarios: Vec<String>,
    sizes: Vec<usize>,
    singles: usize,
    inflight: usize,
    deadline: Option<Duration>,
    ccm_args: Vec<String>,
    kube_vip_args: Vec<String>,
    ccm_bin: PathBuf,
    ipam_bin: Option<PathBuf>,
    quiet: Duration,
    json: Option<PathBuf>,
    keep: bool,
    /// `--fleet N`: N control planes with their controllers on one store (see `fleet`).
    fleet: usize,
    /// `--fleet-services S`: Services per cluster of the fleet run.
    fleet_services: usize,
    raw: Vec<String>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let mut a = Args {
            quick: false,
            systems: vec![],
            scenarios: vec![],
            sizes: vec![],
            singles: 0,
            inflight: 32,
            deadline: None,
            ccm_args: vec![],
            kube_vip_args: vec![],
            ccm_bin: PathBuf::from(env!("CARGO_BIN_EXE_cairn-ccm")),
            ipam_bin: None,
            quiet: Duration::MAX,
            json: None,
            keep: false,
            fleet: 0,
            fleet_services: 100,
            raw: raw.clone(),
        };
        let mut systems: Option<String> = None;
        // `--flag=value` is `--flag value`.
        let split: Vec<String> = raw
            .into_iter()
            .flat_map(|a| match a.split_once('=') {
                Some((k, v)) if k.starts_with("--") => vec![k.to_string(), v.to_string()],
                _ => vec![a],
            })
            .collect();
        let mut it = split.into_iter();
        while let Some(arg) = it.next() {
            let mut val = || it.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--quick" => a.quick = true,
                "--systems" => systems = Some(val()?),
                "--scenarios" => a.scenarios = val()?.split(',').map(str::to_string).collect(),
                "--sizes" => {
                    a.sizes = val()?
                        .split(',')
                        .map(|s| s.trim().parse().context("--sizes"))
                        .collect::<anyhow::Result<_>>()?
                }
                "--singles" => a.singles = val()?.parse()?,
                "--inflight" => a.inflight = val()?.parse()?,
                "--deadline" => a.deadline = Some(Duration::from_secs_f64(val()?.parse()?)),
                "--ccm-arg" => a.ccm_args.push(val()?),
                "--kube-vip-arg" => a.kube_vip_args.push(val()?),
                "--ccm-bin" => a.ccm_bin = PathBuf::from(val()?),
                "--ipam-bin" => a.ipam_bin = Some(PathBuf::from(val()?)),
                "--wait-quiet" => a.quiet = Duration::from_secs_f64(val()?.parse()?),
                "--json" => a.json = Some(PathBuf::from(val()?)),
                "--keep" => a.keep = true,
                "--fleet" => a.fleet = val()?.parse().context("--fleet")?,
                "--fleet-services" => a.fleet_services = val()?.parse().context("--fleet-services")?,
                // Passed by `cargo bench`.
                "--bench" => {}
                "-h" | "--help" => {
                    let doc: Vec<&str> = include_str!("burst.rs")
                        .lines()
                        .take_while(|l| l.starts_with("//!"))
                        .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
                        .collect();
                    println!("{}", doc.join("\n"));
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        if a.scenarios.is_empty() {
            a.scenarios = vec!["single".into(), "burst".into(), "backlog".into()];
        }
        if a.sizes.is_empty() {
            a.sizes = if a.quick { vec![20] } else { vec![1000, 5000] };
        }
        if a.singles == 0 {
            a.singles = if a.quick { 5 } else { 50 };
        }
        if a.quiet == Duration::MAX {
            a.quiet = if a.quick {
                Duration::ZERO
            } else {
                Duration::from_secs(20)
            };
        }
        a.systems = match systems.as_deref() {
            Some(list) => list
                .split(',')
                .map(|s| match s.trim() {
                    "cairn" => Ok(System::Cairn),
                    "metallb" => Ok(System::MetalLb),
                    "kube-vip" | "kube-vip-cloud-provider" => Ok(System::KubeVip),
                    other => bail!("--systems: unknown {other:?} (cairn, metallb, kube-vip)"),
                })
                .collect::<anyhow::Result<_>>()?,
            None if a.quick => vec![System::Cairn],
            None => {
                let mut v = vec![System::Cairn];
                for p in [System::MetalLb, System::KubeVip] {
                    let (bin, target) = p.peer_binary().unwrap();
                    if cairn_e2e::binary_path(bin).is_ok() {
                        v.push(p);
                    } else {
                        println!(
                            "{} skipped: no {bin} in {} (build it with `e2e/tools/build.sh {target}`)",
                            p.label(),
                            bin_dir().display()
                        );
                    }
                }
                v
            }
        };
        Ok(a)
    }

    fn peers(&self) -> bool {
        self.systems.iter().any(|s| *s != System::Cairn)
    }

    /// How long a burst may take. kube-vip-cloud-provider assigns ~1.25 Services/s whatever
    /// the load (its provider's client is held to client-go's default 5 requests/s), so its
    /// runs stop at 120 s by default and report how many it assigned.
    fn deadline(&self, n: usize, system: System) -> Duration {
        let d = self
            .deadline
            .unwrap_or_else(|| Duration::from_secs(60) + Duration::from_millis(100 * n as u64));
        if system == System::KubeVip && self.deadline.is_none() {
            d.min(Duration::from_secs(120))
        } else {
            d
        }
    }
}

// ============================================================================================
// Small helpers: percentiles, /proc
// ============================================================================================

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1e3;
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
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

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32, tck: f64) -> f64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(14) + t(15)) / tck
}

/// CPU seconds the whole machine has been busy (all cores; not idle, not iowait).
fn machine_busy_secs(tck: f64) -> f64 {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(l) = s.lines().next() else { return 0.0 };
    let v: Vec<f64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle) / tck
}

fn loadavg() -> String {
    let l = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// CPU use of this benchmark's processes (the bench itself and every component of the plane)
/// and of the whole machine, to tell our load from other work on the machine.
struct CpuMark {
    at: Instant,
    machine: f64,
    per: BTreeMap<String, f64>,
}

impl CpuMark {
    fn take(cp: &ControlPlane, tck: f64) -> Self {
        let mut per = BTreeMap::new();
        for p in cp.processes() {
            per.insert(p.name.clone(), cpu_secs(p.pid, tck));
        }
        per.insert("bench".into(), cpu_secs(std::process::id(), tck));
        CpuMark {
            at: Instant::now(),
            machine: machine_busy_secs(tck),
            per,
        }
    }

    /// (CPU seconds per process, cores used by the rest of the machine) since `before`.
    fn since(&self, before: &CpuMark) -> (BTreeMap<String, f64>, f64) {
        let per: BTreeMap<String, f64> = self
            .per
            .iter()
            .map(|(k, v)| (k.clone(), v - before.per.get(k).copied().unwrap_or(0.0)))
            .collect();
        let ours: f64 = per.values().sum();
        let wall = (self.at - before.at).as_secs_f64().max(1e-3);
        let others = ((self.machine - before.machine - ours) / wall).max(0.0);
        (per, others)
    }
}

/// Waits (at most `max`) until the rest of the machine uses under 0.3 cores over 2 s.
async fn wait_quiet(cp: &ControlPlane, max: Duration, tck: f64) -> String {
    if max.is_zero() {
        return String::new();
    }
    let t = Instant::now();
    loop {
        let a = CpuMark::take(cp, tck);
        // A measurement window, not a synchronisation.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (_, others) = CpuMark::take(cp, tck).since(&a);
        if others < 0.3 {
            return format!(
                "quiet after {:.0} s ({others:.2} cores busy elsewhere)",
                t.elapsed().as_secs_f64()
            );
        }
        if t.elapsed() >= max {
            return format!(
                "NOT quiet after {:.0} s ({others:.2} cores busy elsewhere); measured anyway",
                t.elapsed().as_secs_f64()
            );
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ============================================================================================
// Observing ingress: one watch on the bench namespace
// ============================================================================================

#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    /// When the create call returned.
    acked: HashMap<String, Instant>,
    first_ingress: HashMap<String, Instant>,
    ips: HashMap<String, Vec<String>>,
    /// Services whose ingress changed after it was first set.
    moved: HashSet<String>,
    synced: bool,
}

struct Tracker {
    system: System,
    seen: Mutex<Seen>,
    changed: Notify,
}

/// The addresses an implementation has assigned a Service. Cairn and MetalLB write
/// `status.loadBalancer.ingress`; kube-vip-cloud-provider only writes the annotation
/// `kube-vip.io/loadbalancerIPs` (and `spec.loadBalancerIP`): the kube-vip daemon on the nodes
/// writes the ingress once it announces the address, and no such daemon runs here.
fn assigned_ips(system: System, svc: &Service) -> Vec<String> {
    match system {
        System::KubeVip => svc
            .annotations()
            .get("kube-vip.io/loadbalancerIPs")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        _ => cairn_ccm::service::ingress_ips(svc),
    }
}

impl Tracker {
    fn new(system: System) -> Self {
        Tracker {
            system,
            seen: Mutex::default(),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, svc: &Service) {
        let ips = assigned_ips(self.system, svc);
        let now = Instant::now();
        let name = svc.name_any();
        let mut s = self.lock();
        if !ips.is_empty() {
            s.first_ingress.entry(name.clone()).or_insert(now);
        }
        if let Some(old) = s.ips.get(&name)
            && !old.is_empty()
            && *old != ips
        {
            s.moved.insert(name.clone());
        }
        s.ips.insert(name, ips);
        drop(s);
        self.changed.notify_waiters();
    }

    /// Waits until `done(seen)` holds or the deadline passes; returns whether it held.
    async fn wait(&self, deadline: Instant, done: impl Fn(&Seen) -> bool) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.lock()) {
                return true;
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                return done(&self.lock());
            }
        }
    }
}

fn spawn_watch(client: Client, tracker: Arc<Tracker>) -> tokio::task::JoinHandle<()> {
    let api: Api<Service> = Api::namespaced(client, NS);
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => tracker.observe(&s),
                Ok(watcher::Event::InitDone) => {
                    tracker.lock().synced = true;
                    tracker.changed.notify_waiters();
                }
                Ok(_) => {}
                Err(e) => eprintln!("bench watch: {e}"),
            }
        }
    })
}

// ============================================================================================
// The audit log: requests of the controller's identity
// ============================================================================================

#[derive(Default, Debug, Clone)]
struct Requests {
    total: u64,
    errors: u64,
    conflicts: u64,
    by_kind: BTreeMap<String, u64>,
}

impl Requests {
    fn writes(&self) -> u64 {
        self.by_kind
            .iter()
            .filter(|(k, _)| {
                ["create", "update", "patch", "delete"]
                    .iter()
                    .any(|v| k.starts_with(v))
            })
            .map(|(_, n)| n)
            .sum()
    }

    fn top(&self, n: usize) -> String {
        let mut v: Vec<_> = self.by_kind.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.iter()
            .take(n)
            .map(|(k, c)| format!("{k} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Counts distinct audited requests in `path` from byte `from` on.
fn audit_since(path: &Path, from: u64) -> anyhow::Result<Requests> {
    let bytes = fs::read(path).with_context(|| format!("audit log {}", path.display()))?;
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    let mut ids = HashSet::new();
    let mut r = Requests::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let id = v["auditID"].as_str().unwrap_or_default().to_string();
        if !ids.insert(id) {
            continue;
        }
        let verb = v["verb"].as_str().unwrap_or("?");
        let o = &v["objectRef"];
        let mut res = o["resource"].as_str().unwrap_or("-").to_string();
        if let Some(sub) = o["subresource"].as_str() {
            res = format!("{res}/{sub}");
        }
        r.total += 1;
        *r.by_kind.entry(format!("{verb} {res}")).or_default() += 1;
        let code = v["responseStatus"]["code"].as_u64().unwrap_or(0);
        if code >= 400 {
            r.errors += 1;
        }
        if code == 409 {
            r.conflicts += 1;
        }
    }
    Ok(r)
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Waits (bounded) until the audit log stops growing for 3 s: the controller is done.
async fn quiesce(audit: &Path, max: Duration) -> Duration {
    let t = Instant::now();
    let mut last = file_len(audit);
    let mut stable_since = Instant::now();
    while t.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = file_len(audit);
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_secs(3) {
            break;
        }
    }
    t.elapsed()
}

// ============================================================================================
// A control plane with one LB implementation
// ============================================================================================

struct Bed {
    system: System,
    cp: ControlPlane,
    client: Client,
    audit: PathBuf,
    tracker: Arc<Tracker>,
    watch: tokio::task::JoinHandle<()>,
    startup: Duration,
    version: String,
    /// The controller's command until it is spawned.
    controller: Option<Command>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

async fn wait_crd(client: &Client, name: &str) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    eventually(
        &format!("CRD {name} established"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let c = api.get(name).await.map_err(|e| e.to_string())?;
                let ok = c
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if ok {
                    Ok(())
                } else {
                    Err("not established".to_string())
                }
            }
        },
    )
    .await?;
    Ok(())
}

async fn install_crd_file(client: &Client, path: &Path) -> anyhow::Result<String> {
    let crd: CustomResourceDefinition =
        serde_yaml_ng::from_str(&fs::read_to_string(path).with_context(|| path.display().to_string())?)
            .with_context(|| path.display().to_string())?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.create(&PostParams::default(), &crd)
        .await
        .with_context(|| format!("create CRD {name}"))?;
    Ok(name)
}

/// Waits until a newly established kind is served (discovery lags `Established` a little).
async fn wait_served(client: &Client, ar: &ApiResource, ns: &str) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    eventually(&format!("{} served", ar.kind), Duration::from_secs(60), || {
        let api = api.clone();
        async move { api.list(&ListParams::default().limit(1)).await.map(drop) }
    })
    .await?;
    Ok(())
}

fn lb_service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": NS },
        "spec": {
            "type": "LoadBalancer",
            // 5,000 Services would exhaust the 2,768 NodePorts; no implementation here needs them.
            "allocateLoadBalancerNodePorts": false,
            "selector": { "app": name },
            "ports": [ { "port": 80, "protocol": "TCP" } ],
        },
    }))
    .unwrap()
}

impl Bed {
    /// A fresh plane set up for `system`; its controller runs (and has served a warm-up
    /// Service) unless `idle`, in which case [`Bed::spawn_controller`] starts it.
    async fn start(
        args: &Args,
        ipam_bin: &Path,
        system: System,
        label: &str,
        work: &Path,
        idle: bool,
        shared: Option<&Shared>,
    ) -> anyhow::Result<Bed> {
        let dir = work.join(label);
        fs::create_dir_all(&dir)?;
        let policy = dir.join("audit-policy.yaml");
        fs::write(&policy, AUDIT_POLICY)?;
        let audit = dir.join("audit.log");
        let opts = Options::default()
            .name(label)
            .apiserver_arg(format!("--audit-policy-file={}", policy.display()))
            .apiserver_arg(format!("--audit-log-path={}", audit.display()));
        let cp = ControlPlane::start_with(opts).await?;
        let client = cp.client()?;
        let t = Instant::now();

        // The controllers' own identity: cluster-admin, audited.
        let token = cp.service_account_token(CTL_NS, CTL_SA).await?;
        let crb: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": { "name": "lb-controller-admin" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin" },
            "subjects": [ { "kind": "ServiceAccount", "name": CTL_SA, "namespace": CTL_NS } ],
        }))?;
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(&PostParams::default(), &crb)
            .await?;
        let sa_client = cp.client_for_token(&token)?;
        eventually("controller identity authorised", Duration::from_secs(30), || {
            let api: Api<Service> = Api::all(sa_client.clone());
            async move { api.list(&ListParams::default().limit(1)).await.map(drop) }
        })
        .await?;
        let kubeconfig = cp.write_kubeconfig_for_token("controller.kubeconfig", &token)?;

        cp.ensure_namespace(NS).await?;
        // One Ready Node, so node-aware implementations see somewhere to send traffic.
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": "bench-node" },
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        nodes
            .patch_status(
                "bench-node",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": {
                    "conditions": [ { "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "bench" } ],
                    "addresses": [ { "type": "InternalIP", "address": "127.0.0.2" } ],
                } })),
            )
            .await?;

        let (version, controller) = match system {
            System::Cairn => {
                Self::start_cairn(args, ipam_bin, &cp, &client, &kubeconfig, &dir, shared).await?
            }
            System::MetalLb => Self::start_metallb(&cp, &client, &kubeconfig).await?,
            System::KubeVip => Self::start_kube_vip(args, &client, &kubeconfig, &dir).await?,
        };

        let tracker = Arc::new(Tracker::new(system));
        let watch = spawn_watch(client.clone(), tracker.clone());
        let mut bed = Bed {
            system,
            cp,
            client,
            audit,
            tracker,
            watch,
            startup: Duration::ZERO,
            version,
            controller: Some(controller),
        };
        // Synced watch, then one Service through end to end: the controller is up.
        let ok = bed
            .tracker
            .wait(Instant::now() + Duration::from_secs(60), |s| s.synced)
            .await;
        anyhow::ensure!(ok, "the bench's Service watch did not sync");
        if idle {
            return Ok(bed);
        }
        bed.spawn_controller()?;
        bed.create("warmup").await?;
        let ok = bed
            .tracker
            .wait(Instant::now() + Duration::from_secs(180), |s| {
                s.first_ingress.contains_key("warmup")
            })
            .await;
        if !ok {
            bed.cp.dump_logs();
            bail!(
                "{}: the warm-up Service got no ingress IP in 180 s",
                system.label()
            );
        }
        bed.startup = t.elapsed();
        Ok(bed)
    }

    async fn start_cairn(
        args: &Args,
        ipam_bin: &Path,
        cp: &ControlPlane,
        client: &Client,
        kubeconfig: &Path,
        dir: &Path,
        shared: Option<&Shared>,
    ) -> anyhow::Result<(String, Command)> {
        let crd = install_crd_file(
            client,
            &workspace_root().join("manifests/crds/clusternetworks.cairn.dev.yaml"),
        )
        .await?;
        wait_crd(client, &crd).await?;
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("cairn.dev", "v1alpha1", "ClusterNetwork"));
        let cns: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        eventually("ClusterNetwork served", Duration::from_secs(60), || {
            let cns = cns.clone();
            async move { cns.list(&ListParams::default().limit(1)).await.map(drop) }
        })
        .await?;

        let (grpc, cluster_id) = match shared {
            // A fleet member: the network is the store's (defined by the cloud); this cluster
            // binds to it.
            Some(sh) => (sh.grpc.clone(), sh.cluster_id.clone()),
            None => (spawn_store(cp, ipam_bin, dir).await?, "bench".to_string()),
        };
        let spec = if shared.is_some() {
            json!({ "network": "bench-net" })
        } else {
            json!({
                "network": "bench-net",
                "reuseGraceSeconds": 0,
                "pools": [
                    { "name": "vip", "purpose": "VIP", "ranges": [RANGE] },
                    { "name": "nodes", "purpose": "NODE", "ranges": ["10.21.0.0/24"] },
                ],
            })
        };
        let cn: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cairn.dev/v1alpha1",
            "kind": "ClusterNetwork",
            "metadata": { "name": "bench-net" },
            "spec": spec,
        }))?;
        cns.create(&PostParams::default(), &cn).await?;

        let mut ccm = Command::new(&args.ccm_bin);
        ccm.arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--cluster-id",
                &cluster_id,
                "--ipam-endpoint",
                &format!("http://{grpc}"),
            ])
            .args(["--metrics-listen", "127.0.0.1:0", "--leader-elect", "false"])
            .args(&args.ccm_args)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_CCM_LOG").unwrap_or_else(|_| "info".into()),
            );
        let v = Command::new(&args.ccm_bin).arg("--version").output()?;
        Ok((String::from_utf8_lossy(&v.stdout).trim().to_string(), ccm))
    }

    async fn start_metallb(
        cp: &ControlPlane,
        client: &Client,
        kubeconfig: &Path,
    ) -> anyhow::Result<(String, Command)> {
        let crds = bin_dir().join("metallb-crds");
        let mut files: Vec<PathBuf> = fs::read_dir(&crds)
            .with_context(|| format!("{} (run e2e/tools/build.sh metallb)", crds.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let mut names = vec![];
        for f in &files {
            names.push(install_crd_file(client, f).await?);
        }
        for n in &names {
            wait_crd(client, n).await?;
        }
        cp.ensure_namespace(METALLB_NS).await?;
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("metallb.io", "v1beta1", "IPAddressPool"));
        wait_served(client, &ar, METALLB_NS).await?;
        // The controller reads its own Pod at start-up (owner references); no kubelet runs it.
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "controller", "namespace": METALLB_NS },
            "spec": { "containers": [ { "name": "controller", "image": "quay.io/metallb/controller:v0.16.1" } ] },
        }))?;
        Api::<Pod>::namespaced(client.clone(), METALLB_NS)
            .create(&PostParams::default(), &pod)
            .await?;
        let pool: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "metallb.io/v1beta1",
            "kind": "IPAddressPool",
            "metadata": { "name": "bench-pool", "namespace": METALLB_NS },
            "spec": { "addresses": [RANGE] },
        }))?;
        Api::<DynamicObject>::namespaced_with(client.clone(), METALLB_NS, &ar)
            .create(&PostParams::default(), &pool)
            .await?;

        let bin = cairn_e2e::binary_path("metallb-controller")?;
        let mut cmd = Command::new(&bin);
        cmd.env("KUBECONFIG", kubeconfig)
            .arg(format!("--namespace={METALLB_NS}"))
            .arg("--webhook-mode=disabled")
            .arg("--disable-cert-rotation")
            .arg("--pod-name=controller")
            .arg(format!("--port={}", free_port()?))
            .arg(format!("--health-probe-port={}", free_port()?))
            .arg("--log-level=info");
        let v = fs::read_link(&bin)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok((v, cmd))
    }

    async fn start_kube_vip(
        args: &Args,
        client: &Client,
        kubeconfig: &Path,
        dir: &Path,
    ) -> anyhow::Result<(String, Command)> {
        let cm: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "kubevip", "namespace": "kube-system" },
            "data": { "range-global": RANGE },
        }))?;
        Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
            .create(&PostParams::default(), &cm)
            .await?;
        // With --OutSideCluster its provider reads $HOME/.kube/config, hard-coded.
        let home = dir.join("kube-vip-home");
        fs::create_dir_all(home.join(".kube"))?;
        fs::copy(kubeconfig, home.join(".kube/config"))?;
        let bin = cairn_e2e::binary_path("kube-vip-cloud-provider")?;
        let mut cmd = Command::new(&bin);
        cmd.env("HOME", &home)
            .arg("--OutSideCluster=true")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .arg("--webhook-secure-port=0")
            .arg("--bind-address=127.0.0.1");
        cmd.args(&args.kube_vip_args);
        let v = fs::read_link(&bin)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok((v, cmd))
    }

    fn spawn_controller(&mut self) -> anyhow::Result<()> {
        let cmd = self.controller.take().context("controller already spawned")?;
        self.cp.spawn(self.system.component(), &cmd)?;
        Ok(())
    }

    async fn create(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), NS);
        self.tracker
            .lock()
            .created
            .insert(name.to_string(), Instant::now());
        api.create(&PostParams::default(), &lb_service(name))
            .await
            .with_context(|| format!("create Service {name}"))?;
        self.tracker.lock().acked.insert(name.to_string(), Instant::now());
        Ok(())
    }

    fn pid(&self, component: &str) -> Option<u32> {
        self.cp.pid(component)
    }
}

// ============================================================================================
// Scenarios
// ============================================================================================

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    system: String,
    scenario: String,
    services: usize,
    assigned: usize,
    /// First create sent → last ingress seen (burst), or the sum of singles.
    all_assigned_s: Option<f64>,
    create_phase_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Create call returned → ingress seen (excludes the apiserver's create latency).
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    /// The create call itself.
    post_p50_ms: f64,
    requests: u64,
    writes: u64,
    errors: u64,
    conflicts: u64,
    request_kinds: String,
    rss_idle_mib: f64,
    rss_end_mib: f64,
    rss_peak_mib: f64,
    store_rss_end_mib: Option<f64>,
    cpu_s: BTreeMap<String, f64>,
    others_cores: f64,
    duplicates: usize,
    out_of_range: usize,
    moved: usize,
    startup_s: f64,
    quiet_note: String,
    loadavg: String,
    version: String,
}

impl Row {
    fn per_svc(&self, v: u64) -> f64 {
        v as f64 / self.services.max(1) as f64
    }
}

fn check_ips(seen: &Seen, names: &[String]) -> (usize, usize, usize) {
    let mut owners: HashMap<&str, usize> = HashMap::new();
    let mut out = 0;
    let mut assigned = 0;
    for n in names {
        let ips = seen.ips.get(n).map(Vec::as_slice).unwrap_or_default();
        if ips.len() == 1 {
            assigned += 1;
        }
        for ip in ips {
            *owners.entry(ip.as_str()).or_default() += 1;
            match ip.parse::<Ipv4Addr>() {
                Ok(a) if a >= RANGE_FIRST && a <= RANGE_LAST => {}
                _ => out += 1,
            }
        }
    }
    let dups = owners.values().filter(|c| **c > 1).count();
    (assigned, dups, out)
}

/// Creates `names` with `inflight` creates in flight; fails if any create fails.
async fn create_all(bed: &Bed, names: &[String], inflight: usize) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = stream::iter(names.iter())
        .map(|name| bed.create(name))
        .buffer_unordered(inflight)
        .collect()
        .await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if let Some(first) = failed.first() {
        bail!("{} of {} creates failed, e.g. {first}", failed.len(), names.len());
    }
    Ok(())
}

async fn measure(args: &Args, bed: &mut Bed, scenario: &str, n: usize, tck: f64) -> anyhow::Result<Row> {
    let ctl = bed.system.component();
    let names: Vec<String> = (0..n).map(|i| format!("{scenario}-{i}")).collect();
    if scenario == "backlog" {
        // The Services exist before the controller starts (a restart, a fail-over, a
        // migration): only the controller's own throughput is measured.
        create_all(bed, &names, args.inflight).await?;
        let all_seen = bed
            .tracker
            .wait(Instant::now() + Duration::from_secs(60), |s| {
                names.iter().all(|k| s.ips.contains_key(k))
            })
            .await;
        anyhow::ensure!(all_seen, "the bench's watch did not see every created Service");
    }
    let quiet_note = wait_quiet(&bed.cp, args.quiet, tck).await;
    let audit_from = file_len(&bed.audit);
    let cpu0 = CpuMark::take(&bed.cp, tck);
    let load = loadavg();
    let mut create_phase = Duration::ZERO;
    let mut all_assigned = None;
    let mut rss_idle = 0;
    let t0 = Instant::now();
    if scenario == "backlog" {
        bed.spawn_controller()?;
        bed.startup = Duration::ZERO;
        let mut s = bed.tracker.lock();
        for k in &names {
            s.created.insert(k.clone(), t0);
            s.acked.insert(k.clone(), t0);
        }
    } else {
        rss_idle = status_kib(bed.pid(ctl).context("controller pid")?, "VmRSS").unwrap_or(0);
    }
    let pid = bed.pid(ctl).context("controller pid")?;
    if scenario == "single" {
        for name in &names {
            bed.create(name).await?;
            let ok = bed
                .tracker
                .wait(Instant::now() + Duration::from_secs(30), |s| {
                    s.first_ingress.contains_key(name)
                })
                .await;
            if !ok {
                bed.cp.dump_logs();
                bail!("{}: {name} got no ingress IP in 30 s", bed.system.label());
            }
        }
        all_assigned = Some(t0.elapsed());
    } else {
        if scenario == "burst" {
            create_all(bed, &names, args.inflight).await?;
            create_phase = t0.elapsed();
        }
        let deadline = t0 + args.deadline(n, bed.system);
        let done = bed
            .tracker
            .wait(deadline, |s| {
                names.iter().all(|k| s.first_ingress.contains_key(k))
            })
            .await;
        if done {
            let s = bed.tracker.lock();
            let last = names.iter().filter_map(|k| s.first_ingress.get(k)).max().copied();
            all_assigned = last.map(|l| l - t0);
        }
    }
    let cpu1 = CpuMark::take(&bed.cp, tck);
    let rss_end = status_kib(pid, "VmRSS").unwrap_or(0);
    let rss_peak = status_kib(pid, "VmHWM").unwrap_or(0);
    let store_rss = bed
        .pid("cairn-ipam")
        .and_then(|p| status_kib(p, "VmRSS"))
        .map(mib);
    // Requests: let the controller finish what it does after the ingress (events, annotations).
    quiesce(&bed.audit, Duration::from_secs(30)).await;
    let req = audit_since(&bed.audit, audit_from)?;
    let (cpu, others) = cpu1.since(&cpu0);

    let s = bed.tracker.lock();
    let mut lat: Vec<Duration> = names
        .iter()
        .filter_map(|k| Some(*s.first_ingress.get(k)? - *s.created.get(k)?))
        .collect();
    lat.sort();
    let mut after_ack: Vec<Duration> = names
        .iter()
        .filter_map(|k| {
            Some(
                s.first_ingress
                    .get(k)?
                    .saturating_duration_since(*s.acked.get(k)?),
            )
        })
        .collect();
    after_ack.sort();
    let mut post: Vec<Duration> = names
        .iter()
        .filter_map(|k| Some(*s.acked.get(k)? - *s.created.get(k)?))
        .collect();
    post.sort();
    let (assigned, dups, out) = check_ips(&s, &names);
    let moved = names.iter().filter(|k| s.moved.contains(*k)).count();
    drop(s);
    Ok(Row {
        system: bed.system.label().into(),
        scenario: scenario.into(),
        services: n,
        assigned,
        all_assigned_s: all_assigned.map(|d| d.as_secs_f64()),
        create_phase_s: create_phase.as_secs_f64(),
        p50_ms: pct(&lat, 50.0).as_secs_f64() * 1e3,
        p99_ms: pct(&lat, 99.0).as_secs_f64() * 1e3,
        max_ms: lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        ack_p50_ms: pct(&after_ack, 50.0).as_secs_f64() * 1e3,
        ack_p99_ms: pct(&after_ack, 99.0).as_secs_f64() * 1e3,
        post_p50_ms: pct(&post, 50.0).as_secs_f64() * 1e3,
        requests: req.total,
        writes: req.writes(),
        errors: req.errors,
        conflicts: req.conflicts,
        request_kinds: req.top(8),
        rss_idle_mib: mib(rss_idle),
        rss_end_mib: mib(rss_end),
        rss_peak_mib: mib(rss_peak),
        store_rss_end_mib: store_rss,
        cpu_s: cpu,
        others_cores: others,
        duplicates: dups,
        out_of_range: out,
        moved,
        startup_s: bed.startup.as_secs_f64(),
        quiet_note,
        loadavg: load,
        version: bed.version.clone(),
    })
}

fn print_row(r: &Row) {
    let total = r
        .all_assigned_s
        .map(|s| format!("{s:.2} s"))
        .unwrap_or_else(|| "NOT all assigned".into());
    let rate = r
        .all_assigned_s
        .map(|s| format!("{:.0}/s", r.services as f64 / s))
        .unwrap_or_default();
    let cpu: Vec<String> = r
        .cpu_s
        .iter()
        .filter(|(_, v)| **v >= 0.05)
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect();
    println!(
        "{} {} n={}: assigned {}/{} in {total} ({rate}; creates took {:.2} s); create→ingress p50 {} ms p99 {} ms max {} ms",
        r.system,
        r.scenario,
        r.services,
        r.assigned,
        r.services,
        r.create_phase_s,
        ms(Duration::from_secs_f64(r.p50_ms / 1e3)),
        ms(Duration::from_secs_f64(r.p99_ms / 1e3)),
        ms(Duration::from_secs_f64(r.max_ms / 1e3)),
    );
    if r.scenario != "backlog" {
        println!(
            "    create call p50 {:.1} ms; create returned→ingress p50 {:.1} ms p99 {:.1} ms",
            r.post_p50_ms, r.ack_p50_ms, r.ack_p99_ms
        );
    }
    println!(
        "    API requests by the controller: {} ({:.2}/Service; writes {:.2}/Service; {} errors, {} conflicts): {}",
        r.requests,
        r.per_svc(r.requests),
        r.per_svc(r.writes),
        r.errors,
        r.conflicts,
        r.request_kinds
    );
    println!(
        "    controller RSS idle {:.1} MiB, end {:.1} MiB, peak {:.1} MiB{}; CPU s: {}; others {:.2} cores; load {}",
        r.rss_idle_mib,
        r.rss_end_mib,
        r.rss_peak_mib,
        r.store_rss_end_mib
            .map(|m| format!(" (+ cairn-ipam {m:.1} MiB)"))
            .unwrap_or_default(),
        cpu.join(", "),
        r.others_cores,
        r.loadavg
    );
    if r.duplicates + r.out_of_range + r.moved > 0 {
        println!(
            "    WRONG: {} duplicate IPs, {} out of range, {} Services whose IP moved",
            r.duplicates, r.out_of_range, r.moved
        );
    }
    if !r.quiet_note.is_empty() {
        println!("    ({})", r.quiet_note);
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::new();
    t.push_str("| system | scenario | Services | all assigned | Services/s | p50 ms | p99 ms | max ms | ack→ingress p50/p99 ms | API req/Svc | writes/Svc | ctl RSS idle→peak MiB | ctl CPU s | apiserver CPU s | others (cores) |\n");
    t.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let comp = match r.system.as_str() {
            "Cairn" => vec!["cairn-ccm", "cairn-ipam"],
            "MetalLB" => vec!["metallb-controller"],
            _ => vec!["kube-vip-ccm"],
        };
        let ctl_cpu: Vec<String> = comp
            .iter()
            .map(|c| format!("{:.1}", r.cpu_s.get(*c).copied().unwrap_or(0.0)))
            .collect();
        let all = match r.all_assigned_s {
            Some(s) => format!("{s:.2} s"),
            None => format!("**{}/{} by deadline**", r.assigned, r.services),
        };
        let rate = r
            .all_assigned_s
            .map(|s| format!("{:.0}", r.services as f64 / s))
            .unwrap_or_else(|| "–".into());
        let rss = match r.store_rss_end_mib {
            Some(m) => format!("{:.1}→{:.1} (+ipam {m:.1})", r.rss_idle_mib, r.rss_peak_mib),
            None => format!("{:.1}→{:.1}", r.rss_idle_mib, r.rss_peak_mib),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {all} | {rate} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {rss} | {} | {:.1} | {:.2} |",
            r.system,
            r.scenario,
            r.services,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            if r.scenario == "backlog" {
                "–".to_string()
            } else {
                format!("{:.1} / {:.1}", r.ack_p50_ms, r.ack_p99_ms)
            },
            r.per_svc(r.requests),
            r.per_svc(r.writes),
            ctl_cpu.join(" + "),
            r.cpu_s.get("kube-apiserver").copied().unwrap_or(0.0),
            r.others_cores,
        );
    }
    t
}

fn ratios(rows: &[Row]) -> String {
    let mut t = String::new();
    let cairn: Vec<&Row> = rows.iter().filter(|r| r.system == "Cairn").collect();
    for peer in rows.iter().filter(|r| r.system != "Cairn") {
        let Some(c) = cairn
            .iter()
            .find(|c| c.scenario == peer.scenario && c.services == peer.services)
        else {
            continue;
        };
        let speed = match (c.all_assigned_s, peer.all_assigned_s) {
            (Some(a), Some(b)) => format!("{:.2}×", b / a),
            (Some(_), None) => "peer not done by its deadline".into(),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            t,
            "| {} vs Cairn | {} {} | {speed} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            peer.system,
            peer.scenario,
            peer.services,
            peer.p50_ms / c.p50_ms.max(1e-9),
            peer.p99_ms / c.p99_ms.max(1e-9),
            peer.per_svc(peer.requests) / c.per_svc(c.requests).max(1e-9),
            peer.rss_peak_mib / c.rss_peak_mib.max(1e-9),
        );
    }
    if t.is_empty() {
        return t;
    }
    format!(
        "| peer | scenario | total time peer/Cairn | p50 peer/Cairn | p99 peer/Cairn | API req/Svc peer/Cairn | ctl peak RSS peer/Cairn |\n|---|---|---:|---:|---:|---:|---:|\n{t}"
    )
}

// ============================================================================================
// main
// ============================================================================================

/// Builds `cairn-ipam` in the profile this benchmark was built in (`cargo bench`: release;
/// `cargo test --bench burst`: debug, as the CI smoke runs it) and returns its path.
fn build_ipam(ccm_bin: &Path) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let profile_dir = ccm_bin.parent().context("cairn-ccm binary path")?;
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "cairn-ipam", "--bin", "cairn-ipam"]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd
        .current_dir(&root)
        .status()
        .context("run cargo build -p cairn-ipam")?;
    anyhow::ensure!(st.success(), "cargo build -p cairn-ipam failed");
    Ok(profile_dir.join("cairn-ipam"))
}

/// Re-executes the benchmark inside a new network namespace with only loopback up.
fn reexec_in_netns(args: &Args, ipam: &Path) -> anyhow::Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt as _;
    let me = std::env::current_exe()?;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$0\" \"$@\"",
    ])
    .arg(me)
    .args(&args.raw)
    .arg("--ipam-bin")
    .arg(ipam)
    .env("CAIRN_BENCH_NETNS", "1");
    let err = cmd.exec();
    bail!(
        "cannot enter a private network namespace for the peers (`unshare --net`, needs root or user namespaces, and `ip`): {err}; run with --systems cairn"
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let ipam = match &args.ipam_bin {
        Some(p) => p.clone(),
        None => build_ipam(&args.ccm_bin)?,
    };
    if args.peers() && std::env::var_os("CAIRN_BENCH_NETNS").is_none() {
        reexec_in_netns(&args, &ipam)?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args, ipam))
}

async fn run(args: Args, ipam: PathBuf) -> anyhow::Result<()> {
    let tck = clk_tck();
    let work = tempfile::Builder::new().prefix("cairn-burst-").tempdir()?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!("# cairn-ccm burst benchmark");
    println!(
        "machine: {cores} cores ({cpu}); load average at start {}; network namespace: {}",
        loadavg(),
        if std::env::var_os("CAIRN_BENCH_NETNS").is_some() {
            "private (loopback only)"
        } else {
            "host (loopback addresses only)"
        }
    );
    println!(
        "binaries: cairn-ccm {} · cairn-ipam {} · tools {}",
        args.ccm_bin.display(),
        ipam.display(),
        bin_dir().display()
    );
    println!(
        "scenarios: {:?}; bursts {:?} at {} in flight; singles {}; systems {:?}; ccm args {:?}; kube-vip args {:?}",
        args.scenarios,
        args.sizes,
        args.inflight,
        args.singles,
        args.systems.iter().map(|s| s.key()).collect::<Vec<_>>(),
        args.ccm_args,
        args.kube_vip_args
    );
    if args.fleet > 0 {
        return fleet(&args, &ipam, work.path(), tck).await;
    }
    let mut rows = vec![];
    let mut failures = vec![];
    for scenario in &args.scenarios {
        let sizes = if scenario == "single" {
            vec![args.singles]
        } else {
            args.sizes.clone()
        };
        for &n in &sizes {
            for &system in &args.systems {
                let label = format!("{}-{scenario}-{n}", system.key());
                let t = Instant::now();
                let result = async {
                    let idle = scenario == "backlog";
                    let mut bed = Bed::start(&args, &ipam, system, &label, work.path(), idle, None).await?;
                    println!(
                        "\n[{label}] {} ready in {:.1} s ({})",
                        system.label(),
                        bed.startup.as_secs_f64(),
                        bed.version
                    );
                    let r = measure(&args, &mut bed, scenario, n, tck).await;
                    if r.is_err() {
                        bed.cp.dump_logs();
                    }
                    let r = r?;
                    if r.all_assigned_s.is_none() {
                        eprintln!("{}", bed.cp.log_tail(system.component(), 40));
                    }
                    anyhow::Ok(r)
                }
                .await;
                match result {
                    Ok(r) => {
                        print_row(&r);
                        rows.push(r);
                    }
                    Err(e) => {
                        println!(
                            "\n[{label}] FAILED after {:.1} s: {e:#}",
                            t.elapsed().as_secs_f64()
                        );
                        failures.push(format!("{label}: {e:#}"));
                    }
                }
            }
        }
    }
    println!("\n## Results\n\n{}", table(&rows));
    let r = ratios(&rows);
    if !r.is_empty() {
        println!("## Ratios (peer ÷ Cairn; > 1 means Cairn is faster / leaner)\n\n{r}");
    }
    if let Some(p) = &args.json {
        fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    if args.keep {
        println!("kept {}", work.keep().display());
    }
    let wrong: Vec<&Row> = rows
        .iter()
        .filter(|r| r.duplicates + r.out_of_range + r.moved > 0)
        .collect();
    if !wrong.is_empty() {
        bail!("{} runs handed out wrong addresses (see above)", wrong.len());
    }
    let cairn_short: Vec<&Row> = rows
        .iter()
        .filter(|r| r.system == "Cairn" && r.all_assigned_s.is_none())
        .collect();
    if !cairn_short.is_empty() {
        bail!("Cairn did not assign every Service by the deadline");
    }
    if failures.iter().any(|f| f.starts_with("cairn-")) {
        bail!("Cairn runs failed: {failures:?}");
    }
    if !failures.is_empty() {
        println!("peer runs that failed: {failures:?}");
    }
    Ok(())
}

// ============================================================================================
// The fleet: several real control planes and controllers on one store
// ============================================================================================

/// A fleet member's view of the shared store.
struct Shared {
    /// The store's gRPC address.
    grpc: String,
    /// This member's `--cluster-id`.
    cluster_id: String,
}

/// Starts a `cairn-ipam serve` as a component of `cp` and returns its gRPC address.
async fn spawn_store(cp: &ControlPlane, ipam_bin: &Path, dir: &Path) -> anyhow::Result<String> {
    let addr = dir.join("ipam.addr");
    cp.spawn("cairn-ipam", &store_command(ipam_bin, dir, &addr))?;
    read_store_addr(&addr).await
}

fn store_command(ipam_bin: &Path, dir: &Path, addr: &Path) -> Command {
    let mut ipam = Command::new(ipam_bin);
    ipam.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--default-reuse-grace",
        "0s",
        "--data-dir",
    ])
    .arg(dir.join("ipam-data"))
    .arg("--addr-file")
    .arg(addr);
    ipam
}

async fn read_store_addr(addr: &Path) -> anyhow::Result<String> {
    let text = eventually("cairn-ipam serving", Duration::from_secs(30), || {
        let addr = addr.to_path_buf();
        async move { fs::read_to_string(&addr) }
    })
    .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("grpc="))
        .context("no grpc= line in the addr file")?
        .to_string())
}

/// A child process killed when dropped (the fleet's store outlives every plane).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mem_available_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024)
}

/// `--fleet N`: one `cairn-ipam`, N control planes (etcd + kube-apiserver each), each with its
/// own `cairn-ccm` (cluster ids fleet-0 … fleet-N-1) whose ClusterNetwork binds to one network
/// the cloud defined in the store; then `--fleet-services` Services created in every cluster at
/// once (`--inflight` at a time per cluster). Reports the time until every Service of every
/// cluster has its ingress, create→ingress p50/p99 over all of them, the store's CPU and memory,
/// and fails on an address held twice across the fleet or any ingress that moved.
async fn fleet(args: &Args, ipam: &Path, work: &Path, tck: f64) -> anyhow::Result<()> {
    let (n, per) = (args.fleet, args.fleet_services);
    anyhow::ensure!(
        n * (per + 1) <= 8192,
        "--fleet {n} × (--fleet-services {per} + a warm-up) is more than the 8,192 addresses of {RANGE}"
    );
    anyhow::ensure!(
        cairn_e2e::max_planes() >= n,
        "--fleet {n} keeps {n} control planes up at once, but this process allows {} \
         (run with CAIRN_E2E_MAX_PLANES={n})",
        cairn_e2e::max_planes()
    );
    println!(
        "\n## Fleet: {n} control planes with their own cairn-ccm on one cairn-ipam, {per} Services each\n"
    );
    let dir = work.join("fleet-store");
    fs::create_dir_all(&dir)?;
    let addr = dir.join("ipam.addr");
    let log = fs::File::create(dir.join("ipam.log"))?;
    let mut cmd = store_command(ipam, &dir, &addr);
    cmd.stdout(log.try_clone()?).stderr(log);
    let store = KillOnDrop(cmd.spawn().context("starting cairn-ipam")?);
    let store_pid = store.0.id();
    let grpc = read_store_addr(&addr).await?;
    // The network as the on-prem cloud defines it; every cluster binds to it.
    let mut client =
        cairn_proto::v1::ipam_service_client::IpamServiceClient::connect(format!("http://{grpc}")).await?;
    let pool = |name: &str, purpose: cairn_proto::v1::PoolPurpose, range: &str| cairn_proto::v1::Pool {
        name: name.into(),
        purpose: purpose as i32,
        ranges: vec![range.into()],
        ..Default::default()
    };
    client
        .upsert_network(cairn_proto::v1::UpsertNetworkRequest {
            network: Some(cairn_proto::v1::Network {
                name: "bench-net".into(),
                pools: vec![
                    pool("vip", cairn_proto::v1::PoolPurpose::Vip, RANGE),
                    pool("nodes", cairn_proto::v1::PoolPurpose::Node, "10.21.0.0/24"),
                ],
                reuse_grace_seconds: Some(0),
                managed_by: "cloud".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let mem0 = mem_available_mib();
    let mut beds = Vec::with_capacity(n);
    for i in 0..n {
        let sh = Shared {
            grpc: grpc.clone(),
            cluster_id: format!("fleet-{i}"),
        };
        let t = Instant::now();
        let bed = Bed::start(args, ipam, System::Cairn, &sh.cluster_id, work, false, Some(&sh)).await?;
        println!(
            "[{}] control plane + cairn-ccm up, warm-up Service assigned, in {:.1} s; machine MemAvailable {} MiB",
            sh.cluster_id,
            t.elapsed().as_secs_f64(),
            mem_available_mib()
        );
        beds.push(bed);
    }
    let quiet_note = wait_quiet(&beds[0].cp, args.quiet, tck).await;
    let store_cpu0 = cpu_secs(store_pid, tck);
    let machine0 = machine_busy_secs(tck);
    let names: Vec<String> = (0..per).map(|i| format!("svc-{i}")).collect();
    let t0 = Instant::now();
    let creates = futures::future::join_all(beds.iter().map(|b| create_all(b, &names, args.inflight))).await;
    for r in creates {
        r?;
    }
    let creates_done = t0.elapsed();
    let deadline = Instant::now() + args.deadline(n * per, System::Cairn);
    for b in &beds {
        let ok = b
            .tracker
            .wait(deadline, |s| {
                names.iter().all(|k| s.first_ingress.contains_key(k))
            })
            .await;
        anyhow::ensure!(ok, "a cluster's Services were not all assigned by the deadline");
    }
    let last = beds
        .iter()
        .filter_map(|b| {
            let s = b.tracker.lock();
            names.iter().filter_map(|k| s.first_ingress.get(k)).max().copied()
        })
        .max()
        .context("no ingress seen")?;
    let all_assigned = last - t0;
    let wall = t0.elapsed().as_secs_f64();
    let store_cores = (cpu_secs(store_pid, tck) - store_cpu0) / wall;
    let machine_cores = (machine_busy_secs(tck) - machine0) / wall;
    // Over the whole fleet: create→ingress, one owner per address, nothing moved.
    let mut lat: Vec<Duration> = vec![];
    let mut owners: HashMap<String, Vec<String>> = HashMap::new();
    let mut moved = 0;
    for (i, b) in beds.iter().enumerate() {
        let s = b.tracker.lock();
        lat.extend(
            names
                .iter()
                .filter_map(|k| Some(*s.first_ingress.get(k)? - *s.created.get(k)?)),
        );
        for (svc, ips) in &s.ips {
            for ip in ips {
                owners
                    .entry(ip.clone())
                    .or_default()
                    .push(format!("fleet-{i}/{svc}"));
            }
        }
        moved += s.moved.len();
    }
    lat.sort();
    let doubled: Vec<(&String, &Vec<String>)> = owners.iter().filter(|(_, o)| o.len() > 1).collect();
    println!(
        "\n{n} clusters × {per} Services = {} created in {:.2} s; all assigned {:.2} s after the first create \
         ({:.0} Services/s); create→ingress p50 {} ms, p99 {} ms, max {} ms; {} addresses held, {} with two owners, \
         {moved} moved. Store: {:.2} cores, VmRSS {:.1} MiB; machine {:.2} of {} cores busy; MemAvailable {} MiB \
         before the planes, {} MiB with them. {quiet_note}",
        n * per,
        creates_done.as_secs_f64(),
        all_assigned.as_secs_f64(),
        (n * per) as f64 / all_assigned.as_secs_f64(),
        ms(pct(&lat, 50.0)),
        ms(pct(&lat, 99.0)),
        ms(lat.last().copied().unwrap_or_default()),
        owners.len(),
        doubled.len(),
        store_cores,
        mib(status_kib(store_pid, "VmRSS").unwrap_or(0)),
        machine_cores,
        std::thread::available_parallelism().map_or(0, |c| c.get()),
        mem0,
        mem_available_mib(),
    );
    if let Some((ip, o)) = doubled.first() {
        bail!(
            "{ip} is held by {o:?} (and {} more addresses twice)",
            doubled.len() - 1
        );
    }
    anyhow::ensure!(moved == 0, "{moved} Services' ingress moved");
    drop(beds);
    drop(store);
    Ok(())
}
