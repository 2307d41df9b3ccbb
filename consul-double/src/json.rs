//! Renders the store as Consul's JSON, field for field (see consul-api.md a.5): `null` maps where
//! a raw register left them nil, capitalized tagged-address keys, `Port` absent when 0 in health
//! output but `ServicePort` always present in catalog output, `[]` for nil tag lists, and the
//! always-present `Proxy.Mode`/`MeshGateway`/`Expose`.
//!
//! Also holds the small go-bexpr subset `?filter=` supports, evaluated on the rendered JSON.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::store::{CheckRec, NodeRec, ServiceRec, StrMap, TaggedAddress, Weights};

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeOut<'a> {
    #[serde(rename = "ID")]
    pub id: &'a str,
    pub node: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    pub tagged_addresses: &'a Option<StrMap>,
    pub meta: &'a Option<StrMap>,
    pub create_index: u64,
    pub modify_index: u64,
}

pub fn node<'a>(n: &'a NodeRec, dc: &'a str) -> NodeOut<'a> {
    NodeOut {
        id: &n.id,
        node: &n.name,
        address: &n.address,
        datacenter: dc,
        tagged_addresses: &n.tagged_addresses,
        meta: &n.meta,
        create_index: n.create_index,
        modify_index: n.modify_index,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeServiceOut<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    pub kind: &'a str,
    #[serde(rename = "ID")]
    pub id: &'a str,
    pub service: &'a str,
    pub tags: &'a [String],
    pub address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tagged_addresses: &'a Option<BTreeMap<String, TaggedAddress>>,
    pub meta: &'a Option<StrMap>,
    #[serde(skip_serializing_if = "is_zero")]
    pub port: u16,
    pub weights: Weights,
    pub enable_tag_override: bool,
    pub proxy: Value,
    pub connect: &'a Map<String, Value>,
    pub peer_name: &'a str,
    pub create_index: u64,
    pub modify_index: u64,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

fn proxy(p: &Map<String, Value>) -> Value {
    let mut p = p.clone();
    p.entry("Mode")
        .or_insert_with(|| Value::String(String::new()));
    p.entry("MeshGateway")
        .or_insert_with(|| Value::Object(Map::new()));
    p.entry("Expose")
        .or_insert_with(|| Value::Object(Map::new()));
    Value::Object(p)
}

pub fn node_service(s: &ServiceRec) -> NodeServiceOut<'_> {
    NodeServiceOut {
        kind: &s.kind,
        id: &s.id,
        service: &s.name,
        tags: &s.tags,
        address: &s.address,
        tagged_addresses: &s.tagged_addresses,
        meta: &s.meta,
        port: s.port,
        weights: s.weights,
        enable_tag_override: s.enable_tag_override,
        proxy: proxy(&s.proxy),
        connect: &s.connect,
        peer_name: "",
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckOut<'a> {
    pub node: &'a str,
    #[serde(rename = "CheckID")]
    pub check_id: &'a str,
    pub name: &'a str,
    pub status: &'a str,
    pub notes: &'a str,
    pub output: &'a str,
    #[serde(rename = "ServiceID")]
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub service_tags: &'a [String],
    #[serde(rename = "Type")]
    pub kind: &'a str,
    pub interval: &'a str,
    pub timeout: &'a str,
    pub exposed_port: u16,
    pub definition: Map<String, Value>,
    pub create_index: u64,
    pub modify_index: u64,
}

pub fn check(c: &CheckRec) -> CheckOut<'_> {
    CheckOut {
        node: &c.node,
        check_id: &c.check_id,
        name: &c.name,
        status: &c.status,
        notes: &c.notes,
        output: &c.output,
        service_id: &c.service_id,
        service_name: &c.service_name,
        service_tags: &c.service_tags,
        kind: &c.kind,
        interval: &c.interval,
        timeout: &c.timeout,
        exposed_port: 0,
        definition: Map::new(),
        create_index: c.create_index,
        modify_index: c.modify_index,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckServiceNodeOut<'a> {
    pub node: NodeOut<'a>,
    pub service: NodeServiceOut<'a>,
    pub checks: Vec<CheckOut<'a>>,
}

/// `/v1/catalog/service/:name` element. Note: no `Checks` field.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceNodeOut<'a> {
    #[serde(rename = "ID")]
    pub id: &'a str,
    pub node: &'a str,
    pub address: &'a str,
    pub datacenter: &'a str,
    pub tagged_addresses: &'a Option<StrMap>,
    pub node_meta: &'a Option<StrMap>,
    pub service_kind: &'a str,
    #[serde(rename = "ServiceID")]
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub service_tags: &'a [String],
    pub service_address: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_tagged_addresses: &'a Option<BTreeMap<String, TaggedAddress>>,
    pub service_weights: Weights,
    pub service_meta: &'a Option<StrMap>,
    pub service_port: u16,
    pub service_socket_path: &'a str,
    pub service_enable_tag_override: bool,
    pub service_proxy: Value,
    pub service_connect: &'a Map<String, Value>,
    pub service_locality: Option<()>,
    pub create_index: u64,
    pub modify_index: u64,
}

pub fn service_node<'a>(n: &'a NodeRec, s: &'a ServiceRec, dc: &'a str) -> ServiceNodeOut<'a> {
    ServiceNodeOut {
        id: &n.id,
        node: &n.name,
        address: &n.address,
        datacenter: dc,
        tagged_addresses: &n.tagged_addresses,
        node_meta: &n.meta,
        service_kind: &s.kind,
        service_id: &s.id,
        service_name: &s.name,
        service_tags: &s.tags,
        service_address: &s.address,
        service_tagged_addresses: &s.tagged_addresses,
        service_weights: s.weights,
        service_meta: &s.meta,
        service_port: s.port,
        service_socket_path: "",
        service_enable_tag_override: s.enable_tag_override,
        service_proxy: proxy(&s.proxy),
        service_connect: &s.connect,
        service_locality: None,
        create_index: s.create_index,
        modify_index: s.modify_index,
    }
}

/// A parsed `?filter=` expression: clauses joined by `and`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter(Vec<Clause>);

#[derive(Debug, Clone, PartialEq)]
enum Clause {
    Eq(String, String, bool),
    In(String, String, bool),
}

impl Filter {
    /// Parses the supported subset: `Sel == "v"`, `Sel != "v"`, `"v" in Sel`, `"v" not in Sel`,
    /// joined by `and`. Anything else is an error (Consul answers 400), never silently ignored.
    pub fn parse(expr: &str) -> Result<Filter, String> {
        let mut clauses = Vec::new();
        for part in expr.split(" and ") {
            let part = part.trim();
            let err = || {
                format!(
                    "Failed to create boolean expression evaluator: unsupported filter {part:?}"
                )
            };
            if let Some(rest) = part.strip_prefix('"') {
                let (value, rest) = rest.split_once('"').ok_or_else(err)?;
                let rest = rest.trim();
                let (neg, sel) = if let Some(s) = rest.strip_prefix("not in ") {
                    (true, s)
                } else if let Some(s) = rest.strip_prefix("in ") {
                    (false, s)
                } else {
                    return Err(err());
                };
                clauses.push(Clause::In(
                    selector(sel).ok_or_else(err)?,
                    value.into(),
                    neg,
                ));
            } else {
                let (sel, neg, rhs) = if let Some((s, r)) = part.split_once("==") {
                    (s, false, r)
                } else if let Some((s, r)) = part.split_once("!=") {
                    (s, true, r)
                } else {
                    return Err(err());
                };
                let rhs = rhs.trim();
                let value = rhs
                    .strip_prefix('"')
                    .and_then(|r| r.strip_suffix('"'))
                    .filter(|v| !v.contains('"'))
                    .ok_or_else(err)?;
                clauses.push(Clause::Eq(
                    selector(sel).ok_or_else(err)?,
                    value.into(),
                    neg,
                ));
            }
        }
        Ok(Filter(clauses))
    }

    /// Evaluates on one rendered entry. Selectors that cross a list are an error.
    pub fn matches(&self, entry: &Value) -> Result<bool, String> {
        for c in &self.0 {
            let ok = match c {
                Clause::Eq(sel, v, neg) => {
                    let got = lookup(entry, sel)?;
                    let eq = match got {
                        Some(Value::String(s)) => s == v,
                        Some(Value::Number(n)) => n.to_string() == *v,
                        Some(Value::Bool(b)) => b.to_string() == *v,
                        _ => false,
                    };
                    eq != *neg
                }
                Clause::In(sel, v, neg) => {
                    let found = match lookup(entry, sel)? {
                        Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(v)),
                        Some(Value::Object(m)) => m.contains_key(v),
                        Some(Value::String(s)) => s.contains(v.as_str()),
                        _ => false,
                    };
                    found != *neg
                }
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn selector(s: &str) -> Option<String> {
    let s = s.trim();
    let valid = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    valid.then(|| s.to_string())
}

fn lookup<'a>(entry: &'a Value, sel: &str) -> Result<Option<&'a Value>, String> {
    let mut cur = entry;
    for (i, part) in sel.split('.').enumerate() {
        match cur {
            Value::Object(m) => match m.get(part) {
                Some(v) => cur = v,
                None if i == 0 => return Err(format!("Selector {sel:?} is not valid")),
                None => return Ok(None),
            },
            Value::Array(_) => {
                return Err(format!(
                    "Selector {sel:?} crosses a list; this double does not support it"
                ))
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(cur))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filter_subset() {
        let e = json!({"Service": {"Meta": {"version": "1"}, "Tags": ["v1", "x"]}, "Node": {"Node": "n1"}});
        let f = Filter::parse(r#"Service.Meta.version == "1" and "v1" in Service.Tags"#).unwrap();
        assert!(f.matches(&e).unwrap());
        let f = Filter::parse(r#""v2" not in Service.Tags and Node.Node != "n2""#).unwrap();
        assert!(f.matches(&e).unwrap());
        let f = Filter::parse(r#"Service.Meta.version == "2""#).unwrap();
        assert!(!f.matches(&e).unwrap());
        assert!(Filter::parse("Service.Port > 3").is_err());
        assert!(Filter::parse(r#"Service.Meta.version == "1" or Node.Node == "x""#).is_err());
        let f = Filter::parse(r#"Checks.Status != "passing""#).unwrap();
        assert!(f.matches(&json!({"Checks": [{"Status": "x"}]})).is_err());
    }
}
