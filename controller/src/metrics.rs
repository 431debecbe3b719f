//! Prometheus metrics of the controller, and the probe endpoints (`/metrics`, `/healthz`,
//! `/readyz` on `--metrics-listen`) that the controller and the HAProxy agent both serve.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use cairn_runtime::{Endpoints, ProbeServer, Status};
use tokio::sync::watch;

use cairn_runtime::metrics::{Counter, Family, Gauge, Histogram, MetricsRegistry, exponential_buckets};
use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConflictLabels {
    network: String,
    pool: String,
    address: String,
    mac: String,
}

/// The metrics.
pub struct Metrics {
    registry: MetricsRegistry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_seconds: Family<ControllerLabels, Histogram>,
    /// Services waiting for a free address.
    pub pending_services: Gauge,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// 1 while the store answers.
    pub store_up: Gauge,
    /// Orphaned allocations released by the repair loop.
    pub orphans_released: Counter,
    /// Events dropped because the publishing queue was full.
    pub events_dropped: Counter,
    /// Duration of each repair pass (one store listing plus one pass over the caches).
    pub repair_seconds: Histogram,
    probes: Family<ProbeLabels, Counter>,
    /// Duration of each conflict probe (an address nobody answers for takes the timeout).
    pub probe_seconds: Histogram,
    conflicts: Family<ConflictLabels, Counter>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = MetricsRegistry::with_prefix("cairn_ccm");
        Metrics {
            reconciles: r.register(
                "reconciles",
                "reconciles by controller and result",
                Family::default(),
            ),
            reconcile_seconds: r.register(
                "reconcile_duration_seconds",
                "reconcile latency",
                Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))),
            ),
            pending_services: r.register(
                "pending_services",
                "LoadBalancer Services waiting for a free VIP",
                Gauge::default(),
            ),
            leader: r.register("leader", "1 while this replica leads", Gauge::default()),
            store_up: r.register("store_up", "1 while the IPAM store answers", Gauge::default()),
            orphans_released: r.register(
                "orphans_released",
                "orphaned allocations released by repair",
                Counter::default(),
            ),
            events_dropped: r.register(
                "events_dropped",
                "Kubernetes Events dropped because the publishing queue was full",
                Counter::default(),
            ),
            repair_seconds: r.register(
                "repair_pass_duration_seconds",
                "duration of a repair pass",
                Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ),
            probes: r.register(
                "conflict_probes",
                "conflict probes of new VIPs by result (free, in_use, error; fresh: not probed again, found free ahead of need)",
                Family::default(),
            ),
            probe_seconds: r.register(
                "conflict_probe_duration_seconds",
                "duration of a conflict probe",
                Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ),
            conflicts: r.register(
                "address_conflicts",
                "addresses a conflict probe found answered by an unknown host, by network, pool, address and the MAC that answered",
                Family::default(),
            ),
            registry: r,
        }
    }

    /// Records one conflict probe: `result` is `free`, `in_use` or `error`.
    pub fn probed(&self, result: &'static str, elapsed: Duration) {
        self.probes.get_or_create(&ProbeLabels { result }).inc();
        self.probe_seconds.observe(elapsed.as_secs_f64());
    }

    /// Records a new address published without a probe: probed free ahead of need, recently.
    pub fn probe_skipped_fresh(&self) {
        self.probes.get_or_create(&ProbeLabels { result: "fresh" }).inc();
    }

    /// Records an address found in use by an unknown host.
    pub fn conflict(&self, network: &str, pool: &str, address: &str, mac: &str) {
        self.conflicts
            .get_or_create(&ConflictLabels {
                network: network.into(),
                pool: pool.into(),
                address: address.into(),
                mac: mac.into(),
            })
            .inc();
    }

    /// Records one reconcile.
    pub fn reconciled(&self, controller: &'static str, result: &'static str, elapsed: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels { controller, result })
            .inc();
        self.reconcile_seconds
            .get_or_create(&ControllerLabels { controller })
            .observe(elapsed.as_secs_f64());
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A process's metrics, as its probe endpoints see them.
pub trait Exposed: Send + Sync + 'static {
    /// The `/metrics` text.
    fn render(&self) -> String;

    /// Whether the metrics say the process can serve, on top of its ready flag (default: yes).
    fn serving(&self) -> bool {
        true
    }
}

impl Exposed for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

/// `/metrics` from the metrics; `/readyz` while the ready flag is up and the metrics agree.
struct Probes<M> {
    metrics: Arc<M>,
    ready: watch::Receiver<bool>,
}

impl<M: Exposed> Endpoints for Probes<M> {
    async fn metrics(&self) -> String {
        self.metrics.render()
    }

    async fn readiness(&self) -> Status {
        Status::ready_if(*self.ready.borrow() && self.metrics.serving())
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` (the `--metrics-listen` flag) until
/// the returned server is stopped or dropped.
pub async fn serve_probes<M: Exposed>(
    addr: SocketAddr,
    metrics: Arc<M>,
    ready: watch::Receiver<bool>,
) -> Result<ProbeServer, cairn_runtime::Error> {
    ProbeServer::start("--metrics-listen", addr, Arc::new(Probes { metrics, ready })).await
}
