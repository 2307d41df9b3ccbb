use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;

use super::*;
use crate::resources::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
use crate::xds::testing::{names, node, resources, NODE};
use crate::xds::wire::Outgoing;

fn state(svcs: &[&str]) -> SotwState {
    SotwState::new("cp-test", NODE, resources(svcs, 1))
}

fn req(type_url: &str, resource_names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.to_string(),
        resource_names: names(resource_names),
        response_nonce: nonce.to_string(),
        version_info: version.to_string(),
        ..Default::default()
    }
}

/// The first request of the stream (carries the node).
fn first(type_url: &str, resource_names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node(),
        ..req(type_url, resource_names, "", "")
    }
}

fn nack(type_url: &str, nonce: &str, message: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: message.to_string(),
            details: vec![],
        }),
        ..req(type_url, &[], nonce, "")
    }
}

fn ack_of(r: &DiscoveryResponse, resource_names: &[&str]) -> DiscoveryRequest {
    req(&r.type_url, resource_names, &r.nonce, &r.version_info)
}

fn one(step: Step<Outgoing<DiscoveryResponse>>) -> DiscoveryResponse {
    assert_eq!(step.responses.len(), 1, "expected one response: {step:?}");
    step.responses
        .into_iter()
        .next()
        .expect("one response")
        .decoded()
}

fn resource_names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .map(|a| {
            if a.type_url.ends_with("ClusterLoadAssignment") {
                ClusterLoadAssignment::decode(a.value.as_slice())
                    .expect("decodes")
                    .cluster_name
            } else if a.type_url.ends_with("Cluster") {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                    .expect("decodes")
                    .name
            } else {
                String::new()
            }
        })
        .collect()
}

#[test]
fn first_request_needs_node_and_node_must_not_change() {
    let mut s = state(&["a"]);
    assert_eq!(
        s.on_request(req(CLUSTER, &[], "", ""))
            .expect_err("rejected"),
        ProtocolError::MissingNode
    );
    assert_eq!(
        ProtocolError::MissingNode.to_string(),
        "missing node information"
    );
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    // Later requests may omit the node...
    assert!(s.on_request(ack_of(&r, &[])).is_ok());
    // ...but may not change it.
    let mut other = req(ENDPOINT, &["a"], "", "");
    other.node = Some(envoy_types::pb::envoy::config::core::v3::Node {
        id: "vm-z".into(),
        ..Default::default()
    });
    assert!(matches!(
        s.on_request(other),
        Err(ProtocolError::NodeChanged { .. })
    ));
}

#[test]
fn initial_cds_is_full_set_with_content_version_and_identifier() {
    let mut s = state(&["a", "b"]);
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    assert_eq!(resource_names(&r), ["a", "b"]);
    let res = resources(&["a", "b"], 1);
    assert_eq!(r.version_info, resources::set_version(&res.clusters));
    assert_eq!(
        r.control_plane.as_ref().map(|c| c.identifier.as_str()),
        Some("cp-test")
    );
    assert!(!r.nonce.is_empty());
}

#[test]
fn ack_gets_no_response_and_is_recorded() {
    let mut s = state(&["a"]);
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    let step = s.on_request(ack_of(&r, &[])).expect("ok");
    assert!(step.responses.is_empty());
    assert_eq!(
        step.events,
        vec![Event::Ack {
            type_url: CLUSTER.into(),
            version: r.version_info.clone(),
            nonce: r.nonce.clone()
        }]
    );
    // Same resources again: nothing to send.
    assert!(s.on_resources(resources(&["a"], 1)).responses.is_empty());
}

#[test]
fn nack_is_recorded_and_version_not_resent_until_a_real_change() {
    let mut s = state(&["a"]);
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    let step = s
        .on_request(nack(CLUSTER, &r.nonce, "bad cluster"))
        .expect("ok");
    assert!(step.responses.is_empty());
    assert_eq!(
        step.events,
        vec![Event::Nack {
            type_url: CLUSTER.into(),
            version: String::new(),
            nonce: r.nonce.clone(),
            message: "bad cluster".into()
        }]
    );
    // The same content (a new snapshot that translates identically) is not resent.
    assert!(s.on_resources(resources(&["a"], 1)).responses.is_empty());
    // A real change is.
    let r2 = one(s.on_resources(resources(&["a", "b"], 1)));
    assert_ne!(r2.version_info, r.version_info);
    assert_eq!(resource_names(&r2), ["a", "b"]);
}

#[test]
fn stale_nonce_is_ignored() {
    let mut s = state(&["a"]);
    s.on_request(first(CLUSTER, &[])).expect("ok");
    let e1 = one(s.on_request(req(ENDPOINT, &["a"], "", "")).expect("ok"));
    // A newer EDS response goes out before the client answers the first.
    let _e2 = one(s.on_resources(resources(&["a"], 2)));
    let step = s.on_request(ack_of(&e1, &["a", "b"])).expect("ok");
    assert!(step.responses.is_empty());
    assert_eq!(
        step.events,
        vec![Event::StaleNonce {
            type_url: ENDPOINT.into(),
            nonce: e1.nonce.clone()
        }]
    );
}

#[test]
fn wildcard_four_steps() {
    let mut s = state(&["A", "B"]);
    // 1. Unset: wildcard, full set.
    let r1 = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    assert_eq!(resource_names(&r1), ["A", "B"]);
    // 2. "*" and "A": still the wildcard, A already sent: nothing new.
    let step = s.on_request(ack_of(&r1, &["*", "A"])).expect("ok");
    assert!(step.responses.is_empty());
    assert_eq!(s.subscription(CLUSTER), Some((true, ["A".into()].into())));
    // 3. "A": wildcard dropped; the next push carries only A.
    s.on_request(ack_of(&r1, &["A"])).expect("ok");
    assert_eq!(s.subscription(CLUSTER), Some((false, ["A".into()].into())));
    let r3 = one(s.on_resources(resources(&["A", "B", "C"], 1)));
    assert_eq!(resource_names(&r3), ["A"]);
    // 4. Unset again: unsubscribed from everything, not a wildcard.
    s.on_request(ack_of(&r3, &[])).expect("ok");
    assert_eq!(s.subscription(CLUSTER), Some((false, Default::default())));
    assert!(s
        .on_resources(resources(&["A", "D"], 1))
        .responses
        .is_empty());
}

#[test]
fn added_names_are_answered_removed_names_are_not() {
    let mut s = state(&["a", "b"]);
    s.on_request(first(CLUSTER, &[])).expect("ok");
    let e = one(s.on_request(req(ENDPOINT, &["a"], "", "")).expect("ok"));
    let e2 = one(s.on_request(ack_of(&e, &["a", "b"])).expect("ok"));
    assert_eq!(resource_names(&e2), ["a", "b"]);
    assert!(s
        .on_request(ack_of(&e2, &["b"]))
        .expect("ok")
        .responses
        .is_empty());
}

#[test]
fn unknown_names_are_remembered_and_eds_gets_empty_assignment() {
    let mut s = state(&["a"]);
    let e = one(s
        .on_request(first(ENDPOINT, &["a", "ghost", "a"]))
        .expect("ok"));
    // No duplicates; the unknown cluster gets an empty assignment so it can finish warming.
    assert_eq!(resource_names(&e), ["a", "ghost"]);
    let ghost = ClusterLoadAssignment::decode(e.resources[1].value.as_slice()).expect("decodes");
    assert!(ghost.endpoints.is_empty());

    let r = one(s.on_request(req(ROUTE, &["inbound"], "", "")).expect("ok"));
    assert!(
        r.resources.is_empty(),
        "unknown route names are not invented"
    );
    // When the route appears it is pushed without another request.
    let mut res = resources(&["a"], 1);
    let mut routes = (*res.routes).clone();
    routes.insert(
        "inbound".into(),
        resources::Resource::encode(
            "inbound",
            &envoy_types::pb::envoy::config::route::v3::RouteConfiguration {
                name: "inbound".into(),
                ..Default::default()
            },
        ),
    );
    res.routes = std::sync::Arc::new(routes);
    let step = s.on_resources(res);
    let pushed: Vec<_> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(pushed, [ROUTE]);
    assert_eq!(step.responses[0].count, 1);
}

#[test]
fn eds_request_after_cds_response_is_always_answered() {
    let mut s = state(&["a"]);
    let c = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    let e = one(s.on_request(req(ENDPOINT, &["a"], "", "")).expect("ok"));
    s.on_request(ack_of(&c, &[])).expect("ok");
    assert!(s
        .on_request(ack_of(&e, &["a"]))
        .expect("ok")
        .responses
        .is_empty());

    // A cluster change with identical endpoints: CDS goes out, EDS content did not change.
    let mut res = resources(&["a"], 1);
    let mut clusters = (*res.clusters).clone();
    clusters.insert(
        "a".into(),
        resources::Resource::encode(
            "a",
            &envoy_types::pb::envoy::config::cluster::v3::Cluster {
                name: "a".into(),
                alt_stat_name: "changed".into(),
                ..Default::default()
            },
        ),
    );
    res.clusters = std::sync::Arc::new(clusters);
    let c2 = one(s.on_resources(res));
    assert_eq!(c2.type_url, CLUSTER);
    // Envoy re-requests EDS for the warming cluster with the same names: answer anyway.
    let e2 = one(s.on_request(ack_of(&e, &["a"])).expect("ok"));
    assert_eq!(e2.version_info, e.version_info);
    // Only once.
    assert!(s
        .on_request(ack_of(&e2, &["a"]))
        .expect("ok")
        .responses
        .is_empty());
}

#[test]
fn pushes_follow_push_order_and_only_requested_types() {
    let mut s = state(&["a"]);
    assert!(s
        .on_resources(resources(&["a", "b"], 2))
        .responses
        .is_empty());
    for t in [LISTENER, ROUTE, ENDPOINT] {
        let names: &[&str] = match t {
            ROUTE => &["outbound"],
            ENDPOINT => &["a", "b"],
            _ => &[],
        };
        let r = if t == LISTENER {
            first(t, names)
        } else {
            req(t, names, "", "")
        };
        one(s.on_request(r).expect("ok"));
    }
    // CDS never requested: not pushed. The rest in make-before-break order.
    let step = s.on_resources(resources(&["a", "b", "c"], 3));
    let order: Vec<_> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(order, [ENDPOINT, LISTENER]);
    s.on_request(req(CLUSTER, &[], "", "")).expect("ok");
    let step = s.on_resources(resources(&["a", "b"], 4));
    let order: Vec<_> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(order, [CLUSTER, ENDPOINT, LISTENER]);
}

#[test]
fn endpoint_push_carries_only_the_changed_assignments() {
    let mut s = state(&["a", "b"]);
    let e = one(s.on_request(first(ENDPOINT, &["a", "b"])).expect("ok"));
    assert_eq!(e.resources.len(), 2);
    assert!(s
        .on_request(ack_of(&e, &["a", "b"]))
        .expect("ok")
        .responses
        .is_empty());

    // Only `a`'s assignment changes; the other maps keep their Arcs.
    let before = resources(&["a", "b"], 1);
    let mut after = before.clone();
    let mut endpoints = (*before.endpoints).clone();
    endpoints.insert("a".into(), resources(&["a"], 2).endpoints["a"].clone());
    after.endpoints = std::sync::Arc::new(endpoints);
    s.on_resources(before);
    let r = one(s.on_resources(after));
    assert_eq!(r.type_url, ENDPOINT);
    assert_eq!(resource_names(&r), ["a"]);
    assert_ne!(r.version_info, e.version_info);
    // Its ACK names the same resources: nothing more to send.
    assert!(s
        .on_request(ack_of(&r, &["a", "b"]))
        .expect("ok")
        .responses
        .is_empty());
}

/// A new stream (Envoy reconnecting, maybe to another replica with the same inputs) whose
/// first requests report the versions discovery would send gets nothing: no resource is sent
/// twice. A stale version is answered in full; later changes are pushed as usual.
#[test]
fn a_reconnect_holding_the_current_versions_gets_nothing_resent() {
    // What a first stream sent and the proxy ACKed, per type.
    let mut old = state(&["a", "b"]);
    let cds = one(old.on_request(first(CLUSTER, &[])).expect("ok"));
    let eds = one(old
        .on_request(req(ENDPOINT, &["a", "b"], "", ""))
        .expect("ok"));
    let lds = one(old.on_request(req(LISTENER, &[], "", "")).expect("ok"));

    let mut s = state(&["a", "b"]);
    let resume = |type_url: &str, names: &[&str], version: &str| DiscoveryRequest {
        node: node(),
        ..req(type_url, names, "", version)
    };
    for (r, names) in [(&cds, &[][..]), (&eds, &["a", "b"][..]), (&lds, &[][..])] {
        let step = s
            .on_request(resume(&r.type_url, names, &r.version_info))
            .expect("ok");
        assert!(step.responses.is_empty(), "{} resent", r.type_url);
        assert_eq!(
            step.events,
            [Event::Resumed {
                type_url: r.type_url.clone(),
                version: r.version_info.clone(),
            }]
        );
    }
    assert!(s.settled(), "nothing outstanding");

    // A proxy that holds something older gets the current state.
    let mut behind = state(&["a", "b"]);
    let r = one(behind
        .on_request(resume(CLUSTER, &[], "an-old-version"))
        .expect("ok"));
    assert_eq!(r.version_info, cds.version_info);

    // The resumed stream still gets changes.
    let changed = resources(&["a", "b"], 2);
    let pushed = s.on_resources(changed);
    assert_eq!(pushed.responses.len(), 1, "{pushed:?}");
    let e2 = pushed.responses[0].decoded();
    assert_eq!(e2.type_url, ENDPOINT);
    assert_eq!(resource_names(&e2), ["a", "b"]);
}

/// An endpoint push carries a subset, but its version is that of everything the proxy then
/// holds, the one a full answer on a new stream would carry: replicas and reconnects agree.
#[test]
fn a_partial_endpoint_push_carries_the_version_of_the_full_set() {
    let mut s = state(&["a", "b"]);
    let e = one(s.on_request(first(ENDPOINT, &["a", "b"])).expect("ok"));
    s.on_request(ack_of(&e, &["a", "b"])).expect("ok");
    let before = resources(&["a", "b"], 1);
    let mut after = before.clone();
    let mut endpoints = (*before.endpoints).clone();
    endpoints.insert("a".into(), resources(&["a"], 2).endpoints["a"].clone());
    after.endpoints = std::sync::Arc::new(endpoints);
    s.on_resources(before);
    let r = one(s.on_resources(after.clone()));
    assert_eq!(resource_names(&r), ["a"]);

    let mut fresh = SotwState::new("cp-test", NODE, after);
    let full = one(fresh.on_request(first(ENDPOINT, &["a", "b"])).expect("ok"));
    assert_eq!(r.version_info, full.version_info);
}
