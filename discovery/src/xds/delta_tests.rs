use envoy_types::pb::google::rpc::Status as RpcStatus;

use super::*;
use crate::resources::{CLUSTER, ENDPOINT, LISTENER};
use crate::xds::testing::{names, node, resources, NODE};
use crate::xds::wire::Outgoing;

fn state(svcs: &[&str]) -> DeltaState {
    DeltaState::new("cp-test", NODE, resources(svcs, 1))
}

fn req(type_url: &str, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        resource_names_subscribe: names(sub),
        resource_names_unsubscribe: names(unsub),
        response_nonce: nonce.to_string(),
        ..Default::default()
    }
}

fn first(type_url: &str, sub: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node(),
        ..req(type_url, sub, &[], "")
    }
}

fn one(step: Step<Outgoing<DeltaDiscoveryResponse>>) -> DeltaDiscoveryResponse {
    assert_eq!(step.responses.len(), 1, "expected one response: {step:?}");
    step.responses
        .into_iter()
        .next()
        .expect("one response")
        .decoded()
}

/// Resources for `svcs` where the first cluster's content differs from `resources()`.
fn changed_a(svcs: &[&str]) -> crate::resources::ProxyResources {
    let mut res = resources(svcs, 1);
    let mut clusters = (*res.clusters).clone();
    let name = svcs[0];
    clusters.insert(
        name.into(),
        resources::Resource::encode(
            name,
            &envoy_types::pb::envoy::config::cluster::v3::Cluster {
                name: name.into(),
                alt_stat_name: "v2".into(),
                ..Default::default()
            },
        ),
    );
    res.clusters = std::sync::Arc::new(clusters);
    res
}

fn sent(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn first_request_needs_node() {
    let mut s = state(&["a"]);
    assert_eq!(
        s.on_request(req(CLUSTER, &[], &[], ""))
            .expect_err("rejected"),
        ProtocolError::MissingNode
    );
    assert!(s.on_request(first(CLUSTER, &[])).is_ok());
}

#[test]
fn initial_wildcard_sends_everything_with_resource_versions() {
    let mut s = state(&["a", "b"]);
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    assert_eq!(sent(&r), ["a", "b"]);
    let res = resources(&["a", "b"], 1);
    assert_eq!(r.resources[0].version, res.clusters["a"].version);
    assert_eq!(
        r.control_plane.as_ref().map(|c| c.identifier.as_str()),
        Some("cp-test")
    );
    // An empty first answer is still an answer, so Envoy's initialization does not stall.
    let mut empty = state(&[]);
    let r = one(empty.on_request(first(CLUSTER, &[])).expect("ok"));
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
}

#[test]
fn ack_and_nack_are_recorded_and_nacked_version_is_not_resent() {
    let mut s = state(&["a"]);
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    let step = s.on_request(req(CLUSTER, &[], &[], &r.nonce)).expect("ok");
    assert!(step.responses.is_empty());
    assert_eq!(
        step.events,
        vec![Event::Ack {
            type_url: CLUSTER.into(),
            version: r.system_version_info.clone(),
            nonce: r.nonce.clone()
        }]
    );

    let r2 = one(s.on_resources(resources(&["a", "b"], 1)));
    assert_eq!(sent(&r2), ["b"], "only what changed");
    let mut n = req(CLUSTER, &[], &[], &r2.nonce);
    n.error_detail = Some(RpcStatus {
        code: 3,
        message: "cluster b: bad".into(),
        details: vec![],
    });
    let step = s.on_request(n).expect("ok");
    assert!(step.responses.is_empty());
    assert!(
        matches!(&step.events[..], [Event::Nack { message, .. }] if message == "cluster b: bad")
    );
    assert!(s
        .on_resources(resources(&["a", "b"], 1))
        .responses
        .is_empty());
}

#[test]
fn stale_nonce_still_honours_subscription_changes() {
    let mut s = state(&["a", "b"]);
    s.on_request(first(CLUSTER, &[])).expect("ok");
    let e1 = one(s.on_request(req(ENDPOINT, &["a"], &[], "")).expect("ok"));
    let _e2 = one(s.on_resources(resources(&["a", "b"], 2)));
    // Answers e1 (superseded) while subscribing to b: b must still be sent.
    let step = s
        .on_request(req(ENDPOINT, &["b"], &[], &e1.nonce))
        .expect("ok");
    assert!(step
        .events
        .iter()
        .any(|e| matches!(e, Event::Ack { nonce, .. } if *nonce == e1.nonce)));
    let r = one(step);
    assert_eq!(sent(&r), ["b"]);
    // A nonce never sent is stale, and subscriptions still apply.
    let step = s
        .on_request(req(ENDPOINT, &[], &["b"], "bogus"))
        .expect("ok");
    assert!(step
        .events
        .iter()
        .any(|e| matches!(e, Event::StaleNonce { .. })));
    let step = s.on_resources(resources(&["a", "b"], 3));
    assert_eq!(sent(&one(step)), ["a"], "b was unsubscribed");
}

#[test]
fn wildcard_four_steps() {
    let mut s = state(&["A", "B"]);
    // 1. subscribe unset: wildcard.
    let r = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    assert_eq!(sent(&r), ["A", "B"]);
    // 2. subscribe A: wildcard kept, A already held: nothing to send.
    let step = s
        .on_request(req(CLUSTER, &["A"], &[], &r.nonce))
        .expect("ok");
    assert!(step.responses.is_empty());
    // 3. unsubscribe "*": A kept; B no longer wanted (the client drops it itself).
    let step = s.on_request(req(CLUSTER, &[], &["*"], "")).expect("ok");
    assert!(step.responses.is_empty());
    assert!(s
        .on_resources(resources(&["A", "B", "C"], 1))
        .responses
        .is_empty());
    let r = one(s.on_resources(changed_a(&["A", "B", "C"])));
    assert_eq!(sent(&r), ["A"]);
    // 4. unsubscribe A: nothing at all, and not a wildcard.
    s.on_request(req(CLUSTER, &[], &["A"], &r.nonce))
        .expect("ok");
    assert!(s.on_resources(resources(&["D"], 1)).responses.is_empty());
}

#[test]
fn unsubscribing_a_name_under_wildcard_is_answered() {
    let mut s = state(&["A", "B"]);
    let r = one(s.on_request(first(CLUSTER, &["*", "A"])).expect("ok"));
    assert_eq!(sent(&r), ["A", "B"]);
    let r = one(s
        .on_request(req(CLUSTER, &[], &["A"], &r.nonce))
        .expect("ok"));
    assert_eq!(sent(&r), ["A"], "still covered by the wildcard: resent");
}

#[test]
fn unknown_names_go_to_removed_resources_and_are_pushed_when_they_appear() {
    let mut s = state(&["a"]);
    let r = one(s.on_request(first(ENDPOINT, &["a", "ghost"])).expect("ok"));
    assert_eq!(sent(&r), ["a"]);
    assert_eq!(r.removed_resources, ["ghost"]);
    // Reported once, not on every push.
    let r = one(s.on_resources(resources(&["a"], 2)));
    assert!(r.removed_resources.is_empty());
    let r = one(s.on_resources(resources(&["a", "ghost"], 2)));
    assert_eq!(sent(&r), ["ghost"]);
}

#[test]
fn service_removal_lands_in_removed_resources() {
    let mut s = state(&["a", "b"]);
    let c = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    s.on_request(req(CLUSTER, &[], &[], &c.nonce)).expect("ok");
    one(s
        .on_request(req(ENDPOINT, &["a", "b"], &[], ""))
        .expect("ok"));
    let step = s.on_resources(resources(&["a"], 1));
    let order: Vec<_> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(order, [CLUSTER, ENDPOINT]);
    for r in &step.responses {
        assert!(r.resources.is_empty());
        assert_eq!(r.removed_resources, ["b"]);
    }
}

#[test]
fn initial_resource_versions_skip_what_the_client_has() {
    let res = resources(&["a", "b"], 1);
    let mut s = state(&["a", "b"]);
    let mut r = first(CLUSTER, &[]);
    r.initial_resource_versions = [
        ("a".to_string(), res.clusters["a"].version.clone()),
        ("b".to_string(), "old".to_string()),
        ("gone".to_string(), "old".to_string()),
    ]
    .into_iter()
    .collect();
    let r = one(s.on_request(r).expect("ok"));
    assert_eq!(sent(&r), ["b"]);
    assert_eq!(r.removed_resources, ["gone"]);
}

/// A reconnect (to this replica or another with the same inputs) that subscribes to names it
/// declares holding at the current versions gets an empty answer: nothing is sent twice.
#[test]
fn a_reconnect_subscribing_to_names_it_holds_gets_nothing_resent() {
    let res = resources(&["a", "b"], 1);
    let mut s = state(&["a", "b"]);
    let mut r = first(ENDPOINT, &["a", "b"]);
    r.initial_resource_versions = [
        ("a".to_string(), res.endpoints["a"].version.clone()),
        ("b".to_string(), "old".to_string()),
    ]
    .into_iter()
    .collect();
    let r = one(s.on_request(r).expect("ok"));
    assert_eq!(sent(&r), ["b"], "only the stale one");
}

#[test]
fn eds_after_cds_resends_subscribed_names() {
    let mut s = state(&["a"]);
    let c = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    let e = one(s.on_request(req(ENDPOINT, &["a"], &[], "")).expect("ok"));
    s.on_request(req(CLUSTER, &[], &[], &c.nonce)).expect("ok");
    s.on_request(req(ENDPOINT, &[], &[], &e.nonce)).expect("ok");
    // The cluster changes but its endpoints do not: Envoy holds the assignment and does not
    // re-subscribe, yet the updated cluster warms until it gets one. Push it unasked.
    let step = s.on_resources(changed_a(&["a"]));
    let types: Vec<_> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(types, [CLUSTER, ENDPOINT]);
    assert_eq!(sent(&step.responses[1].decoded()), ["a"]);
    // A client that does re-subscribe after the CDS update is answered too.
    let r = one(s
        .on_request(req(ENDPOINT, &["a"], &[], &step.responses[1].nonce))
        .expect("ok"));
    assert_eq!(sent(&r), ["a"]);
}

#[test]
fn types_are_not_sent_before_requested() {
    let mut s = state(&["a"]);
    s.on_request(first(LISTENER, &[])).expect("ok");
    let step = s.on_resources(resources(&["a", "b"], 2));
    let order: Vec<_> = step.responses.iter().map(|r| r.type_url.as_str()).collect();
    assert_eq!(order, [LISTENER]);
}

/// Every cluster of `svcs` with a new version (a global change, such as a new load balancer).
fn all_changed(svcs: &[&str]) -> crate::resources::ProxyResources {
    let mut res = resources(svcs, 1);
    let clusters = svcs
        .iter()
        .map(|name| {
            let c = envoy_types::pb::envoy::config::cluster::v3::Cluster {
                name: name.to_string(),
                alt_stat_name: "v2".into(),
                ..Default::default()
            };
            (name.to_string(), resources::Resource::encode(*name, &c))
        })
        .collect();
    res.clusters = std::sync::Arc::new(clusters);
    res
}

/// A stream holding CDS and EDS for `svcs`, everything ACKed.
fn synced(svcs: &[&str]) -> DeltaState {
    let mut s = state(svcs);
    let c = one(s.on_request(first(CLUSTER, &[])).expect("ok"));
    let e = one(s.on_request(req(ENDPOINT, svcs, &[], "")).expect("ok"));
    s.on_request(req(CLUSTER, &[], &[], &c.nonce)).expect("ok");
    s.on_request(req(ENDPOINT, &[], &[], &e.nonce)).expect("ok");
    assert!(s.settled());
    s
}

#[test]
fn a_global_change_resends_every_assignment_once_and_only_updated_ones_otherwise() {
    let names: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    let svcs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut s = synced(&svcs);
    let step = s.on_resources(all_changed(&svcs));
    let r: Vec<_> = step.responses.iter().map(|r| r.decoded()).collect();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].resources.len(), r[1].resources.len()), (40, 40));
    assert!(r[1].removed_resources.is_empty());
    assert!(!s.settled(), "waiting for the ACKs");

    // One cluster of two: only its assignment goes again.
    let mut s = synced(&["a", "b"]);
    let step = s.on_resources(changed_a(&["a", "b"]));
    assert_eq!(sent(&step.responses[1].decoded()), ["a"]);
}
