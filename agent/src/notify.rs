//! The agent's side of systemd's notify protocol (the unit is `Type=notify`, see
//! `systemd/pilotfish-agent.service` and the `pilotfish-systemd` crate).
//!
//! [`run`] is one part of the agent: `READY=1` once Envoy serves with config (the same check as
//! `/healthz/ready`: an Envoy process runs and its admin `/ready` answers 200), `WATCHDOG=1` from
//! the agent's single-threaded runtime (a stuck runtime stops the pings and systemd restarts
//! the agent; with `KillMode=process` Envoy keeps serving meanwhile), `STOPPING=1` when SIGTERM
//! starts the drain, pings until Envoy is gone. Nothing at all without `NOTIFY_SOCKET`.
//!
//! For a reload (SIGHUP: the agent re-executes itself and hot-restarts Envoy): call
//! [`reloading`] when it starts, and [`ready`] once the new Envoy serves. A re-executed agent
//! keeps its PID and `NOTIFY_SOCKET`, and its [`run`] sends `READY=1` again on its own once
//! `/healthz/ready` holds, which ends the reload for systemd; if the old Envoy still answers
//! `/ready` at that moment, wait for the new epoch first and call [`ready`] instead.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::health::Health;

pub use pilotfish_systemd::{ready, reloading};

/// How often to ask Envoy whether it is ready, until it is.
const READY_POLL: Duration = Duration::from_millis(250);

/// `shutdown` starts the drain (`STOPPING=1`); `services` is cancelled once Envoy is gone.
pub async fn run(health: Health, shutdown: CancellationToken, services: CancellationToken) {
    let envoy_ready = async {
        while !health.is_ready().await {
            tokio::time::sleep(READY_POLL).await;
        }
    };
    pilotfish_systemd::converse(envoy_ready, "Envoy is ready", shutdown, services).await;
}
