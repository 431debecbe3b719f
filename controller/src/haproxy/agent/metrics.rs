//! The agent's metrics (prefix `cairn_ccm_haproxy_`), and the poller that reads HAProxy's
//! server states into them.

use std::{sync::Arc, time::Duration};

use cairn_runtime::metrics::{Counter, Family, Gauge, Histogram, MetricsRegistry, exponential_buckets};
use prometheus_client::encoding::EncodeLabelSet;

use crate::{haproxy::master::Master, metrics::Exposed};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// The agent's metrics (prefix `cairn_ccm_haproxy_`).
pub struct AgentMetrics {
    registry: MetricsRegistry,
    pub(super) reloads: Counter,
    reload_failures: Family<StageLabels, Counter>,
    pub(super) reload_seconds: Histogram,
    pub(super) frontends: Gauge,
    pub(super) backends: Gauge,
    backends_up: Gauge,
    pub(super) up: Gauge,
    pub(super) isolated: Gauge,
}

impl AgentMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = MetricsRegistry::with_prefix("cairn_ccm_haproxy");
        let m = AgentMetrics {
            reloads: r.register(
                "reloads",
                "configurations put into service (reloads, and starts by the agent)",
                Counter::default(),
            ),
            reload_failures: r.register(
                "reload_failures",
                "configurations HAProxy refused, by stage (validate, reload, io)",
                Family::default(),
            ),
            reload_seconds: r.register(
                "reload_duration_seconds",
                "validate + swap + reload",
                Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            ),
            frontends: r.register(
                "frontends",
                "frontends in the running configuration (stats frontend not counted)",
                Gauge::default(),
            ),
            backends: r.register(
                "backends",
                "backend servers in the running configuration",
                Gauge::default(),
            ),
            backends_up: r.register(
                "backends_up",
                "backend servers HAProxy reports up",
                Gauge::default(),
            ),
            up: r.register("up", "1 while HAProxy's master CLI answers", Gauge::default()),
            isolated: r.register(
                "isolated_frontends",
                "Service frontends left out of the running configuration because HAProxy could not serve them (e.g. cannot bind VIP:port)",
                Gauge::default(),
            ),
            registry: r,
        };
        // Every stage from the start, so a rate over them is defined before the first failure.
        for stage in ["validate", "reload", "io"] {
            let _ = m.reload_failures.get_or_create(&StageLabels { stage });
        }
        m
    }

    /// Counts a configuration HAProxy refused at `stage`.
    pub(super) fn reload_failed(&self, stage: &'static str) {
        self.reload_failures.get_or_create(&StageLabels { stage }).inc();
    }

    /// Text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Exposed for AgentMetrics {
    fn render(&self) -> String {
        AgentMetrics::render(self)
    }

    /// Ready only while HAProxy's master answers (besides a configuration being applied).
    fn serving(&self) -> bool {
        self.up.get() == 1
    }
}

/// Polls HAProxy's server states into `backends_up` / `up`.
pub(super) async fn poll_stats(master: Master, metrics: Arc<AgentMetrics>, every: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names() {
        let m = AgentMetrics::new();
        m.reloads.inc();
        m.reload_failed("reload");
        let text = m.render();
        for name in [
            "cairn_ccm_haproxy_reloads_total 1",
            "cairn_ccm_haproxy_reload_failures_total{stage=\"validate\"} 0",
            "cairn_ccm_haproxy_reload_failures_total{stage=\"reload\"} 1",
            "cairn_ccm_haproxy_reload_duration_seconds_count 0",
            "cairn_ccm_haproxy_frontends 0",
            "cairn_ccm_haproxy_backends 0",
            "cairn_ccm_haproxy_backends_up 0",
            "cairn_ccm_haproxy_up 0",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
