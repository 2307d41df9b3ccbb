//! State of the World ADS, one stream: subscriptions, nonces, ACK/NACK and versions per type.
//!
//! Inputs are requests ([`SotwState::on_request`]) and new resources for the proxy
//! ([`SotwState::on_resources`]); outputs are the responses to send, in push order, and events.
//! The rules are those of `shared/reference/xds-protocol.md` (b.2-b.6), after Istio's
//! `ShouldRespond`: a NACK is an `error_detail`; a stale nonce is ignored; an ACK with unchanged
//! names gets no answer, except the first EDS request after a CDS response (AlwaysRespond).
//!
//! A new stream whose first request of a type carries the `version_info` discovery would send
//! gets no answer (go-control-plane does the same): an Envoy that reconnects, to this replica or
//! another with the same inputs, already runs that config. Versions are content hashes of what
//! the client holds, EDS included (not a chain of pushes), so replicas agree on them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::subscription::Subscription;
use super::wire::{self, Flavour, Outgoing};
use super::{check_node, control_plane, Event, ProtocolError, Step};
use crate::resources::{self, ProxyResources, Resource, ResourceMap, PUSH_ORDER};
use bytes::Bytes;

/// Per-type state on one stream.
#[derive(Debug)]
struct TypeState {
    sub: Subscription,
    /// Nonce of the last response sent for this type; `None` until the first.
    last_nonce: Option<String>,
    /// Version of the last response sent.
    sent_version: Option<String>,
    /// Answer the next request even when it looks like an ACK (EDS after a CDS response).
    always_respond: bool,
    /// The last response sent was ACKed or NACKed (true until the first).
    answered: bool,
    /// The last answer was a NACK.
    nacked: bool,
    /// Stream-wide sequence number of the last response sent, and of the last one ACKed.
    sent_seq: u64,
    acked_seq: u64,
    /// The client has asked for this type on this stream.
    requested: bool,
}

impl Default for TypeState {
    fn default() -> Self {
        TypeState {
            sub: Subscription::default(),
            last_nonce: None,
            sent_version: None,
            always_respond: false,
            answered: true,
            nacked: false,
            sent_seq: 0,
            acked_seq: 0,
            requested: false,
        }
    }
}

#[derive(Debug)]
pub struct SotwState {
    control_plane: String,
    node: String,
    seen_first: bool,
    resources: ProxyResources,
    /// Types the client has asked for; discovery never answers a type before that.
    types: BTreeMap<String, TypeState>,
    nonce_counter: u64,
}

impl SotwState {
    /// `node` is the id of the proxy the stream serves (from its first request).
    pub fn new(control_plane: &str, node: &str, resources: ProxyResources) -> SotwState {
        SotwState {
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
        req: DiscoveryRequest,
    ) -> Result<Step<Outgoing<DiscoveryResponse>>, ProtocolError> {
        check_node(&self.node, &mut self.seen_first, req.node.as_ref())?;
        let mut step = Step::default();
        let type_url = req.type_url.clone();
        if !PUSH_ORDER.contains(&type_url.as_str()) {
            step.events.push(Event::UnknownType { type_url });
            return Ok(step);
        }
        let state = self.types.entry(type_url.clone()).or_default();
        let first_of_type = !state.requested;
        state.requested = true;
        let nonce = req.response_nonce.as_str();
        // An empty nonce, or none sent yet for the type, is an initial request or a reconnect.
        let initial = nonce.is_empty() || state.last_nonce.is_none();
        if !initial && state.last_nonce.as_deref() != Some(nonce) {
            step.events.push(Event::StaleNonce {
                type_url,
                nonce: nonce.to_string(),
            });
            return Ok(step);
        }
        // An ACK names what it named before: skip copying a subscription of 1000 names.
        let before = if state.sub.same_sotw(&type_url, &req.resource_names) {
            None
        } else {
            let before = state.sub.clone();
            state.sub.set_sotw(&type_url, &req.resource_names);
            Some(before)
        };

        if !initial {
            state.answered = true;
            state.nacked = req.error_detail.is_some();
            if !state.nacked {
                state.acked_seq = state.sent_seq;
            }
        }
        if let Some(error) = &req.error_detail {
            step.events.push(Event::Nack {
                type_url: type_url.clone(),
                version: req.version_info.clone(),
                nonce: nonce.to_string(),
                message: error.message.clone(),
            });
            // Never resend the rejected version: wait for the next real change. A NACK that
            // opens a stream still gets the current state, like any first request.
            if !initial {
                return Ok(step);
            }
        }

        // A reconnect that already holds what it would get: answer nothing.
        let may_resume = first_of_type
            && nonce.is_empty()
            && req.error_detail.is_none()
            && !req.version_info.is_empty();
        if may_resume && self.current_version(&type_url).as_ref() == Some(&req.version_info) {
            if let Some(state) = self.types.get_mut(&type_url) {
                state.sent_version = Some(req.version_info.clone());
            }
            step.events.push(Event::Resumed {
                type_url,
                version: req.version_info,
            });
            return Ok(step);
        }
        let Some(state) = self.types.get_mut(&type_url) else {
            return Ok(step);
        };
        let respond = if initial {
            true
        } else {
            step.events.push(Event::Ack {
                type_url: type_url.clone(),
                version: req.version_info.clone(),
                nonce: nonce.to_string(),
            });
            let added = before.is_some_and(|before| {
                (state.sub.wildcard && !before.wildcard)
                    || state.sub.names.iter().any(|n| !before.covers(n))
            });
            added || state.always_respond
        };
        if respond {
            state.always_respond = false;
            self.respond(&type_url, true, &mut step);
        } else if type_url == resources::CLUSTER && self.awaiting_assignments() {
            // Clusters were accepted, but no assignment went out after them: they may be
            // warming. Send the assignments rather than wait for a request that may not come.
            let eds = self.types.get(resources::ENDPOINT);
            if eds.is_some_and(|e| e.last_nonce.is_some() && e.answered) {
                self.respond(resources::ENDPOINT, true, &mut step);
            }
        }
        Ok(step)
    }

    /// Whether the proxy has accepted everything sent, including the assignments of the
    /// clusters last sent (a cluster warms until its assignment arrives): the condition for
    /// the next make-before-break stage ([`super::stages`]).
    pub fn settled(&self) -> bool {
        self.types.values().all(|t| t.answered && !t.nacked) && !self.awaiting_assignments()
    }

    /// A newer snapshot supersedes whatever the proxy rejected: the make-before-break chain
    /// may go on from what the proxy holds (a rejected response left it as it was). Without
    /// this a NACK would stop every later push to that proxy.
    pub fn forget_rejections(&mut self) {
        for t in self.types.values_mut() {
            if t.nacked {
                t.nacked = false;
                // The rejected response is not in force: nothing warms from it.
                t.sent_seq = t.acked_seq;
            }
        }
    }

    /// A CDS response went out after the last ACKed EDS response.
    fn awaiting_assignments(&self) -> bool {
        let (Some(cds), Some(eds)) = (
            self.types.get(resources::CLUSTER),
            self.types.get(resources::ENDPOINT),
        ) else {
            return false;
        };
        !eds.sub.is_empty() && cds.sent_seq > 0 && eds.acked_seq < cds.sent_seq
    }

    /// New resources for the proxy: push every requested type whose content changed.
    ///
    /// The work is proportional to what changed: a type whose map is the same `Arc` as before
    /// is skipped outright, and EDS (which SotW allows to carry any subset, b.5) sends only the
    /// subscribed assignments that changed, found by a diff shared by every stream.
    pub fn on_resources(&mut self, resources: ProxyResources) -> Step<Outgoing<DiscoveryResponse>> {
        let previous = std::mem::replace(&mut self.resources, resources);
        let mut step = Step::default();
        for type_url in PUSH_ORDER {
            let subscribed = self
                .types
                .get(type_url)
                .is_some_and(|s| s.requested && !s.sub.is_empty());
            if !subscribed {
                continue;
            }
            let (Some(old), Some(new)) =
                (previous.of_type(type_url), self.resources.of_type(type_url))
            else {
                continue;
            };
            if Arc::ptr_eq(old, new) {
                continue;
            }
            if type_url == resources::ENDPOINT {
                let changed = resources::changed_names(old, new);
                self.respond_changed(type_url, &changed, &mut step);
            } else {
                self.respond(type_url, false, &mut step);
            }
        }
        step
    }

    /// Pushes the subscribed resources among `changed` (a non-wildcard type), if any. The
    /// version is that of everything the client then holds of the type, as a full answer
    /// would carry: a client that reconnects with it needs nothing sent.
    fn respond_changed(
        &mut self,
        type_url: &str,
        changed: &[String],
        step: &mut Step<Outgoing<DiscoveryResponse>>,
    ) {
        let Some(state) = self.types.get(type_url) else {
            return;
        };
        let all = self
            .resources
            .of_type(type_url)
            .cloned()
            .unwrap_or_default();
        let contents: Vec<Arc<Resource>> = changed
            .iter()
            .filter(|name| state.sub.names.contains(*name))
            .map(|name| match all.get(name) {
                Some(r) => r.clone(),
                None => resources::empty_assignment(name),
            })
            .collect();
        if contents.is_empty() {
            return;
        }
        let version = resources::map_version(&self.contents(type_url, &state.sub));
        let entries = wire::entries(&contents, Flavour::Sotw);
        self.send(type_url, version, contents.len(), entries, step);
    }

    /// What the client would get for `type_url` now: LDS/CDS the full subscribed set, EDS/RDS
    /// the subscribed names (EDS answers unknown names with an empty assignment). The shared
    /// map itself when the subscription covers exactly it (the usual case).
    fn contents(&self, type_url: &str, sub: &Subscription) -> Arc<ResourceMap> {
        let empty = Arc::default();
        let all = self.resources.of_type(type_url).unwrap_or(&empty);
        if sub.covers_exactly(all) {
            return all.clone();
        }
        let picked: ResourceMap = sub
            .names
            .iter()
            .filter_map(|name| match all.get(name) {
                Some(r) => Some((name.clone(), r.clone())),
                None if type_url == resources::ENDPOINT => {
                    Some((name.clone(), resources::empty_assignment(name)))
                }
                None => None,
            })
            .collect();
        Arc::new(picked)
    }

    /// The version a full answer for `type_url` would carry now.
    fn current_version(&self, type_url: &str) -> Option<String> {
        let state = self.types.get(type_url)?;
        Some(resources::map_version(&self.contents(type_url, &state.sub)))
    }

    fn respond(
        &mut self,
        type_url: &str,
        force: bool,
        step: &mut Step<Outgoing<DiscoveryResponse>>,
    ) {
        let Some(state) = self.types.get(type_url) else {
            return;
        };
        let contents = self.contents(type_url, &state.sub);
        let version = resources::map_version(&contents);
        if !force && state.sent_version.as_deref() == Some(version.as_str()) {
            return;
        }
        let entries = wire::map_entries(&contents, Flavour::Sotw);
        self.send(type_url, version, contents.len(), entries, step);
    }

    fn send(
        &mut self,
        type_url: &str,
        version: String,
        count: usize,
        entries: Bytes,
        step: &mut Step<Outgoing<DiscoveryResponse>>,
    ) {
        self.nonce_counter += 1;
        let nonce = self.nonce_counter.to_string();
        if let Some(state) = self.types.get_mut(type_url) {
            state.last_nonce = Some(nonce.clone());
            state.sent_version = Some(version.clone());
            state.answered = false;
            state.sent_seq = self.nonce_counter;
            // Any assignments sent after the clusters complete their warming: a request that
            // only ACKs needs no second copy.
            if type_url == resources::ENDPOINT {
                state.always_respond = false;
            }
        }
        if type_url == resources::CLUSTER {
            // A cluster warms only once an assignment arrives for it, so the next EDS request
            // is answered even if it looks like an ACK.
            self.types
                .entry(resources::ENDPOINT.to_string())
                .or_default()
                .always_respond = true;
        }
        step.events.push(Event::Pushed {
            type_url: type_url.to_string(),
            version: version.clone(),
            resources: count,
        });
        step.responses.push(Outgoing {
            entries,
            count,
            head: DiscoveryResponse {
                version_info: version,
                type_url: type_url.to_string(),
                nonce,
                control_plane: control_plane(&self.control_plane),
                ..Default::default()
            },
        });
    }

    /// The subscription of a type: wildcard, and the names asked for explicitly.
    pub fn subscription(&self, type_url: &str) -> Option<(bool, BTreeSet<String>)> {
        self.types
            .get(type_url)
            .map(|s| (s.sub.wildcard, BTreeSet::clone(&s.sub.names)))
    }
}

#[cfg(test)]
#[path = "sotw_tests.rs"]
mod tests;
