//! A whole mesh on one machine: discovery (one process, or several replicas with the same
//! inputs), N simulated hosts (agent + Envoy each, on their own loopback address), sample apps,
//! and the registry directory the test edits.
//!
//! With [`MeshOptions::netns`] each host is a network namespace of the mesh's [`Lab`] instead
//! (fixed ports, its own 127.0.0.1), and discovery listens on the lab's bridge address.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::{Lab, NetnsHost};
use crate::{binary, envoy_binary, free_port, wait_for, Net, Process};

/// One simulated host: an agent and its Envoy.
#[derive(Debug)]
pub struct Host {
    pub node: String,
    pub ip: IpAddr,
    pub outbound: SocketAddr,
    pub mesh_port: u16,
    pub admin: SocketAddr,
    pub health: SocketAddr,
    pub config: PathBuf,
    pub dir: PathBuf,
    pub agent: Process,
    /// The host's network namespace in a [`MeshOptions::netns`] mesh: run commands in it with
    /// [`NetnsHost::command`]. `outbound` is then 127.0.0.1 inside it, out of the test's reach.
    pub netns: Option<NetnsHost>,
}

impl Host {
    /// Block until Envoy answers `/ready` with 200 on this host.
    pub async fn wait_ready(&self, deadline: Duration) -> Result<()> {
        let admin = self.admin;
        wait_for(
            &format!("envoy of {} ready", self.node),
            deadline,
            || async move {
                Ok(
                    crate::blocking(move || crate::http_get(admin, "admin", "/ready"))
                        .await
                        .ok()
                        .filter(|r| r.status == 200)
                        .map(|_| ()),
                )
            },
        )
        .await
    }

    /// The pid of this host's Envoy: the newest one running (after a hot restart the old
    /// one drains for a while beside it).
    pub fn envoy_pid(&self) -> Option<u32> {
        self.envoy_pids().last().copied()
    }

    /// Every Envoy process of this host that runs (not a zombie), oldest first. Found by its
    /// bootstrap path, since an Envoy outlives its agent and may be nobody's child here.
    pub fn envoy_pids(&self) -> Vec<u32> {
        let bootstrap = self.dir.join("run").join("envoy-bootstrap.json");
        let bootstrap = bootstrap.to_string_lossy();
        let mut found: Vec<(u64, u32)> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                let envoy = args.first().is_some_and(|a| {
                    Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a))
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("envoy"))
                });
                let ours = args.iter().any(|a| *a == bootstrap.as_bytes());
                if !(envoy && ours) {
                    return None;
                }
                let (state, start) = crate::proc_stat(pid)?;
                (state != 'Z' && state != 'X').then_some((start, pid))
            })
            .collect();
        found.sort_unstable();
        found.into_iter().map(|(_, pid)| pid).collect()
    }

    /// SIGKILL this host's agent (as a crash would) and start it again with the same command.
    pub fn restart_agent(&mut self) -> Result<()> {
        self.agent.restart()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The agent drains and stops its Envoy on SIGTERM; an Envoy left behind (its agent
        // was killed, or did not stop in time) is killed here, so no test leaks one.
        let _ = self.agent.terminate(Duration::from_secs(5));
        for pid in self.envoy_pids() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// A discovery replica beyond the first (which is [`Mesh::discovery`], [`Mesh::grpc`],
/// [`Mesh::http`]): its own process, address, ports and `state_dir`, the same registry.
/// [`MeshOptions::replicas`] makes them, or [`crate::replica`] beside a mesh.
#[derive(Debug)]
pub struct Replica {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    pub process: Process,
}

impl Replica {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Discovery plus hosts, all torn down on drop.
#[derive(Debug)]
pub struct Mesh {
    pub net: Net,
    pub dir: PathBuf,
    pub registry: PathBuf,
    /// Replica 0: its gRPC and HTTP addresses and process.
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub discovery: Process,
    /// Replicas 1.. (`MeshOptions::replicas` > 1); every agent lists all replicas.
    pub replicas: Vec<Replica>,
    pub hosts: Vec<Host>,
    pub apps: Vec<Process>,
    /// Which ADS flavour the agents' Envoys use ("delta" or "sotw").
    pub xds: &'static str,
    /// mTLS everywhere (join tokens, CA) instead of `insecure = true`.
    pub secure: bool,
    /// The trust bundle agents get as `ca_file` (secure meshes only).
    pub ca_file: PathBuf,
    pub config: PathBuf,
    /// Extra environment for the agents started from now on.
    pub agent_env: Vec<(String, String)>,
    /// The hosts' namespaces and bridge ([`MeshOptions::netns`]); dropped after every process.
    pub lab: Option<Lab>,
    _tmp: tempfile::TempDir,
}

/// The rules API token every test mesh writes to `api-token` beside discovery.toml.
pub const API_TOKEN: &str = "e2e-api-token";

/// How to start a mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub xds: &'static str,
    pub secure: bool,
    /// Extra TOML appended to discovery.toml (for example a `[ca]` table).
    pub discovery_extra: String,
    /// Extra top-level keys for discovery.toml (before its first table).
    pub discovery_top: String,
    /// Extra environment for discovery (for example `NOTIFY_SOCKET`).
    pub discovery_env: Vec<(String, String)>,
    /// Discovery processes reading the same registry directory (default 1). Each replica has
    /// its own address (`net.host(250 + i)` for replica i > 0), ports and `state_dir`, and
    /// gets `discovery_top` and `discovery_extra` too. Insecure meshes only: replicas share
    /// neither join tokens nor a CA yet.
    pub replicas: usize,
    /// Each host in its own network namespace ([`crate::netns`]): host `i` at
    /// `10.213.N.(i+1)` with fixed ports (outbound 127.0.0.1:15001, mesh port 15006, Envoy
    /// admin on port 15000 and agent health on 15020 of the host's address); discovery and
    /// its replicas on the bridge address `10.213.N.1`.
    pub netns: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            xds: "delta",
            secure: false,
            discovery_extra: String::new(),
            discovery_top: String::new(),
            discovery_env: Vec::new(),
            replicas: 1,
            netns: false,
        }
    }
}

impl Mesh {
    /// Start discovery (insecure, local experiment) on host 1 of a fresh address block, with an
    /// empty registry directory.
    pub fn start() -> Result<Mesh> {
        Mesh::start_with("delta")
    }

    pub fn start_with(xds: &'static str) -> Result<Mesh> {
        Mesh::start_opts(MeshOptions {
            xds,
            ..MeshOptions::default()
        })
    }

    /// A mesh with mTLS: discovery runs its CA, each host enrols with a join token.
    pub fn start_secure() -> Result<Mesh> {
        Mesh::start_opts(MeshOptions {
            secure: true,
            ..MeshOptions::default()
        })
    }

    pub fn start_opts(opts: MeshOptions) -> Result<Mesh> {
        let xds = opts.xds;
        let net = Net::new();
        let tmp = tempfile::Builder::new()
            .prefix("pilotfish-e2e-")
            .tempdir()?;
        let dir = tmp.path().to_path_buf();
        let registry = dir.join("registry.d");
        fs::create_dir_all(&registry)?;
        let lab = if opts.netns { Some(Lab::new()?) } else { None };
        // Discovery's address: with namespaced hosts the bridge's, the root namespace's own.
        let discovery_ip = |i: usize| -> Result<IpAddr> {
            match &lab {
                Some(lab) => Ok(IpAddr::V4(lab.gateway())),
                None if i == 0 => Ok(net.host(1)),
                None => Ok(net.host(250 + u8::try_from(i).context("at most 5 replicas")?)),
            }
        };
        let ip = discovery_ip(0)?;
        let grpc = SocketAddr::new(ip, free_port(ip));
        let http = SocketAddr::new(ip, free_port(ip));
        let config = dir.join("discovery.toml");
        let insecure = if opts.secure { "" } else { "insecure = true\n" };
        fs::write(
            &config,
            format!(
                "{insecure}trust_domain = \"pilotfish.local\"\nstate_dir = \"state\"\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n{}\n\n[registry.files]\npaths = [\"registry.d\"]\n{}\n",
                opts.discovery_top, opts.discovery_extra
            ),
        )?;
        // The rules API's bearer token, for tests that use it (`[api] token_file = "api-token"`).
        fs::write(dir.join("api-token"), API_TOKEN)?;
        let ca_file = dir.join("root.pem");
        if opts.secure {
            let bundle = discovery_cli(&config, &["ca", "bundle"])?;
            fs::write(&ca_file, bundle)?;
        }
        let discovery = Process::spawn_env(
            "discovery",
            &binary("pilotfish-discovery")?,
            &["--config", &config.display().to_string()],
            dir.join("discovery.log"),
            &opts.discovery_env,
        )?;
        if opts.replicas > 1 && opts.secure {
            anyhow::bail!("replicas > 1 needs an insecure mesh (no shared CA or join tokens)");
        }
        let mut replicas = Vec::new();
        for i in 1..opts.replicas {
            let ip = discovery_ip(i)?;
            let grpc = SocketAddr::new(ip, free_port(ip));
            let http = SocketAddr::new(ip, free_port(ip));
            let rdir = dir.join(format!("replica-{i}"));
            fs::create_dir_all(&rdir)?;
            let config = rdir.join("discovery.toml");
            fs::write(
                &config,
                format!(
                    "insecure = true\ntrust_domain = \"pilotfish.local\"\nstate_dir = \"state\"\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n{}\n\n[registry.files]\npaths = [\"{}\"]\n{}\n",
                    opts.discovery_top,
                    registry.display(),
                    opts.discovery_extra
                ),
            )?;
            fs::write(rdir.join("api-token"), API_TOKEN)?;
            let process = Process::spawn_env(
                &format!("discovery-{i}"),
                &binary("pilotfish-discovery")?,
                &["--config", &config.display().to_string()],
                rdir.join("discovery.log"),
                &opts.discovery_env,
            )?;
            replicas.push(Replica {
                grpc,
                http,
                config,
                log: rdir.join("discovery.log"),
                process,
            });
        }
        Ok(Mesh {
            net,
            dir,
            registry,
            grpc,
            http,
            discovery,
            replicas,
            hosts: Vec::new(),
            apps: Vec::new(),
            xds,
            secure: opts.secure,
            ca_file,
            config,
            agent_env: Vec::new(),
            lab,
            _tmp: tmp,
        })
    }

    /// Run a `pilotfish-discovery --config <this mesh's config> ARGS...` command; its stdout.
    pub fn discovery_cli(&self, args: &[&str]) -> Result<String> {
        discovery_cli(&self.config, args)
    }

    /// A fresh join token for `node`.
    pub fn join_token(&self, node: &str) -> Result<String> {
        Ok(self
            .discovery_cli(&["token", "create", "--node", node])?
            .trim()
            .to_string())
    }

    /// Write (or replace, atomically) a registry file.
    pub fn write_registry(&self, name: &str, content: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, content)?;
        fs::rename(&tmp, self.registry.join(name))?;
        Ok(())
    }

    /// Add simulated host `i` (its address is `net.host(i)`, or `10.213.N.(i+1)` in its own
    /// namespace with [`MeshOptions::netns`]) running an agent for `node`.
    pub fn add_host(&mut self, node: &str, i: u8) -> Result<&Host> {
        self.add_host_with(node, i, "")
    }

    /// [`Mesh::add_host`] with extra keys for the agent's `[envoy]` table (one per line, for
    /// example `access_log = "off"`). They end the file, so further tables (`[tracing]`) may
    /// follow them.
    pub fn add_host_with(&mut self, node: &str, i: u8, envoy_extra: &str) -> Result<&Host> {
        let agent = binary("pilotfish-agent")?;
        self.add_host_running(node, i, envoy_extra, &agent)
    }

    /// [`Mesh::add_host_with`], the agent started from `agent` (a copy a test may replace,
    /// as a package upgrade does).
    pub fn add_host_running(
        &mut self,
        node: &str,
        i: u8,
        envoy_extra: &str,
        agent: &Path,
    ) -> Result<&Host> {
        let dir = self.dir.join(node);
        fs::create_dir_all(&dir)?;
        let netns = match self.lab.as_mut() {
            Some(lab) => Some(lab.add_host(i)?),
            None => None,
        };
        let (ip, outbound, mesh_port, admin, health) = match &netns {
            // A namespace of its own: the ports a real VM's agent would use.
            Some(ns) => {
                let ip = IpAddr::V4(ns.ip);
                let outbound = SocketAddr::from(([127, 0, 0, 1], 15001));
                let (admin, health) = (SocketAddr::new(ip, 15000), SocketAddr::new(ip, 15020));
                (ip, outbound, 15006, admin, health)
            }
            None => {
                let ip = self.net.host(i);
                let outbound = SocketAddr::new(ip, free_port(ip));
                let mesh_port = free_port(ip);
                let admin = SocketAddr::new(ip, free_port(ip));
                let health = SocketAddr::new(ip, free_port(ip));
                (ip, outbound, mesh_port, admin, health)
            }
        };
        let config = dir.join("agent.toml");
        let security = if self.secure {
            let token = dir.join("token");
            fs::write(&token, self.join_token(node)?)?;
            format!(
                "token_file = \"{}\"\nca_file = \"{}\"\ntrust_domain = \"pilotfish.local\"",
                token.display(),
                self.ca_file.display()
            )
        } else {
            "insecure = true".to_string()
        };
        let discovery = std::iter::once(self.grpc)
            .chain(self.replicas.iter().map(|r| r.grpc))
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            &config,
            format!(
                r#"node = "{node}"
address = "{ip}"
discovery = [{discovery}]
{security}
outbound = "{outbound}"
app_address = "{ip}"
mesh_port = {mesh_port}
state_dir = "state"
run_dir = "run"
health = "{health}"

[envoy]
binary = "{envoy}"
admin = "{admin}"
concurrency = 1
drain_time = "2s"
xds = "{xds}"
{envoy_extra}
"#,
                envoy = envoy_binary()?.display(),
                xds = self.xds,
            ),
        )?;
        let log = dir.join("agent.log");
        let agent = match &netns {
            Some(ns) => ns
                .command(agent)
                .arg("--config")
                .arg(&config)
                .envs(&self.agent_env)
                .spawn(node, log)?,
            None => Process::spawn_env(
                node,
                agent,
                &["--config", &config.display().to_string()],
                log,
                &self.agent_env,
            )?,
        };
        self.hosts.push(Host {
            node: node.to_string(),
            ip,
            outbound,
            mesh_port,
            admin,
            health,
            config,
            dir,
            agent,
            netns,
        });
        self.hosts.last().context("host just added")
    }

    /// A `[services.<name>]` table (port 9080, plus the `extra` keys) with one instance per
    /// `(node, app port, labels)`, each at its host's address and mesh port.
    pub fn service_toml(&self, name: &str, extra: &str, instances: &[(&str, u16, &str)]) -> String {
        let mut out = format!("[services.{name}]\nport = 9080\n{extra}\n");
        for (node, port, labels) in instances {
            let h = self.host(node);
            out.push_str(&format!(
                "[[services.{name}.instances]]\nnode = \"{node}\"\naddress = \"{}\"\n\
                 port = {port}\nmesh_port = {}\n",
                h.ip, h.mesh_port
            ));
            if !labels.is_empty() {
                out.push_str(&format!("labels = {{ {labels} }}\n"));
            }
        }
        out.push('\n');
        out
    }

    pub fn host(&self, node: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.node == node)
            .unwrap_or_else(|| panic!("no host {node}"))
    }

    pub fn host_mut(&mut self, node: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.node == node)
            .unwrap_or_else(|| panic!("no host {node}"))
    }

    /// Start a sample app `name`/`version` on `ip`; returns its port.
    pub fn start_app(
        &mut self,
        name: &str,
        version: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> Result<u16> {
        let port = free_port(ip);
        let listen = SocketAddr::new(ip, port).to_string();
        let mut args = vec!["--listen", &listen, "--name", name, "--version", version];
        args.extend_from_slice(extra);
        let app = Process::spawn(
            &format!("{name}-{version}"),
            &binary("pilotfish-sample-app")?,
            &args,
            self.dir.join(format!("app-{name}-{version}-{port}.log")),
        )?;
        self.apps.push(app);
        let addr: SocketAddr = listen.parse()?;
        wait_port(addr, Duration::from_secs(10))?;
        Ok(port)
    }

    /// Start a sample app `name`/`version` inside `node`'s namespace ([`MeshOptions::netns`]),
    /// listening on every address there (so on 127.0.0.1 and the host's address) at `port`;
    /// returns once the test process reaches it at the host's address.
    pub fn start_app_in(
        &mut self,
        node: &str,
        name: &str,
        version: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<()> {
        let host = self.host(node);
        let ns = host
            .netns
            .clone()
            .with_context(|| format!("host {node} has no namespace (MeshOptions::netns)"))?;
        let addr = SocketAddr::new(host.ip, port);
        let app = ns
            .command(binary("pilotfish-sample-app")?)
            .args(["--listen", &format!("0.0.0.0:{port}")])
            .args(["--name", name, "--version", version])
            .args(extra.iter().copied())
            .spawn(
                &format!("{name}-{version}"),
                self.dir
                    .join(format!("app-{name}-{version}-{node}-{port}.log")),
            )?;
        self.apps.push(app);
        wait_port(addr, Duration::from_secs(10))
    }

    /// Wait until every host's Envoy is ready; on timeout the error carries every log.
    pub async fn wait_all_ready(&self, deadline: Duration) -> Result<()> {
        for h in &self.hosts {
            if let Err(e) = h.wait_ready(deadline).await {
                anyhow::bail!("{e:#}\n{}", self.logs());
            }
        }
        Ok(())
    }

    /// How many discovery replicas run (or ran): replica 0 and [`Mesh::replicas`].
    pub fn replica_count(&self) -> usize {
        1 + self.replicas.len()
    }

    /// Replica `i`'s gRPC address (what agents list in `discovery`).
    pub fn replica_grpc(&self, i: usize) -> SocketAddr {
        match i {
            0 => self.grpc,
            i => self.replicas[i - 1].grpc,
        }
    }

    /// Replica `i`'s HTTP address (`/status`, `/metrics`, `/v1/...`).
    pub fn replica_http(&self, i: usize) -> SocketAddr {
        match i {
            0 => self.http,
            i => self.replicas[i - 1].http,
        }
    }

    /// Replica `i`'s process.
    pub fn replica_process(&mut self, i: usize) -> &mut Process {
        match i {
            0 => &mut self.discovery,
            i => &mut self.replicas[i - 1].process,
        }
    }

    /// Replica `i`'s `/status`, parsed.
    pub async fn replica_status(&self, i: usize) -> Result<serde_json::Value> {
        let http = self.replica_http(i);
        let body = crate::blocking(move || crate::admin_get(http, "/status")).await?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Which replicas hold an open ADS stream of `node` now (its `/status` entries), by index;
    /// replicas that do not answer (stopped) are skipped.
    pub async fn replicas_of(&self, node: &str) -> Vec<(usize, serde_json::Value)> {
        let mut out = Vec::new();
        for i in 0..self.replica_count() {
            let Ok(status) = self.replica_status(i).await else {
                continue;
            };
            let empty = Vec::new();
            let proxies = status["proxies"].as_array().unwrap_or(&empty);
            out.extend(
                proxies
                    .iter()
                    .filter(|p| p["node"] == node)
                    .map(|p| (i, p.clone())),
            );
        }
        out
    }

    /// Every process's log, for a failing test's output.
    pub fn logs(&self) -> String {
        let mut out = format!("--- discovery ---\n{}\n", tail(&self.discovery.log_text()));
        for (i, r) in self.replicas.iter().enumerate() {
            out.push_str(&format!(
                "--- discovery replica {} ---\n{}\n",
                i + 1,
                tail(&r.process.log_text())
            ));
        }
        for h in &self.hosts {
            out.push_str(&format!(
                "--- agent {} ---\n{}\n",
                h.node,
                tail(&h.agent.log_text())
            ));
        }
        out
    }

    /// Whether `node`'s ADS stream to the discovery running now has accepted its clusters and
    /// listeners (discovery's `/status` lists only its own streams).
    pub async fn resynced(&self, node: &str) -> Result<bool> {
        let http = self.http;
        let body = crate::blocking(move || crate::admin_get(http, "/status")).await?;
        let status: serde_json::Value = serde_json::from_str(&body)?;
        let empty = Vec::new();
        let proxies = status["proxies"].as_array().unwrap_or(&empty);
        Ok(proxies.iter().any(|p| {
            p["node"] == node
                && ["cds", "lds"].iter().all(|t| {
                    let ty = &p["types"][*t];
                    !ty["acked_version"].is_null() && ty["acked_version"] == ty["sent_version"]
                })
        }))
    }

    /// Waits until every host has resynced with the discovery running now (after a restart);
    /// on timeout the error carries every log.
    pub async fn wait_resynced(&self, deadline: Duration) -> Result<()> {
        let waited = wait_for(
            "every proxy resynced with discovery",
            deadline,
            || async move {
                for h in &self.hosts {
                    if !self.resynced(&h.node).await.unwrap_or(false) {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await;
        waited.map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.logs()))
    }

    pub fn discovery_log(&self) -> String {
        self.discovery.log_text()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        Path::new(&self.dir).join(rel)
    }
}

fn discovery_cli(config: &Path, args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&crate::discovery_run(config, args)?.stdout).to_string())
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(6000);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_port(addr: SocketAddr, deadline: Duration) -> Result<()> {
    let end = std::time::Instant::now() + deadline;
    loop {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > end {
            anyhow::bail!("nothing listens on {addr} after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
