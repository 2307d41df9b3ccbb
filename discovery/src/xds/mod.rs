//! The ADS server: per-stream protocol state (SotW and Delta) and the gRPC loop around it.
//!
//! Data flows one way per stream: requests from Envoy and new [`ProxyResources`] (after a mesh
//! snapshot change) go into a plain state struct ([`sotw::SotwState`], [`delta::DeltaState`]),
//! which answers with the responses to send and the [`Event`]s to record. The state does no I/O;
//! [`server`] only moves messages between the gRPC stream, the snapshot channel and the state,
//! and records events in [`connections::Connections`] for the status API.
//!
//! [`ProxyResources`]: crate::resources::ProxyResources

pub mod connections;
pub mod delta;
pub mod metrics;
pub mod server;
pub mod sotw;
pub mod stages;
pub mod subscription;
pub mod wire;

/// Something the protocol state noticed, for logs, metrics and the status API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The client applied the response with this nonce.
    Ack {
        type_url: String,
        version: String,
        nonce: String,
    },
    /// The client rejected the response with this nonce; `version` is the last it accepted.
    Nack {
        type_url: String,
        version: String,
        nonce: String,
        message: String,
    },
    /// A request answered a response that a newer one has superseded.
    StaleNonce { type_url: String, nonce: String },
    /// A response is about to go out (`version` is the type's version after it).
    Pushed {
        type_url: String,
        version: String,
        resources: usize,
    },
    /// The client asked for a type discovery does not serve.
    UnknownType { type_url: String },
    /// A new stream's first request of a type reports the version discovery would send (the
    /// client reconnected, maybe from another replica): nothing is sent, and the client counts
    /// as having accepted that version.
    Resumed { type_url: String, version: String },
}

/// A request that ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("missing node information")]
    MissingNode,
    #[error("node.id changed on the stream from \"{first}\" to \"{now}\"")]
    NodeChanged { first: String, now: String },
}

impl From<ProtocolError> for tonic::Status {
    fn from(e: ProtocolError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// What one input produced: responses to send, in order, and events to record.
#[derive(Debug)]
pub struct Step<R> {
    pub responses: Vec<R>,
    pub events: Vec<Event>,
}

impl<R> Default for Step<R> {
    fn default() -> Self {
        Step {
            responses: Vec::new(),
            events: Vec::new(),
        }
    }
}

/// Checks the node of a request: required on the first, unchanged after.
fn check_node(
    expected: &str,
    seen_first: &mut bool,
    node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
) -> Result<(), ProtocolError> {
    match node {
        None if !*seen_first => Err(ProtocolError::MissingNode),
        Some(n) if n.id != expected => Err(ProtocolError::NodeChanged {
            first: expected.to_string(),
            now: n.id.clone(),
        }),
        _ => {
            *seen_first = true;
            Ok(())
        }
    }
}

fn control_plane(
    identifier: &str,
) -> Option<envoy_types::pb::envoy::config::core::v3::ControlPlane> {
    Some(envoy_types::pb::envoy::config::core::v3::ControlPlane {
        identifier: identifier.to_string(),
    })
}

#[cfg(test)]
pub(crate) mod testing;
