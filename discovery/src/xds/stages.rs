//! Make-before-break: the order in which one proxy moves from the resources it runs to the
//! newest ones.
//!
//! A change reaches a proxy in up to three stages, each sent only once the proxy has ACKed
//! everything of the stage before (the stream checks that with the protocol state's
//! `settled`, which also waits for the assignments of added or updated clusters):
//!
//! 1. **add**: new and changed clusters and assignments; clusters and assignments that are no
//!    longer wanted stay, since routes and listeners the proxy runs may still name them.
//! 2. **switch**: the new listeners and route configurations, which may now name the clusters
//!    of stage 1; route configurations no longer wanted stay until the listeners stop naming
//!    them.
//! 3. **remove**: exactly the new resources, so what nothing names any more goes away.
//!
//! A stage that changes nothing is skipped, so an endpoint change is one push. A NACK leaves
//! the proxy unsettled: the chain stops where it is (a route is never sent before the cluster
//! it names was accepted) until a newer snapshot arrives. Pure: no I/O, no clocks.

use crate::resources::{keep_removed, ProxyResources};

#[derive(Debug)]
pub struct Stages {
    /// The newest resources for the proxy.
    target: ProxyResources,
    /// What the protocol state was last given: the proxy holds it once settled.
    current: ProxyResources,
}

impl Stages {
    /// A stream that starts with `initial` (sent as the proxy asks for each type).
    pub fn new(initial: ProxyResources) -> Stages {
        Stages {
            target: initial.clone(),
            current: initial,
        }
    }

    pub fn set_target(&mut self, target: ProxyResources) {
        self.target = target;
    }

    /// The resources the proxy should get next, once it has settled on the current ones;
    /// `None` when it runs the target.
    pub fn next_stage(&mut self) -> Option<ProxyResources> {
        let (c, t) = (&self.current, &self.target);
        let add = ProxyResources {
            clusters: keep_removed(&c.clusters, &t.clusters),
            endpoints: keep_removed(&c.endpoints, &t.endpoints),
            listeners: c.listeners.clone(),
            routes: c.routes.clone(),
        };
        let switch = ProxyResources {
            listeners: t.listeners.clone(),
            routes: keep_removed(&c.routes, &t.routes),
            ..add.clone()
        };
        for stage in [add, switch, t.clone()] {
            if !same_maps(&stage, &self.current) {
                self.current = stage;
                return Some(self.current.clone());
            }
        }
        None
    }
}

/// Same maps by pointer: stages are built from the target's and the current maps themselves.
fn same_maps(a: &ProxyResources, b: &ProxyResources) -> bool {
    use std::sync::Arc;
    Arc::ptr_eq(&a.clusters, &b.clusters)
        && Arc::ptr_eq(&a.endpoints, &b.endpoints)
        && Arc::ptr_eq(&a.listeners, &b.listeners)
        && Arc::ptr_eq(&a.routes, &b.routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::testing::resources;

    fn names(m: &crate::resources::ResourceMap) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    #[test]
    fn adds_before_switching_and_removes_last() {
        let old = resources(&["a", "b"], 1);
        let new = resources(&["a", "c"], 1);
        let mut s = Stages::new(old.clone());
        s.set_target(new.clone());

        let add = s.next_stage().expect("add stage");
        assert_eq!(names(&add.clusters), ["a", "b", "c"], "b kept, c added");
        assert_eq!(names(&add.endpoints), ["a", "b", "c"]);
        assert!(std::sync::Arc::ptr_eq(&add.listeners, &old.listeners));
        assert!(std::sync::Arc::ptr_eq(&add.routes, &old.routes));

        let switch = s.next_stage().expect("switch stage");
        assert!(std::sync::Arc::ptr_eq(&switch.listeners, &new.listeners));
        assert_eq!(names(&switch.clusters), ["a", "b", "c"], "b still kept");

        let remove = s.next_stage().expect("remove stage");
        assert_eq!(names(&remove.clusters), ["a", "c"]);
        assert!(s.next_stage().is_none());
    }

    #[test]
    fn endpoint_change_is_one_stage() {
        let old = resources(&["a", "b"], 1);
        let mut new = resources(&["a", "b"], 2);
        new.clusters = old.clusters.clone();
        new.listeners = old.listeners.clone();
        new.routes = old.routes.clone();
        let mut s = Stages::new(old);
        s.set_target(new.clone());
        let first = s.next_stage().expect("one push");
        assert!(std::sync::Arc::ptr_eq(&first.endpoints, &new.endpoints));
        assert!(s.next_stage().is_none());
    }

    #[test]
    fn a_newer_target_midway_starts_from_what_was_sent() {
        let v1 = resources(&["a", "b"], 1);
        let v2 = resources(&["a", "c"], 1);
        let v3 = resources(&["d"], 1);
        let mut s = Stages::new(v1);
        s.set_target(v2);
        let add = s.next_stage().expect("add");
        assert_eq!(names(&add.clusters), ["a", "b", "c"]);
        s.set_target(v3);
        // Everything sent so far stays until the new listeners and routes are in.
        let add = s.next_stage().expect("add d");
        assert_eq!(names(&add.clusters), ["a", "b", "c", "d"]);
        s.next_stage().expect("switch");
        let remove = s.next_stage().expect("remove");
        assert_eq!(names(&remove.clusters), ["d"]);
        assert!(s.next_stage().is_none());
    }

    mod with_sotw {
        use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
        use envoy_types::pb::google::rpc::Status as RpcStatus;

        use super::*;
        use crate::resources::{CLUSTER, ENDPOINT, LISTENER, ROUTE};
        use crate::xds::sotw::SotwState;
        use crate::xds::testing::{names, node, NODE};
        use crate::xds::wire::Outgoing;

        fn req(type_url: &str, names_: &[&str], nonce: &str) -> DiscoveryRequest {
            DiscoveryRequest {
                node: node(),
                type_url: type_url.into(),
                resource_names: names(names_),
                response_nonce: nonce.into(),
                ..Default::default()
            }
        }

        /// What the stream loop does after each input: the next stage while settled.
        fn advance(state: &mut SotwState, stages: &mut Stages) -> Vec<Outgoing<DiscoveryResponse>> {
            let mut out = Vec::new();
            while state.settled() {
                let Some(next) = stages.next_stage() else {
                    break;
                };
                out.extend(state.on_resources(next).responses);
            }
            out
        }

        fn types(rs: &[Outgoing<DiscoveryResponse>]) -> Vec<&str> {
            rs.iter().map(|r| r.type_url.as_str()).collect()
        }

        /// A proxy synced on `a`: CDS, EDS, LDS and RDS all ACKed.
        fn synced() -> (SotwState, Stages) {
            let initial = resources(&["a"], 1);
            let mut state = SotwState::new("cp", NODE, initial.clone());
            let stages = Stages::new(initial);
            for (t, n) in [
                (CLUSTER, vec![]),
                (ENDPOINT, vec!["a"]),
                (LISTENER, vec![]),
                (ROUTE, vec!["outbound"]),
            ] {
                let r = state.on_request(req(t, &n, "")).expect("ok").responses;
                let nonce = r[0].nonce.clone();
                state.on_request(req(t, &n, &nonce)).expect("ack");
            }
            assert!(state.settled());
            (state, stages)
        }

        #[test]
        fn listeners_wait_for_the_clusters_and_their_assignments() {
            let (mut state, mut stages) = synced();
            stages.set_target(resources(&["a", "b"], 1));
            let sent = advance(&mut state, &mut stages);
            assert_eq!(types(&sent), [CLUSTER], "clusters first, nothing else yet");
            // Envoy asks for the new cluster's assignment, then ACKs the clusters.
            let eds = state
                .on_request(req(ENDPOINT, &["a", "b"], ""))
                .expect("ok")
                .responses;
            let eds_nonce = eds.last().expect("assignments").nonce.clone();
            state
                .on_request(req(CLUSTER, &[], &sent[0].nonce))
                .expect("ack");
            assert!(
                advance(&mut state, &mut stages).is_empty(),
                "b still warming"
            );
            state
                .on_request(req(ENDPOINT, &["a", "b"], &eds_nonce))
                .expect("ack");
            let sent = advance(&mut state, &mut stages);
            assert_eq!(types(&sent), [LISTENER], "now the listener that may name b");
        }

        #[test]
        fn a_nack_stops_the_chain() {
            let (mut state, mut stages) = synced();
            stages.set_target(resources(&["a", "b"], 1));
            let sent = advance(&mut state, &mut stages);
            assert_eq!(types(&sent), [CLUSTER]);
            let mut nack = req(CLUSTER, &[], &sent[0].nonce);
            nack.error_detail = Some(RpcStatus {
                code: 3,
                message: "bad cluster".into(),
                details: vec![],
            });
            state.on_request(nack).expect("nack");
            assert!(!state.settled());
            assert!(
                advance(&mut state, &mut stages).is_empty(),
                "no route to a rejected cluster"
            );
            // The next snapshot (the operator fixed it) goes out: a NACK stops the chain for
            // that change, never for good.
            stages.set_target(resources(&["a", "c"], 1));
            state.forget_rejections();
            let sent = advance(&mut state, &mut stages);
            assert_eq!(types(&sent), [CLUSTER], "the fix is pushed");
        }
    }
}
