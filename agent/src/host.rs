//! The agent's side of the `Host` service ([`pilotfish_pki::wire::host`]), on the relay's own
//! connection to discovery (so it costs no extra connection, and carries the node
//! certificate's identity):
//!
//! - `pilotfish-ctl proxy-config`: a `Host.Attach` stream answering each request with Envoy's
//!   config dump, read from the admin port on loopback, cut to the sections asked for and with
//!   private keys redacted ([`run`]);
//! - a coordinated drain: on stop, `Host.Leave` tells discovery this host is leaving and
//!   returns once callers stopped choosing it ([`leave`]).

use std::time::Duration;

use pilotfish_pki::wire::host::{DumpReply, DumpRequest, HostClient, LeaveRequest};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::envoy::admin::Admin;

/// Wait before reopening a stream discovery ended or refused on the same connection.
const RETRY: Duration = Duration::from_secs(5);

/// Sections of Envoy's config dump by the names `proxy-config` uses.
const SECTIONS: [(&str, &str); 5] = [
    (
        "clusters",
        "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
    ),
    (
        "endpoints",
        "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
    ),
    (
        "listeners",
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
    ),
    (
        "routes",
        "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
    ),
    (
        "secrets",
        "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
    ),
];

/// Keys whose values are never sent, wherever they appear (Envoy redacts these itself; this
/// is the second lock).
const REDACTED_KEYS: [&str; 5] = [
    "private_key",
    "password",
    "session_ticket_keys",
    "hmac_secret",
    "generic_secret",
];

/// Keeps a stream open on whatever connection the relay uses, until `shutdown`.
pub async fn run(
    mut relay: watch::Receiver<Option<(u64, Channel)>>,
    node: String,
    admin: Admin,
    shutdown: CancellationToken,
) {
    loop {
        let current = relay.borrow_and_update().clone();
        let Some((_, channel)) = current else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = relay.changed() => if changed.is_err() { return } else { continue },
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            // The relay moved to another connection (or lost it): follow it.
            changed = relay.changed() => if changed.is_err() { return },
            _ = serve(channel, &node, &admin) => {
                // Ended or refused: retry later on the same connection, or at once on a new one.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = relay.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// Tells discovery this host is leaving, and waits (at most `wait`) until the callers have
/// accepted its instances as draining. Without a connection to discovery there is nobody to
/// tell: callers will notice the host gone through retries and `node_grace`.
pub async fn leave(relay: &watch::Receiver<Option<(u64, Channel)>>, node: &str, wait: Duration) {
    let current = relay.borrow().clone();
    let Some((_, channel)) = current else {
        warn!("stopping without telling discovery: not connected to it");
        return;
    };
    let started = std::time::Instant::now();
    let request = LeaveRequest {
        node: node.to_string(),
        wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
    };
    match tokio::time::timeout(wait, HostClient::new(channel).leave(request)).await {
        Ok(Ok(answer)) => {
            let a = answer.into_inner();
            info!(callers = a.callers, pending = a.pending, after = ?started.elapsed(), "discovery drained this host: callers send it nothing new");
        }
        Ok(Err(status)) => warn!(%status, "discovery refused the leave; stopping anyway"),
        Err(_) => warn!(
            ?wait,
            "discovery did not confirm the drain in time; stopping anyway"
        ),
    }
}

/// One `Attach` stream: the hello, then an answer per request, until it ends.
async fn serve(channel: Channel, node: &str, admin: &Admin) {
    let (tx, rx) = mpsc::channel(4);
    let hello = DumpReply {
        id: 0,
        node: node.to_string(),
        ..DumpReply::default()
    };
    if tx.send(hello).await.is_err() {
        return;
    }
    let mut requests = match HostClient::new(channel)
        .attach(ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            debug!(%status, "discovery refused the config-dump stream");
            return;
        }
    };
    debug!("config-dump stream open");
    loop {
        match requests.message().await {
            Ok(Some(request)) => {
                let reply = answer(admin, request).await;
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(status) => {
                debug!(%status, "config-dump stream failed");
                return;
            }
        }
    }
}

async fn answer(admin: &Admin, request: DumpRequest) -> DumpReply {
    let wanted: Vec<&str> = if request.types.is_empty() {
        SECTIONS.iter().map(|(name, _)| *name).collect()
    } else {
        request.types.iter().map(String::as_str).collect()
    };
    info!(types = ?wanted, "discovery asked for Envoy's config (proxy-config)");
    let mut reply = DumpReply {
        id: request.id,
        ..DumpReply::default()
    };
    match admin.config_dump(wanted.contains(&"endpoints")).await {
        Ok(body) => match cut(&body, &wanted) {
            Ok(json) => reply.config_dump_json = json,
            Err(e) => reply.error = format!("Envoy's config dump is not JSON: {e}"),
        },
        Err(e) => reply.error = e.to_string(),
    }
    reply
}

/// Envoy's dump with only the `wanted` sections, secrets redacted, as JSON text.
fn cut(body: &[u8], wanted: &[&str]) -> Result<String, serde_json::Error> {
    let mut dump: Value = serde_json::from_slice(body)?;
    let types: Vec<&str> = SECTIONS
        .iter()
        .filter(|(name, _)| wanted.contains(name))
        .map(|(_, ty)| *ty)
        .collect();
    if let Some(configs) = dump.get_mut("configs").and_then(Value::as_array_mut) {
        configs.retain(|c| {
            c.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| types.contains(&t))
        });
    }
    redact(&mut dump);
    serde_json::to_string(&dump)
}

fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if REDACTED_KEYS.contains(&key.as_str()) {
                    *v = Value::String("[redacted]".into());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_sections_asked_for_and_redacts_keys() {
        let dump = serde_json::json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {}},
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "dynamic_active_clusters": [{"cluster": {"name": "a"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
             "dynamic_active_secrets": [{"name": "s", "secret": {"tls_certificate": {
                "certificate_chain": {"inline_bytes": "Y2VydA=="},
                "private_key": {"inline_bytes": "a2V5"}}}}]},
        ]});
        let body = serde_json::to_vec(&dump).expect("json");
        let out: Value = serde_json::from_str(&cut(&body, &["clusters", "secrets"]).expect("cut"))
            .expect("json");
        let configs = out["configs"].as_array().expect("configs");
        assert_eq!(configs.len(), 2, "{out}");
        let text = out.to_string();
        assert!(!text.contains("a2V5"), "the key left the host: {text}");
        assert!(text.contains("[redacted]") && text.contains("Y2VydA=="));
        let only: Value =
            serde_json::from_str(&cut(&body, &["clusters"]).expect("cut")).expect("json");
        assert_eq!(only["configs"].as_array().map(Vec::len), Some(1));
    }
}
