//! End-to-end harness: real `pilotfish-discovery`, `pilotfish-agent` and Envoy processes, each
//! simulated host on its own loopback address, plus the sample apps and a tiny HTTP client.
//!
//! Used by the tests in `tests/tests/` and by the demo binary. Every process is killed when its
//! handle drops, so a failing test leaves nothing behind; logs go to files in the test's work
//! directory and are printed when a wait times out.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// `--help` / `-h` and a bare `--version` for the helper binaries (demo, sample app, bench),
/// whose other flags are read by hand: prints `usage` or `<binary> <version>` and returns
/// true when the caller should exit 0. A `--version` followed by a value is the caller's own
/// flag (the sample app's `--version v2`).
pub fn help_or_version(binary: &str, usage: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{usage}");
        return true;
    }
    let bare_version = args.iter().enumerate().any(|(i, a)| {
        a == "--version" && args.get(i + 1).is_none_or(|next| next.starts_with("--"))
    });
    if bare_version {
        println!("{binary} {}", env!("CARGO_PKG_VERSION"));
        return true;
    }
    false
}

/// The workspace root (the folder holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where `cargo build` put the binaries of this profile (target/debug or target/release).
pub fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps; other binaries sit one level up.
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.ends_with("deps") {
            dir.pop();
        }
        if dir.join("pilotfish-discovery").exists() {
            return dir;
        }
    }
    workspace_root().join("target").join("debug")
}

/// Path of one of the workspace's binaries; fails with the command that builds it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = target_dir().join(name);
    if path.exists() {
        Ok(path)
    } else {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first (scripts/test.sh does)",
            path.display()
        )
    }
}

/// The Envoy binary: $PILOTFISH_ENVOY, then the project's own install (.tools/envoy, made by
/// scripts/install-envoy.sh), then `envoy` on PATH.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PILOTFISH_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let local = workspace_root().join(".tools/envoy/bin/envoy");
    if local.exists() {
        return Ok(local);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("envoy");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    bail!("envoy not found: run scripts/install-envoy.sh (or set PILOTFISH_ENVOY)")
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// A private /24 of loopback addresses for one test: 127.P.N.x with P from the process id and
/// N a per-process counter, so tests in parallel (threads or processes) never share an address.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    a: u8,
    b: u8,
}

impl Net {
    pub fn new() -> Net {
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // 127.0.0.x is left to the demo, which uses fixed addresses.
        let a = 1 + ((pid / 7 + n / 250) % 250) as u8;
        let b = (n % 250) as u8 + 1;
        Net { a, b }
    }

    /// The address of simulated host `i` (1-based).
    pub fn host(&self, i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.a, self.b, i))
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

/// A port that is free on `ip` right now and that this process has not handed out before.
///
/// The kernel may return a port it just released to the next `bind(0)`, so two calls in a row
/// can give the same port (an Envoy admin port and a listener port, say); the ports handed out
/// are remembered to rule that out.
pub fn free_port(ip: IpAddr) -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<(IpAddr, u16)>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..64 {
        let port = TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port != 0 && handed_out.insert((ip, port)) {
            return port;
        }
    }
    0
}

/// A child process that is killed when dropped; its output goes to `log`.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    command: Vec<String>,
    env: Vec<(String, String)>,
}

impl Process {
    pub fn spawn(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Result<Process> {
        Process::spawn_env(name, program, args, log, &[])
    }

    /// [`Process::spawn`] with extra environment variables (kept for [`Process::restart`]).
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        env: &[(String, String)],
    ) -> Result<Process> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(
                "PILOTFISH_LOG",
                std::env::var("PILOTFISH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let mut command = vec![program.display().to_string()];
        command.extend(args.iter().map(|a| a.to_string()));
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log,
            command,
            env: env.to_vec(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Start the same command again (after `kill`).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let program = PathBuf::from(&self.command[0]);
        let args: Vec<&str> = self.command[1..].iter().map(String::as_str).collect();
        let mut fresh =
            Process::spawn_env(&self.name, &program, &args, self.log.clone(), &self.env)?;
        self.child = fresh.child.take();
        Ok(())
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY-free: kill(1) keeps this crate free of unsafe code.
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Send SIGTERM and wait for the exit status (killing after `grace`).
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(15);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM first so agents stop their Envoy; then make sure.
        if self.child.is_some() {
            let _ = self.terminate(Duration::from_secs(3));
        }
    }
}

/// Poll `check` until it returns `Ok(Some(v))` or `deadline` passes.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let end = Instant::now() + deadline;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= end {
            return Err(match last_err {
                Some(e) => {
                    anyhow!("timed out after {deadline:?} waiting for {what}: last error: {e:#}")
                }
                None => anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), blocking, with a timeout.
/// Deliberately tiny: tests observe exactly what Envoy answers, nothing is retried.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<Response> {
    let timeout = Duration::from_secs(10);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    let _ = write!(req, "Content-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(req.as_bytes())?;
    let raw = read_response(&mut stream)?;
    parse_response(&raw)
}

/// Reads one response: up to its `Content-Length` when it has one, else to the end. Waiting for
/// the end of a response that says its length would wait for Envoy's delayed close (1 s after
/// a local reply such as a fault abort) instead of the response.
fn read_response(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            // The peer reset after sending everything: what arrived is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty() => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if length.is_some_and(|len| raw.len() >= end + 4 + len) {
                return Ok(raw);
            }
        }
    }
}

pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<Response> {
    http_request(addr, "GET", host, path, &[], "")
}

fn parse_response(raw: &[u8]) -> Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response: {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Run `f` on the blocking pool (the HTTP client above is synchronous).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// `program` on PATH, installed from Debian's `package` with apt-get when it is not
/// (idempotent; one install at a time in this process, since dpkg takes a lock). Fails, never
/// skips, when that is impossible: the test that needs it then says what to install.
pub fn ensure_debian_tool(program: &str, package: &str) -> Result<PathBuf> {
    debian::ensure_tool(program, package).map_err(anyhow::Error::msg)
}

/// GET a URL on Envoy's admin or discovery's HTTP port and return the body.
pub fn admin_get(addr: SocketAddr, path: &str) -> Result<String> {
    let resp = http_get(addr, &addr.to_string(), path)?;
    if resp.status != 200 {
        bail!("GET {path} on {addr}: status {}", resp.status);
    }
    Ok(resp.body)
}

/// Read one counter or gauge from Envoy's admin `/stats` (plain text `name: value`).
pub fn envoy_stat(admin: SocketAddr, name: &str) -> Result<Option<u64>> {
    let body = admin_get(
        admin,
        &format!("/stats?filter=^{}$", name.replace('|', "\\|")),
    )?;
    Ok(body
        .lines()
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok()))
}

/// Runs `pilotfish-discovery --config CONFIG ARGS...` to completion; its output, or an error
/// with its stderr when it failed.
pub fn discovery_run(config: &Path, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new(binary("pilotfish-discovery")?)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "pilotfish-discovery {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Copy `examples/demo` to `work` and do what an operator does before starting the hosts:
/// hand the mesh root to the agents (`ca bundle`) and create a join token per host.
pub fn prepare_demo(work: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(work);
    copy_dir(&workspace_root().join("examples/demo"), work)?;
    let config = work.join("discovery.toml");
    let run = |args: &[&str]| -> Result<String> {
        Ok(String::from_utf8_lossy(&discovery_run(&config, args)?.stdout).to_string())
    };
    fs::write(work.join("root.pem"), run(&["ca", "bundle"])?)?;
    for node in ["vm-a", "vm-b", "vm-c"] {
        let dir = work.join("agents").join(node);
        fs::create_dir_all(&dir)?;
        let token = run(&["token", "create", "--node", node, "--ttl", "1h"])?;
        fs::write(dir.join("token"), token.trim())?;
    }
    Ok(())
}

/// State letter and start time (clock ticks since boot) from `/proc/<pid>/stat`.
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Copy a directory tree.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub mod debian;
pub mod leaving;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod replica;
pub mod rules;
