//! The ADS server's metrics: responses, resources and bytes sent by type, NACKs, stale nonces,
//! streams dropped for slow clients or closed for their age, open streams, and how long a
//! change takes to reach each proxy.
//!
//! Convergence is timed per stream and per type with a [`StreamTimer`]: a response sent for a
//! snapshot that arrived while the stream was open carries the moment discovery learned of the
//! change (`MeshSnapshot::learned_mono`). Sending it observes `pilotfish_xds_push_seconds`; the
//! proxy's ACK of that version observes `pilotfish_xds_convergence_seconds`. The initial sync
//! of a (re)connecting proxy is not a change reaching it and is not timed. The hot path is a
//! counter increment per response and one histogram observation per response and per ACK.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::connections::Connections;
use super::Event;
use crate::metrics::{latencies, Latencies, ScrapeGauge, StaticLabels};
use crate::resources::{short_name, PUSH_ORDER};

/// `{type="cds"}`.
type TypeLabel = StaticLabels<1>;

#[derive(Debug)]
pub struct XdsMetrics {
    pushes: Family<TypeLabel, Counter>,
    resources_sent: Family<TypeLabel, Counter>,
    sent_bytes: Family<TypeLabel, Counter>,
    push_seconds: Latencies<TypeLabel>,
    convergence_seconds: Latencies<TypeLabel>,
    /// The three families' members, indexed like [`PUSH_ORDER`]: the hot path skips the
    /// families' lookups.
    by_type: [ByType; 4],
    nacks: Counter,
    stale_nonces: Counter,
    /// Streams dropped because the client did not take a response in time.
    send_timeouts: Counter,
    /// Streams closed at their (jittered) maximum age.
    aged_out: Counter,
}

#[derive(Debug)]
struct ByType {
    pushes: Counter,
    resources_sent: Counter,
    sent_bytes: Counter,
    push_seconds: Histogram,
    convergence_seconds: Histogram,
}

impl Default for XdsMetrics {
    fn default() -> Self {
        let pushes = Family::<TypeLabel, Counter>::default();
        let resources_sent = Family::<TypeLabel, Counter>::default();
        let sent_bytes = Family::<TypeLabel, Counter>::default();
        let push_seconds = latencies();
        let convergence_seconds = latencies();
        let by_type = PUSH_ORDER.map(|t| {
            let label = [("type", short_name(t))];
            ByType {
                pushes: pushes.get_or_create_owned(&label),
                resources_sent: resources_sent.get_or_create_owned(&label),
                sent_bytes: sent_bytes.get_or_create_owned(&label),
                push_seconds: push_seconds.get_or_create_owned(&label),
                convergence_seconds: convergence_seconds.get_or_create_owned(&label),
            }
        });
        XdsMetrics {
            pushes,
            resources_sent,
            sent_bytes,
            push_seconds,
            convergence_seconds,
            by_type,
            nacks: Counter::default(),
            stale_nonces: Counter::default(),
            send_timeouts: Counter::default(),
            aged_out: Counter::default(),
        }
    }
}

impl XdsMetrics {
    /// Registers under `pilotfish_xds_`; `connections` gives the open streams at scrape time.
    pub fn register(&self, registry: &mut Registry, connections: Connections) {
        let xds = registry.sub_registry_with_prefix("xds");
        xds.register_collector(ScrapeGauge::boxed(
            "connected_proxies",
            "Open ADS streams.",
            move || i64::try_from(connections.count()).unwrap_or(i64::MAX),
        ));
        xds.register("pushes", "xDS responses sent, by type", self.pushes.clone());
        xds.register(
            "resources_sent",
            "Resources sent in xDS responses, by type",
            self.resources_sent.clone(),
        );
        // `_bytes` is the unit; prometheus-client appends `_total` to the counter.
        xds.register(
            "sent_bytes",
            "Bytes of xDS responses sent (gRPC frames), by type",
            self.sent_bytes.clone(),
        );
        xds.register(
            "streams_aged_out",
            "ADS streams closed at their maximum age (max_stream_age, jittered) so proxies \
             rebalance over replicas",
            self.aged_out.clone(),
        );
        xds.register(
            "nacks",
            "xDS responses rejected by proxies",
            self.nacks.clone(),
        );
        xds.register(
            "stale_nonces",
            "SotW requests ignored for a superseded nonce",
            self.stale_nonces.clone(),
        );
        xds.register(
            "send_timeouts",
            "ADS streams closed because the proxy did not take a response in time",
            self.send_timeouts.clone(),
        );
        xds.register(
            "push_seconds",
            "From discovery learning of a change to the response carrying it being sent to a \
             proxy, per response, by type",
            self.push_seconds.clone(),
        );
        xds.register(
            "convergence_seconds",
            "From discovery learning of a change to a proxy ACKing the response carrying it, \
             per response, by type",
            self.convergence_seconds.clone(),
        );
    }

    /// Counts `event` and, with `learned` (when the change behind the current snapshot was
    /// learned, if it arrived while the stream was open), times it in the stream's `timer`.
    pub fn record(&self, event: &Event, timer: &mut StreamTimer, learned: Option<Instant>) {
        match event {
            Event::Pushed {
                type_url, version, ..
            } => {
                let Some(i) = type_index(type_url) else {
                    return;
                };
                let by_type = &self.by_type[i];
                by_type.pushes.inc();
                timer.sent[i] = learned.map(|learned| {
                    by_type
                        .push_seconds
                        .observe(learned.elapsed().as_secs_f64());
                    Sent {
                        version: version.clone(),
                        learned,
                    }
                });
            }
            Event::Ack {
                type_url, version, ..
            } => {
                let Some(i) = type_index(type_url) else {
                    return;
                };
                if timer.sent[i]
                    .as_ref()
                    .is_some_and(|s| s.version == *version)
                {
                    if let Some(sent) = timer.sent[i].take() {
                        self.by_type[i]
                            .convergence_seconds
                            .observe(sent.learned.elapsed().as_secs_f64());
                    }
                }
            }
            Event::Nack { type_url, .. } => {
                self.nacks.inc();
                // That change did not converge on this proxy; a later fix is timed afresh.
                if let Some(i) = type_index(type_url) {
                    timer.sent[i] = None;
                }
            }
            Event::StaleNonce { .. } => {
                self.stale_nonces.inc();
            }
            Event::UnknownType { .. } | Event::Resumed { .. } => {}
        }
    }

    /// A response of `type_url` carrying `resources` went out in `bytes` bytes.
    pub fn sent(&self, type_url: &str, resources: usize, bytes: usize) {
        if let Some(i) = type_index(type_url) {
            self.by_type[i].resources_sent.inc_by(resources as u64);
            self.by_type[i].sent_bytes.inc_by(bytes as u64);
        }
    }

    pub fn send_timeout(&self) {
        self.send_timeouts.inc();
    }

    pub fn aged_out(&self) {
        self.aged_out.inc();
    }

    /// Pushes per type URL, in push order.
    pub fn pushes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        PUSH_ORDER
            .iter()
            .zip(&self.by_type)
            .map(|(t, b)| (*t, b.pushes.get()))
    }

    pub fn nacks(&self) -> u64 {
        self.nacks.get()
    }
}

fn type_index(type_url: &str) -> Option<usize> {
    PUSH_ORDER.iter().position(|t| *t == type_url)
}

/// One stream's responses that carry a timed change and wait for their ACK, by type: only the
/// latest per type, since a newer response supersedes an unanswered one.
#[derive(Debug, Default)]
pub struct StreamTimer {
    sent: [Option<Sent>; 4],
}

#[derive(Debug)]
struct Sent {
    version: String,
    learned: Instant,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::encoding::prometheus_text::encode;

    use super::*;
    use crate::resources::{CLUSTER, LISTENER};

    fn pushed(type_url: &str, version: &str) -> Event {
        Event::Pushed {
            type_url: type_url.into(),
            version: version.into(),
            resources: 1,
        }
    }

    fn ack(type_url: &str, version: &str) -> Event {
        Event::Ack {
            type_url: type_url.into(),
            version: version.into(),
            nonce: "1".into(),
        }
    }

    fn text(m: &XdsMetrics) -> String {
        let mut registry = Registry::default();
        m.register(&mut registry, Connections::default());
        let mut out = String::new();
        encode(&mut out, &registry).expect("encodes");
        out
    }

    fn count(text: &str, sample: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {sample} in:\n{text}"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_timed_from_learned_to_pushed_to_acked() {
        let m = XdsMetrics::default();
        let mut timer = StreamTimer::default();
        let learned = Instant::now();
        tokio::time::advance(Duration::from_millis(20)).await;
        m.record(&pushed(CLUSTER, "v2"), &mut timer, Some(learned));
        tokio::time::advance(Duration::from_millis(300)).await;
        // An ACK of an older version says nothing about this change.
        m.record(&ack(CLUSTER, "v1"), &mut timer, Some(learned));
        m.record(&ack(CLUSTER, "v2"), &mut timer, Some(learned));
        // A second ACK of the same version is not a second convergence.
        m.record(&ack(CLUSTER, "v2"), &mut timer, Some(learned));
        let t = text(&m);
        assert_eq!(count(&t, "xds_push_seconds_count{type=\"cds\"}"), 1);
        assert_eq!(
            count(&t, "xds_push_seconds_bucket{type=\"cds\",le=\"0.01\"}"),
            0
        );
        assert_eq!(
            count(&t, "xds_push_seconds_bucket{type=\"cds\",le=\"0.025\"}"),
            1
        );
        assert_eq!(count(&t, "xds_convergence_seconds_count{type=\"cds\"}"), 1);
        assert_eq!(
            count(
                &t,
                "xds_convergence_seconds_bucket{type=\"cds\",le=\"0.25\"}"
            ),
            0
        );
        assert_eq!(
            count(
                &t,
                "xds_convergence_seconds_bucket{type=\"cds\",le=\"0.5\"}"
            ),
            1
        );
        assert_eq!(count(&t, "xds_pushes_total{type=\"cds\"}"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn initial_syncs_and_nacked_changes_are_not_convergence() {
        let m = XdsMetrics::default();
        let mut timer = StreamTimer::default();
        // The initial sync: counted, not timed.
        m.record(&pushed(LISTENER, "v1"), &mut timer, None);
        m.record(&ack(LISTENER, "v1"), &mut timer, None);
        // A change the proxy rejects.
        let learned = Instant::now();
        m.record(&pushed(LISTENER, "v2"), &mut timer, Some(learned));
        m.record(
            &Event::Nack {
                type_url: LISTENER.into(),
                version: "v1".into(),
                nonce: "2".into(),
                message: "bad".into(),
            },
            &mut timer,
            Some(learned),
        );
        m.record(&ack(LISTENER, "v2"), &mut timer, Some(learned));
        let t = text(&m);
        assert_eq!(count(&t, "xds_pushes_total{type=\"lds\"}"), 2);
        assert_eq!(count(&t, "xds_push_seconds_count{type=\"lds\"}"), 1);
        assert_eq!(count(&t, "xds_convergence_seconds_count{type=\"lds\"}"), 0);
        assert_eq!(count(&t, "xds_nacks_total"), 1);
    }
}
