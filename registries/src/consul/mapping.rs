//! Consul JSON -> model, as pure functions (no I/O, no clock).
//!
//! The rules, which are the product's contract for Consul-backed services:
//!
//! - **Selection.** A service is read when its name matches `name_filter` (a glob, `*` = any run)
//!   and, with `service_tag` set, when it carries that tag; then only its instances carrying the
//!   tag are kept. The `consul` service (the servers themselves) is never read.
//! - **Kinds.** Entries with a `Kind` (`connect-proxy`, gateways) are Consul Connect plumbing, not
//!   instances of the service: they are skipped, so a sidecar is never a duplicate endpoint.
//! - **Address.** `Service.Address`, or `Node.Address` when that is empty. Port: `Service.Port`;
//!   an entry without an address or with port 0 is rejected (reported, not used).
//! - **Labels.** Every `Service.Meta` pair as-is, except keys starting with `pilotfish-` (control
//!   keys). A tag `k=v` becomes label `k = "v"` unless Meta already sets `k`. Any other tag `t`
//!   becomes label `tag.t = "true"`, so subsets can select Consul tags.
//! - **Health.** Only the node-level checks and the instance's own checks count. Any `critical`
//!   check (including node `serfHealth` and maintenance) makes the instance unhealthy. Otherwise
//!   it is healthy, with weight `Weights.Passing`, or `Weights.Warning` when any check is
//!   `warning` (a warning weight of 0 makes it unhealthy). Weights are clamped to [1, 128] and
//!   default to 1, as Consul's own xDS does (consul-api.md a.9).
//! - **Locality.** The datacenter the entry was read from.
//! - **Pilotfish agents.** When the Consul node carries node meta `pilotfish-agent = "true"`, the
//!   instance is fronted by that host's agent: `node` = the Consul node name, and peers reach it
//!   on `address:mesh_port`, with `mesh_port` from node meta `pilotfish-mesh-port` (default
//!   15006, or `default_mesh_port`). An unparseable mesh port rejects the entry.
//! - **Service fields.** Consul has no protocol or client port per service: `protocol` comes
//!   from the instances' `protocol` Meta when they all agree on a valid one (else http), and
//!   `port` is the most common instance port (ties: the lowest). TOML overrides both (see merge).
//! - **Duplicates.** Two entries with the same address and port in one service and datacenter:
//!   the first by (node, service ID) is kept, the other rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::api::{CheckServiceNode, ServiceList};
use crate::model::{Catalog, Instance, Labels, MtlsMode, Origin, Protocol, Service};

/// Node meta marking a node whose services are fronted by a Pilotfish agent.
pub const AGENT_META: &str = "pilotfish-agent";
/// Node meta giving that agent's mesh port.
pub const MESH_PORT_META: &str = "pilotfish-mesh-port";

/// What selects services and shapes instances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingOptions {
    pub service_tag: Option<String>,
    pub name_filter: Option<String>,
    pub default_mesh_port: u16,
}

/// An entry the mapping refused, with the reason a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RejectedEntry {
    pub datacenter: String,
    pub service: String,
    pub node: String,
    pub service_id: String,
    pub reason: String,
}

/// The instances of one service in one datacenter, plus what was learnt on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappedService {
    pub instances: Vec<Instance>,
    pub rejected: Vec<RejectedEntry>,
    /// Consul nodes hosting an instance (accepted or not): node-level check changes fan out here.
    pub nodes: BTreeSet<String>,
}

/// `*` matches any run of characters; everything else literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

/// The services of a `/v1/catalog/services` answer that the adapter reads, with their tags
/// (sorted: Consul gives them in no order).
pub fn select_services(
    list: &ServiceList,
    opts: &MappingOptions,
) -> BTreeMap<String, BTreeSet<String>> {
    list.iter()
        .filter(|(name, _)| name.as_str() != "consul")
        .filter(|(name, _)| {
            opts.name_filter
                .as_deref()
                .is_none_or(|p| glob_match(p, name))
        })
        .filter(|(_, tags)| {
            opts.service_tag
                .as_ref()
                .is_none_or(|t| tags.as_ref().is_some_and(|tags| tags.contains(t)))
        })
        .map(|(name, tags)| (name.clone(), tags.iter().flatten().cloned().collect()))
        .collect()
}

/// Maps one `/v1/health/service/:name` answer from datacenter `dc`.
pub fn map_service(
    dc: &str,
    service: &str,
    entries: &[CheckServiceNode],
    opts: &MappingOptions,
) -> MappedService {
    let mut sorted: Vec<&CheckServiceNode> = entries.iter().collect();
    sorted.sort_by(|a, b| (&a.node.node, &a.service.id).cmp(&(&b.node.node, &b.service.id)));
    let mut out = MappedService::default();
    let mut seen: BTreeSet<(String, u16)> = BTreeSet::new();
    for e in sorted {
        out.nodes.insert(e.node.node.clone());
        if !e.service.kind.is_empty() || e.service.service != service {
            continue;
        }
        if let Some(tag) = &opts.service_tag {
            if !e.service.tags.contains(tag) {
                continue;
            }
        }
        let reject = |reason: String| RejectedEntry {
            datacenter: dc.to_string(),
            service: service.to_string(),
            node: e.node.node.clone(),
            service_id: e.service.id.clone(),
            reason,
        };
        match map_entry(dc, e, opts) {
            Ok(inst) => {
                if seen.insert((inst.address.clone(), inst.port)) {
                    out.instances.push(inst);
                } else {
                    out.rejected.push(reject(format!(
                        "duplicate address {}:{} in service {service}",
                        inst.address, inst.port
                    )));
                }
            }
            Err(reason) => out.rejected.push(reject(reason)),
        }
    }
    out.instances.sort_by(instance_order);
    out
}

/// The deterministic order of instances in a service.
pub fn instance_order(a: &Instance, b: &Instance) -> std::cmp::Ordering {
    (&a.locality, &a.address, a.port, &a.node).cmp(&(&b.locality, &b.address, b.port, &b.node))
}

fn map_entry(dc: &str, e: &CheckServiceNode, opts: &MappingOptions) -> Result<Instance, String> {
    let svc = &e.service;
    let address = if svc.address.is_empty() {
        e.node.address.clone()
    } else {
        svc.address.clone()
    };
    if address.is_empty() {
        return Err("no Service.Address and no Node.Address".into());
    }
    if svc.port == 0 {
        return Err("no Service.Port".into());
    }
    let (node, mesh_port) = if e.node.meta.get(AGENT_META).map(String::as_str) == Some("true") {
        let port = match e.node.meta.get(MESH_PORT_META) {
            None => opts.default_mesh_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => {
                    return Err(format!(
                        "node meta {MESH_PORT_META} = \"{p}\" is not a port"
                    ))
                }
            },
        };
        (Some(e.node.node.clone()), port)
    } else {
        (None, opts.default_mesh_port)
    };

    let mut labels: Labels = svc
        .meta
        .iter()
        .filter(|(k, _)| !k.starts_with("pilotfish-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for tag in &svc.tags {
        match tag.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                labels.entry(k.to_string()).or_insert_with(|| v.to_string());
            }
            _ => {
                labels
                    .entry(format!("tag.{tag}"))
                    .or_insert_with(|| "true".into());
            }
        }
    }

    let (healthy, weight) = health_and_weight(e);
    Ok(Instance {
        node,
        address,
        port: svc.port,
        mesh_port,
        labels,
        weight,
        healthy,
        draining: false,
        locality: Some(dc.to_string()),
    })
}

/// Consul's own rule (`calculateEndpointHealthAndWeight`): critical -> unhealthy; warning ->
/// the warning weight; a weight below 1 -> unhealthy; weights clamped to [1, 128].
pub fn health_and_weight(e: &CheckServiceNode) -> (bool, u32) {
    let relevant = e
        .checks
        .iter()
        .filter(|c| c.service_id.is_empty() || c.service_id == e.service.id);
    let mut critical = false;
    let mut warning = false;
    for c in relevant {
        match c.status.as_str() {
            "passing" => {}
            "warning" => warning = true,
            // critical, and anything unknown: fail safe.
            _ => critical = true,
        }
    }
    let (passing_w, warning_w) = e.service.weights.map_or((1, 1), |w| (w.passing, w.warning));
    let w = if warning { warning_w } else { passing_w };
    let healthy = !critical && w >= 1;
    (healthy, w.clamp(1, 128) as u32)
}

/// Builds the Consul side of the catalog from every datacenter's services.
pub fn build_catalog<'a>(
    datacenters: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, Vec<Instance>>)>,
) -> Catalog {
    let mut merged: BTreeMap<String, (Vec<Instance>, Vec<&'a str>)> = BTreeMap::new();
    for (dc, services) in datacenters {
        for (name, instances) in services {
            let e = merged.entry(name.clone()).or_default();
            e.0.extend(instances.iter().cloned());
            e.1.push(dc);
        }
    }
    let mut catalog = Catalog::default();
    for (name, (mut instances, dcs)) in merged {
        if instances.is_empty() {
            continue;
        }
        instances.sort_by(instance_order);
        let protocol = protocol_of(&instances);
        let port = port_of(&instances);
        catalog.services.insert(
            name.clone(),
            Service {
                name: name.clone(),
                protocol,
                port,
                upstreams: None,
                instances,
                mtls: MtlsMode::default(),
                health: Default::default(),
                origin: Origin {
                    file: PathBuf::from(format!("consul://{}/{}", dcs.join(","), name)),
                    line: 0,
                },
            },
        );
    }
    catalog
}

fn protocol_of(instances: &[Instance]) -> Protocol {
    let values: BTreeSet<Option<&String>> =
        instances.iter().map(|i| i.labels.get("protocol")).collect();
    match values.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(p)] => p.parse().unwrap_or_default(),
        _ => Protocol::default(),
    }
}

fn port_of(instances: &[Instance]) -> u16 {
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    for i in instances {
        *counts.entry(i.port).or_default() += 1;
    }
    // Highest count; on a tie the lowest port (BTreeMap iterates ascending, max_by_key keeps
    // the last maximum, so compare with the port reversed).
    counts
        .into_iter()
        .max_by_key(|(port, n)| (*n, std::cmp::Reverse(*port)))
        .map_or(0, |(p, _)| p)
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
mod tests;
