//! Keeps one Envoy process running for as long as the agent runs.
//!
//! Start Envoy with the bootstrap, watch its admin `/ready`, and when it exits (crash, OOM kill,
//! `kill -9`) start it again after an exponential backoff that resets once a process has stayed
//! up for a while. The agent never exits because Envoy did.
//!
//! On shutdown the supervisor drains before it stops: `POST /drain_listeners?graceful` makes
//! Envoy discourage keep-alive (HTTP/1 `Connection: close`, HTTP/2 GOAWAY) on every listener;
//! the supervisor then waits until no downstream connection is open or `drain_time` has passed,
//! sends SIGTERM, and SIGKILLs only if Envoy has not exited a few seconds later.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::admin::Admin;
use super::process;
use crate::config::AgentConfig;
use crate::status::AgentStatus;

const READY_POLL: Duration = Duration::from_millis(100);
/// Envoy waits up to 15 s for its first xDS fetch before it becomes ready on its own.
const READY_WARN_AFTER: Duration = Duration::from_secs(30);
const DRAIN_POLL: Duration = Duration::from_millis(200);
const TERM_GRACE: Duration = Duration::from_secs(5);

/// How long to wait before each restart: doubles from `initial` up to `cap`, and starts over
/// once a process has stayed up for `stable`.
#[derive(Debug, Clone)]
pub struct RestartBackoff {
    pub initial: Duration,
    pub cap: Duration,
    pub stable: Duration,
    next: Duration,
}

impl RestartBackoff {
    pub fn new(initial: Duration, cap: Duration, stable: Duration) -> Self {
        RestartBackoff {
            initial,
            cap,
            stable,
            next: initial,
        }
    }

    /// The delay before the next start, given how long the last process stayed up.
    pub fn after_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.stable {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff::new(
            Duration::from_millis(200),
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }
}

#[derive(Debug)]
pub struct Supervisor {
    pub binary: PathBuf,
    pub bootstrap: PathBuf,
    pub log_level: String,
    pub concurrency: Option<u32>,
    pub drain_time: Duration,
    pub admin: Admin,
    pub backoff: RestartBackoff,
    pub status: Arc<AgentStatus>,
}

enum Outcome {
    Exited(std::io::Result<ExitStatus>),
    Stopped,
}

impl Supervisor {
    pub fn new(config: &AgentConfig, status: Arc<AgentStatus>) -> Self {
        Supervisor {
            binary: config.envoy.binary.clone(),
            bootstrap: config.bootstrap_path(),
            log_level: config.envoy.log_level.clone(),
            concurrency: config.envoy.concurrency,
            drain_time: config.envoy.drain_time,
            admin: Admin::new(config.envoy.admin),
            backoff: RestartBackoff::default(),
            status,
        }
    }

    /// Envoy's command line. Hot restart is off so that several Envoys (several simulated
    /// hosts) can share a machine without fighting over shared memory; the agent restarts
    /// Envoy itself instead.
    pub fn args(&self) -> Vec<OsString> {
        let drain_secs = self.drain_time.as_secs() + u64::from(self.drain_time.subsec_nanos() > 0);
        let mut args: Vec<OsString> = vec![
            "-c".into(),
            self.bootstrap.clone().into(),
            "--disable-hot-restart".into(),
            "--log-level".into(),
            self.log_level.clone().into(),
            "--drain-time-s".into(),
            drain_secs.to_string().into(),
            // Discourage every connection at once on drain rather than ramping up over the
            // drain time: the agent waits for connections to reach zero and then stops Envoy.
            "--drain-strategy".into(),
            "immediate".into(),
            // Access log lines reach journald (or the file) within a second, not Envoy's
            // default ten.
            "--file-flush-interval-msec".into(),
            "1000".into(),
        ];
        if let Some(n) = self.concurrency {
            args.push("--concurrency".into());
            args.push(n.to_string().into());
        }
        args
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            // Own process group: a terminal's Ctrl-C reaches the agent, which drains Envoy,
            // instead of killing Envoy mid-request.
            .process_group(0);
        process::die_with_parent(&mut cmd);
        cmd.spawn()
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let started = Instant::now();
            match self.spawn() {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or_default();
                    info!(pid, binary = %self.binary.display(), "envoy started");
                    self.status.set_envoy_pid(Some(pid));
                    let outcome = self.supervise(&mut child, pid, &shutdown).await;
                    self.status.set_envoy_pid(None);
                    match outcome {
                        Outcome::Stopped => return,
                        Outcome::Exited(Ok(status)) => {
                            warn!(pid, %status, uptime = ?started.elapsed(), "envoy exited")
                        }
                        Outcome::Exited(Err(e)) => {
                            error!(pid, error = %e, "lost track of envoy")
                        }
                    }
                }
                Err(e) => error!(binary = %self.binary.display(), error = %e, "cannot start envoy"),
            }
            let delay = self.backoff.after_exit(started.elapsed());
            info!(?delay, "restarting envoy after backoff");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
            self.status.envoy_restarted();
        }
    }

    async fn supervise(
        &self,
        child: &mut Child,
        pid: u32,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let ready = self.wait_ready(pid);
        tokio::pin!(ready);
        let mut ready_done = false;
        loop {
            tokio::select! {
                status = child.wait() => return Outcome::Exited(status),
                _ = shutdown.cancelled() => {
                    self.stop(child, pid).await;
                    return Outcome::Stopped;
                }
                _ = &mut ready, if !ready_done => ready_done = true,
            }
        }
    }

    async fn wait_ready(&self, pid: u32) {
        let started = Instant::now();
        let mut warned = false;
        loop {
            if self.admin.ready().await {
                info!(pid, after = ?started.elapsed(), admin = %self.admin.addr(), "envoy ready");
                return;
            }
            if !warned && started.elapsed() > READY_WARN_AFTER {
                warned = true;
                warn!(pid, admin = %self.admin.addr(), "envoy is not ready yet");
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Drain, then SIGTERM, then SIGKILL as a last resort.
    async fn stop(&self, child: &mut Child, pid: u32) {
        let deadline = Instant::now() + self.drain_time;
        match self.admin.drain_listeners().await {
            Ok(()) => {
                info!(pid, drain_time = ?self.drain_time, "draining envoy");
                loop {
                    let open = self.admin.active_connections().await;
                    debug!(pid, ?open, "waiting for connections to close");
                    if matches!(open, Ok(0)) || Instant::now() >= deadline {
                        break;
                    }
                    tokio::select! {
                        status = child.wait() => {
                            info!(pid, ?status, "envoy exited while draining");
                            return;
                        }
                        _ = tokio::time::sleep(DRAIN_POLL) => {}
                    }
                }
            }
            Err(e) => warn!(pid, error = %e, "cannot drain envoy; stopping it directly"),
        }
        if let Err(e) = process::terminate(pid) {
            warn!(pid, error = %e, "cannot send SIGTERM to envoy");
        }
        match tokio::time::timeout(TERM_GRACE, child.wait()).await {
            Ok(status) => info!(pid, ?status, "envoy stopped"),
            Err(_) => {
                warn!(pid, "envoy ignored SIGTERM; killing it");
                if let Err(e) = child.kill().await {
                    error!(pid, error = %e, "cannot kill envoy");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testutil::{envoy_binary, free_port, wait_until};
    use serde_json::json;

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_stable_run() {
        let mut b = RestartBackoff::default();
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..8).map(|_| b.after_exit(quick)).collect();
        assert_eq!(delays[0], Duration::from_millis(200));
        assert_eq!(delays[1], Duration::from_millis(400));
        assert_eq!(delays[2], Duration::from_millis(800));
        assert_eq!(delays[7], Duration::from_secs(10));
        assert_eq!(
            b.after_exit(Duration::from_secs(31)),
            Duration::from_millis(200)
        );
        assert_eq!(b.after_exit(quick), Duration::from_millis(400));
    }

    fn supervisor(dir: &std::path::Path, binary: PathBuf, status: Arc<AgentStatus>) -> Supervisor {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let bootstrap = dir.join("bootstrap.json");
        let doc = json!({
            "node": { "id": "supervisor-test", "cluster": "pilotfish" },
            "admin": { "address": { "socket_address": {
                "address": "127.0.0.1", "port_value": admin.port() } } },
        });
        std::fs::write(&bootstrap, doc.to_string()).unwrap();
        Supervisor {
            binary,
            bootstrap,
            log_level: "warning".into(),
            concurrency: Some(1),
            drain_time: Duration::from_secs(1),
            admin: Admin::new(admin),
            backoff: RestartBackoff::new(
                Duration::from_millis(50),
                Duration::from_millis(200),
                Duration::from_secs(30),
            ),
            status,
        }
    }

    fn kill_9(pid: u32) {
        let ok = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -9 {pid}");
    }

    /// Real Envoy: killed with SIGKILL, it comes back and becomes ready again; on shutdown the
    /// supervisor drains and stops it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restarts_a_killed_envoy_and_stops_it_on_shutdown() {
        let Some(envoy) = envoy_binary() else {
            eprintln!("note: no envoy binary found; skipping supervisor test");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let status = Arc::new(AgentStatus::default());
        let sup = supervisor(dir.path(), envoy, status.clone());
        let admin = sup.admin.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sup.run(shutdown.clone()));

        wait_until(Duration::from_secs(30), || admin.ready()).await;
        assert!(status.envoy_up());
        let first = status.envoy_pid().expect("envoy child pid");
        kill_9(first);

        wait_until(Duration::from_secs(30), || async {
            status.envoy_restarts() == 1 && admin.ready().await
        })
        .await;
        let second = status.envoy_pid().expect("restarted envoy pid");
        assert_ne!(first, second);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("supervisor stops within drain time + grace")
            .unwrap();
        assert!(!status.envoy_up());
        assert!(!admin.ready().await);
        assert_eq!(status.envoy_pid(), None);
        assert!(!std::path::Path::new(&format!("/proc/{second}")).exists());
    }

    /// A binary that exits at once is restarted with backoff, never taking the agent down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashing_binary_is_restarted_with_backoff() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("envoy");
        std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let status = Arc::new(AgentStatus::default());
        let sup = supervisor(dir.path(), fake, status.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sup.run(shutdown.clone()));
        wait_until(Duration::from_secs(10), || async {
            status.envoy_restarts() >= 3
        })
        .await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("supervisor stops promptly")
            .unwrap();
    }
}
