//! Authorization -> Envoy RBAC, on the inbound side (mTLS only; an insecure mesh cannot tell
//! callers apart, so it enforces nothing).
//!
//! A service's deny rules become a DENY filter and its allow rules an ALLOW filter after it, so
//! a request is refused when it matches a deny rule, or when allow rules exist and it matches
//! none (403 for HTTP; the connection is closed for TCP). Each filter holds exactly one policy,
//! `pilotfish` (RBAC `policies` is a map, and prost encodes maps in `HashMap` order), shaped:
//!
//! ```text
//! permissions: [any]
//! principals:  [or_ids [ one and_ids per rule:
//!                 or_ids [authenticated.principal_name exact spiffe://<td>/service/<from>, ...]
//!                 or_ids [header ":method" exact <method>, ...]          (HTTP, when given)
//!                 or_ids [url_path exact <p> | prefix <p>, ...]            (HTTP, when given) ]]
//! ```
//!
//! Identities fail closed on plaintext (a permissive service's plaintext chain): no principal
//! name matches a connection without TLS, an allow rule without `from` means "any
//! *authenticated* peer", and a deny rule's `from` also matches every unauthenticated caller.
//! Identities are compared exactly, never through a regex.

use envoy_types::pb::envoy::config::listener::v3::{filter, Filter};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action, Permission, Policy, Principal, Rbac,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, HeaderMatcher,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac as HttpRbac, RbacPerRoute};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpFilter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher::MatchPattern, PathMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::Any;
use pilotfish_registries::model::{AuthzAction, AuthzRule, Catalog, PathMatch, Service};

use super::tls::service_id;
use super::{any, inbound_name};

/// The one policy name in every RBAC filter.
pub const POLICY: &str = "pilotfish";
/// Filter names; per-route configs on the plaintext chain find their filter by these.
pub const DENY_FILTER: &str = "pilotfish.rbac.deny";
pub const ALLOW_FILTER: &str = "pilotfish.rbac.allow";

/// The DENY and ALLOW rule sets of `svc` (`None` when it has no rule of that kind).
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Policies {
    pub deny: Option<Rbac>,
    pub allow: Option<Rbac>,
}

pub(super) fn policies(catalog: &Catalog, svc: &Service, trust_domain: &str) -> Policies {
    let rules: &[AuthzRule] = catalog
        .authorizations
        .get(&svc.name)
        .map(|a| a.rules.as_slice())
        .unwrap_or_default();
    let of = |action: AuthzAction| {
        let principals: Vec<Principal> = rules
            .iter()
            .filter(|r| r.action == action)
            .map(|r| rule_principal(r, trust_domain))
            .collect();
        (!principals.is_empty()).then(|| Rbac {
            action: match action {
                AuthzAction::Allow => Action::Allow,
                AuthzAction::Deny => Action::Deny,
            } as i32,
            // One entry (see the module comment).
            policies: [(
                POLICY.to_string(),
                Policy {
                    permissions: vec![Permission {
                        rule: Some(permission::Rule::Any(true)),
                    }],
                    principals: vec![or(principals)],
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        })
    };
    Policies {
        deny: of(AuthzAction::Deny),
        allow: of(AuthzAction::Allow),
    }
}

/// The HTTP filters enforcing `policies` on a chain that serves one service (before the router).
pub(super) fn http_filters(policies: &Policies) -> Vec<HttpFilter> {
    [
        (DENY_FILTER, &policies.deny),
        (ALLOW_FILTER, &policies.allow),
    ]
    .into_iter()
    .filter_map(|(name, rules)| {
        rules
            .as_ref()
            .map(|rules| http_filter(name, Some(rules.clone())))
    })
    .collect()
}

/// The HTTP filters of a chain shared by several services (the plaintext chain): no rules of
/// their own, so they enforce only what a virtual host or route configures with
/// [`per_route`].
pub(super) fn shared_http_filters(deny: bool, allow: bool) -> Vec<HttpFilter> {
    let mut out = Vec::new();
    if deny {
        out.push(http_filter(DENY_FILTER, None));
    }
    if allow {
        out.push(http_filter(ALLOW_FILTER, None));
    }
    out
}

/// A per-route override that enforces `rules` with the filter of the same kind.
pub(super) fn per_route(rules: &Rbac) -> Any {
    any(&RbacPerRoute {
        rbac: Some(HttpRbac {
            rules: Some(rules.clone()),
            ..Default::default()
        }),
    })
}

fn http_filter(name: &str, rules: Option<Rbac>) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&HttpRbac {
            rules,
            ..Default::default()
        }))),
        ..Default::default()
    }
}

/// The network filters enforcing `policies` for TCP service `svc` (before tcp_proxy).
pub(super) fn network_filters(svc: &Service, policies: &Policies) -> Vec<Filter> {
    [
        (DENY_FILTER, "deny", &policies.deny),
        (ALLOW_FILTER, "allow", &policies.allow),
    ]
    .into_iter()
    .filter_map(|(name, kind, rules)| {
        rules.as_ref().map(|rules| Filter {
            name: name.to_string(),
            config_type: Some(filter::ConfigType::TypedConfig(any(&NetworkRbac {
                rules: Some(rules.clone()),
                stat_prefix: format!("{}.{kind}.", inbound_name(&svc.name)),
                ..Default::default()
            }))),
        })
    })
    .collect()
}

/// One rule: every condition it gives (see the module comment).
fn rule_principal(rule: &AuthzRule, trust_domain: &str) -> Principal {
    let mut and = Vec::new();
    if rule.from.is_empty() {
        if rule.action == AuthzAction::Allow {
            and.push(authenticated(None));
        }
    } else {
        let mut from: Vec<Principal> = rule
            .from
            .iter()
            .map(|s| authenticated(Some(service_id(trust_domain, s))))
            .collect();
        if rule.action == AuthzAction::Deny {
            // Fail closed: a caller that cannot be identified may be any of them.
            from.push(Principal {
                identifier: Some(principal::Identifier::NotId(Box::new(authenticated(None)))),
            });
        }
        and.push(or(from));
    }
    if !rule.methods.is_empty() {
        and.push(or(rule
            .methods
            .iter()
            .map(|m| Principal {
                identifier: Some(principal::Identifier::Header(HeaderMatcher {
                    name: ":method".to_string(),
                    header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(exact(m))),
                    ..Default::default()
                })),
            })
            .collect()));
    }
    if !rule.paths.is_empty() {
        and.push(or(rule
            .paths
            .iter()
            .map(|p| {
                let matcher = match p {
                    PathMatch::Exact(path) => exact(path),
                    PathMatch::Prefix(prefix) => StringMatcher {
                        match_pattern: Some(MatchPattern::Prefix(prefix.clone())),
                        ignore_case: false,
                    },
                };
                Principal {
                    identifier: Some(principal::Identifier::UrlPath(PathMatcher {
                        rule: Some(path_matcher::Rule::Path(matcher)),
                    })),
                }
            })
            .collect()));
    }
    if and.is_empty() {
        // A deny rule with no conditions: every caller.
        and.push(Principal {
            identifier: Some(principal::Identifier::Any(true)),
        });
    }
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids: and })),
    }
}

/// A TLS peer; with a name, one whose certificate's URI SAN is exactly it.
fn authenticated(name: Option<String>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: name.map(|n| exact(&n)),
            },
        )),
    }
}

fn or(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn exact(value: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::Exact(value.to_string())),
        ignore_case: false,
    }
}
