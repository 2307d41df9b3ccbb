//! Delta (incremental) ADS, one stream: subscriptions and what the client holds, per type.
//!
//! Each type tracks the version of every resource the client holds (from what was sent and from
//! `initial_resource_versions`), so a response carries only resources whose version differs and
//! names that went away (`removed_resources`). Unlike SotW, subscription changes are honoured
//! even when the request carries a stale nonce; the nonce only correlates ACKs and NACKs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

use super::subscription::{Subscription, WILDCARD};
use super::wire::{self, Flavour, Outgoing};
use super::{check_node, control_plane, Event, ProtocolError, Step};
use crate::resources::{self, ProxyResources, Resource, ResourceMap, PUSH_ORDER};

/// How many unanswered responses per type are remembered for ACK correlation.
const PENDING_NONCES: usize = 64;

/// What a client holds of one type.
#[derive(Debug)]
enum Held {
    /// Exactly the resources of the stream's map of the type that its subscription covered
    /// when they were last sent: the usual state, which costs nothing per resource.
    Synced,
    /// By name, the version of each resource: a new stream (nothing, or the client's
    /// `initial_resource_versions`) until the first full answer makes it [`Held::Synced`].
    Versions(BTreeMap<String, String>),
}

impl Default for Held {
    fn default() -> Self {
        Held::Versions(BTreeMap::new())
    }
}

#[derive(Debug, Default)]
struct TypeState {
    sub: Subscription,
    held: Held,
    /// Requested names known not to exist, already reported in `removed_resources`.
    reported_absent: BTreeSet<String>,
    /// Names to send (or report removed) on the next response whatever the client holds.
    force: BTreeSet<String>,
    /// EDS only: updated clusters whose assignments must be sent again whatever the client
    /// holds (shared `Arc`s, not copied names: a global change updates every cluster).
    force_clusters: Vec<Arc<Resource>>,
    /// EDS only: every cluster was updated; send every covered assignment again.
    force_all: bool,
    /// Responses not yet ACKed or NACKed: nonce, `system_version_info` and stream-wide
    /// sequence number.
    pending: VecDeque<(String, String, u64)>,
    /// The last answer was a NACK.
    nacked: bool,
    /// Sequence number of the last response sent and of the last one ACKed.
    sent_seq: u64,
    acked_seq: u64,
    /// CDS only: the last response carried clusters that take their endpoints from EDS.
    needs_assignments: bool,
    /// Resend the names of the next EDS request even if held (after a CDS response).
    always_respond: bool,
    /// The client has sent a request of this type.
    requested: bool,
    /// `system_version_info` of the last response.
    last_version: String,
}

#[derive(Debug)]
pub struct DeltaState {
    control_plane: String,
    node: String,
    seen_first: bool,
    resources: ProxyResources,
    types: BTreeMap<String, TypeState>,
    nonce_counter: u64,
}

impl DeltaState {
    pub fn new(control_plane: &str, node: &str, resources: ProxyResources) -> DeltaState {
        DeltaState {
            control_plane: control_plane.to_string(),
            node: node.to_string(),
            seen_first: false,
            resources,
            types: BTreeMap::new(),
            nonce_counter: 0,
        }
    }

    pub fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
    ) -> Result<Step<Outgoing<DeltaDiscoveryResponse>>, ProtocolError> {
        check_node(&self.node, &mut self.seen_first, req.node.as_ref())?;
        let mut step = Step::default();
        let type_url = req.type_url.clone();
        if !PUSH_ORDER.contains(&type_url.as_str()) {
            step.events.push(Event::UnknownType { type_url });
            return Ok(step);
        }
        let state = self.types.entry(type_url.clone()).or_default();
        let first = !state.requested;
        state.requested = true;

        let nonce = req.response_nonce.as_str();
        if !nonce.is_empty() {
            match state.pending.iter().position(|(n, _, _)| n == nonce) {
                Some(at) => {
                    let (_, version, seq) = state.pending[at].clone();
                    state.pending.drain(..=at);
                    state.nacked = req.error_detail.is_some();
                    if !state.nacked {
                        state.acked_seq = seq;
                    }
                    step.events.push(match &req.error_detail {
                        Some(error) => Event::Nack {
                            type_url: type_url.clone(),
                            version,
                            nonce: nonce.to_string(),
                            message: error.message.clone(),
                        },
                        None => Event::Ack {
                            type_url: type_url.clone(),
                            version,
                            nonce: nonce.to_string(),
                        },
                    });
                }
                // Still honour the subscription changes below (spec, Envoy #16659).
                None => step.events.push(Event::StaleNonce {
                    type_url: type_url.clone(),
                    nonce: nonce.to_string(),
                }),
            }
        }

        if !req.initial_resource_versions.is_empty() {
            let mut versions = match std::mem::take(&mut state.held) {
                Held::Versions(v) => v,
                Held::Synced => BTreeMap::new(),
            };
            for (name, version) in &req.initial_resource_versions {
                versions.insert(name.clone(), version.clone());
            }
            state.held = Held::Versions(versions);
        }
        // Names the subscription did not cover before are not held, whatever the map says;
        // except on a stream's first request, where `initial_resource_versions` says exactly
        // what the client holds (a reconnect must not get what it has again).
        for name in &req.resource_names_subscribe {
            let declared = first && req.initial_resource_versions.contains_key(name);
            if name != WILDCARD && !state.sub.covers(name) && !declared {
                state.force.insert(name.clone());
            }
        }
        state.sub.apply_delta(
            &type_url,
            first,
            &req.resource_names_subscribe,
            &req.resource_names_unsubscribe,
        );
        for name in &req.resource_names_unsubscribe {
            if name == WILDCARD {
                let sub = &state.sub;
                if let Held::Versions(v) = &mut state.held {
                    v.retain(|n, _| sub.covers(n));
                }
            } else if state.sub.covers(name) {
                // Still covered by the wildcard: the client must hear about it either way.
                state.force.insert(name.clone());
            } else {
                if let Held::Versions(v) = &mut state.held {
                    v.remove(name);
                }
                state.force.remove(name);
                state.reported_absent.remove(name);
            }
        }
        if state.always_respond && type_url == resources::ENDPOINT {
            state.always_respond = false;
            state.force.extend(
                req.resource_names_subscribe
                    .iter()
                    .filter(|n| n.as_str() != WILDCARD)
                    .cloned(),
            );
        }
        // A bare ACK or NACK changes nothing the client should hold (pushes keep its holdings
        // current), so it is not worth walking every name it holds.
        let bare = !first
            && req.resource_names_subscribe.is_empty()
            && req.resource_names_unsubscribe.is_empty()
            && req.initial_resource_versions.is_empty()
            && self
                .types
                .get(&type_url)
                .is_some_and(|s| s.force.is_empty() && s.force_clusters.is_empty() && !s.force_all);
        if !bare {
            let named = req
                .resource_names_subscribe
                .iter()
                .chain(&req.resource_names_unsubscribe);
            if first
                || !req.initial_resource_versions.is_empty()
                || named.clone().any(|n| n == WILDCARD)
            {
                self.respond(&type_url, first, &mut step);
            } else {
                // Only the names this request touched (and forced ones) can need an answer.
                let names: Vec<String> = named.cloned().collect();
                self.respond_to(&type_url, false, Some(&names), None, &mut step);
            }
        }
        if type_url == resources::CLUSTER {
            self.respond_forced(resources::ENDPOINT, &mut step);
        }
        Ok(step)
    }

    /// New resources for the proxy: send what changed for every requested type, in push order.
    ///
    /// The work is proportional to what changed: a type whose map is the same `Arc` as before
    /// (and with nothing forced) is skipped, and otherwise only the names that differ between
    /// the two maps (a diff shared by every stream) and the forced ones are looked at. Between
    /// requests, what the client holds matches the old map for every covered name, so no
    /// other name can need sending.
    pub fn on_resources(
        &mut self,
        resources: ProxyResources,
    ) -> Step<Outgoing<DeltaDiscoveryResponse>> {
        let previous = std::mem::replace(&mut self.resources, resources);
        let mut step = Step::default();
        for type_url in PUSH_ORDER {
            let Some(state) = self.types.get(type_url).filter(|s| s.requested) else {
                continue;
            };
            let (Some(old), Some(new)) =
                (previous.of_type(type_url), self.resources.of_type(type_url))
            else {
                continue;
            };
            if Arc::ptr_eq(old, new)
                && state.force.is_empty()
                && state.force_clusters.is_empty()
                && !state.force_all
            {
                continue;
            }
            let changed = resources::changed_names(old, new);
            let old = old.clone();
            self.respond_to(type_url, false, Some(&changed), Some(&old), &mut step);
        }
        step
    }

    /// A newer snapshot supersedes whatever the proxy rejected: the make-before-break chain
    /// may go on from what the proxy holds. Without this a NACK would stop every later push.
    pub fn forget_rejections(&mut self) {
        for t in self.types.values_mut() {
            if t.nacked {
                t.nacked = false;
                t.sent_seq = t.acked_seq;
            }
        }
    }

    /// Whether the proxy has accepted everything sent, including the assignments of the
    /// clusters last sent (a cluster warms until its assignment arrives): the condition for
    /// the next make-before-break stage ([`super::stages`]).
    pub fn settled(&self) -> bool {
        let all_answered = self
            .types
            .values()
            .all(|t| t.pending.is_empty() && !t.nacked);
        let awaiting = match (
            self.types.get(resources::CLUSTER),
            self.types.get(resources::ENDPOINT),
        ) {
            (Some(cds), Some(eds)) => {
                cds.needs_assignments && eds.requested && eds.acked_seq < cds.sent_seq
            }
            _ => false,
        };
        all_answered && !awaiting
    }

    /// Sends what `force` holds for a type the client already requested.
    fn respond_forced(
        &mut self,
        type_url: &str,
        step: &mut Step<Outgoing<DeltaDiscoveryResponse>>,
    ) {
        if self.types.get(type_url).is_some_and(|s| {
            s.requested && !(s.force.is_empty() && s.force_clusters.is_empty() && !s.force_all)
        }) {
            self.respond(type_url, false, step);
        }
    }

    /// Sends the difference between what the client holds and what it should hold. `always`
    /// sends even an empty response (the first request of a type must be answered).
    fn respond(
        &mut self,
        type_url: &str,
        always: bool,
        step: &mut Step<Outgoing<DeltaDiscoveryResponse>>,
    ) {
        self.respond_to(type_url, always, None, None, step);
    }

    /// [`DeltaState::respond`], looking only at `changed` (and forced) names when given: those
    /// whose resource changed since the client's holdings were last brought up to date.
    fn respond_to(
        &mut self,
        type_url: &str,
        always: bool,
        changed: Option<&[String]>,
        previous: Option<&Arc<ResourceMap>>,
        step: &mut Step<Outgoing<DeltaDiscoveryResponse>>,
    ) {
        let empty: Arc<ResourceMap> = Arc::default();
        let all = self.resources.of_type(type_url).unwrap_or(&empty).clone();
        let previous_given = previous.is_some();
        let previous = previous.unwrap_or(&all).clone();
        let Some(state) = self.types.get_mut(type_url) else {
            return;
        };
        let synced_only = matches!(state.held, Held::Synced)
            && state.force.is_empty()
            && state.force_clusters.is_empty();
        let mut force_all = std::mem::take(&mut state.force_all);
        if force_all {
            let exactly = state.sub.covers_exactly(&all);
            if !(exactly && synced_only) {
                // The general path: force each covered name.
                let sub = &state.sub;
                state
                    .force_clusters
                    .extend(all.values().filter(|r| sub.covers(&r.name)).cloned());
                force_all = false;
            }
        }
        let wildcard_change = previous_given
            && changed.is_some()
            && synced_only
            && state.sub.wildcard
            && state.sub.names.is_empty();
        let (send, removed): (Vec<Arc<Resource>>, Vec<String>) = if force_all {
            // Every cluster was updated and the client holds exactly this map: all of it
            // again (encoded once for every stream), and what went away since `previous`.
            let removed = if previous_given {
                let c = resources::classified_changes(&previous, &all);
                c.absent
                    .iter()
                    .filter(|n| state.sub.covers(n))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            (all.values().cloned().collect(), removed)
        } else if wildcard_change {
            // What changed between the two maps is the same for every stream: computed once.
            let c = resources::classified_changes(&previous, &all);
            (c.present.clone(), c.absent.clone())
        } else {
            let force_names = std::mem::take(&mut state.force);
            let force_clusters = std::mem::take(&mut state.force_clusters);
            let force: BTreeSet<&str> = force_names
                .iter()
                .map(String::as_str)
                .chain(force_clusters.iter().map(|r| r.name.as_str()))
                .collect();
            let mut candidates: BTreeSet<&str> = force.clone();
            // A full answer looks at every name the client could hold or want; these are copied
            // (a first request, a reconnect), names from the maps are borrowed.
            let mut owned: Vec<String> = Vec::new();
            let full = changed.is_none();
            match changed {
                Some(names) => candidates.extend(names.iter().map(String::as_str)),
                None => {
                    owned.extend(state.sub.names.iter().cloned());
                    if let Held::Versions(v) = &state.held {
                        owned.extend(v.keys().cloned());
                    }
                    if state.sub.wildcard {
                        candidates.extend(all.keys().map(String::as_str));
                        candidates.extend(previous.keys().map(String::as_str));
                    }
                }
            }
            candidates.extend(owned.iter().map(String::as_str));

            let mut send = Vec::new();
            let mut removed = Vec::new();
            for name in candidates {
                if !state.sub.covers(name) {
                    if let Held::Versions(v) = &mut state.held {
                        v.remove(name);
                    }
                    continue;
                }
                let held = match &state.held {
                    Held::Synced => previous.get(name).map(|r| r.version.as_str()),
                    Held::Versions(v) => v.get(name).map(String::as_str),
                };
                match all.get(name) {
                    Some(r) => {
                        if force.contains(name) || held != Some(r.version.as_str()) {
                            if let Held::Versions(v) = &mut state.held {
                                v.insert(name.to_string(), r.version.clone());
                            }
                            send.push(r.clone());
                        }
                        state.reported_absent.remove(name);
                    }
                    None => {
                        let was_held = held.is_some();
                        if let Held::Versions(v) = &mut state.held {
                            v.remove(name);
                        }
                        let explicit = state.sub.names.contains(name);
                        let unreported = explicit && !state.reported_absent.contains(name);
                        if was_held || force.contains(name) || unreported {
                            removed.push(name.to_string());
                        }
                        if explicit {
                            state.reported_absent.insert(name.to_string());
                        }
                    }
                }
            }
            if full {
                // The client now holds exactly the covered part of the map.
                state.held = Held::Synced;
            }
            (send, removed)
        };
        if send.is_empty() && removed.is_empty() && !always {
            return;
        }

        self.nonce_counter += 1;
        let nonce = self.nonce_counter.to_string();
        // Debugging only (b.5): chained from the last one with what this response changes, so
        // a push costs what it sends, not what the client holds.
        let whole = !send.is_empty() && send.len() == all.len() && removed.is_empty();
        let version = if whole {
            // Shared by every stream sent the whole map (and costs one hash for all of them).
            resources::map_version(&all)
        } else {
            resources::versions_hash(
                std::iter::once(("", state.last_version.as_str()))
                    .chain(send.iter().map(|r| (r.name.as_str(), r.version.as_str())))
                    .chain(removed.iter().map(|n| (n.as_str(), ""))),
            )
        };
        state.last_version.clone_from(&version);
        state.sent_seq = self.nonce_counter;
        state
            .pending
            .push_back((nonce.clone(), version.clone(), self.nonce_counter));
        if state.pending.len() > PENDING_NONCES {
            state.pending.pop_front();
        }
        if type_url == resources::CLUSTER {
            state.needs_assignments = send
                .iter()
                .any(|r| self.resources.endpoints.contains_key(&r.name));
        }
        if type_url == resources::CLUSTER && !send.is_empty() {
            // An updated cluster warms until it gets an assignment, but Envoy does not
            // re-subscribe names it already holds: push those assignments again ourselves.
            let eds = self
                .types
                .entry(resources::ENDPOINT.to_string())
                .or_default();
            eds.always_respond = true;
            if whole {
                eds.force_all = true;
            }
            for r in send.iter().filter(|_| !whole) {
                let held = match &eds.held {
                    Held::Synced => eds.sub.covers(&r.name),
                    Held::Versions(v) => v.contains_key(&r.name),
                };
                if held || eds.sub.names.contains(&r.name) {
                    eds.force_clusters.push(r.clone());
                }
            }
        }
        step.events.push(Event::Pushed {
            type_url: type_url.to_string(),
            version: version.clone(),
            resources: send.len(),
        });
        // The whole map (a first response, a global change) is encoded once for every stream.
        let entries = if whole {
            wire::map_entries(&all, Flavour::Delta)
        } else {
            wire::entries(&send, Flavour::Delta)
        };
        step.responses.push(Outgoing {
            entries,
            count: send.len(),
            head: DeltaDiscoveryResponse {
                system_version_info: version,
                type_url: type_url.to_string(),
                removed_resources: removed,
                nonce,
                control_plane: control_plane(&self.control_plane),
                ..Default::default()
            },
        });
    }
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
