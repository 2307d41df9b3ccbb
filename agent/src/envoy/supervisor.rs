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
use super::handover::{self, Record};
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
    /// The agent binary to run Envoy under as its keeper (`/proc/self/exe`, see
    /// [`super::keep`]); `None` runs Envoy directly (unit tests, where this process is a test
    /// binary).
    pub keeper: Option<PathBuf>,
    pub bootstrap: PathBuf,
    /// Where the Envoy record and base id live ([`handover`]).
    pub run_dir: PathBuf,
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

/// How often the supervisor checks on inherited Envoys (to log and reap their exit).
const INHERITED_POLL: Duration = Duration::from_secs(1);

impl Supervisor {
    pub fn new(config: &AgentConfig, status: Arc<AgentStatus>) -> Self {
        Supervisor {
            binary: config.envoy.binary.clone(),
            // The running image, even when a package upgrade replaced the file it came from.
            keeper: Some(PathBuf::from("/proc/self/exe")),
            bootstrap: config.bootstrap_path(),
            run_dir: config.run_dir.clone(),
            log_level: config.envoy.log_level.clone(),
            concurrency: config.envoy.concurrency,
            drain_time: config.envoy.drain_time,
            admin: Admin::new(config.envoy.admin),
            backoff: RestartBackoff::default(),
            status,
        }
    }

    fn drain_secs(&self) -> u64 {
        self.drain_time.as_secs() + u64::from(self.drain_time.subsec_nanos() > 0)
    }

    /// Envoy's command line. `parent`: the running Envoy this one takes over from by hot
    /// restart (its epoch + 1, its base id); without one, epoch 0 with a base id Envoy picks
    /// among the free ones (several hosts, or several tests, share a machine) and writes to
    /// `run_dir/envoy.base-id`.
    pub fn args(&self, parent: Option<&Record>) -> Vec<OsString> {
        let drain_secs = self.drain_secs();
        let mut args: Vec<OsString> = vec![
            "-c".into(),
            self.bootstrap.clone().into(),
            "--log-level".into(),
            self.log_level.clone().into(),
            "--drain-time-s".into(),
            drain_secs.to_string().into(),
            // Discourage every connection at once on drain rather than ramping up over the
            // drain time: the agent waits for connections to reach zero and then stops Envoy.
            "--drain-strategy".into(),
            "immediate".into(),
            // After a hot restart the old Envoy drains for drain_time, then the new one stops
            // it.
            "--parent-shutdown-time-s".into(),
            (drain_secs + PARENT_SHUTDOWN_MARGIN_SECS)
                .to_string()
                .into(),
            // Access log lines reach journald (or the file) within a second, not Envoy's
            // default ten.
            "--file-flush-interval-msec".into(),
            "1000".into(),
        ];
        match parent {
            Some(p) => args.extend([
                "--restart-epoch".into(),
                (p.epoch + 1).to_string().into(),
                "--base-id".into(),
                p.base_id.to_string().into(),
                // The parent may die while this one starts (it was told to stop, or crashed):
                // start as if first rather than abort.
                "--skip-hot-restart-on-no-parent".into(),
            ]),
            None => args.extend([
                "--restart-epoch".into(),
                "0".into(),
                "--use-dynamic-base-id".into(),
                "--base-id-path".into(),
                self.run_dir.join(handover::BASE_ID_FILE).into(),
            ]),
        }
        if let Some(n) = self.concurrency {
            args.push("--concurrency".into());
            args.push(n.to_string().into());
        }
        args
    }

    fn spawn(&self, parent: Option<&Record>) -> std::io::Result<Child> {
        if parent.is_none() {
            // A new base id is written; never read a stale one.
            let _ = std::fs::remove_file(self.run_dir.join(handover::BASE_ID_FILE));
        }
        let mut cmd = match &self.keeper {
            Some(keeper) => {
                let mut cmd = Command::new(keeper);
                cmd.arg(super::KEEPER_ARG).arg(&self.binary);
                cmd
            }
            None => Command::new(&self.binary),
        };
        cmd.args(self.args(parent))
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            // Envoy outlives the agent (a crash, `kill -9`, a re-exec on reload): the next
            // agent takes over from it with a hot restart. Only a stop drains and ends it.
            .kill_on_drop(false)
            // Own process group: a terminal's Ctrl-C reaches the agent, which drains Envoy,
            // instead of killing Envoy mid-request.
            .process_group(0);
        cmd.spawn()
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        // Envoys running without being children of this process image: the one a previous
        // agent (or this one, before re-executing) recorded. The newest one alive hands its
        // sockets over to the next start.
        let mut inherited: Vec<Record> = Record::load(&self.run_dir)
            .filter(Record::alive)
            .into_iter()
            .collect();
        if let Some(r) = inherited.first() {
            info!(
                pid = r.pid,
                epoch = r.epoch,
                "envoy of the previous agent is running; taking over with a hot restart"
            );
        }
        loop {
            if shutdown.is_cancelled() {
                self.stop_inherited(&mut inherited).await;
                return;
            }
            let parent = newest_alive(&mut inherited);
            let started = Instant::now();
            match self.spawn(parent.as_ref()) {
                Ok(mut child) => {
                    let pid = child.id().unwrap_or_default();
                    let epoch = parent.map_or(0, |p| p.epoch + 1);
                    match &parent {
                        Some(p) => {
                            info!(pid, epoch, from = p.pid, binary = %self.binary.display(), "envoy started; taking over from the running one")
                        }
                        None => info!(pid, binary = %self.binary.display(), "envoy started"),
                    }
                    if let Some(record) = parent.and_then(|p| Record::of(pid, epoch, p.base_id)) {
                        record.store(&self.run_dir);
                    }
                    self.status.set_envoy_pid(Some(pid));
                    self.status.set_envoy_started(false);
                    let outcome = self
                        .supervise(&mut child, pid, epoch, &mut inherited, &shutdown)
                        .await;
                    self.status.set_envoy_pid(None);
                    match outcome {
                        Outcome::Stopped => {
                            self.stop_inherited(&mut inherited).await;
                            return;
                        }
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
                _ = shutdown.cancelled() => {
                    self.stop_inherited(&mut inherited).await;
                    return;
                }
            }
            self.status.envoy_restarted();
        }
    }

    async fn supervise(
        &self,
        child: &mut Child,
        pid: u32,
        epoch: u32,
        inherited: &mut Vec<Record>,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let ready = self.wait_ready(pid, epoch);
        tokio::pin!(ready);
        let mut ready_done = false;
        // Epoch 0 picked its own base id: record the process once Envoy has written it.
        let mut recorded = epoch > 0;
        let mut tick = tokio::time::interval(if recorded { INHERITED_POLL } else { READY_POLL });
        loop {
            tokio::select! {
                status = child.wait() => return Outcome::Exited(status),
                _ = shutdown.cancelled() => {
                    self.stop(child, pid).await;
                    return Outcome::Stopped;
                }
                _ = &mut ready, if !ready_done => {
                    ready_done = true;
                    self.status.set_envoy_started(true);
                }
                _ = tick.tick() => {
                    if !recorded {
                        if let Some(record) = handover::read_base_id(&self.run_dir)
                            .and_then(|base_id| Record::of(pid, 0, base_id))
                        {
                            record.store(&self.run_dir);
                            recorded = true;
                            tick = tokio::time::interval(INHERITED_POLL);
                        }
                    }
                    newest_alive(inherited);
                }
            }
        }
    }

    async fn wait_ready(&self, pid: u32, epoch: u32) {
        let started = Instant::now();
        let mut warned = false;
        loop {
            if self.admin.ready_at(epoch).await {
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
        let _ = std::fs::remove_file(self.run_dir.join(handover::FILE));
    }

    /// On stop: an inherited Envoy still draining after a hot restart is stopped too, so a
    /// stopped agent leaves no Envoy behind.
    async fn stop_inherited(&self, inherited: &mut Vec<Record>) {
        for r in inherited.iter().filter(|r| r.alive()) {
            info!(pid = r.pid, "stopping the previous envoy");
            if let Err(e) = process::terminate(r.pid) {
                warn!(pid = r.pid, error = %e, "cannot send SIGTERM to the previous envoy");
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        while inherited.iter().any(Record::alive) && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        for r in inherited.iter().filter(|r| r.alive()) {
            warn!(
                pid = r.pid,
                "the previous envoy ignored SIGTERM; killing it"
            );
            let _ = process::kill(r.pid);
        }
        inherited.clear();
    }
}

/// How much longer than its drain time an Envoy replaced by a hot restart may run.
const PARENT_SHUTDOWN_MARGIN_SECS: u64 = 5;

/// Forgets (and logs) the inherited Envoys that exited; the newest one still running.
fn newest_alive(inherited: &mut Vec<Record>) -> Option<Record> {
    inherited.retain(|r| {
        let alive = r.alive();
        if !alive {
            info!(pid = r.pid, epoch = r.epoch, "the previous envoy exited");
        }
        alive
    });
    inherited.iter().max_by_key(|r| r.epoch).copied()
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
            keeper: None,
            bootstrap,
            run_dir: dir.to_path_buf(),
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
