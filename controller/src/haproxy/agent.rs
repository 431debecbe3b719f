//! `cairn-ccm haproxy-agent`: the watch loop.
//!
//! Reflectors over Services, Nodes, EndpointSlices (and ClusterNetworks, for the API-server
//! VIP, unless `--api-server-vip` is given) wake one loop. Each turn renders the whole
//! configuration ([`super::model`] + [`super::render`]); when the text differs from what
//! HAProxy runs, it is validated, swapped in and HAProxy reloaded ([`super::apply`]). Reloads
//! are at least `--min-reload-interval` apart (changes in between are coalesced into one); a
//! configuration that failed is retried after `--retry-interval` unless the objects change.
//! The agent only reads the cluster; it writes Events and nothing else.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::pin,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use futures::{FutureExt as _, StreamExt as _, future::BoxFuture};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use super::{
    apply::{ApplyError, Haproxy, cited_lines, default_bin, write_atomic},
    master::Master,
    model::{ApiServer, Inputs, LbConfig, ServiceRef, Settings, Warning, build},
    render::{Rendered, render},
};
use crate::crd::ClusterNetwork;

/// Event reporter name.
pub const REPORTER: &str = "cairn-haproxy-agent";

/// Parses `500ms`, `2s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with ms, s, m or h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    }
}

/// Flags of `cairn-ccm haproxy-agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Kubeconfig file (default: in-cluster config, then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The HAProxy configuration file the agent owns (rewritten on every change).
    #[arg(long, default_value = "/etc/haproxy/haproxy.cfg")]
    pub config: PathBuf,
    /// HAProxy binary (default: `haproxy` on $PATH, else /usr/sbin/haproxy).
    #[arg(long)]
    pub haproxy_bin: Option<PathBuf>,
    /// HAProxy's master CLI socket (`haproxy -W -S <this>`), used to reload and read stats.
    #[arg(long, default_value = "/run/haproxy-master.sock")]
    pub master_socket: PathBuf,
    /// Start and supervise HAProxy (`haproxy -W -S <master socket> -f <config>`) instead of
    /// reloading one that a supervisor runs.
    #[arg(long)]
    pub manage_haproxy: bool,
    /// Serve only Services with this loadBalancerClass (default: those with none).
    #[arg(long)]
    pub load_balancer_class: Option<String>,
    /// API-server VIP(s), comma-separated (default: `status.apiServerVIP` of the ClusterNetworks).
    #[arg(long, value_delimiter = ',')]
    pub api_server_vip: Vec<IpAddr>,
    /// Port of the API-server frontend on the VIP.
    #[arg(long, default_value_t = 6443)]
    pub api_server_port: u16,
    /// Port of the API server on the control-plane nodes.
    #[arg(long, default_value_t = 6443)]
    pub api_server_backend_port: u16,
    /// HAProxy's stats/health frontend (`/stats`, `/healthz`); keep it on loopback. (It is
    /// also the listener that keeps HAProxy running while no Service has a VIP.)
    #[arg(long, default_value = "127.0.0.1:8404")]
    pub stats_listen: SocketAddr,
    /// Address of the agent's /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub metrics_listen: SocketAddr,
    /// Write `metrics=<address>` here once listening (useful with port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// Print the configuration the agent would apply, then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Minimum time between two reloads; changes in between are applied together.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub min_reload_interval: Duration,
    /// Retry a configuration HAProxy refused after this long (sooner if the cluster changes).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub retry_interval: Duration,
    /// How long old workers may finish established connections after a reload.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub hard_stop_after: Duration,
    /// How long a reload (or HAProxy's start) may take.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub reload_timeout: Duration,
    /// How often to read server states from HAProxy (for `backends_up`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub stats_interval: Duration,
    /// HAProxy's global connection limit (default: HAProxy derives it from its file-descriptor
    /// limit, e.g. systemd's `LimitNOFILE`; a value HAProxy cannot get descriptors for makes it
    /// refuse to start).
    #[arg(long)]
    pub maxconn: Option<u32>,
    /// User HAProxy's workers run as (`user` in `global`); the master keeps its own.
    #[arg(long, value_parser = config_word)]
    pub haproxy_user: Option<String>,
    /// Group HAProxy's workers run as.
    #[arg(long, value_parser = config_word)]
    pub haproxy_group: Option<String>,
    /// Traffic log target, rendered as `log <this>` in `global` with `option tcplog`, e.g.
    /// `/dev/log local0` or `stderr format raw daemon` (default: no traffic logs).
    #[arg(long, value_parser = config_line)]
    pub haproxy_log: Option<String>,
}

/// A value that goes into the configuration as one word.
fn config_word(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: letters, digits, '-', '_' and '.' only"))
    }
}

/// A value that goes into the configuration as the rest of a line.
fn config_line(s: &str) -> Result<String, String> {
    if !s.trim().is_empty() && !s.chars().any(|c| c.is_control() || c == '#') {
        Ok(s.trim().to_string())
    } else {
        Err(format!("{s:?}: one line, no '#'"))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// The agent's metrics (prefix `cairn_ccm_haproxy_`).
pub struct AgentMetrics {
    registry: Registry,
    reloads: Counter,
    reload_failures: Family<StageLabels, Counter>,
    reload_seconds: Histogram,
    frontends: Gauge,
    backends: Gauge,
    backends_up: Gauge,
    up: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cairn_ccm_haproxy");
        let reloads = Counter::default();
        registry.register(
            "reloads",
            "configurations put into service (reloads, and starts by the agent)",
            reloads.clone(),
        );
        let reload_failures = Family::<StageLabels, Counter>::default();
        registry.register(
            "reload_failures",
            "configurations HAProxy refused, by stage (validate, reload, io)",
            reload_failures.clone(),
        );
        for stage in ["validate", "reload", "io"] {
            let _ = reload_failures.get_or_create(&StageLabels { stage });
        }
        let reload_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register(
            "reload_duration_seconds",
            "validate + swap + reload",
            reload_seconds.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "frontends",
            "frontends in the running configuration (stats frontend not counted)",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register(
            "backends",
            "backend servers in the running configuration",
            backends.clone(),
        );
        let backends_up = Gauge::default();
        registry.register(
            "backends_up",
            "backend servers HAProxy reports up",
            backends_up.clone(),
        );
        let up = Gauge::default();
        registry.register("up", "1 while HAProxy's master CLI answers", up.clone());
        AgentMetrics {
            registry,
            reloads,
            reload_failures,
            reload_seconds,
            frontends,
            backends,
            backends_up,
            up,
        }
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone)]
struct Http {
    metrics: Arc<AgentMetrics>,
    ready: watch::Receiver<bool>,
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    http: Http,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Http>| async move { h.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(h): State<Http>| async move {
                // A configuration applied, and HAProxy's master answers.
                if *h.ready.borrow() && h.metrics.up.get() == 1 {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .with_state(http);
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    Ok(())
}

/// A reflector driven by its own task: the store, a signal that turns true once the initial
/// list is in, and `changed` notified after every change (not during a (re)list).
fn watch_store<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    strip: fn(&mut K),
) -> (Store<K>, watch::Receiver<bool>, tokio::task::JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let (tx, rx) = watch::channel(false);
    let kind = K::kind(&());
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(strip)
            .reflect(writer);
        let mut stream = pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    let _ = tx.send(true);
                    changed.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(%kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    (reader, rx, task)
}

fn strip_meta<K: ResourceExt>(o: &mut K) {
    o.managed_fields_mut().clear();
}

fn strip_node(n: &mut Node) {
    n.managed_fields_mut().clear();
    if let Some(s) = n.status.as_mut() {
        s.images = None;
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

struct Agent {
    args: AgentArgs,
    haproxy: Haproxy,
    metrics: Arc<AgentMetrics>,
    recorder: Recorder,
    services: Store<Service>,
    nodes: Store<Node>,
    slices: Store<EndpointSlice>,
    networks: Option<Store<ClusterNetwork>>,
    /// The text HAProxy runs.
    running: Option<String>,
    /// The last text that failed, and when.
    failed: Option<(String, Instant)>,
    last_apply: Option<Instant>,
    /// Warnings already reported (an Event is sent when one appears).
    warned: BTreeSet<Warning>,
    ready: watch::Sender<bool>,
}

fn desired(
    args: &AgentArgs,
    services: &Store<Service>,
    nodes: &Store<Node>,
    slices: &Store<EndpointSlice>,
    networks: Option<&Store<ClusterNetwork>>,
) -> (LbConfig, Vec<Warning>, Rendered) {
    let mut vips = args.api_server_vip.clone();
    if let Some(cns) = networks {
        for cn in cns.state() {
            if let Some(ip) = cn
                .status
                .as_ref()
                .and_then(|s| s.api_server_vip.as_deref())
                .and_then(|s| s.trim().parse().ok())
            {
                vips.push(ip);
            }
        }
    }
    let api = ApiServer {
        vips,
        port: args.api_server_port,
        backend_port: args.api_server_backend_port,
    };
    let (services, nodes, slices) = (services.state(), nodes.state(), slices.state());
    let (cfg, warnings) = build(
        &Inputs {
            services: &services,
            nodes: &nodes,
            slices: &slices,
            class: args.load_balancer_class.as_deref(),
            api_server: &api,
        },
        Settings {
            stats: Some(args.stats_listen),
            hard_stop_after: args.hard_stop_after,
            maxconn: args.maxconn,
            user: args.haproxy_user.clone(),
            group: args.haproxy_group.clone(),
            log: args.haproxy_log.clone(),
        },
    );
    let r = render(&cfg);
    (cfg, warnings, r)
}

impl Agent {
    async fn event(&self, owner: &ServiceRef, type_: EventType, reason: &str, action: &str, note: &str) {
        let key = ObjectRef::<Service>::new(&owner.name).within(&owner.namespace);
        let Some(svc) = self.services.get(&key) else {
            return;
        };
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &svc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, service = %owner, "could not publish event");
        }
    }

    async fn report_warnings(&mut self, warnings: Vec<Warning>) {
        let now: BTreeSet<Warning> = warnings.into_iter().collect();
        for w in now.difference(&self.warned) {
            match &w.owner {
                Some(o) => {
                    tracing::warn!(service = %o, reason = w.reason, "{}", w.message);
                    self.event(o, EventType::Warning, w.reason, "Configure", &w.message)
                        .await;
                }
                None => tracing::warn!(reason = w.reason, "{}", w.message),
            }
        }
        self.warned = now;
    }

    /// Reports a failed apply: on the Services HAProxy's messages point at, else in the log.
    async fn report_failure(&self, e: &ApplyError, r: &Rendered) {
        self.metrics
            .reload_failures
            .get_or_create(&StageLabels { stage: e.stage() })
            .inc();
        let lines = cited_lines(e.output(), &self.args.config);
        let mut owners: Vec<&ServiceRef> = lines
            .iter()
            .filter_map(|l| r.section_at(*l))
            .filter_map(|s| s.owner.as_ref())
            .collect();
        owners.sort();
        owners.dedup();
        let services: Vec<String> = owners.iter().map(ToString::to_string).collect();
        if self.running.is_some() {
            tracing::error!(error = %e, ?services, "configuration not applied; the previous one keeps running");
        } else {
            tracing::error!(error = %e, ?services, "configuration not applied; HAProxy is not running");
        }
        let reason = match e {
            ApplyError::Rejected { .. } => "ConfigRejected",
            _ => "ReloadFailed",
        };
        for o in owners {
            // Only the complaints about this Service's lines.
            let mine: Vec<&str> = e
                .output()
                .lines()
                .filter(|l| {
                    cited_lines(l, &self.args.config)
                        .iter()
                        .any(|n| r.section_at(*n).and_then(|s| s.owner.as_ref()) == Some(o))
                })
                .collect();
            let note = format!(
                "HAProxy refused the configuration for this Service; {}: {}",
                if self.running.is_some() {
                    "the previous configuration keeps running"
                } else {
                    "HAProxy is not running"
                },
                mine.join("; ")
            );
            self.event(o, EventType::Warning, reason, "Reload", &note).await;
        }
    }

    async fn apply(&mut self, r: &Rendered) -> Result<(), ApplyError> {
        self.haproxy.install(&r.text).await?;
        if self.args.manage_haproxy && !self.haproxy.child_alive() {
            return self.haproxy.start().await;
        }
        match self.haproxy.reload().await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Keep the file what HAProxy runs, so a restart comes up with it.
                if let Some(prev) = &self.running
                    && let Err(w) = write_atomic(&self.args.config, prev).await
                {
                    tracing::error!(error = %w, "could not restore the previous configuration file");
                }
                Err(e)
            }
        }
    }

    /// One turn: render, and apply if needed and allowed. Returns when to look again even if
    /// nothing changes (a gated or failed apply).
    async fn step(&mut self) -> Option<Instant> {
        let (cfg, warnings, r) = desired(
            &self.args,
            &self.services,
            &self.nodes,
            &self.slices,
            self.networks.as_ref(),
        );
        self.report_warnings(warnings).await;
        if self.running.as_deref() == Some(r.text.as_str()) {
            return None;
        }
        let now = Instant::now();
        let mut gate = self.last_apply.map_or(now, |t| t + self.args.min_reload_interval);
        if let Some((text, at)) = &self.failed
            && *text == r.text
        {
            gate = gate.max(*at + self.args.retry_interval);
        }
        if now < gate {
            return Some(gate);
        }
        self.last_apply = Some(now);
        let result = self.apply(&r).await;
        self.metrics.reload_seconds.observe(now.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                self.metrics.reloads.inc();
                self.metrics.frontends.set(r.frontends() as i64);
                self.metrics.backends.set(cfg.servers() as i64);
                self.metrics.up.set(1);
                tracing::info!(
                    frontends = r.frontends(),
                    servers = cfg.servers(),
                    took_ms = now.elapsed().as_millis() as u64,
                    "configuration applied"
                );
                self.running = Some(r.text);
                self.failed = None;
                let _ = self.ready.send(true);
                None
            }
            Err(e) => {
                self.report_failure(&e, &r).await;
                let at = Instant::now();
                self.failed = Some((r.text, at));
                Some(at + self.args.retry_interval)
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Polls HAProxy's server states into `backends_up` / `up`.
async fn poll_stats(master: Master, metrics: Arc<AgentMetrics>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        tick.tick().await;
        match master.show_stat().await {
            Ok(stats) => {
                failures = 0;
                metrics
                    .backends_up
                    .set(stats.iter().filter(|s| s.is_up()).count() as i64);
                metrics.up.set(1);
            }
            Err(e) => {
                // The master CLI is briefly away while the master re-executes on a reload.
                failures += 1;
                tracing::debug!(error = %e, failures, "reading HAProxy stats");
                if failures >= 2 {
                    metrics.backends_up.set(0);
                    metrics.up.set(0);
                }
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(args: AgentArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    if args.load_balancer_class.as_deref() == Some("") {
        anyhow::bail!("--load-balancer-class: must not be empty");
    }
    let s = args.stats_listen;
    if !s.ip().is_loopback() {
        tracing::warn!(%s, "--stats-listen is not on loopback: HAProxy's stats page is unauthenticated");
    }
    let mut shutdown: BoxFuture<'static, ()> = shutdown.boxed();
    let client = crate::run::client(args.kubeconfig.as_ref()).await?;

    let changed = Arc::new(Notify::new());
    let (services, svc_ready, t1) = watch_store(
        Api::<Service>::all(client.clone()),
        changed.clone(),
        strip_meta::<Service>,
    );
    let (nodes, node_ready, t2) = watch_store(Api::<Node>::all(client.clone()), changed.clone(), strip_node);
    let (slices, slice_ready, t3) = watch_store(
        Api::<EndpointSlice>::all(client.clone()),
        changed.clone(),
        strip_meta::<EndpointSlice>,
    );
    let mut tasks = vec![t1, t2, t3];
    let mut readies = vec![svc_ready, node_ready, slice_ready];
    let networks = if args.api_server_vip.is_empty() {
        let (cns, ready, t) = watch_store(
            Api::<ClusterNetwork>::all(client.clone()),
            changed.clone(),
            strip_meta::<ClusterNetwork>,
        );
        tasks.push(t);
        readies.push(ready);
        Some(cns)
    } else {
        None
    };
    let all_ready = async {
        for r in &mut readies {
            r.wait_for(|v| *v).await.context("watch ended")?;
        }
        anyhow::Ok(())
    };
    let abort = |tasks: &[tokio::task::JoinHandle<()>]| tasks.iter().for_each(|t| t.abort());

    if args.dry_run {
        let r = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(60), all_ready) => r,
            () = &mut shutdown => { abort(&tasks); return Ok(()); }
        };
        abort(&tasks);
        r.context("the initial lists did not arrive within 60s")??;
        let (_, warnings, rendered) = desired(&args, &services, &nodes, &slices, networks.as_ref());
        for w in warnings {
            let who = w.owner.map(|o| o.to_string()).unwrap_or_default();
            eprintln!("warning: {who}: {}: {}", w.reason, w.message);
        }
        print!("{}", rendered.text);
        return Ok(());
    }

    let bin = args.haproxy_bin.clone().unwrap_or_else(default_bin);
    let haproxy = Haproxy::new(
        bin,
        args.config.clone(),
        args.master_socket.clone(),
        args.reload_timeout,
    );
    let version = haproxy.version().await?;
    tracing::info!(%version, config = %args.config.display(), manage = args.manage_haproxy, "haproxy agent starting");

    let metrics = Arc::new(AgentMetrics::new());
    let (ready_tx, ready_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("--metrics-listen {}", args.metrics_listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /metrics, /healthz, /readyz");
    if let Some(f) = &args.addr_file {
        write_atomic(f, &format!("metrics={bound}\n"))
            .await
            .with_context(|| format!("--addr-file {}", f.display()))?;
    }
    let http = tokio::spawn(serve_http(
        listener,
        Http {
            metrics: metrics.clone(),
            ready: ready_rx,
        },
        {
            let mut rx = stop_rx;
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        },
    ));
    let stats = tokio::spawn(poll_stats(
        haproxy.master.clone(),
        metrics.clone(),
        args.stats_interval,
    ));

    tokio::select! {
        r = all_ready => r?,
        () = &mut shutdown => {
            abort(&tasks);
            stats.abort();
            let _ = stop_tx.send(true);
            let _ = http.await;
            return Ok(());
        }
    }
    tracing::info!("initial lists loaded");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.into(),
            instance: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string()),
        },
    );
    let mut agent = Agent {
        args,
        haproxy,
        metrics: metrics.clone(),
        recorder,
        services,
        nodes,
        slices,
        networks,
        running: None,
        failed: None,
        last_apply: None,
        warned: BTreeSet::new(),
        ready: ready_tx,
    };
    let manage = agent.args.manage_haproxy;
    loop {
        let wake = agent.step().await;
        tokio::select! {
            () = changed.notified() => {}
            () = sleep_until(wake) => {}
            status = agent.haproxy.exited(), if manage => {
                tracing::error!(status = ?status, "haproxy exited; restarting it");
                agent.running = None;
                agent.metrics.up.set(0);
                let _ = agent.ready.send(false);
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down");
    abort(&tasks);
    stats.abort();
    if manage {
        agent.haproxy.stop(Duration::from_secs(5)).await;
    }
    let _ = stop_tx.send(true);
    let _ = http.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn metric_names() {
        let m = AgentMetrics::new();
        m.reloads.inc();
        let text = m.render();
        for name in [
            "cairn_ccm_haproxy_reloads_total 1",
            "cairn_ccm_haproxy_reload_failures_total{stage=\"validate\"} 0",
            "cairn_ccm_haproxy_frontends 0",
            "cairn_ccm_haproxy_backends_up 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn config_values_cannot_inject_lines() {
        assert!(config_word("haproxy").is_ok());
        assert!(config_word("hap roxy").is_err());
        assert!(config_word("x\nlisten").is_err());
        assert_eq!(config_line(" /dev/log local0 ").unwrap(), "/dev/log local0");
        assert!(config_line("stderr\nlisten x").is_err());
        assert!(config_line("stderr # x").is_err());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ééééé", 6), "é...");
    }
}
