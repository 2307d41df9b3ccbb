//! The endpoint fast path: which catalog changes touch only `ClusterLoadAssignment`s, and how a
//! [`Shared`] is derived from the previous one for such a change.
//!
//! # What counts as endpoint-only
//!
//! A new catalog is an [`EndpointChange`] of the old one when routes, policies, the set of
//! services, authorizations, and every service's attributes other than its instances are
//! equal, and every service whose instances differ has only IP addresses before and after (a
//! DNS name makes its clusters STRICT_DNS with the assignment inline) and keeps the same mix of
//! mesh and non-mesh instances (which decides its clusters' transport). `origin` is ignored:
//! it only ever reaches log lines.
//!
//! Instances also shape what the proxies *on their nodes* get: the node's hosted services
//! decide its scope, its inbound listener and route, and its `inbound|<svc>` clusters list the
//! local instances' ports and weights. So the change also names the nodes whose local view
//! changed (an instance added on a node that hosted nothing of that service, moved between
//! nodes, or with a new port or weight); those proxies are recomputed from scratch, lazily, by
//! [`Shared::for_proxy`]. Every other proxy keeps its clusters, listeners and routes `Arc`s and
//! only gets its scope's new endpoint map.
//!
//! Anything else is a full change and goes through [`Shared::build`].

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use pilotfish_registries::model::{Catalog, Service};

use super::tls::{ClientTls, NODE_SECRET};
use super::{clusters, lock, CachedProxy, ResourceMap, Scoped, ServiceOutbound, Shared};

/// What an endpoint-only catalog change touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointChange {
    /// Services whose instances changed: their assignments are re-encoded.
    pub services: BTreeSet<String>,
    /// Nodes whose local view changed: their proxies' resources are recomputed.
    pub nodes: BTreeSet<String>,
}

/// `Some` when `new` differs from `old` only in ways that change endpoint assignments and the
/// local view of some nodes (see the module comment); `None` for a full change.
///
/// The destructuring is exhaustive on purpose: a field added to the model does not compile
/// here until someone decides whether it is endpoint-only (almost never).
pub fn endpoint_change(old: &Catalog, new: &Catalog) -> Option<EndpointChange> {
    let Catalog {
        services: old_services,
        routes,
        policies,
        authorizations,
        gateways,
    } = old;
    if *routes != new.routes
        || *policies != new.policies
        || *authorizations != new.authorizations
        || *gateways != new.gateways
        || old_services.len() != new.services.len()
    {
        return None;
    }
    let mut change = EndpointChange::default();
    for (o, (new_name, n)) in old_services.values().zip(&new.services) {
        let Service {
            name,
            protocol,
            port,
            upstreams,
            instances,
            mtls,
            // Read by the liveness stage, which sets `healthy` before translation.
            health: _,
            origin: _,
        } = o;
        if name != new_name
            || *protocol != n.protocol
            || *port != n.port
            || *upstreams != n.upstreams
            || *mtls != n.mtls
        {
            return None;
        }
        if *instances == n.instances {
            continue;
        }
        // A DNS name makes the clusters STRICT_DNS with inline endpoints; whether instances
        // are on mesh nodes decides the clusters' transport (all, some or none over mTLS).
        if has_dns(o) || has_dns(n) || mesh_kind(o) != mesh_kind(n) {
            return None;
        }
        change.services.insert(new_name.clone());
        change.nodes.extend(changed_nodes(o, n));
    }
    Some(change)
}

/// How many of a service's instances are on mesh nodes: none, all, or some (as 0, 1, 2).
fn mesh_kind(svc: &Service) -> u8 {
    match svc.instances.iter().filter(|i| i.node.is_some()).count() {
        0 => 0,
        n if n == svc.instances.len() => 1,
        _ => 2,
    }
}

fn has_dns(svc: &Service) -> bool {
    svc.instances
        .iter()
        .any(|i| i.address.parse::<IpAddr>().is_err())
}

/// Nodes where the instances of the service, as the node's own proxy sees them (present at
/// all, port, weight, in order), differ.
fn changed_nodes<'a>(old: &'a Service, new: &'a Service) -> impl Iterator<Item = String> + 'a {
    let nodes: BTreeSet<&str> = old
        .instances
        .iter()
        .chain(&new.instances)
        .filter_map(|i| i.node.as_deref())
        .collect();
    nodes.into_iter().filter_map(move |node| {
        let local = |svc: &'a Service| {
            svc.instances
                .iter()
                .filter(move |i| i.node.as_deref() == Some(node))
                .map(|i| (i.port, i.weight))
        };
        (!local(old).eq(local(new))).then(|| node.to_string())
    })
}

impl Shared {
    /// The translation of `catalog`, which must be `change` applied to `self.catalog` (as
    /// [`endpoint_change`] found it): the changed services' assignments are re-encoded, and
    /// everything else is carried over by `Arc`. An assignment whose content did not change
    /// keeps its `Arc` too, so only what really changed is pushed.
    pub fn with_endpoints(&self, catalog: Arc<Catalog>, change: &EndpointChange) -> Shared {
        let mut services = self.services.clone();
        let node_tls = ClientTls {
            settings: &self.settings,
            secret: NODE_SECRET,
        };
        let tls = self.settings.mtls.then_some(&node_tls);
        // Assignments that are new this time, by name.
        let mut replaced: HashMap<String, Arc<super::Resource>> = HashMap::new();
        for name in &change.services {
            let (Some(svc), Some(old)) = (catalog.services.get(name), self.services.get(name))
            else {
                continue;
            };
            // The clusters come out equal (only instances changed); the old `Arc`s are kept.
            let (_, fresh) = clusters::outbound(&catalog, svc, tls);
            let endpoints: Vec<_> = fresh
                .into_iter()
                .map(|e| {
                    match old
                        .endpoints
                        .iter()
                        .find(|o| o.name == e.name && o.version == e.version)
                    {
                        Some(same) => same.clone(),
                        None => {
                            replaced.insert(e.name.clone(), e.clone());
                            e
                        }
                    }
                })
                .collect();
            services.insert(
                name.clone(),
                Arc::new(ServiceOutbound {
                    protocol: old.protocol,
                    port: old.port,
                    clusters: old.clusters.clone(),
                    endpoints,
                    vhost: old.vhost.clone(),
                }),
            );
        }

        // Old scope (by address) -> its successor, for the per-proxy cache below.
        let mut successors: HashMap<*const Scoped, Arc<Scoped>> = HashMap::new();
        let mut update = |scoped: &Arc<Scoped>| -> Arc<Scoped> {
            let next = successors
                .entry(Arc::as_ptr(scoped))
                .or_insert_with(|| with_replaced(scoped, &replaced));
            next.clone()
        };
        let all = update(&self.all);
        let scopes: HashMap<_, _> = lock(&self.scopes)
            .iter()
            .map(|(names, scoped)| (names.clone(), update(scoped)))
            .collect();
        let proxies: HashMap<_, _> = lock(&self.proxies)
            .iter()
            .filter(|(proxy, _)| !change.nodes.contains(&proxy.node))
            .map(|(proxy, cached)| {
                let scoped = update(&cached.scoped);
                let mut resources = cached.resources.clone();
                resources.endpoints = scoped.endpoints.clone();
                (proxy.clone(), CachedProxy { scoped, resources })
            })
            .collect();

        Shared {
            catalog,
            services,
            all,
            scopes: std::sync::Mutex::new(scopes),
            proxies: std::sync::Mutex::new(proxies),
            settings: self.settings.clone(),
            vips: self.vips.clone(),
            // Inline routes and TCP proxies name clusters, never endpoints.
            intercepts: std::sync::Mutex::new(lock(&self.intercepts).clone()),
            // Cluster content is unchanged (same mesh mix), whatever the client identity.
            client_clusters: std::sync::Mutex::new(lock(&self.client_clusters).clone()),
        }
    }
}

/// `scoped` with the given assignments swapped in; the same `Arc` when it holds none of them.
fn with_replaced(
    scoped: &Arc<Scoped>,
    replaced: &HashMap<String, Arc<super::Resource>>,
) -> Arc<Scoped> {
    if !replaced
        .keys()
        .any(|name| scoped.endpoints.contains_key(name))
    {
        return scoped.clone();
    }
    let mut endpoints = ResourceMap::clone(&scoped.endpoints);
    for (name, resource) in replaced {
        if let Some(slot) = endpoints.get_mut(name) {
            *slot = resource.clone();
        }
    }
    Arc::new(Scoped {
        endpoints: Arc::new(endpoints),
        ..Scoped::clone(scoped)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use pilotfish_registries::model::{Instance, Policy, Protocol, Route, DEFAULT_MESH_PORT};

    use super::*;
    use crate::proxy::Proxy;
    use crate::resources::ProxyResources;

    fn instance(node: Option<&str>, address: &str, port: u16, version: &str) -> Instance {
        Instance {
            node: node.map(str::to_string),
            address: address.to_string(),
            port,
            mesh_port: DEFAULT_MESH_PORT,
            labels: [("version".to_string(), version.to_string())].into(),
            weight: 1,
            healthy: true,
            draining: false,
            locality: None,
        }
    }

    fn service(name: &str, upstreams: Option<&[&str]>, instances: Vec<Instance>) -> Service {
        Service {
            name: name.to_string(),
            protocol: Protocol::Http,
            port: 9080,
            upstreams: upstreams.map(|u| u.iter().map(|s| s.to_string()).collect()),
            instances,
            mtls: Default::default(),
            health: Default::default(),
            origin: Default::default(),
        }
    }

    /// productpage on vm-a calls reviews (v1 on vm-b, v2 on vm-c, one outside the mesh);
    /// reviews has subsets by version.
    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for s in [
            service(
                "productpage",
                Some(&["reviews"]),
                vec![instance(Some("vm-a"), "10.0.0.1", 9080, "v1")],
            ),
            service(
                "reviews",
                None,
                vec![
                    instance(Some("vm-b"), "10.0.0.2", 9080, "v1"),
                    instance(Some("vm-c"), "10.0.0.3", 9080, "v2"),
                    instance(None, "10.0.0.9", 9080, "v2"),
                ],
            ),
        ] {
            c.services.insert(s.name.clone(), s);
        }
        c.policies.insert(
            "reviews".into(),
            Policy {
                service: "reviews".into(),
                subsets: [
                    (
                        "v1".to_string(),
                        [("version".to_string(), "v1".to_string())].into(),
                    ),
                    (
                        "v2".to_string(),
                        [("version".to_string(), "v2".to_string())].into(),
                    ),
                ]
                .into(),
                ..Default::default()
            },
        );
        c
    }

    fn proxy(node: &str) -> Proxy {
        Proxy {
            node: node.to_string(),
            address: "10.0.0.50".parse().unwrap(),
            mesh_port: DEFAULT_MESH_PORT,
            outbound: "127.0.0.1:15001".parse().unwrap(),
            app_address: "127.0.0.1".parse().unwrap(),
            access_log: Default::default(),
            tracing: None,
            intercept: None,
        }
    }

    fn versions(map: &ResourceMap) -> BTreeMap<String, String> {
        map.iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect()
    }

    fn same_content(a: &ProxyResources, b: &ProxyResources) {
        assert_eq!(versions(&a.clusters), versions(&b.clusters));
        assert_eq!(versions(&a.endpoints), versions(&b.endpoints));
        assert_eq!(versions(&a.listeners), versions(&b.listeners));
        assert_eq!(versions(&a.routes), versions(&b.routes));
    }

    #[test]
    fn instance_changes_outside_nodes_are_endpoint_only() {
        let old = catalog();
        let mut new = old.clone();
        let reviews = new.services.get_mut("reviews").unwrap();
        reviews.instances[2].port = 9999;
        reviews.instances[2].healthy = false;
        reviews.origin.line = 42; // only ever logged
        let change = endpoint_change(&old, &new).unwrap();
        assert_eq!(change.services, BTreeSet::from(["reviews".to_string()]));
        assert!(change.nodes.is_empty());
    }

    #[test]
    fn node_local_view_changes_name_the_node() {
        let old = catalog();
        // The app port on vm-b is in vm-b's inbound cluster; the label only in EDS.
        let mut new = old.clone();
        let reviews = new.services.get_mut("reviews").unwrap();
        reviews.instances[0].port = 9081;
        reviews.instances[1].labels.insert("x".into(), "y".into());
        let change = endpoint_change(&old, &new).unwrap();
        assert_eq!(change.nodes, BTreeSet::from(["vm-b".to_string()]));

        // A first instance on a new node changes that node's scope and listeners.
        let mut new = old.clone();
        new.services
            .get_mut("reviews")
            .unwrap()
            .instances
            .push(instance(Some("vm-d"), "10.0.0.4", 9080, "v1"));
        let change = endpoint_change(&old, &new).unwrap();
        assert_eq!(change.nodes, BTreeSet::from(["vm-d".to_string()]));
    }

    #[test]
    fn anything_else_is_a_full_change() {
        let old = catalog();
        let full = |edit: &dyn Fn(&mut Catalog)| {
            let mut new = old.clone();
            edit(&mut new);
            endpoint_change(&old, &new)
        };
        assert!(full(&|c| {
            c.routes.insert("reviews".into(), Route::default());
        })
        .is_none());
        assert!(full(&|c| {
            c.policies.remove("reviews");
        })
        .is_none());
        assert!(full(&|c| c.services.get_mut("reviews").unwrap().port = 1).is_none());
        assert!(full(&|c| {
            c.services.get_mut("reviews").unwrap().upstreams = Some(vec![]);
        })
        .is_none());
        assert!(full(&|c| {
            c.services.remove("productpage");
        })
        .is_none());
        // A DNS name turns the clusters into STRICT_DNS with inline endpoints.
        assert!(full(&|c| {
            c.services.get_mut("reviews").unwrap().instances[2].address = "reviews.example".into()
        })
        .is_none());
    }

    #[test]
    fn with_endpoints_keeps_every_other_arc_and_matches_a_full_build() {
        let old = catalog();
        let shared = Shared::build(Arc::new(old.clone()));
        let before: Vec<_> = ["vm-a", "vm-b", "vm-x"]
            .iter()
            .map(|n| shared.for_proxy(&proxy(n)))
            .collect();

        let mut new = old.clone();
        let reviews = new.services.get_mut("reviews").unwrap();
        reviews.instances[0].port = 9081; // vm-b's local view
        reviews.instances[2].port = 9999; // EDS of reviews and reviews|v2
        let change = endpoint_change(&old, &new).unwrap();
        let new = Arc::new(new);
        let next = shared.with_endpoints(new.clone(), &change);
        let fresh = Shared::build(new);

        for (n, before) in ["vm-a", "vm-b", "vm-x"].iter().zip(&before) {
            let after = next.for_proxy(&proxy(n));
            same_content(&after, &fresh.for_proxy(&proxy(n)));
            assert!(!Arc::ptr_eq(&before.endpoints, &after.endpoints), "{n}");
            if *n != "vm-b" {
                assert!(Arc::ptr_eq(&before.clusters, &after.clusters), "{n}");
                assert!(Arc::ptr_eq(&before.listeners, &after.listeners), "{n}");
                assert!(Arc::ptr_eq(&before.routes, &after.routes), "{n}");
            }
        }
        // Unchanged assignments keep their Arc: the v1 subset did not change.
        let name = crate::translate::subset_name("reviews", "v1");
        assert!(Arc::ptr_eq(
            &before[0].endpoints[&name],
            &next.for_proxy(&proxy("vm-a")).endpoints[&name]
        ));
    }

    #[test]
    fn scope_without_the_changed_service_keeps_its_endpoint_map() {
        let mut old = catalog();
        old.services.insert(
            "ratings".into(),
            service("ratings", None, vec![instance(None, "10.0.1.1", 80, "v1")]),
        );
        let shared = Shared::build(Arc::new(old.clone()));
        // vm-a only sees reviews.
        let a = shared.for_proxy(&proxy("vm-a"));
        let mut new = old.clone();
        new.services.get_mut("ratings").unwrap().instances[0].port = 81;
        let change = endpoint_change(&old, &new).unwrap();
        let next = shared.with_endpoints(Arc::new(new), &change);
        let a2 = next.for_proxy(&proxy("vm-a"));
        assert!(Arc::ptr_eq(&a.endpoints, &a2.endpoints));
        assert!(!Arc::ptr_eq(
            &shared.for_proxy(&proxy("vm-x")).endpoints,
            &next.for_proxy(&proxy("vm-x")).endpoints
        ));
    }
}
