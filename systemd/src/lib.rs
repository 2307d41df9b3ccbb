//! Pilotfish's side of systemd's notify protocol (`sd_notify(3)`), for the `Type=notify` units
//! next to this crate (`pilotfish-agent.service`, `pilotfish-discovery.service`).
//!
//! A binary spawns [`converse`] on its main runtime with a future that resolves once it really
//! serves (discovery: first snapshot built; agent: Envoy's admin `/ready` answers 200). The
//! conversation then says `READY=1`, so `systemctl start` and units ordered after this one wait
//! for that moment; it pings `WATCHDOG=1` every half `WatchdogSec=` from that runtime, so a
//! runtime that stops making progress stops the pings and systemd restarts the unit; it says
//! `STOPPING=1` when the process starts draining, and keeps pinging until draining is over.
//! [`reloading`] and [`ready`] bracket a reload (SIGHUP).
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (tests, a binary started by hand), and a
//! failed send is logged, never an error: systemd's bookkeeping must not stop the mesh.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// What the conversation tells the service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `READY=1`: serving.
    Ready,
    /// `WATCHDOG=1`: still making progress.
    Watchdog,
    /// `STOPPING=1`: draining; do not expect `READY=1` again.
    Stopping,
}

/// True when a service manager listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

/// How often to ping: half of `WatchdogSec=`, as `sd_watchdog_enabled(3)` advises, so one late
/// ping is not yet a timeout. `None` without a watchdog or without a service manager.
pub fn watchdog_interval() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// The whole conversation with systemd for one process run: see the module comment. `status`
/// is the `STATUS=` text `systemctl status` shows once ready. Returns when `done` is cancelled
/// (at once without a service manager).
pub async fn converse<F>(
    ready: F,
    status: &str,
    stopping: CancellationToken,
    done: CancellationToken,
) where
    F: Future<Output = ()>,
{
    if !enabled() {
        return;
    }
    let interval = watchdog_interval();
    debug!(watchdog = ?interval, "talking to systemd");
    conversation(ready, interval, stopping, done, |event| match event {
        Event::Ready => send(&[NotifyState::Ready, NotifyState::Status(status)]),
        Event::Watchdog => send(&[NotifyState::Watchdog]),
        Event::Stopping => send(&[NotifyState::Stopping, NotifyState::Status("draining")]),
    })
    .await;
}

/// The conversation's logic with the sending passed in (the tests record it): `Ready` once
/// `ready` resolves (never after `stopping`), `Watchdog` every `watchdog` from the start until
/// `done`, `Stopping` once `stopping` is cancelled.
pub async fn conversation<F>(
    ready: F,
    watchdog: Option<Duration>,
    stopping: CancellationToken,
    done: CancellationToken,
    mut emit: impl FnMut(Event),
) where
    F: Future<Output = ()>,
{
    tokio::pin!(ready);
    let mut ticks = watchdog.map(|period| {
        let mut ticks = tokio::time::interval(period);
        // A late ping is sent once, not in a burst that would hide how late it was.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    });
    let (mut ready_sent, mut stopping_sent) = (false, false);
    loop {
        tokio::select! {
            biased;
            () = done.cancelled() => return,
            () = stopping.cancelled(), if !stopping_sent => {
                stopping_sent = true;
                emit(Event::Stopping);
            }
            () = &mut ready, if !ready_sent && !stopping_sent => {
                ready_sent = true;
                emit(Event::Ready);
            }
            () = tick(&mut ticks) => emit(Event::Watchdog),
        }
    }
}

async fn tick(ticks: &mut Option<Interval>) {
    match ticks {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// `READY=1` (with `STATUS=status`): serving again, after [`reloading`].
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=` (the clock reading systemd >= 253 requires for
/// `Type=notify-reload`, harmless before): a reload started. Send [`ready`] when it is done;
/// until then `systemctl reload` and `systemctl status` show the unit reloading.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(e) => {
            warn!(error = %e, "cannot read CLOCK_MONOTONIC for systemd's RELOADING=1");
            send(&[NotifyState::Reloading, NotifyState::Status("reloading")]);
        }
    }
}

/// `STOPPING=1`: draining.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn send(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(states = ?states, "told systemd"),
        Err(e) => warn!(error = %e, states = ?states, "cannot notify systemd (NOTIFY_SOCKET)"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::oneshot;
    use tokio::time::Instant;

    use super::*;

    type Log = Arc<Mutex<Vec<(Duration, Event)>>>;

    /// Runs a conversation in the background, recording each event with the (paused) time since
    /// the start.
    fn start(
        watchdog: Option<Duration>,
    ) -> (
        oneshot::Sender<()>,
        CancellationToken,
        CancellationToken,
        Log,
        tokio::task::JoinHandle<()>,
    ) {
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let (stopping, done) = (CancellationToken::new(), CancellationToken::new());
        let log: Log = Arc::default();
        let (s, d, l) = (stopping.clone(), done.clone(), log.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let ready = async {
                let _ = ready_rx.await;
            };
            conversation(ready, watchdog, s, d, |e| {
                l.lock().unwrap().push((started.elapsed(), e));
            })
            .await;
        });
        (ready_tx, stopping, done, log, task)
    }

    fn events(log: &Log) -> Vec<(u64, Event)> {
        log.lock()
            .unwrap()
            .iter()
            .map(|(t, e)| (t.as_millis() as u64, *e))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn pings_from_the_start_says_ready_once_then_stopping_and_pings_until_done() {
        let (ready, stopping, done, log, task) = start(Some(Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_secs(15)).await;
        ready.send(()).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        stopping.cancel();
        // Draining takes a while; systemd must keep hearing from the process meanwhile.
        tokio::time::sleep(Duration::from_secs(22)).await;
        done.cancel();
        task.await.unwrap();
        use Event::*;
        assert_eq!(
            events(&log),
            vec![
                (0, Watchdog),
                (10_000, Watchdog),
                (15_000, Ready),
                (20_000, Watchdog),
                (25_000, Stopping),
                (30_000, Watchdog),
                (40_000, Watchdog),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_ready_after_stopping_and_silent_without_a_watchdog() {
        let (ready, stopping, done, log, task) = start(None);
        tokio::time::sleep(Duration::from_secs(5)).await;
        stopping.cancel();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = ready.send(());
        tokio::time::sleep(Duration::from_secs(60)).await;
        done.cancel();
        task.await.unwrap();
        assert_eq!(events(&log), vec![(5_000, Event::Stopping)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_ping_goes_out_once_and_the_period_restarts_from_it() {
        // While the runtime is stuck nothing pings (systemd's watchdog then fires); when it
        // runs again, one ping goes out, not a burst that would look like health.
        let (_ready, _stopping, done, log, task) = start(Some(Duration::from_secs(10)));
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(25)).await;
        tokio::time::sleep(Duration::from_secs(11)).await;
        done.cancel();
        task.await.unwrap();
        use Event::Watchdog;
        assert_eq!(
            events(&log),
            vec![(0, Watchdog), (25_000, Watchdog), (35_000, Watchdog)]
        );
    }
}
