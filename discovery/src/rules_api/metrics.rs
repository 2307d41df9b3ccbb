//! The rules API's metrics: writes (PUT and DELETE) by kind and outcome.

use axum::http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Kind;
use crate::metrics::StaticLabels;

/// `{kind="routes",outcome="applied"}`.
type WriteLabels = StaticLabels<2>;

#[derive(Debug, Clone, Default)]
pub struct RulesApiMetrics {
    writes: Family<WriteLabels, Counter>,
}

/// What became of a write, from its answer.
pub fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "applied",
        // 409: an operator's file declares the object, or `If-Match` names an older version.
        409 => "conflict",
        400..=499 => "refused",
        _ => "failed",
    }
}

impl RulesApiMetrics {
    /// Registers under `pilotfish_rules_api_`.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("rules_api").register(
            "writes",
            "Writes (PUT, DELETE) by kind and outcome: applied (2xx), conflict (409: an \
             operator's file declares the object, or it changed since it was read), refused \
             (other 4xx: invalid, unauthenticated), failed (5xx, 503 while disabled)",
            self.writes.clone(),
        );
    }

    pub fn write(&self, kind: Kind, status: StatusCode) {
        self.writes
            .get_or_create(&[("kind", kind.segment()), ("outcome", outcome(status))])
            .inc();
    }

    pub fn writes(&self, kind: Kind, outcome: &'static str) -> u64 {
        self.writes
            .get(&[("kind", kind.segment()), ("outcome", outcome)])
            .map_or(0, |c| c.get())
    }
}
