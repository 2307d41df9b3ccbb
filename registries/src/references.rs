//! References from one declaration to a service, checked on the merged catalog (TOML files and
//! Consul together). Pure.
//!
//! A file may name a service that another source declares: `upstreams = ["web"]` where `web`
//! comes from Consul, a route or policy for a Consul service, an authorization `from` a service
//! not declared yet. Such a reference is never a reason to refuse the file: until some source
//! declares the service it is an [`Unresolved`] warning that names the file and line, and
//! translation skips what it would need (a route for a service that does not exist routes
//! nothing; an `upstreams` entry that names nothing grants nothing).

use std::fmt;

use crate::model::{Catalog, Origin};

/// A reference to a service that no source declares.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unresolved {
    /// The declaration that makes the reference.
    pub origin: Origin,
    /// Its key path, e.g. `services.web.upstreams[1]`.
    pub field: String,
    pub service: String,
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: unknown service \"{}\" (no file or Consul datacenter declares it yet)",
            self.origin, self.field, self.service
        )
    }
}

/// Every reference in `catalog` to a service it does not have, sorted by file and line.
pub fn unresolved(catalog: &Catalog) -> Vec<Unresolved> {
    let mut out = Vec::new();
    let mut check = |origin: &Origin, field: String, service: &str| {
        if !catalog.services.contains_key(service) {
            out.push(Unresolved {
                origin: origin.clone(),
                field,
                service: service.to_string(),
            });
        }
    };
    for (name, svc) in &catalog.services {
        for (i, up) in svc.upstreams.iter().flatten().enumerate() {
            check(&svc.origin, format!("services.{name}.upstreams[{i}]"), up);
        }
    }
    for (name, route) in &catalog.routes {
        check(&route.origin, format!("routes.{name}"), name);
        for (i, rule) in route.rules.iter().enumerate() {
            if let Some(m) = &rule.actions.mirror {
                let field = format!("routes.{name}.rules[{i}].mirror.service");
                check(&rule.origin, field, &m.service);
            }
        }
    }
    for (name, policy) in &catalog.policies {
        check(&policy.origin, format!("policies.{name}"), name);
    }
    for (name, authz) in &catalog.authorizations {
        check(&authz.origin, format!("authorization.{name}"), name);
        for (i, rule) in authz.rules.iter().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let field = format!("authorization.{name}.rules[{i}].from[{j}]");
                check(&rule.origin, field, from);
            }
        }
    }
    for (name, gateway) in &catalog.gateways {
        for (i, r) in gateway.routes.iter().enumerate() {
            let field = format!("gateways.{name}.routes[{i}].service");
            check(&gateway.origin, field, &r.service);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{Route, Service};

    fn origin(file: &str, line: usize) -> Origin {
        Origin {
            file: file.into(),
            line,
        }
    }

    fn service(name: &str, upstreams: Option<Vec<&str>>) -> Service {
        Service {
            name: name.into(),
            protocol: Default::default(),
            port: 80,
            upstreams: upstreams.map(|u| u.into_iter().map(str::to_string).collect()),
            instances: Vec::new(),
            mtls: Default::default(),
            health: Default::default(),
            origin: origin("/r/app.toml", 1),
        }
    }

    #[test]
    fn references_resolve_against_every_source() {
        let mut files = Catalog::default();
        files
            .services
            .insert("app".into(), service("app", Some(vec!["web", "db"])));
        files.routes.insert(
            "web".into(),
            Route {
                service: "web".into(),
                origin: origin("/r/web.toml", 4),
                ..Default::default()
            },
        );
        let found = unresolved(&files);
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "/r/app.toml:1: services.app.upstreams[0]: unknown service \"web\" (no file or Consul datacenter declares it yet)",
                "/r/app.toml:1: services.app.upstreams[1]: unknown service \"db\" (no file or Consul datacenter declares it yet)",
                "/r/web.toml:4: routes.web: unknown service \"web\" (no file or Consul datacenter declares it yet)",
            ]
        );
        // Consul declares web: only db is left.
        let mut consul = Catalog::default();
        consul.services.insert("web".into(), service("web", None));
        let (merged, _) = crate::merge::merge(&files, &consul);
        let left: Vec<String> = unresolved(&merged).into_iter().map(|u| u.service).collect();
        assert_eq!(left, ["db"]);
    }
}
