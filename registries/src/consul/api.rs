//! The parts of Consul's JSON the adapter reads. Unknown fields are ignored (Consul grows new
//! ones, and Enterprise adds `Namespace`/`Partition`); maps and lists may be `null`; `Port` may be
//! absent. Never `deny_unknown_fields` here.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `/v1/catalog/services`: service name -> tags (a set, in no order).
pub type ServiceList = BTreeMap<String, Option<Vec<String>>>;

/// An element of `/v1/health/service/:name`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckServiceNode {
    #[serde(default, deserialize_with = "null_default")]
    pub node: Node,
    #[serde(default, deserialize_with = "null_default")]
    pub service: NodeService,
    #[serde(default, deserialize_with = "null_default")]
    pub checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub datacenter: String,
    #[serde(default, deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeService {
    #[serde(default)]
    pub kind: String,
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "null_default")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub address: String,
    #[serde(default, deserialize_with = "null_default")]
    pub meta: BTreeMap<String, String>,
    /// Absent when 0.
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub weights: Option<Weights>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    #[serde(default)]
    pub passing: i64,
    #[serde(default)]
    pub warning: i64,
}

/// A check, in `/v1/health/service/:name` (`Checks`) and `/v1/health/state/:state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(default)]
    pub node: String,
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    #[serde(default)]
    pub status: String,
    #[serde(rename = "ServiceID", default)]
    pub service_id: String,
    #[serde(default)]
    pub service_name: String,
    #[serde(default)]
    pub modify_index: u64,
}
