#![allow(clippy::unwrap_used)]
use super::*;
use crate::consul::api::{CheckServiceNode, HealthCheck, ServiceList};

fn opts() -> MappingOptions {
    MappingOptions {
        default_mesh_port: 15006,
        ..MappingOptions::default()
    }
}

/// The canonical CE response from consul-api.md a.5, with a sidecar and a native entry.
const CANONICAL: &str = r#"[{"Node":{"ID":"8f246b77-f3e1-ff88-5b48-8ec93abf3e05","Node":"vm-web-1","Address":"10.0.0.11","Datacenter":"dc1",
  "TaggedAddresses":{"lan":"10.0.0.11","lan_ipv4":"10.0.0.11","wan":"10.0.0.11","wan_ipv4":"10.0.0.11"},
  "Meta":{"consul-network-segment":""},"CreateIndex":13,"ModifyIndex":15},
 "Service":{"ID":"web-1","Service":"web","Tags":["v1"],"Address":"10.0.0.11",
  "TaggedAddresses":{"lan_ipv4":{"Address":"10.0.0.11","Port":8080}},
  "Meta":{"version":"1.2.3"},"Port":8080,"Weights":{"Passing":10,"Warning":1},"EnableTagOverride":false,
  "Proxy":{"Mode":"","MeshGateway":{},"Expose":{}},"Connect":{},"PeerName":"","CreateIndex":20,"ModifyIndex":20},
 "Checks":[
  {"Node":"vm-web-1","CheckID":"serfHealth","Name":"Serf Health Status","Status":"passing","Notes":"","Output":"Agent alive and reachable",
   "ServiceID":"","ServiceName":"","ServiceTags":[],"Type":"","Interval":"","Timeout":"","ExposedPort":0,"Definition":{},"CreateIndex":13,"ModifyIndex":13},
  {"Node":"vm-web-1","CheckID":"service:web-1","Name":"Service 'web' check","Status":"warning","Notes":"","Output":"HTTP GET: 429",
   "ServiceID":"web-1","ServiceName":"web","ServiceTags":["v1"],"Type":"http","Interval":"10s","Timeout":"1s","ExposedPort":0,"Definition":{},"CreateIndex":21,"ModifyIndex":40}]},
 {"Node":{"Node":"vm-web-1","Address":"10.0.0.11","Meta":null,"TaggedAddresses":null},
  "Service":{"Kind":"connect-proxy","ID":"web-1-sidecar-proxy","Service":"web","Port":21000,"Tags":null,"Meta":null,
   "Proxy":{"DestinationServiceName":"web","DestinationServiceID":"web-1","LocalServiceAddress":"127.0.0.1","LocalServicePort":8080,"Mode":"","MeshGateway":{},"Expose":{}}},
  "Checks":null}]"#;

fn decode(s: &str) -> Vec<CheckServiceNode> {
    serde_json::from_str(s).unwrap()
}

#[test]
fn consul_canonical_warning_uses_warning_weight_and_skips_sidecar() {
    let m = map_service("dc1", "web", &decode(CANONICAL), &opts());
    assert_eq!(m.instances.len(), 1, "{m:?}");
    let i = &m.instances[0];
    assert_eq!((i.address.as_str(), i.port), ("10.0.0.11", 8080));
    assert!(i.healthy);
    assert_eq!(i.weight, 1, "warning -> Weights.Warning");
    assert_eq!(i.labels.get("version").map(String::as_str), Some("1.2.3"));
    assert_eq!(i.labels.get("tag.v1").map(String::as_str), Some("true"));
    assert_eq!(i.locality.as_deref(), Some("dc1"));
    assert_eq!(i.node, None);
    assert!(m.rejected.is_empty());
}

fn entry(
    node: &str,
    node_addr: &str,
    id: &str,
    svc_addr: &str,
    port: Option<u16>,
    checks: &[(&str, &str, &str)],
) -> serde_json::Value {
    let checks: Vec<_> = checks
        .iter()
        .map(|(cid, sid, status)| serde_json::json!({"Node": node, "CheckID": cid, "ServiceID": sid, "Status": status, "ModifyIndex": 5}))
        .collect();
    let mut service = serde_json::json!({"ID": id, "Service": "api", "Tags": ["version=v2", "canary"], "Address": svc_addr,
        "Meta": {"team": "a", "pilotfish-mesh-port": "1"}, "Weights": {"Passing": 300, "Warning": 0}});
    if let Some(p) = port {
        service["Port"] = p.into();
    }
    serde_json::json!({"Node": {"Node": node, "Address": node_addr, "Meta": null}, "Service": service, "Checks": checks})
}

#[test]
fn consul_json_variants_decode_to_the_same_model() {
    // null maps, absent Port (rejected), Enterprise and unknown fields, shuffled order,
    // lower-case tagged-address keys.
    let a = serde_json::json!([
        entry(
            "n1",
            "10.0.0.1",
            "api-1",
            "",
            Some(80),
            &[("serfHealth", "", "passing")]
        ),
        entry("n2", "10.0.0.2", "api-2", "10.9.9.9", Some(81), &[]),
        entry("n3", "10.0.0.3", "api-3", "", None, &[]),
    ]);
    let mut b = a.clone();
    let arr = b.as_array_mut().unwrap();
    arr.reverse();
    for e in arr.iter_mut() {
        e["Service"]["Namespace"] = "default".into();
        e["Service"]["Partition"] = "default".into();
        e["Service"]["TaggedAddresses"] =
            serde_json::json!({"lan_ipv4": {"address": "1.2.3.4", "port": 1}});
        e["Node"]["Locality"] = serde_json::json!({"Region": "r"});
        e["SomethingNew"] = serde_json::json!({"x": [1, 2]});
    }
    let ma = map_service(
        "dc1",
        "api",
        &serde_json::from_value::<Vec<CheckServiceNode>>(a).unwrap(),
        &opts(),
    );
    let mb = map_service(
        "dc1",
        "api",
        &serde_json::from_value::<Vec<CheckServiceNode>>(b).unwrap(),
        &opts(),
    );
    assert_eq!(ma, mb);
    assert_eq!(ma.instances.len(), 2);
    assert_eq!(
        ma.instances[1].address, "10.9.9.9",
        "Service.Address wins over Node.Address"
    );
    assert_eq!(
        ma.instances[0].address, "10.0.0.1",
        "empty Service.Address -> Node.Address"
    );
    assert_eq!(ma.instances[0].weight, 128, "clamped to 128");
    assert_eq!(
        ma.instances[0].labels.get("version").map(String::as_str),
        Some("v2")
    );
    assert!(!ma.instances[0].labels.contains_key("pilotfish-mesh-port"));
    assert_eq!(ma.rejected.len(), 1);
    assert!(ma.rejected[0].reason.contains("Port"));
    assert_eq!(ma.nodes.len(), 3);
}

#[test]
fn consul_critical_checks_make_unhealthy() {
    let e = decode(
        &serde_json::json!([
            entry(
                "n1",
                "10.0.0.1",
                "api-1",
                "",
                Some(80),
                &[("serfHealth", "", "critical"), ("c", "api-1", "passing")]
            ),
            entry(
                "n2",
                "10.0.0.2",
                "api-2",
                "",
                Some(80),
                &[("_service_maintenance:api-2", "api-2", "critical")]
            ),
            entry(
                "n3",
                "10.0.0.3",
                "api-3",
                "",
                Some(80),
                &[("c", "api-3", "warning")]
            ),
            // A check of another service on the same node does not count.
            entry(
                "n4",
                "10.0.0.4",
                "api-4",
                "",
                Some(80),
                &[("other", "db-1", "critical")]
            ),
        ])
        .to_string(),
    );
    let m = map_service("dc1", "api", &e, &opts());
    let health: Vec<bool> = m.instances.iter().map(|i| i.healthy).collect();
    // warning weight 0 -> unhealthy (a.9).
    assert_eq!(health, vec![false, false, false, true]);
}

#[test]
fn consul_agent_nodes_use_mesh_port() {
    let mut e = entry("vm-b", "10.0.0.12", "api-1", "", Some(9080), &[]);
    e["Node"]["Meta"] =
        serde_json::json!({"pilotfish-agent": "true", "pilotfish-mesh-port": "15106"});
    let mut bad = entry("vm-c", "10.0.0.13", "api-2", "", Some(9080), &[]);
    bad["Node"]["Meta"] =
        serde_json::json!({"pilotfish-agent": "true", "pilotfish-mesh-port": "nope"});
    let mut dflt = entry("vm-d", "10.0.0.14", "api-3", "", Some(9080), &[]);
    dflt["Node"]["Meta"] = serde_json::json!({"pilotfish-agent": "true"});
    let m = map_service(
        "dc2",
        "api",
        &decode(&serde_json::json!([e, bad, dflt]).to_string()),
        &opts(),
    );
    assert_eq!(m.instances.len(), 2);
    assert_eq!(m.instances[0].node.as_deref(), Some("vm-b"));
    assert_eq!(m.instances[0].target(), ("10.0.0.12", 15106));
    assert_eq!(m.instances[1].mesh_port, 15006);
    assert_eq!(m.rejected.len(), 1);
    assert!(m.rejected[0].reason.contains("pilotfish-mesh-port"));
}

#[test]
fn consul_duplicates_are_rejected_deterministically() {
    let a = entry("n1", "10.0.0.1", "api-1", "", Some(80), &[]);
    let b = entry("n2", "10.0.0.2", "api-2", "10.0.0.1", Some(80), &[]);
    let m1 = map_service(
        "dc1",
        "api",
        &decode(&serde_json::json!([a, b]).to_string()),
        &opts(),
    );
    let m2 = map_service(
        "dc1",
        "api",
        &decode(&serde_json::json!([b, a]).to_string()),
        &opts(),
    );
    assert_eq!(m1, m2);
    assert_eq!(m1.instances.len(), 1);
    assert_eq!(m1.rejected[0].service_id, "api-2");
}

#[test]
fn consul_selection_by_tag_and_glob() {
    let list: ServiceList = serde_json::from_str(
        r#"{"consul": [], "web": ["mesh", "v1"], "web-admin": null, "db": ["mesh"], "web-sidecar-proxy": []}"#,
    )
    .unwrap();
    let all = select_services(&list, &opts());
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        ["db", "web", "web-admin", "web-sidecar-proxy"]
    );
    let o = MappingOptions {
        service_tag: Some("mesh".into()),
        name_filter: Some("web*".into()),
        ..opts()
    };
    assert_eq!(
        select_services(&list, &o).keys().collect::<Vec<_>>(),
        ["web"]
    );
    assert!(glob_match("*-api-*", "team-api-v2"));
    assert!(!glob_match("web", "web2"));
}

#[test]
fn consul_catalog_from_two_datacenters_carries_locality() {
    let e1 = map_service(
        "dc1",
        "api",
        &decode(&serde_json::json!([entry("n1", "10.0.0.1", "a", "", Some(80), &[])]).to_string()),
        &opts(),
    );
    let e2 = map_service(
        "dc2",
        "api",
        &decode(&serde_json::json!([entry("n9", "10.1.0.1", "a", "", Some(80), &[])]).to_string()),
        &opts(),
    );
    let dc1 = BTreeMap::from([("api".to_string(), e1.instances)]);
    let dc2 = BTreeMap::from([("api".to_string(), e2.instances)]);
    let c = build_catalog([("dc1", &dc1), ("dc2", &dc2)]);
    let s = &c.services["api"];
    assert_eq!(s.port, 80);
    let loc: Vec<_> = s
        .instances
        .iter()
        .map(|i| i.locality.clone().unwrap())
        .collect();
    assert_eq!(loc, ["dc1", "dc2"]);
    assert_eq!(s.origin.file.to_string_lossy(), "consul://dc1,dc2/api");
}

#[test]
fn consul_health_check_decode_ignores_unknown() {
    let c: Vec<HealthCheck> = serde_json::from_str(
        r#"[{"Node":"n","CheckID":"serfHealth","Status":"passing","ServiceTags":null,"Definition":{},"PeerName":"p","ModifyIndex":3}]"#,
    )
    .unwrap();
    assert_eq!(c[0].modify_index, 3);
}
