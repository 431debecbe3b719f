//! Prometheus metrics of the store, served as text on `--metrics-listen` at `/metrics`.

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
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

use crate::ledger::{CommitObserver, Ledger};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
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
    registry: Registry,
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram>,
    commits: Counter,
    commit_seconds: Histogram,
    commit_requests: Histogram,
    allocations: Gauge,
    pool_addresses: Family<PoolLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cairn_ipam");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register("rpc_requests", "gRPC calls by method and result", rpcs.clone());
        let rpc_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency, including the durable commit",
            rpc_seconds.clone(),
        );
        let commits = Counter::default();
        registry.register(
            "commits",
            "durable commit batches (one fsync each)",
            commits.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register(
            "commit_duration_seconds",
            "time to apply and fsync one batch",
            commit_seconds.clone(),
        );
        let commit_requests = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "commit_batch_requests",
            "requests acknowledged by one fsync (group commit)",
            commit_requests.clone(),
        );
        let allocations = Gauge::default();
        registry.register("allocations", "allocations held", allocations.clone());
        let pool_addresses = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "pool_addresses",
            "addresses per network, pool, family and state",
            pool_addresses.clone(),
        );
        Metrics {
            registry,
            rpcs,
            rpc_seconds,
            commits,
            commit_seconds,
            commit_requests,
            allocations,
            pool_addresses,
        }
    }

    /// Records one RPC.
    pub fn observe_rpc(&self, method: &'static str, code: &'static str, elapsed: Duration) {
        self.rpcs.get_or_create(&RpcLabels { method, code }).inc();
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition, with gauges refreshed from the ledger.
    pub async fn render(&self, ledger: &Ledger) -> String {
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
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
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
