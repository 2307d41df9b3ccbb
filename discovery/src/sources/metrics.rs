//! The sources' metrics: the file registry's problems, Consul per datacenter (read from the
//! status the adapter publishes, at scrape time), how long each Consul request takes, and the
//! merge conflicts between the two.
//!
//! The registries crate picks no metrics library: the Consul adapter reports each request's
//! time to the [`RequestObserver`] made here, which observes `pilotfish_consul_poll_seconds`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use pilotfish_registries::consul::{ConsulStatus, DatacenterStatus, RequestObserver};
use pilotfish_registries::files::FilesStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::SourcesView;
use crate::metrics::{latencies, Latencies, ScrapeGauge};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PollLabels {
    dc: String,
    request: &'static str,
}

/// What the sources record as they run (the rest is read from their status at scrape time).
#[derive(Debug, Clone)]
pub struct SourcesMetrics {
    consul_poll_seconds: Latencies<PollLabels>,
}

impl Default for SourcesMetrics {
    fn default() -> Self {
        SourcesMetrics {
            consul_poll_seconds: latencies(),
        }
    }
}

impl SourcesMetrics {
    /// For [`pilotfish_registries::consul::ConsulRegistry::with_request_observer`].
    pub fn consul_observer(&self) -> RequestObserver {
        let family = self.consul_poll_seconds.clone();
        Arc::new(move |dc: &str, request: &'static str, took: Duration| {
            family
                .get_or_create(&PollLabels {
                    dc: dc.to_string(),
                    request,
                })
                .observe(took.as_secs_f64());
        })
    }

    /// Registers under `pilotfish_registry_` (files, merge conflicts) and `pilotfish_consul_`
    /// (only when Consul is configured).
    pub fn register(
        &self,
        registry: &mut Registry,
        files: watch::Receiver<Arc<FilesStatus>>,
        view: &SourcesView,
    ) {
        let sources = registry.sub_registry_with_prefix("registry");
        let problems = files.clone();
        sources.register_collector(ScrapeGauge::boxed(
            "file_problems",
            "Problems in registry files (their last good version stays in force).",
            move || {
                let n: usize = problems
                    .borrow()
                    .files
                    .values()
                    .map(|f| f.problems.len())
                    .sum();
                i64::try_from(n).unwrap_or(i64::MAX)
            },
        ));
        sources.register_collector(ScrapeGauge::boxed(
            "files_restored",
            "Broken registry files served from the copy an earlier run stored \
             (state_dir/last-good).",
            move || {
                let files = files.borrow();
                let n = files
                    .files
                    .values()
                    .filter(|f| f.restored.is_some())
                    .count();
                i64::try_from(n).unwrap_or(i64::MAX)
            },
        ));
        let conflicts = view.conflicts.clone();
        sources.register_collector(ScrapeGauge::boxed(
            "merge_conflicts",
            "Instances declared by TOML and Consul at the same address:port (TOML's is used).",
            move || i64::try_from(conflicts.borrow().len()).unwrap_or(i64::MAX),
        ));
        if let Some(consul) = &view.consul {
            let consul_registry = registry.sub_registry_with_prefix("consul");
            consul_registry.register_collector(Box::new(PerDatacenter {
                status: consul.status.clone(),
            }));
            consul_registry.register(
                "poll_seconds",
                "Time of each Consul request, by datacenter and request: `services` and \
                 `checks` are blocking queries (an answer waits for a change or the `wait` \
                 time), `service` reads one service's instances",
                self.consul_poll_seconds.clone(),
            );
        }
    }
}

/// Consul's per-datacenter gauges and counters, from the adapter's status at scrape time.
struct PerDatacenter {
    status: watch::Receiver<Arc<ConsulStatus>>,
}

impl std::fmt::Debug for PerDatacenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerDatacenter").finish_non_exhaustive()
    }
}

/// (name, type, help, value of a datacenter)
type PerDcFamily = (
    &'static str,
    MetricType,
    &'static str,
    fn(&DatacenterStatus) -> u64,
);

const PER_DATACENTER: [PerDcFamily; 8] = [
    (
        "stale",
        MetricType::Gauge,
        "1 while the datacenter's last good catalog is served instead of a fresh one.",
        |d| u64::from(d.stale),
    ),
    (
        "restored",
        MetricType::Gauge,
        "1 while the catalog an earlier run stored is served (not read in full since start).",
        |d| u64::from(d.restored_since.is_some()),
    ),
    (
        "synced",
        MetricType::Gauge,
        "1 once every selected service of the datacenter was read.",
        |d| u64::from(d.synced),
    ),
    (
        "last_sync_timestamp_seconds",
        MetricType::Gauge,
        "Unix time of the last successful answer from the datacenter (0: never).",
        |d| {
            d.last_sync
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |t| t.as_secs())
        },
    ),
    (
        "errors",
        MetricType::Counter,
        "Failed Consul requests.",
        |d| d.errors_total,
    ),
    (
        "requests",
        MetricType::Counter,
        "Consul requests sent.",
        |d| d.requests_total,
    ),
    (
        "instances",
        MetricType::Gauge,
        "Instances read from the datacenter.",
        |d| d.instances as u64,
    ),
    (
        "rejected_entries",
        MetricType::Gauge,
        "Consul entries not used (see /status sources.consul).",
        |d| d.rejected.len() as u64,
    ),
];

impl Collector for PerDatacenter {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = Arc::clone(&self.status.borrow());
        for (name, kind, help, value) in PER_DATACENTER {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (dc, d) in &status.datacenters {
                let labels = [("dc", dc.as_str())];
                let sample = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(d)).encode(sample)?,
                    _ => ConstGauge::new(value(d)).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}
