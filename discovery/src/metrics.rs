//! What every part's metrics share: the latency buckets, and the gauge a part computes from its
//! state at scrape time instead of keeping a copy up to date.
//!
//! Each part owns its metrics (`xds::metrics`, `identity::metrics`, `mesh::MeshMetrics`,
//! `sources::metrics`, `rules_api::metrics`) and registers them with a
//! [`prometheus_client::registry::Registry`]; [`crate::http`] assembles the registry and
//! encodes it on `/metrics`.
//!
//! Help texts given to `Registry::register` end without a full stop (the crate adds one);
//! a collector's end with one.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds (seconds) of every latency histogram: from a millisecond (a snapshot build, a
/// push on a quiet mesh) to half a minute (a proxy stuck behind a slow link or a NACK).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Latency histograms by label set `L`.
pub type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

/// An empty [`Latencies`] family.
pub fn latencies<L: Clone + Eq + std::hash::Hash>() -> Latencies<L> {
    Family::new_with_constructor(latency_histogram)
}

/// Labels known at compile time: `[("type", "cds")]`.
pub type StaticLabels<const N: usize> = [(&'static str, &'static str); N];

/// One unlabelled gauge read from state on each scrape: `read` is called then, so the value is
/// never staler than the scrape.
pub struct ScrapeGauge<F> {
    name: &'static str,
    help: &'static str,
    read: F,
}

impl<F> ScrapeGauge<F>
where
    F: Fn() -> i64 + Send + Sync + 'static,
{
    pub fn boxed(name: &'static str, help: &'static str, read: F) -> Box<ScrapeGauge<F>> {
        Box::new(ScrapeGauge { name, help, read })
    }
}

impl<F> std::fmt::Debug for ScrapeGauge<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeGauge")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<F> Collector for ScrapeGauge<F>
where
    F: Fn() -> i64 + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new((self.read)());
        let metric = encoder.encode_descriptor(self.name, self.help, None, gauge.metric_type())?;
        gauge.encode(metric)
    }
}

/// A real Prometheus parser for the tests: Debian's `promtool`, installed when missing.
#[cfg(test)]
#[path = "../../tests/src/debian.rs"]
pub mod debian;
