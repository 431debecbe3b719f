//! Prometheus metrics of the store, served as text on `--metrics-listen` at `/metrics`.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use cairn_runtime::metrics::{Counter, Family, Gauge, Histogram, MetricsRegistry, exponential_buckets};
use prometheus_client::encoding::EncodeLabelSet;

use crate::ledger::{CommitObserver, Ledger};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    method: &'static str,
    role: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    network: String,
    pool: String,
    family: &'static str,
    state: &'static str,
}

/// The store's metrics.
pub struct Metrics {
    registry: MetricsRegistry,
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram>,
    audit: Family<AuditLabels, Counter>,
    commits: Counter,
    commit_seconds: Histogram,
    commit_requests: Histogram,
    allocations: Gauge,
    pool_addresses: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    leader: Gauge,
    follower_lag: Gauge,
    follower_loads: Counter,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut r = MetricsRegistry::with_prefix("cairn_ipam");
        Metrics {
            rpcs: r.register(
                "rpc_requests",
                "gRPC calls by method and result",
                Family::default(),
            ),
            rpc_seconds: r.register(
                "rpc_duration_seconds",
                "gRPC call latency, including the durable commit",
                Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_05, 2.0, 18))),
            ),
            audit: r.register(
                "audit",
                "mutating gRPC calls by method, caller role (cluster, cloud, reader, none, plaintext) and result",
                Family::default(),
            ),
            commits: r.register(
                "commits",
                "durable commit batches (one fsync each)",
                Counter::default(),
            ),
            commit_seconds: r.register(
                "commit_duration_seconds",
                "time to apply and fsync one batch",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            ),
            commit_requests: r.register(
                "commit_batch_requests",
                "requests acknowledged by one fsync (group commit)",
                Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            ),
            allocations: r.register("allocations", "allocations held", Gauge::default()),
            pool_addresses: r.register(
                "pool_addresses",
                "addresses per network, pool, family and state",
                Family::default(),
            ),
            leader: r.register(
                "leader",
                "1 while this replica is the store's writer (always with sled), 0 while it follows",
                Gauge::default(),
            ),
            follower_lag: r.register(
                "follower_lag_revisions",
                "etcd revisions a follower's replica had not applied at its last watch response (0 on the leader)",
                Gauge::default(),
            ),
            follower_loads: r.register(
                "follower_loads",
                "times a follower loaded its replica from etcd (start, and after a compaction or a lost watch)",
                Counter::default(),
            ),
            registry: r,
        }
    }

    /// A follower's replica is behind by `revisions` etcd revisions.
    pub fn follower_lag(&self, revisions: i64) {
        self.follower_lag.set(revisions);
    }

    /// A follower loaded its replica.
    pub fn follower_loaded(&self) {
        self.follower_loads.inc();
    }

    /// Records one RPC.
    pub fn observe_rpc(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        self.rpcs.get_or_create(&RpcLabels { method, code }).inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one audited (mutating) call.
    pub fn observe_audit(&self, method: &'static str, role: &'static str, code: &'static str) {
        self.audit
            .get_or_create(&AuditLabels { method, role, code })
            .inc();
    }

    /// The text exposition of a follower replica (no ledger loaded).
    pub fn render_follower(&self) -> String {
        self.leader.set(0);
        self.registry.render()
    }

    /// The text exposition, with gauges refreshed from the ledger.
    pub async fn render(&self, ledger: &Ledger) -> String {
        self.leader.set(1);
        self.follower_lag.set(0);
        self.allocations.set(ledger.allocation_count() as i64);
        if let Ok(usage) = ledger.usage(None).await {
            self.pool_addresses.clear();
            for u in usage {
                let fam = match u.family {
                    crate::alloc::addr::Family::V4 => "ipv4",
                    crate::alloc::addr::Family::V6 => "ipv6",
                };
                for (state, v) in [
                    ("total", u.total),
                    ("used", u.used),
                    ("free", u.free),
                    ("quarantined", u.quarantined),
                    ("out_of_range", u.out_of_range),
                ] {
                    let l = PoolLabels {
                        network: u.network.clone(),
                        pool: u.pool.clone(),
                        family: fam,
                        state,
                    };
                    self.pool_addresses.get_or_create(&l).set(v as f64);
                }
            }
        }
        self.registry.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Feeds commit figures into the metrics.
pub struct CommitMetrics(pub Arc<Metrics>);

impl CommitObserver for CommitMetrics {
    fn committed(&self, requests: usize, _ops: usize, elapsed: Duration) {
        self.0.commits.inc();
        self.0.commit_seconds.observe(elapsed.as_secs_f64());
        self.0.commit_requests.observe(requests as f64);
    }
}
