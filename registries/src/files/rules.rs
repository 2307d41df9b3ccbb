//! The traffic rules in one file: `[routes.<svc>]` and `[policies.<svc>]`, as serde sees
//! them and as checked one file at a time. Part of [`super::parse`], which calls in here for
//! each route and policy table; checks against other files are in [`super::validate`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use super::parse::{key, Context, Pos, MAX_WEIGHT};
use crate::model::{
    Destination, Labels, LoadBalancer, Policy, Retries, Route, RouteMatch, RouteRule,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(rename = "match")]
    matches: Option<Spanned<RawMatch>>,
    to: Spanned<Vec<Spanned<RawDestination>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, String>,
    path_prefix: Option<Spanned<String>>,
    path_exact: Option<Spanned<String>>,
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
        let mut rules = Vec::new();
        for (i, rule) in raw.rules.into_iter().enumerate() {
            let rule_path = format!("{path}.rules[{i}]");
            let origin = self.origin(rule.span());
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
            let to = self.destinations(&format!("{rule_path}.to"), rule.to, &mut subset_refs);
            rules.push(RouteRule {
                matches,
                to,
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
        Retries {
            attempts,
            per_try_timeout,
            on,
        }
    }

    fn route_match(&mut self, path: &str, raw: RawMatch) -> RouteMatch {
        let mut headers = BTreeMap::new();
        for (name, value) in raw.headers {
            let field = format!("{path}.headers");
            let valid = !name.get_ref().is_empty()
                && name
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
            if !valid {
                self.report(
                    name.span(),
                    &field,
                    format!("\"{}\" is not a header name", name.get_ref()),
                );
            }
            // HTTP header names are case-insensitive and Envoy sees them in lower case.
            let lower = name.get_ref().to_ascii_lowercase();
            if headers.insert(lower.clone(), value).is_some() {
                self.report(
                    name.span(),
                    &field,
                    format!("header \"{lower}\" is matched twice"),
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
            path_prefix: raw.path_prefix.map(Spanned::into_inner),
            path_exact: raw.path_exact.map(Spanned::into_inner),
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
        let decl = PolicyDecl {
            pos: self.pos(name.span()),
            policy: Policy {
                service: name.get_ref().clone(),
                subsets,
                load_balancer,
                connect_timeout,
                origin: self.origin(name.span()),
            },
        };
        (name.into_inner(), decl)
    }
}
