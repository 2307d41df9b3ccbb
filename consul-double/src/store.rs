//! The catalog the double serves: nodes, services and checks per datacenter, with the Raft-like
//! indexes that drive blocking queries.
//!
//! Every write bumps the datacenter's index and records it as the `ModifyIndex` of what it
//! touched, and as the table index (`services`, `checks`) and per-service index that the read
//! endpoints report. An idempotent re-register still bumps them, as in Consul: that is the real
//! "spurious wake-up". Rendering to JSON lives in [`crate::json`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use crate::kv::{KvApplied, KvOp, KvStore};

pub type StrMap = BTreeMap<String, String>;

/// A write or read refused by the store; the HTTP layer maps it to a status and a plain body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    NoPathToDatacenter,
    BadRequest(String),
}

/// `PUT /v1/catalog/register` body (`RegisterRequest`). Go decodes case-insensitively, so the
/// common lower-case spellings are accepted as aliases.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegisterRequest {
    #[serde(default)]
    pub datacenter: String,
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub tagged_addresses: Option<StrMap>,
    #[serde(default)]
    pub node_meta: Option<StrMap>,
    #[serde(default)]
    pub service: Option<ServiceIn>,
    #[serde(default)]
    pub check: Option<CheckIn>,
    #[serde(default)]
    pub checks: Option<Vec<CheckIn>>,
    #[serde(default)]
    pub skip_node_update: bool,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub partition: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceIn {
    #[serde(default)]
    pub kind: String,
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub tagged_addresses: Option<BTreeMap<String, TaggedAddress>>,
    #[serde(default)]
    pub meta: Option<StrMap>,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub weights: Option<Weights>,
    #[serde(default)]
    pub enable_tag_override: bool,
    #[serde(default)]
    pub proxy: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub connect: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct TaggedAddress {
    #[serde(rename = "Address", alias = "address", default)]
    pub address: String,
    #[serde(rename = "Port", alias = "port", default)]
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    #[serde(default)]
    pub passing: i64,
    #[serde(default)]
    pub warning: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckIn {
    #[serde(default)]
    pub node: String,
    #[serde(rename = "CheckID", alias = "CheckId", default)]
    pub check_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub output: String,
    #[serde(rename = "ServiceID", alias = "ServiceId", default)]
    pub service_id: String,
    #[serde(default, rename = "Type")]
    pub kind: String,
    #[serde(default)]
    pub interval: String,
    #[serde(default)]
    pub timeout: String,
}

/// `PUT /v1/catalog/deregister` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeregisterRequest {
    #[serde(default)]
    pub datacenter: String,
    #[serde(default)]
    pub node: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: Option<String>,
    #[serde(rename = "CheckID", default)]
    pub check_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRec {
    pub id: String,
    pub name: String,
    pub address: String,
    pub tagged_addresses: Option<StrMap>,
    pub meta: Option<StrMap>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRec {
    pub node: String,
    pub kind: String,
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub address: String,
    pub tagged_addresses: Option<BTreeMap<String, TaggedAddress>>,
    pub meta: Option<StrMap>,
    pub port: u16,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub proxy: serde_json::Map<String, Value>,
    pub connect: serde_json::Map<String, Value>,
    pub create_index: u64,
    pub modify_index: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckRec {
    pub node: String,
    pub check_id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub output: String,
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub kind: String,
    pub interval: String,
    pub timeout: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One datacenter's state machine.
#[derive(Debug, Clone, Default)]
pub struct DcStore {
    /// The Raft index of the last write (never 0 once anything happened).
    pub index: u64,
    pub nodes: BTreeMap<String, NodeRec>,
    /// By (node, service id).
    pub services: BTreeMap<(String, String), ServiceRec>,
    /// By (node, check id).
    pub checks: BTreeMap<(String, String), CheckRec>,
    /// Index of the services table: any service write anywhere in the datacenter.
    pub services_index: u64,
    /// Index of the checks table.
    pub checks_index: u64,
    pub nodes_index: u64,
    /// Per service name: instances, their checks and their nodes.
    pub service_index: BTreeMap<String, u64>,
    /// The KV store; its writes share the Raft index with the catalog.
    pub kv: KvStore,
}

impl DcStore {
    fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Applies a KV write. Every apply consumes a Raft index, as a `KVS.Apply` that reaches Raft
    /// does, whether or not it changes anything.
    pub fn kv_apply(&mut self, op: KvOp) -> KvApplied {
        let idx = self.next_index();
        self.kv.apply(idx, op)
    }

    fn touch_service(&mut self, name: &str, idx: u64) {
        self.service_index.insert(name.to_string(), idx);
    }

    fn services_on_node(&self, node: &str) -> BTreeSet<String> {
        self.services
            .range((node.to_string(), String::new())..)
            .take_while(|((n, _), _)| n == node)
            .map(|(_, s)| s.name.clone())
            .collect()
    }

    /// The checks registered on `node` (node-level and service-level).
    pub fn checks_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a CheckRec> + 'a {
        self.checks
            .range((node.to_string(), String::new())..)
            .take_while(move |((n, _), _)| n == node)
            .map(|(_, c)| c)
    }

    /// The index a read of `/v1/health/service/:name` (or catalog) reports.
    pub fn index_of_service(&self, name: &str) -> u64 {
        self.service_index
            .get(name)
            .copied()
            .unwrap_or(self.services_index)
    }

    pub fn register(&mut self, req: RegisterRequest) -> Result<(), StoreError> {
        if req.node.is_empty() {
            return Err(StoreError::BadRequest("Must provide node".into()));
        }
        if req.address.is_empty() && !req.skip_node_update && !self.nodes.contains_key(&req.node) {
            return Err(StoreError::BadRequest("Must provide address".into()));
        }
        let idx = self.next_index();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut new_node = false;

        if !req.skip_node_update || !self.nodes.contains_key(&req.node) {
            let existing = self.nodes.get(&req.node).cloned();
            new_node = existing.is_none();
            let create_index = existing.as_ref().map_or(idx, |n| n.create_index);
            let id = if req.id.is_empty() {
                existing
                    .as_ref()
                    .map_or_else(|| pseudo_uuid(&req.node), |n| n.id.clone())
            } else {
                req.id.clone()
            };
            self.nodes.insert(
                req.node.clone(),
                NodeRec {
                    id,
                    name: req.node.clone(),
                    address: req.address.clone(),
                    tagged_addresses: req.tagged_addresses.clone(),
                    meta: req.node_meta.clone(),
                    create_index,
                    modify_index: idx,
                },
            );
            self.nodes_index = idx;
            touched.extend(self.services_on_node(&req.node));
        }

        if let Some(svc) = req.service {
            let id = if svc.id.is_empty() {
                svc.service.clone()
            } else {
                svc.id.clone()
            };
            if svc.service.is_empty() {
                return Err(StoreError::BadRequest("Must provide service name".into()));
            }
            let key = (req.node.clone(), id.clone());
            let create_index = self.services.get(&key).map_or(idx, |s| s.create_index);
            if let Some(old) = self.services.get(&key) {
                if old.name != svc.service {
                    touched.insert(old.name.clone());
                }
            }
            let weights = match svc.weights {
                Some(w)
                    if w.passing >= 1 && w.passing <= 65535 && (0..=65535).contains(&w.warning) =>
                {
                    w
                }
                _ => Weights {
                    passing: 1,
                    warning: 1,
                },
            };
            let rec = ServiceRec {
                node: req.node.clone(),
                kind: svc.kind,
                id: id.clone(),
                name: svc.service.clone(),
                tags: dedup_tags(svc.tags.unwrap_or_default()),
                address: svc.address,
                tagged_addresses: svc.tagged_addresses.filter(|m| !m.is_empty()),
                meta: svc.meta,
                port: svc.port,
                weights,
                enable_tag_override: svc.enable_tag_override,
                proxy: svc.proxy.unwrap_or_default(),
                connect: svc.connect.unwrap_or_default(),
                create_index,
                modify_index: idx,
            };
            // Checks carry their service's name and tags.
            for (_, c) in self
                .checks
                .range_mut((req.node.clone(), String::new())..)
                .take_while(|((n, _), _)| n == &req.node)
            {
                if c.service_id == id {
                    c.service_name = rec.name.clone();
                    c.service_tags = rec.tags.clone();
                    c.modify_index = idx;
                }
            }
            touched.insert(rec.name.clone());
            self.services.insert(key, rec);
            self.services_index = idx;
        }

        let mut checks: Vec<CheckIn> = req.check.into_iter().collect();
        checks.extend(req.checks.unwrap_or_default());
        if new_node && !checks.iter().any(|c| c.check_id == "serfHealth") {
            // A node joining the cluster comes with the agent's Serf health check.
            checks.push(CheckIn {
                check_id: "serfHealth".into(),
                name: "Serf Health Status".into(),
                status: "passing".into(),
                output: "Agent alive and reachable".into(),
                ..CheckIn::default()
            });
        }
        for c in checks {
            let check_id = if c.check_id.is_empty() {
                c.name.clone()
            } else {
                c.check_id.clone()
            };
            if check_id.is_empty() {
                return Err(StoreError::BadRequest("Missing check ID".into()));
            }
            let status = if c.status.is_empty() {
                "critical".to_string()
            } else {
                c.status.clone()
            };
            if !matches!(status.as_str(), "passing" | "warning" | "critical") {
                return Err(StoreError::BadRequest(format!(
                    "Invalid check status: \"{status}\""
                )));
            }
            let (service_name, service_tags) = if c.service_id.is_empty() {
                (String::new(), Vec::new())
            } else {
                match self.services.get(&(req.node.clone(), c.service_id.clone())) {
                    Some(s) => (s.name.clone(), s.tags.clone()),
                    None => {
                        return Err(StoreError::BadRequest(format!(
                            "Unknown service ID '{}' for check ID '{}'",
                            c.service_id, check_id
                        )))
                    }
                }
            };
            let key = (req.node.clone(), check_id.clone());
            let create_index = self.checks.get(&key).map_or(idx, |c| c.create_index);
            if service_name.is_empty() {
                touched.extend(self.services_on_node(&req.node));
            } else {
                touched.insert(service_name.clone());
            }
            self.checks.insert(
                key,
                CheckRec {
                    node: req.node.clone(),
                    check_id,
                    name: c.name,
                    status,
                    notes: c.notes,
                    output: c.output,
                    service_id: c.service_id,
                    service_name,
                    service_tags,
                    kind: c.kind,
                    interval: c.interval,
                    timeout: c.timeout,
                    create_index,
                    modify_index: idx,
                },
            );
            self.checks_index = idx;
        }
        for name in touched {
            self.touch_service(&name, idx);
        }
        Ok(())
    }

    pub fn deregister(&mut self, req: DeregisterRequest) -> Result<(), StoreError> {
        if req.node.is_empty() {
            return Err(StoreError::BadRequest("Must provide node".into()));
        }
        let idx = self.next_index();
        let mut touched = BTreeSet::new();
        match (&req.service_id, &req.check_id) {
            (Some(sid), _) => {
                if let Some(s) = self.services.remove(&(req.node.clone(), sid.clone())) {
                    touched.insert(s.name);
                    self.services_index = idx;
                }
                let before = self.checks.len();
                self.checks
                    .retain(|_, c| !(c.node == req.node && &c.service_id == sid));
                if self.checks.len() != before {
                    self.checks_index = idx;
                }
            }
            (None, Some(cid)) => {
                if let Some(c) = self.checks.remove(&(req.node.clone(), cid.clone())) {
                    if c.service_name.is_empty() {
                        touched.extend(self.services_on_node(&req.node));
                    } else {
                        touched.insert(c.service_name);
                    }
                    self.checks_index = idx;
                }
            }
            (None, None) => {
                touched.extend(self.services_on_node(&req.node));
                self.nodes.remove(&req.node);
                self.services.retain(|(n, _), _| n != &req.node);
                self.checks.retain(|(n, _), _| n != &req.node);
                self.nodes_index = idx;
                self.services_index = idx;
                self.checks_index = idx;
            }
        }
        for name in touched {
            self.touch_service(&name, idx);
        }
        Ok(())
    }

    /// Bumps every index without changing content, as an idempotent write does.
    pub fn spurious_write(&mut self) {
        let idx = self.next_index();
        self.services_index = idx;
        self.checks_index = idx;
        self.nodes_index = idx;
        for v in self.service_index.values_mut() {
            *v = idx;
        }
    }

    /// Moves every index back to at most `to`, as restoring an older snapshot does.
    pub fn regress_index(&mut self, to: u64) {
        self.index = to;
        for v in [
            &mut self.services_index,
            &mut self.checks_index,
            &mut self.nodes_index,
        ] {
            *v = (*v).min(to);
        }
        for v in self.service_index.values_mut() {
            *v = (*v).min(to);
        }
        self.kv.regress_index(to);
    }

    /// Sets a check's status (the common "fail a health check" write).
    pub fn set_check_status(&mut self, node: &str, check_id: &str, status: &str) -> bool {
        let idx = self.index + 1;
        let Some(c) = self
            .checks
            .get_mut(&(node.to_string(), check_id.to_string()))
        else {
            return false;
        };
        self.index = idx;
        c.status = status.to_string();
        c.modify_index = idx;
        let touched = if c.service_name.is_empty() {
            self.services_on_node(node)
        } else {
            BTreeSet::from([c.service_name.clone()])
        };
        self.checks_index = idx;
        for name in touched {
            self.touch_service(&name, idx);
        }
        true
    }
}

fn dedup_tags(tags: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    tags.into_iter()
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

/// A stable UUID-shaped node ID derived from the node name (FNV-1a), so output is reproducible.
fn pseudo_uuid(name: &str) -> String {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in name.bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    let s = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reg(node: &str, svc: &str, id: &str, port: u16) -> RegisterRequest {
        RegisterRequest {
            node: node.into(),
            address: "10.0.0.1".into(),
            service: Some(ServiceIn {
                id: id.into(),
                service: svc.into(),
                port,
                ..ServiceIn::default()
            }),
            ..RegisterRequest::default()
        }
    }

    #[test]
    fn per_service_index_and_tables() {
        let mut dc = DcStore::default();
        dc.register(reg("n1", "web", "web-1", 80)).unwrap();
        dc.register(reg("n2", "db", "db-1", 5432)).unwrap();
        assert_eq!(dc.index, 2);
        assert_eq!(dc.index_of_service("web"), 1);
        assert_eq!(dc.index_of_service("db"), 2);
        assert_eq!(dc.services_index, 2);
        // A new node gets serfHealth.
        assert!(dc.checks.contains_key(&("n1".into(), "serfHealth".into())));
        // Failing a node check touches every service on that node.
        assert!(dc.set_check_status("n1", "serfHealth", "critical"));
        assert_eq!(dc.index_of_service("web"), 3);
        assert_eq!(dc.index_of_service("db"), 2);
        dc.deregister(DeregisterRequest {
            node: "n1".into(),
            service_id: Some("web-1".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(dc.index_of_service("web"), 4);
        assert!(dc.services.len() == 1);
        dc.regress_index(1);
        assert_eq!(dc.index_of_service("db"), 1);
    }
}
