//! `GET /v1/services`, what the web console's Services section shows: every service of the
//! catalog discovery serves, with its instances. Pure: built from the catalog *after* the
//! liveness stage ([`crate::liveness`]), so an instance on a dead host is listed unhealthy,
//! exactly as the proxies see it.

use pilotfish_registries::model::{Catalog, Labels, Origin, Service};
use serde::Serialize;

/// One service, as `/v1/services` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceEntry {
    pub name: String,
    /// `http`, `http2`, `grpc` or `tcp`.
    pub protocol: &'static str,
    /// The port clients address it by.
    pub port: u16,
    /// Where it is declared: `file:line`, or `consul://<datacenters>/<service>`.
    pub origin: String,
    /// Its virtual IP (`vip_range`): what mesh DNS answers for `<service>.mesh` on hosts that
    /// intercept; `None` when the range is full.
    pub vip: Option<std::net::Ipv4Addr>,
    pub instances: Vec<InstanceEntry>,
}

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceEntry {
    /// The host whose agent fronts it; `None`: outside the mesh, reached directly.
    pub node: Option<String>,
    pub address: String,
    /// The app's port.
    pub port: u16,
    /// As the proxies see it: an instance on a dead or revoked host is unhealthy.
    pub healthy: bool,
    pub labels: Labels,
    pub locality: Option<String>,
}

/// Every service of `catalog`, by name, with its VIP from `vips`.
pub fn entries(
    catalog: &Catalog,
    vips: &std::collections::BTreeMap<String, std::net::Ipv4Addr>,
) -> Vec<ServiceEntry> {
    catalog
        .services
        .values()
        .map(|s| entry(s, vips.get(&s.name).copied()))
        .collect()
}

fn entry(service: &Service, vip: Option<std::net::Ipv4Addr>) -> ServiceEntry {
    ServiceEntry {
        name: service.name.clone(),
        protocol: service.protocol.as_str(),
        port: service.port,
        origin: origin(&service.origin),
        vip,
        instances: service
            .instances
            .iter()
            .map(|i| InstanceEntry {
                node: i.node.clone(),
                address: i.address.clone(),
                port: i.port,
                healthy: i.healthy,
                labels: i.labels.clone(),
                locality: i.locality.clone(),
            })
            .collect(),
    }
}

/// Consul's origins are URLs with no line to point at.
fn origin(origin: &Origin) -> String {
    let file = origin.file.to_string_lossy();
    if file.starts_with("consul://") {
        file.into_owned()
    } else {
        origin.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use pilotfish_registries::model::{HealthMode, Instance, MtlsMode, Protocol};

    use super::*;

    fn instance(node: &str, healthy: bool) -> Instance {
        Instance {
            node: Some(node.into()),
            address: "10.0.0.2".into(),
            port: 9080,
            mesh_port: 15006,
            labels: Labels::from([("version".into(), "v1".into())]),
            weight: 1,
            healthy,
            draining: false,
            locality: Some("dc1".into()),
        }
    }

    fn service(name: &str, file: &str, line: usize, instances: Vec<Instance>) -> Service {
        Service {
            name: name.into(),
            protocol: Protocol::Grpc,
            port: 9080,
            upstreams: None,
            instances,
            mtls: MtlsMode::default(),
            health: HealthMode::default(),
            origin: Origin {
                file: PathBuf::from(file),
                line,
            },
        }
    }

    #[test]
    fn lists_services_with_instances_and_where_they_come_from() {
        let mut catalog = Catalog::default();
        catalog.services.insert(
            "reviews".into(),
            service(
                "reviews",
                "/r/services.toml",
                12,
                vec![instance("vm-b", true), instance("vm-c", false)],
            ),
        );
        catalog.services.insert(
            "api".into(),
            service("api", "consul://dc1,dc2/api", 0, Vec::new()),
        );
        let vips = [(
            "reviews".to_string(),
            std::net::Ipv4Addr::new(240, 240, 0, 7),
        )]
        .into();
        let json = serde_json::to_value(entries(&catalog, &vips)).expect("serializes");
        assert_eq!(json[0]["name"], "api");
        assert_eq!(json[0]["vip"], serde_json::Value::Null);
        assert_eq!(json[1]["vip"], "240.240.0.7");
        assert_eq!(json[0]["origin"], "consul://dc1,dc2/api");
        let reviews = &json[1];
        assert_eq!(reviews["origin"], "/r/services.toml:12");
        assert_eq!(reviews["protocol"], "grpc");
        assert_eq!(reviews["instances"][0]["node"], "vm-b");
        assert_eq!(reviews["instances"][0]["healthy"], true);
        assert_eq!(reviews["instances"][0]["labels"]["version"], "v1");
        assert_eq!(reviews["instances"][0]["locality"], "dc1");
        assert_eq!(reviews["instances"][1]["healthy"], false);
    }
}
