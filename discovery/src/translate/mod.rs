//! Translation: (catalog, proxy) -> Envoy resources. Pure: no I/O, no clocks.
//!
//! [`Shared::build`] runs once per catalog snapshot and encodes everything that does not depend
//! on who asks (one cluster per service and per subset, their endpoint assignments, outbound
//! route configurations per upstream scope). [`Shared::for_proxy`] then picks what one proxy may
//! see and adds the few resources that are its own (listeners, inbound clusters and routes).
//! Results are memoized per scope, so 2000 proxies with the same upstreams share one set of
//! `Arc`s.
//!
//! An endpoint-only change ([`endpoint_change`], decided in [`incremental`]) does not go through
//! [`Shared::build`]: [`Shared::with_endpoints`] re-encodes the assignments of the changed
//! services and carries everything else over by `Arc` (clusters, routes, listeners, scopes,
//! the per-proxy cache), so streams see the very same `Arc`s for every other type and push
//! only EDS.
//!
//! # Resource names
//!
//! | type | name | what |
//! |---|---|---|
//! | cluster | `outbound\|<svc>` | every instance of a service (EDS, ADS config source) |
//! | cluster | `outbound\|<svc>\|<subset>` | the instances of a subset declared in `[policies.<svc>]` |
//! | endpoints | same as the cluster | `ClusterLoadAssignment`; EDS `service_name` = cluster name |
//! | cluster | `inbound\|<svc>` | STATIC, the local app(s) at `app_address:instance.port` |
//! | cluster | `pilotfish-zipkin` | the proxy's Zipkin collector (only with `pilotfish.zipkin`) |
//! | listener | `outbound` | binds `proxy.outbound`; HTTP, RDS `outbound` |
//! | listener | `outbound\|<svc>` | TCP services: binds `outbound.ip():service.port`, tcp_proxy |
//! | listener | `inbound` | binds `address:mesh_port`; HTTP, RDS `inbound` (only with local HTTP services) |
//! | listener | `gateway\|<name>` | an ingress gateway's node: binds `listen`, inline routes to services' clusters |
//! | route | `outbound` | one virtual host per HTTP service in scope |
//! | route | `inbound` | one virtual host per local HTTP service (with mTLS: per local permissive HTTP service) |
//!
//! # Access logs
//!
//! The proxy's `access_log` ([`crate::proxy::AccessLog`]) goes into every connection manager and
//! TCP proxy of its listeners ([`access_log`]). Listeners are built per proxy and memoized by the
//! whole [`Proxy`], so the choice is part of the key: proxies with different choices never
//! share listeners, and nothing else depends on it.
//!
//! # Tracing
//!
//! A proxy with a Zipkin collector (`proxy.tracing`) gets the `pilotfish-zipkin` cluster and the
//! Zipkin tracing config in every connection manager ([`trace`]); like the access log it is part
//! of the per-proxy memo key. The cluster goes into the proxy's own copy of the scope's clusters,
//! as inbound clusters do, so proxies without tracing keep sharing the scope's `Arc`s.
//!
//! # mTLS
//!
//! [`Shared::build_with`] takes [`Settings`]; with `mtls` on, outbound clusters reach mesh
//! instances over TLS (names, secrets and SNI in [`tls`]), the `inbound` listener picks a filter
//! chain per local service by SNI (layout in [`listeners`]), local TCP services get an inbound
//! cluster and chain too, and authorizations become RBAC filters ([`rbac`]). Outbound clusters
//! then carry the client certificate of the proxy's node, so they are encoded once per client
//! identity and scope (proxies that present the node certificate share the scope's clusters).
//! With `mtls` off the output is exactly that of a mesh without mTLS.
//!
//! Virtual hosts are named after the service, with domains `svc`, `svc:port`, `svc.mesh` and
//! `svc.mesh:port`. A service whose instances include a DNS name (not an IP address) gets
//! STRICT_DNS clusters with the assignment inline instead of EDS, since EDS needs IP addresses.
//!
//! # Scope
//!
//! A proxy whose node hosts services that all declare `upstreams` receives only the union of
//! those upstreams; otherwise (a local service without `upstreams`, or no local service) it
//! receives every service.
//!
//! # Determinism
//!
//! Versions are hashes of the encoded bytes and prost encodes `map` fields in `HashMap` order,
//! so no map built here holds more than one entry: labels go into one `Struct` encoded entry by
//! entry in key order ([`labels_metadata`]).

mod access_log;
mod clusters;
mod describe;
mod endpoints;
mod incremental;
mod intercept;
mod listeners;
mod rbac;
mod routes;
#[cfg(test)]
mod tests;
mod tls;
mod trace;
#[cfg(test)]
mod traffic_tests;
mod vips;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::config::core::v3::{
    config_source::ConfigSourceSpecifier, AggregatedConfigSource, ApiVersion, ConfigSource,
};
use envoy_types::pb::google::protobuf::{Any, Duration};
use pilotfish_registries::model::{Catalog, Protocol};
use prost::Message;

use crate::proxy::Proxy;
use crate::resources::{ProxyResources, Resource, ResourceMap};

pub use describe::describe;
pub use endpoints::labels_metadata;
pub use incremental::{endpoint_change, EndpointChange};
pub use intercept::{INTERCEPT, PASSTHROUGH};
pub use tls::{
    client_secret, node_id, service_id, service_secret, sni, Settings, NODE_SECRET, ROOTS_SECRET,
    SDS_CLUSTER,
};
pub use trace::{SPANS_PATH, ZIPKIN_CLUSTER};
pub use vips::{VipRange, DEFAULT_VIP_RANGE};

/// The outbound name of a service's cluster, endpoints and TCP listener.
pub fn outbound_name(service: &str) -> String {
    format!("outbound|{service}")
}

/// The outbound name of one subset of a service.
pub fn subset_name(service: &str, subset: &str) -> String {
    format!("outbound|{service}|{subset}")
}

/// The cluster for a service's local instances on the proxy's own host.
pub fn inbound_name(service: &str) -> String {
    format!("inbound|{service}")
}

/// Listener and route configuration names.
pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";

/// The services a proxy may call, in name order; `None` = all of them.
type ScopeKey = Option<BTreeSet<String>>;

/// Everything proxy-independent about one service, encoded once per snapshot.
#[derive(Debug)]
struct ServiceOutbound {
    protocol: Protocol,
    port: u16,
    clusters: Vec<Arc<Resource>>,
    endpoints: Vec<Arc<Resource>>,
    /// The outbound virtual host (HTTP services only); encoded as part of a route configuration.
    vhost: Option<envoy_types::pb::envoy::config::route::v3::VirtualHost>,
}

/// The resources of one upstream scope, shared by every proxy with that scope.
#[derive(Debug, Clone)]
struct Scoped {
    clusters: Arc<ResourceMap>,
    endpoints: Arc<ResourceMap>,
    outbound_route: Arc<Resource>,
    /// TCP services in scope: (service, port); their listeners bind per proxy.
    tcp: Vec<(String, u16)>,
}

/// The proxy-independent part of a translated catalog, shared by every stream.
#[derive(Debug)]
pub struct Shared {
    pub catalog: Arc<Catalog>,
    services: BTreeMap<String, Arc<ServiceOutbound>>,
    all: Arc<Scoped>,
    scopes: Mutex<HashMap<BTreeSet<String>, Arc<Scoped>>>,
    proxies: Mutex<HashMap<Proxy, CachedProxy>>,
    settings: Arc<Settings>,
    /// Every service's virtual IP ([`vips`]): a function of the service names, so an
    /// endpoint-only change carries it over.
    vips: Arc<BTreeMap<String, Ipv4Addr>>,
    /// `intercept` listeners, by what they depend on besides the snapshot.
    intercepts: Mutex<HashMap<InterceptKey, Arc<Resource>>>,
    /// With mTLS: a scope's outbound clusters as a client identity other than the node's
    /// presents itself (`services` holds them as [`NODE_SECRET`]), by (secret, scope).
    client_clusters: Mutex<HashMap<(String, ScopeKey), Arc<ResourceMap>>>,
}

/// A proxy's resources and the scope they were cut from, so an endpoint-only change can swap
/// in the scope's new assignments without recomputing the proxy.
#[derive(Debug, Clone)]
struct CachedProxy {
    scoped: Arc<Scoped>,
    resources: ProxyResources,
}

impl Shared {
    /// [`Shared::build_with`] the default (insecure, plaintext) settings.
    pub fn build(catalog: Arc<Catalog>) -> Shared {
        Shared::build_with(catalog, Arc::new(Settings::default()))
    }

    pub fn build_with(catalog: Arc<Catalog>, settings: Arc<Settings>) -> Shared {
        let node_tls = tls::ClientTls {
            settings: &settings,
            secret: NODE_SECRET,
        };
        let tls = settings.mtls.then_some(&node_tls);
        let services: BTreeMap<String, Arc<ServiceOutbound>> = catalog
            .services
            .values()
            .map(|svc| {
                let (clusters, endpoints) = clusters::outbound(&catalog, svc, tls);
                let vhost = svc
                    .protocol
                    .is_http()
                    .then(|| routes::outbound_vhost(&catalog, svc));
                let out = ServiceOutbound {
                    protocol: svc.protocol,
                    port: svc.port,
                    clusters,
                    endpoints,
                    vhost,
                };
                (svc.name.clone(), Arc::new(out))
            })
            .collect();
        let all = Arc::new(scoped(&services, None));
        let vips = Arc::new(vips::allocate(
            catalog.services.keys().map(String::as_str),
            settings.vip_range,
        ));
        Shared {
            catalog,
            services,
            all,
            scopes: Mutex::new(HashMap::new()),
            proxies: Mutex::new(HashMap::new()),
            settings,
            vips,
            intercepts: Mutex::new(HashMap::new()),
            client_clusters: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every service's virtual IP, by name.
    pub fn vips(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.vips
    }

    pub fn for_proxy(&self, proxy: &Proxy) -> ProxyResources {
        if let Some(done) = lock(&self.proxies).get(proxy) {
            return done.resources.clone();
        }
        let key = scope_of(&self.catalog, &proxy.node);
        let scoped = self.scoped(key.clone());
        let resources = self.per_proxy(proxy, &scoped, &key);
        lock(&self.proxies)
            .entry(proxy.clone())
            .or_insert(CachedProxy { scoped, resources })
            .resources
            .clone()
    }

    fn scoped(&self, key: ScopeKey) -> Arc<Scoped> {
        let Some(names) = key else {
            return self.all.clone();
        };
        if let Some(found) = lock(&self.scopes).get(&names) {
            return found.clone();
        }
        // Built outside the lock: two streams racing build the same value, one is kept.
        let built = Arc::new(scoped(&self.services, Some(&names)));
        lock(&self.scopes).entry(names).or_insert(built).clone()
    }

    /// With mTLS, the outbound clusters of scope `key` as `secret` presents itself.
    fn client_clusters(&self, secret: &str, key: &ScopeKey, scoped: &Scoped) -> Arc<ResourceMap> {
        if secret == NODE_SECRET {
            return scoped.clusters.clone();
        }
        let memo_key = (secret.to_string(), key.clone());
        if let Some(found) = lock(&self.client_clusters).get(&memo_key) {
            return found.clone();
        }
        let client = tls::ClientTls {
            settings: &self.settings,
            secret,
        };
        let mut clusters = ResourceMap::new();
        let in_scope = self
            .catalog
            .services
            .values()
            .filter(|s| key.as_ref().is_none_or(|n| n.contains(&s.name)));
        for svc in in_scope {
            // Plaintext clusters do not depend on the client: the node's `Arc`s serve.
            let encoded = match (tls::mesh_kind(svc), self.services.get(&svc.name)) {
                (tls::MeshKind::None, Some(shared)) => shared.clusters.clone(),
                _ => clusters::outbound_clusters(&self.catalog, svc, &client),
            };
            for c in encoded {
                clusters.insert(c.name.clone(), c);
            }
        }
        // Built outside the lock, like scopes.
        lock(&self.client_clusters)
            .entry(memo_key)
            .or_insert(Arc::new(clusters))
            .clone()
    }

    fn per_proxy(&self, proxy: &Proxy, scoped: &Scoped, key: &ScopeKey) -> ProxyResources {
        let mtls = self.settings.mtls;
        // Without mTLS the mesh port serves HTTP only (a TCP stream cannot name its service);
        // with it, SNI names the service, TCP included.
        let local: Vec<_> = self
            .catalog
            .services_on_node(&proxy.node)
            .filter(|s| mtls || s.protocol.is_http())
            .collect();

        let outbound_clusters = if mtls {
            let secret = tls::client_secret(&self.catalog, &proxy.node);
            self.client_clusters(&secret, key, scoped)
        } else {
            scoped.clusters.clone()
        };
        let clusters = if local.is_empty() && proxy.tracing.is_none() && proxy.intercept.is_none() {
            outbound_clusters
        } else {
            let mut clusters = ResourceMap::clone(&outbound_clusters);
            for svc in &local {
                let cluster = clusters::inbound(&self.catalog, svc, proxy);
                clusters.insert(cluster.name.clone(), cluster);
            }
            if let Some(tracing) = &proxy.tracing {
                let cluster = trace::collector_cluster(tracing);
                clusters.insert(cluster.name.clone(), cluster);
            }
            if proxy.intercept.is_some() {
                let cluster = intercept::passthrough_cluster();
                clusters.insert(cluster.name.clone(), cluster);
            }
            Arc::new(clusters)
        };

        let mut listeners = ResourceMap::new();
        let mut routes = ResourceMap::new();
        let mut bound = vec![proxy.outbound];
        let outbound = listeners::outbound(proxy, &self.settings, &self.catalog);
        listeners.insert(outbound.name.clone(), outbound);
        routes.insert(OUTBOUND.to_string(), scoped.outbound_route.clone());
        if !local.is_empty() {
            let addr = SocketAddr::new(proxy.address, proxy.mesh_port);
            if !claim(&mut bound, addr) {
                tracing::warn!(node = %proxy.node, %addr, "mesh port collides with the outbound listener; no inbound listener");
            } else if mtls {
                let (inbound, route) =
                    listeners::inbound_mtls(&self.catalog, proxy, &local, &self.settings);
                listeners.insert(inbound.name.clone(), inbound);
                if let Some(route) = route {
                    routes.insert(route.name.clone(), route);
                }
            } else {
                let inbound = listeners::inbound(proxy);
                listeners.insert(inbound.name.clone(), inbound);
                let route = routes::inbound(&local);
                routes.insert(route.name.clone(), route);
            }
        }
        for (service, port) in &scoped.tcp {
            let addr = SocketAddr::new(proxy.outbound.ip(), *port);
            // Envoy rejects two listeners on one address; the first service (by name) keeps it.
            if !claim(&mut bound, addr) {
                tracing::warn!(node = %proxy.node, service, %addr, "TCP service port already bound; no outbound listener");
                continue;
            }
            let listener = listeners::tcp_outbound(&self.catalog, service, addr, &proxy.access_log);
            listeners.insert(listener.name.clone(), listener);
        }
        if let Some(addr) = proxy.intercept {
            if claim(&mut bound, addr) {
                let listener = self.intercept(proxy, addr, key);
                listeners.insert(listener.name.clone(), listener);
            } else {
                tracing::warn!(node = %proxy.node, %addr, "interception port collides with another listener; no intercept listener");
            }
        }
        for gw in self.catalog.gateways.values() {
            if gw.node != proxy.node {
                continue;
            }
            if !claim(&mut bound, gw.listen) {
                tracing::warn!(node = %proxy.node, gateway = %gw.name, addr = %gw.listen, "gateway address already bound; no gateway listener");
                continue;
            }
            let listener = listeners::gateway(&self.catalog, gw, proxy);
            listeners.insert(listener.name.clone(), listener);
        }

        ProxyResources {
            clusters,
            endpoints: scoped.endpoints.clone(),
            listeners: Arc::new(listeners),
            routes: Arc::new(routes),
        }
    }
}

impl Shared {
    /// The `intercept` listener of a proxy whose agent captures its apps' traffic, shared by
    /// every proxy with the same scope, port, access log and tracing.
    fn intercept(&self, proxy: &Proxy, addr: SocketAddr, key: &ScopeKey) -> Arc<Resource> {
        let memo_key = InterceptKey {
            scope: key.clone(),
            addr,
            access_log: proxy.access_log.clone(),
            tracing: proxy.tracing.clone(),
        };
        if let Some(found) = lock(&self.intercepts).get(&memo_key) {
            return found.clone();
        }
        let targets = intercept::targets(&self.vips, |name| {
            if key.as_ref().is_some_and(|names| !names.contains(name)) {
                return None;
            }
            let svc = self.services.get(name)?;
            Some((svc.protocol, svc.vhost.as_ref()))
        });
        let built = intercept::listener(&self.catalog, proxy, addr, &targets, self.settings.mtls);
        // Built outside the lock, like scopes.
        lock(&self.intercepts)
            .entry(memo_key)
            .or_insert(built)
            .clone()
    }
}

/// What an `intercept` listener depends on besides the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct InterceptKey {
    scope: ScopeKey,
    addr: SocketAddr,
    access_log: crate::proxy::AccessLog,
    tracing: Option<crate::proxy::Tracing>,
}

/// Records a listener address unless one already bound overlaps it (same port, and the same IP
/// or either one the wildcard), which would fail to bind.
fn claim(bound: &mut Vec<SocketAddr>, addr: SocketAddr) -> bool {
    let overlaps = bound.iter().any(|b| {
        b.port() == addr.port()
            && (b.ip() == addr.ip() || b.ip().is_unspecified() || addr.ip().is_unspecified())
    });
    if !overlaps {
        bound.push(addr);
    }
    !overlaps
}

/// Which services `node`'s proxy may call (see the module comment).
fn scope_of(catalog: &Catalog, node: &str) -> ScopeKey {
    let mut names = BTreeSet::new();
    let mut hosts_any = false;
    for svc in catalog.services_on_node(node) {
        hosts_any = true;
        match &svc.upstreams {
            None => return None,
            Some(upstreams) => names.extend(upstreams.iter().cloned()),
        }
    }
    if !hosts_any {
        return None;
    }
    // A gateway's node calls the services its routes name.
    for gw in catalog.gateways.values().filter(|g| g.node == node) {
        names.extend(gw.routes.iter().map(|r| r.service.clone()));
    }
    // Mirrors: copies go to the mirror service's clusters, which must be in scope too.
    let mirrors: Vec<String> = names
        .iter()
        .filter_map(|n| catalog.routes.get(n))
        .flat_map(|r| r.rules.iter())
        .filter_map(|rule| rule.actions.mirror.as_ref().map(|m| m.service.clone()))
        .collect();
    names.extend(mirrors);
    Some(names)
}

fn scoped(
    services: &BTreeMap<String, Arc<ServiceOutbound>>,
    names: Option<&BTreeSet<String>>,
) -> Scoped {
    let in_scope = services
        .iter()
        .filter(|(name, _)| names.is_none_or(|n| n.contains(*name)));
    let mut clusters = ResourceMap::new();
    let mut endpoints = ResourceMap::new();
    let mut vhosts = Vec::new();
    let mut tcp = Vec::new();
    for (name, svc) in in_scope {
        for c in &svc.clusters {
            clusters.insert(c.name.clone(), c.clone());
        }
        for e in &svc.endpoints {
            endpoints.insert(e.name.clone(), e.clone());
        }
        if let Some(vhost) = &svc.vhost {
            vhosts.push(vhost.clone());
        }
        if svc.protocol == Protocol::Tcp {
            tcp.push((name.clone(), svc.port));
        }
    }
    Scoped {
        clusters: Arc::new(clusters),
        endpoints: Arc::new(endpoints),
        outbound_route: routes::route_config(OUTBOUND, vhosts),
        tcp,
    }
}

/// The maps above only cache derived values, so a panic elsewhere cannot leave them wrong.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A message packed into an `Any`, for typed_config fields.
fn any<M: Message + prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Dynamic resources come over the ADS stream the agent relays.
fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}
