//! Translation: (catalog, proxy) -> Envoy resources. Pure: no I/O, no clocks.
//!
//! [`Shared::build`] runs once per catalog snapshot and encodes everything that does not depend
//! on who asks (one cluster per service and per subset, their endpoint assignments, outbound
//! route configurations per upstream scope). [`Shared::for_proxy`] then picks what one proxy may
//! see and adds the few resources that are its own (listeners, inbound clusters and routes).
//! Results are memoized per scope, so 2000 proxies with the same upstreams share one set of
//! `Arc`s, and an endpoint-only change re-encodes only endpoint assignments.

use std::sync::Arc;

use pilotfish_registries::model::Catalog;

use crate::proxy::Proxy;
use crate::xds::resource::{self, ResourceMap};

/// What one proxy receives, by type.
#[derive(Debug, Clone, Default)]
pub struct ProxyResources {
    pub clusters: Arc<ResourceMap>,
    pub endpoints: Arc<ResourceMap>,
    pub listeners: Arc<ResourceMap>,
    pub routes: Arc<ResourceMap>,
}

impl ProxyResources {
    pub fn of_type(&self, type_url: &str) -> Option<&Arc<ResourceMap>> {
        match type_url {
            resource::CLUSTER => Some(&self.clusters),
            resource::ENDPOINT => Some(&self.endpoints),
            resource::LISTENER => Some(&self.listeners),
            resource::ROUTE => Some(&self.routes),
            _ => None,
        }
    }
}

/// The proxy-independent part of a translated catalog, shared by every stream.
#[derive(Debug)]
pub struct Shared {
    pub catalog: Arc<Catalog>,
    // filled in by the translation module
}

impl Shared {
    pub fn build(catalog: Arc<Catalog>) -> Shared {
        Shared { catalog }
    }

    pub fn for_proxy(&self, _proxy: &Proxy) -> ProxyResources {
        ProxyResources::default()
    }
}
