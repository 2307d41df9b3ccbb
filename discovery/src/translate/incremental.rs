//! The endpoint fast path: which catalog changes touch only `ClusterLoadAssignment`s, and how a
//! [`Shared`] is derived from the previous one for such a change.
//!
//! # What counts as endpoint-only
//!
//! A new catalog is an [`EndpointChange`] of the old one when routes, policies, the set of
//! services, and every service's protocol, port and `upstreams` are equal, and every service
//! whose instances differ has only IP addresses, before and after. (A DNS name makes the
//! service's clusters STRICT_DNS with the assignment inline, so its instances are cluster
//! content.) `origin` is ignored: it only ever reaches log lines.
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
pub fn endpoint_change(old: &Catalog, new: &Catalog) -> Option<EndpointChange> {
    if old.routes != new.routes
        || old.policies != new.policies
        || old.services.len() != new.services.len()
    {
        return None;
    }
    let mut change = EndpointChange::default();
    for ((old_name, o), (new_name, n)) in old.services.iter().zip(&new.services) {
        if old_name != new_name
            || o.protocol != n.protocol
            || o.port != n.port
            || o.upstreams != n.upstreams
        {
            return None;
        }
        if o.instances == n.instances {
            continue;
        }
        if has_dns(o) || has_dns(n) {
            return None;
        }
        change.services.insert(new_name.clone());
        change.nodes.extend(changed_nodes(o, n));
    }
    Some(change)
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
        // Assignments that are new this time, by name.
        let mut replaced: HashMap<String, Arc<super::Resource>> = HashMap::new();
        for name in &change.services {
            let (Some(svc), Some(old)) = (catalog.services.get(name), self.services.get(name))
            else {
                continue;
            };
            // The clusters come out equal (only instances changed); the old `Arc`s are kept.
            let (_, fresh) = clusters::outbound(&catalog, svc);
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
