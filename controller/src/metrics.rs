//! Prometheus metrics of the controller (and the HAProxy agent), served at `/metrics`.

use std::time::Duration;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

/// The metrics.
pub struct Metrics {
    registry: Registry,
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cairn_ccm");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "reconciles by controller and result",
            reconciles.clone(),
        );
        let reconcile_seconds = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "reconcile_duration_seconds",
            "reconcile latency",
            reconcile_seconds.clone(),
        );
        let pending_services = Gauge::default();
        registry.register(
            "pending_services",
            "LoadBalancer Services waiting for a free VIP",
            pending_services.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let store_up = Gauge::default();
        registry.register("store_up", "1 while the IPAM store answers", store_up.clone());
        let orphans_released = Counter::default();
        registry.register(
            "orphans_released",
            "orphaned allocations released by repair",
            orphans_released.clone(),
        );
        Metrics {
            registry,
            reconciles,
            reconcile_seconds,
            pending_services,
            leader,
            store_up,
            orphans_released,
        }
    }

    /// Registry, for components that add their own metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
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
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
