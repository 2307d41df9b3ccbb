//! The traffic rules in one file: `[routes.<svc>]` and `[policies.<svc>]`, as serde sees
//! them and as checked one file at a time. Part of [`super::parse`], which calls in here for
//! each route and policy table; checks against other files are in [`super::validate`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use super::actions::{
    RawBackoff, RawFault, RawHash, RawHeaderEdits, RawHealthCheck, RawLocality, RawMirror,
    RawOutlier, RawPool, RawRateLimit, RawRedirect, RawRewrite,
};
use super::parse::{key, Context, Pos, MAX_WEIGHT};
use crate::model::{
    Destination, Labels, LoadBalancer, Policy, Retries, Route, RouteMatch, RouteRule, RuleActions,
};

/// More retry attempts than this is a retry storm waiting to happen, not a policy.
pub(crate) const MAX_RETRY_ATTEMPTS: i64 = 100;

/// Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` conditions. Checked here because a
/// typo would otherwise reach Envoy and only show up as retries that never happen.
const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteDecl {
    pub pos: Pos,
    pub route: Route,
    /// Every `to[].subset` of the rules, to check against the policy's subsets.
    pub subset_refs: Vec<SubsetRef>,
    /// Where HTTP-only settings (retries, match) are, so a TCP service can refuse them.
    pub http_only: Vec<(String, Pos)>,
    /// Every `mirror`, to check the service and subset against the catalog.
    pub mirrors: Vec<MirrorRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MirrorRef {
    /// The field path, `routes.reviews.rules[0].mirror`.
    pub field: String,
    pub service: String,
    pub subset: Option<String>,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubsetRef {
    /// The field path, `routes.reviews.rules[1].to[0].subset`.
    pub field: String,
    pub subset: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicyDecl {
    pub pos: Pos,
    pub policy: Policy,
    /// Where HTTP-only settings (hash on header/cookie, rate_limit) are.
    pub http_only: Vec<(String, Pos)>,
}

// ---- the tables as serde sees them ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<RawRetries>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetries {
    attempts: Spanned<i64>,
    per_try_timeout: Option<Spanned<String>>,
    #[serde(default)]
    on: Vec<Spanned<String>>,
    backoff: Option<RawBackoff>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(rename = "match")]
    matches: Option<Spanned<RawMatch>>,
    to: Option<Spanned<Vec<Spanned<RawDestination>>>>,
    retries: Option<Spanned<RawRetries>>,
    timeout: Option<Spanned<String>>,
    fault: Option<Spanned<RawFault>>,
    mirror: Option<Spanned<RawMirror>>,
    headers: Option<Spanned<RawHeaderEdits>>,
    rewrite: Option<Spanned<RawRewrite>>,
    redirect: Option<Spanned<RawRedirect>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    /// `name = "exact value"` or `name = { exact | prefix | regex = "...", present = bool }`.
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, toml::Value>,
    /// Query parameters, in the same forms as headers.
    #[serde(default)]
    query: BTreeMap<Spanned<String>, toml::Value>,
    path_prefix: Option<Spanned<String>>,
    path_exact: Option<Spanned<String>>,
    /// RE2 regex on the whole path (without the query).
    path_regex: Option<Spanned<String>>,
    method: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDestination {
    subset: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    subsets: BTreeMap<Spanned<String>, Labels>,
    load_balancer: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    /// ring_hash / maglev only: `{ header = "x" }`, `{ cookie = "c", ttl = "1h" }`, `{ source_ip = true }`.
    hash: Option<Spanned<RawHash>>,
    /// Circuit breaking: `{ max_connections, max_pending_requests, max_requests, max_retries }`.
    connection_pool: Option<RawPool>,
    /// `{ consecutive_5xx, interval, base_ejection_time, max_ejection_percent }`.
    outlier_detection: Option<RawOutlier>,
    /// `{ path, interval, timeout, healthy_threshold, unhealthy_threshold }`.
    health_check: Option<RawHealthCheck>,
    idle_timeout: Option<Spanned<String>>,
    /// `{ requests, per }`, enforced by each caller's Envoy (429, `x-pilotfish-ratelimited`).
    rate_limit: Option<Spanned<RawRateLimit>>,
    /// `{ failover = ["dc1", "dc2"] }`: instance localities in priority order.
    locality: Option<RawLocality>,
}

impl Context {
    pub(super) fn route(&mut self, name: Spanned<String>, raw: RawRoute) -> (String, RouteDecl) {
        let path = format!("routes.{}", key(name.get_ref()));
        self.name(&name, &path, "service");
        let mut http_only = Vec::new();
        let timeout = raw
            .timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{path}.timeout")));
        let retries = raw.retries.map(|r| {
            http_only.push((format!("{path}.retries"), self.pos(r.span())));
            self.retries(&format!("{path}.retries"), r.into_inner())
        });
        let mut subset_refs = Vec::new();
        let mut mirrors = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in raw.rules.into_iter().enumerate() {
            let rule_path = format!("{path}.rules[{i}]");
            let origin = self.origin(rule.span());
            let rule_span = rule.span();
            let rule = rule.into_inner();
            let matches = match rule.matches {
                Some(m) => {
                    let field = format!("{rule_path}.match");
                    let pos = self.pos(m.span());
                    let matches = self.route_match(&field, m.into_inner());
                    if !matches.is_empty() {
                        http_only.push((field, pos));
                    }
                    matches
                }
                None => RouteMatch::default(),
            };
            let to = match (rule.to, &rule.redirect) {
                (Some(to), None) => {
                    self.destinations(&format!("{rule_path}.to"), to, &mut subset_refs)
                }
                (Some(to), Some(_)) => {
                    self.report(
                        to.span(),
                        &format!("{rule_path}.to"),
                        "set together with redirect; a redirected request goes nowhere else",
                    );
                    Vec::new()
                }
                (None, Some(_)) => Vec::new(),
                (None, None) => {
                    self.report(
                        rule_span.clone(),
                        &format!("{rule_path}.to"),
                        "missing (a rule needs destinations, or a redirect)",
                    );
                    Vec::new()
                }
            };
            let mut actions = RuleActions::default();
            let mut http = |cx: &Context, key: &str, span: std::ops::Range<usize>| {
                http_only.push((format!("{rule_path}.{key}"), cx.pos(span)));
            };
            if let Some(r) = rule.retries {
                http(self, "retries", r.span());
                actions.retries =
                    Some(self.retries(&format!("{rule_path}.retries"), r.into_inner()));
            }
            if let Some(t) = &rule.timeout {
                http(self, "timeout", t.span());
                actions.timeout = self.duration(t, &format!("{rule_path}.timeout"));
            }
            if let Some(f) = rule.fault {
                http(self, "fault", f.span());
                actions.fault = Some(self.fault(&format!("{rule_path}.fault"), f));
            }
            if let Some(m) = rule.mirror {
                http(self, "mirror", m.span());
                let field = format!("{rule_path}.mirror");
                let mirror = self.mirror(&field, m.get_ref());
                mirrors.push(MirrorRef {
                    field,
                    service: mirror.service.clone(),
                    subset: mirror.subset.clone(),
                    pos: self.pos(m.get_ref().service.span()),
                });
                actions.mirror = Some(mirror);
            }
            if let Some(h) = rule.headers {
                http(self, "headers", h.span());
                let (request, response) =
                    self.header_edits(&format!("{rule_path}.headers"), h.into_inner());
                actions.request_headers = request;
                actions.response_headers = response;
            }
            if let Some(r) = rule.rewrite {
                http(self, "rewrite", r.span());
                actions.rewrite = Some(self.rewrite(&format!("{rule_path}.rewrite"), r));
            }
            if let Some(r) = rule.redirect {
                http(self, "redirect", r.span());
                actions.redirect = Some(self.redirect(&format!("{rule_path}.redirect"), r));
            }
            rules.push(RouteRule {
                matches,
                to,
                actions,
                origin,
            });
        }
        let decl = RouteDecl {
            pos: self.pos(name.span()),
            route: Route {
                service: name.get_ref().clone(),
                timeout,
                retries,
                rules,
                origin: self.origin(name.span()),
            },
            subset_refs,
            http_only,
            mirrors,
        };
        (name.into_inner(), decl)
    }

    fn retries(&mut self, path: &str, raw: RawRetries) -> Retries {
        let attempts = match u32::try_from(*raw.attempts.get_ref()) {
            Ok(a) if i64::from(a) <= MAX_RETRY_ATTEMPTS => a,
            _ => {
                self.report(
                    raw.attempts.span(),
                    &format!("{path}.attempts"),
                    format!(
                        "{} is out of range (0-{MAX_RETRY_ATTEMPTS})",
                        raw.attempts.get_ref()
                    ),
                );
                0
            }
        };
        let per_try_timeout = raw
            .per_try_timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{path}.per_try_timeout")));
        let mut on = Vec::new();
        for (i, cond) in raw.on.into_iter().enumerate() {
            if !RETRY_ON.contains(&cond.get_ref().as_str()) {
                self.report(
                    cond.span(),
                    &format!("{path}.on[{i}]"),
                    format!(
                        "unknown retry condition \"{}\" (expected one of {})",
                        cond.get_ref(),
                        RETRY_ON.join(", ")
                    ),
                );
            }
            on.push(cond.into_inner());
        }
        let backoff = raw
            .backoff
            .and_then(|b| self.backoff(&format!("{path}.backoff"), b));
        Retries {
            attempts,
            per_try_timeout,
            on,
            backoff,
        }
    }

    fn route_match(&mut self, path: &str, raw: RawMatch) -> RouteMatch {
        let mut headers = BTreeMap::new();
        let mut header_conditions = BTreeMap::new();
        for (name, value) in raw.headers {
            let field = format!("{path}.headers");
            self.header_name(&name, &field);
            // HTTP header names are case-insensitive and Envoy sees them in lower case.
            let lower = name.get_ref().to_ascii_lowercase();
            let twice = match value {
                toml::Value::String(v) => headers.insert(lower.clone(), v).is_some(),
                other => {
                    let field = format!("{field}.{}", key(&lower));
                    match self.condition(&name, &other, &field) {
                        Some(c) => header_conditions.insert(lower.clone(), c).is_some(),
                        None => false,
                    }
                }
            };
            if twice || (headers.contains_key(&lower) && header_conditions.contains_key(&lower)) {
                self.report(
                    name.span(),
                    &field,
                    format!("header \"{lower}\" is matched twice"),
                );
            }
        }
        let mut query = BTreeMap::new();
        for (name, value) in raw.query {
            let field = format!("{path}.query.{}", key(name.get_ref()));
            if name.get_ref().is_empty() {
                self.report(name.span(), &field, "a query parameter needs a name");
            }
            if let Some(c) = self.condition(&name, &value, &field) {
                if c == crate::model::StringCondition::Present(false) {
                    // Envoy cannot match the absence of a query parameter.
                    self.report(
                        name.span(),
                        &format!("{field}.present"),
                        "only `present = true` is supported for query parameters",
                    );
                }
                query.insert(name.into_inner(), c);
            }
        }
        if let Some(re) = &raw.path_regex {
            self.regex(re, &format!("{path}.path_regex"));
        }
        let paths = usize::from(raw.path_prefix.is_some())
            + usize::from(raw.path_exact.is_some())
            + usize::from(raw.path_regex.is_some());
        if paths > 1 && raw.path_regex.is_some() {
            if let Some(re) = &raw.path_regex {
                self.report(
                    re.span(),
                    &format!("{path}.path_regex"),
                    "set together with path_prefix or path_exact; use one of them",
                );
            }
        }
        for (field, value) in [
            ("path_prefix", &raw.path_prefix),
            ("path_exact", &raw.path_exact),
        ] {
            if let Some(v) = value {
                if !v.get_ref().starts_with('/') {
                    self.report(
                        v.span(),
                        &format!("{path}.{field}"),
                        format!("\"{}\" must start with '/'", v.get_ref()),
                    );
                }
            }
        }
        if let (Some(_), Some(exact)) = (&raw.path_prefix, &raw.path_exact) {
            self.report(
                exact.span(),
                &format!("{path}.path_exact"),
                "set together with path_prefix; use one of them",
            );
        }
        if let Some(m) = &raw.method {
            let valid =
                !m.get_ref().is_empty() && m.get_ref().chars().all(|c| c.is_ascii_uppercase());
            if !valid {
                self.report(
                    m.span(),
                    &format!("{path}.method"),
                    format!(
                        "\"{}\" is not an HTTP method (upper case, like GET)",
                        m.get_ref()
                    ),
                );
            }
        }
        RouteMatch {
            headers,
            header_conditions,
            query,
            path_prefix: raw.path_prefix.map(Spanned::into_inner),
            path_exact: raw.path_exact.map(Spanned::into_inner),
            path_regex: raw.path_regex.map(Spanned::into_inner),
            method: raw.method.map(Spanned::into_inner),
        }
    }

    fn destinations(
        &mut self,
        path: &str,
        raw: Spanned<Vec<Spanned<RawDestination>>>,
        subset_refs: &mut Vec<SubsetRef>,
    ) -> Vec<Destination> {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.is_empty() {
            self.report(span.clone(), path, "a rule needs at least one destination");
        }
        let mut seen = BTreeSet::new();
        let mut total: i64 = 0;
        let mut out = Vec::new();
        for (j, dest) in raw.into_iter().enumerate() {
            let dest_span = dest.span();
            let dest = dest.into_inner();
            let field = format!("{path}[{j}]");
            if let Some(subset) = &dest.subset {
                let subset_field = format!("{field}.subset");
                self.name(subset, &subset_field, "subset");
                subset_refs.push(SubsetRef {
                    field: subset_field,
                    subset: subset.get_ref().clone(),
                    pos: self.pos(subset.span()),
                });
            }
            let subset = dest.subset.map(Spanned::into_inner);
            if !seen.insert(subset.clone()) {
                let what = subset
                    .as_deref()
                    .map_or("the whole service".to_string(), |s| {
                        format!("subset \"{s}\"")
                    });
                self.report(
                    dest_span,
                    &field,
                    format!("{what} is listed twice in this rule"),
                );
            }
            let weight = match &dest.weight {
                None => 1,
                Some(w) => match u32::try_from(*w.get_ref()) {
                    Ok(v) if i64::from(v) <= MAX_WEIGHT => v,
                    _ => {
                        self.report(
                            w.span(),
                            &format!("{field}.weight"),
                            format!("{} is out of range (0-{MAX_WEIGHT})", w.get_ref()),
                        );
                        1
                    }
                },
            };
            total += i64::from(weight);
            out.push(Destination { subset, weight });
        }
        if !out.is_empty() && total == 0 {
            self.report(
                span.clone(),
                path,
                "every weight is 0; at least one destination must have a positive weight",
            );
        }
        if total > MAX_WEIGHT {
            self.report(
                span,
                path,
                format!("the weights add up to {total}, more than {MAX_WEIGHT}"),
            );
        }
        out
    }

    pub(super) fn policy(&mut self, name: Spanned<String>, raw: RawPolicy) -> (String, PolicyDecl) {
        let path = format!("policies.{}", key(name.get_ref()));
        self.name(&name, &path, "service");
        let mut subsets = BTreeMap::new();
        for (subset, selector) in raw.subsets {
            let field = format!("{path}.subsets.{}", key(subset.get_ref()));
            self.name(&subset, &field, "subset");
            if selector.is_empty() {
                // An empty selector matches every instance: the whole service, which a route
                // says by leaving `subset` out.
                self.report(subset.span(), &field, "an empty selector selects every instance; give at least one label (a route omits `subset` to mean the whole service)");
            }
            subsets.insert(subset.into_inner(), selector);
        }
        let load_balancer = match &raw.load_balancer {
            Some(lb) => lb.get_ref().parse().unwrap_or_else(|message| {
                self.report(lb.span(), &format!("{path}.load_balancer"), message);
                LoadBalancer::default()
            }),
            None => LoadBalancer::default(),
        };
        let connect_timeout = raw
            .connect_timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{path}.connect_timeout")));
        let mut http_only = Vec::new();
        let hash = raw.hash.and_then(|h| {
            let field = format!("{path}.hash");
            let pos = self.pos(h.span());
            if !matches!(load_balancer, LoadBalancer::RingHash | LoadBalancer::Maglev) {
                self.report(
                    h.span(),
                    &field,
                    "only ring_hash and maglev hash; set load_balancer = \"ring_hash\" or \"maglev\"",
                );
            }
            let hash = self.hash(&field, h);
            if !matches!(hash, Some(crate::model::HashOn::SourceIp) | None) {
                http_only.push((field, pos));
            }
            hash
        });
        let connection_pool = raw
            .connection_pool
            .map(|p| self.pool(&format!("{path}.connection_pool"), p));
        let outlier_detection = raw
            .outlier_detection
            .map(|o| self.outlier(&format!("{path}.outlier_detection"), o));
        let health_check = raw
            .health_check
            .map(|h| self.health_check(&format!("{path}.health_check"), h));
        let idle_timeout = raw
            .idle_timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{path}.idle_timeout")));
        let rate_limit = raw.rate_limit.and_then(|r| {
            let field = format!("{path}.rate_limit");
            http_only.push((field.clone(), self.pos(r.span())));
            self.rate_limit(&field, r.into_inner())
        });
        let failover = raw
            .locality
            .map(|l| self.failover(&format!("{path}.locality"), l))
            .unwrap_or_default();
        let decl = PolicyDecl {
            pos: self.pos(name.span()),
            policy: Policy {
                service: name.get_ref().clone(),
                subsets,
                load_balancer,
                connect_timeout,
                hash,
                connection_pool,
                outlier_detection,
                health_check,
                idle_timeout,
                rate_limit,
                failover,
                origin: self.origin(name.span()),
            },
            http_only,
        };
        (name.into_inner(), decl)
    }
}
