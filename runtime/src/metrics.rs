//! A Prometheus registry that hands back what it registers (so a metric is declared once, not
//! created, cloned and registered in three lines) and renders the text exposition; and the
//! metric types the binaries use, named from one place. (Deriving `EncodeLabelSet` still
//! needs `prometheus-client` as a direct dependency: the derive names that crate.)

pub use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use prometheus_client::{
    encoding::text::encode,
    registry::{Metric, Registry},
};

/// A registry whose metric names all start with one prefix.
#[derive(Debug)]
pub struct MetricsRegistry(Registry);

impl MetricsRegistry {
    /// An empty registry; every name gets `<prefix>_`.
    pub fn with_prefix(prefix: &str) -> Self {
        MetricsRegistry(Registry::with_prefix(prefix))
    }

    /// Registers `metric` and returns it (metrics are handles; the registry keeps a clone).
    pub fn register<M: Metric + Clone>(&mut self, name: &str, help: &str, metric: M) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }

    /// The text exposition (OpenMetrics text, as `/metrics` serves it).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if encode(&mut out, &self.0).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_handles_show_in_the_text() {
        let mut r = MetricsRegistry::with_prefix("cairn_test");
        let c = r.register("things", "things done", Counter::<u64>::default());
        let g = r.register("up", "1 while up", Gauge::<i64>::default());
        c.inc();
        g.set(1);
        let text = r.render();
        assert!(text.contains("# HELP cairn_test_things things done"), "{text}");
        assert!(text.contains("cairn_test_things_total 1"), "{text}");
        assert!(text.contains("cairn_test_up 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
