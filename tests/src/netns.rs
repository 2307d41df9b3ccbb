//! Simulated hosts in network namespaces, for tests that need a host of their own: nftables
//! rules, a resolver on 127.0.0.153, fixed ports, 127.0.0.1 that belongs to one host.
//!
//! A [`Lab`] is one test's network: a bridge `pfb<N>` in the root namespace with 10.213.N.1/24,
//! and per host `i` (1..=253) a namespace `pf<N>h<i>` whose `eth0` (the far end of the veth
//! `pf<N>v<i>`, which sits on the bridge) has 10.213.N.(i+1)/24, `lo` up and a default route
//! via the bridge. The test process stays in the root namespace and reaches every host address
//! through the bridge, so the harness's HTTP helpers work unchanged; what runs inside a host is
//! started through [`NetnsHost::command`] (`ip netns exec`, which execs, so a [`Process`]'s pid
//! is the program's own).
//!
//! The kernel is the lock: creating `pfb<N>` fails when it exists, and the next N is tried, so
//! tests in one process and in several test binaries never share a lab. Each bridge and veth
//! carries its owner (pid and start time) in its link group; a lab whose owner is gone (a test
//! that crashed) is removed by the next `Lab::new`, with `ip link del group`, which cannot hit a
//! newer lab that took the same N. Namespaces are only ever touched by the holder of their N.

use std::ffi::OsString;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

use crate::Process;

/// Second octet of every lab's 10.213.N.0/24.
const LAB_OCTET: u8 = 213;
/// A link group keeps the owner's pid in its low 22 bits (the kernel's pid limit) and the low
/// 9 bits of its start time above (`ip` takes groups up to 2^31 - 1), so a reused pid is
/// seldom taken for the owner, and a live owner never for a dead one.
const PID_BITS: u32 = 22;

/// One test's network of namespaced hosts; everything it made is deleted on drop.
#[derive(Debug)]
pub struct Lab {
    n: u8,
    group: u32,
    hosts: Vec<NetnsHost>,
}

/// A handle on one host of a [`Lab`] (its namespace and address); the lab owns the namespace.
#[derive(Debug, Clone)]
pub struct NetnsHost {
    /// The namespace's name (`pf<N>h<i>`), as `ip netns` and `ip -n` take it.
    pub name: String,
    /// The address of its `eth0`.
    pub ip: Ipv4Addr,
}

impl Lab {
    /// Claims the first free lab number (removing labs whose test is gone first) and sets up
    /// its bridge.
    pub fn new() -> Result<Lab> {
        let group = own_group()?;
        remove_orphans();
        for n in 0..=u8::MAX {
            let bridge = bridge_name(n);
            let group_arg = group.to_string();
            let created = Command::new("ip")
                .args(["link", "add", "name", &bridge, "group", &group_arg])
                .args(["type", "bridge"])
                .output()
                .context("run ip (iproute2)")?;
            if !created.status.success() {
                let err = String::from_utf8_lossy(&created.stderr);
                if err.contains("File exists") {
                    continue;
                }
                bail!("ip link add {bridge}: {}", err.trim());
            }
            // From here on the bridge is ours, and so is everything named for N.
            let lab = Lab {
                n,
                group,
                hosts: Vec::new(),
            };
            lab.setup_bridge()
                .with_context(|| format!("set up bridge {bridge}"))?;
            return Ok(lab);
        }
        bail!("every lab number (bridges pfb0..pfb255) is taken")
    }

    fn setup_bridge(&self) -> Result<()> {
        let bridge = self.bridge();
        let alias = format!("pilotfish e2e lab, pid={}", std::process::id());
        ip(&["link", "set", &bridge, "alias", &alias])?;
        // Leftovers of a crashed lab with this N (the bridge, the only lock, is gone already).
        let ns_prefix = format!("pf{}h", self.n);
        for ns in names_in("/run/netns", &ns_prefix) {
            delete_namespace(&ns);
        }
        for veth in names_in("/sys/class/net", &format!("pf{}v", self.n)) {
            let _ = ip(&["link", "del", &veth]);
        }
        for dir in names_in("/etc/netns", &ns_prefix) {
            let _ = fs::remove_dir_all(PathBuf::from("/etc/netns").join(dir));
        }
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.gateway()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])
    }

    /// The bridge's name in the root namespace (`pfb<N>`).
    pub fn bridge(&self) -> String {
        bridge_name(self.n)
    }

    /// The bridge's address: the root namespace (the test process, discovery) on the lab's
    /// network, and every host's default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, LAB_OCTET, self.n, 1)
    }

    /// The address host `i` has (or will have).
    pub fn address(&self, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, LAB_OCTET, self.n, i.saturating_add(1))
    }

    /// Every host made so far.
    pub fn hosts(&self) -> &[NetnsHost] {
        &self.hosts
    }

    /// Creates host `i` (1..=253): its namespace, joined to the bridge, at 10.213.N.(i+1).
    pub fn add_host(&mut self, i: u8) -> Result<NetnsHost> {
        if !(1..=253).contains(&i) {
            bail!("host number {i} is not in 1..=253 (.1 is the bridge)");
        }
        let host = NetnsHost {
            name: format!("pf{}h{i}", self.n),
            ip: self.address(i),
        };
        if self.hosts.iter().any(|h| h.name == host.name) {
            bail!("host {i} exists already in lab {}", self.n);
        }
        ip(&["netns", "add", &host.name])?;
        // Recorded before it is complete, so that drop removes a half-made host too.
        self.hosts.push(host.clone());
        let veth = format!("pf{}v{i}", self.n);
        let group = self.group.to_string();
        // The far end is created inside the namespace, so no temporary name can clash.
        ip(&[
            "link", "add", &veth, "group", &group, "type", "veth", "peer", "name", "eth0", "netns",
            &host.name,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge(), "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", host.name.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["link", "set", "eth0", "up"])?;
        inside(&[
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ])?;
        Ok(host)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Namespaces first (their veths go with them), the bridge last: it is the lock on N.
        for host in &self.hosts {
            delete_namespace(&host.name);
            let _ = fs::remove_dir_all(host.etc_dir());
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

impl NetnsHost {
    /// `program` to be run inside this host (see [`NetnsCommand`]).
    pub fn command(&self, program: impl Into<OsString>) -> NetnsCommand {
        NetnsCommand {
            netns: self.name.clone(),
            user: None,
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Gives this host its own `/etc/resolv.conf` (for commands started from now on:
    /// `ip netns exec` bind-mounts `/etc/netns/<ns>/*` over `/etc`).
    pub fn set_resolv_conf(&self, text: &str) -> Result<()> {
        let dir = self.etc_dir();
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join("resolv.conf");
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }

    fn etc_dir(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }
}

/// A command to run inside a host: `ip netns exec <ns> [setpriv ...] program args`.
#[derive(Debug, Clone)]
pub struct NetnsCommand {
    netns: String,
    user: Option<(u32, u32)>,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
}

impl NetnsCommand {
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn envs(mut self, env: &[(String, String)]) -> Self {
        self.env.extend_from_slice(env);
        self
    }

    /// Run as user `uid` (no supplementary groups; the group is the user's primary group from
    /// /etc/passwd, or `uid` for a user that has no entry), as a proxy or an app would run.
    pub fn as_user(mut self, uid: u32) -> Self {
        self.user = Some((uid, primary_gid(uid).unwrap_or(uid)));
        self
    }

    /// The whole command line, `ip` first.
    pub fn argv(&self) -> Vec<OsString> {
        let mut argv: Vec<OsString> = ["ip", "netns", "exec", self.netns.as_str()]
            .into_iter()
            .map(OsString::from)
            .collect();
        if let Some((uid, gid)) = self.user {
            argv.extend(
                [
                    "setpriv".to_string(),
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".to_string(),
                    "--".to_string(),
                ]
                .map(OsString::from),
            );
        }
        argv.push(self.program.clone());
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// A `std::process::Command` for this (stdin closed).
    pub fn to_command(&self) -> Command {
        let argv = self.argv();
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Run to completion; its output, whatever the exit status.
    pub fn output(&self) -> Result<Output> {
        self.to_command()
            .output()
            .with_context(|| format!("run {}", self.display()))
    }

    /// Run to completion; its stdout, or an error with its stderr when it failed.
    pub fn run(&self) -> Result<String> {
        let out = self.output()?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}{}",
                self.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Start it as a long-running [`Process`] (output to `log`; `restart` runs it again in the
    /// same namespace).
    pub fn spawn(&self, name: &str, log: PathBuf) -> Result<Process> {
        let argv: Vec<String> = self
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        Process::spawn_env(name, argv[0].as_ref(), &args, log, &self.env)
    }

    fn display(&self) -> String {
        self.argv()
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn bridge_name(n: u8) -> String {
    format!("pfb{n}")
}

/// Runs `ip ARGS`; an error with its stderr when it fails.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kills what still runs in namespace `ns` (a crashed test's processes, or an Envoy that
/// outlived its agent), then deletes it.
fn delete_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Entries of `dir` whose name is `prefix` followed by a number.
fn names_in(dir: &str, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// This process's link group: its pid and the low bits of its start time.
fn own_group() -> Result<u32> {
    let pid = std::process::id();
    let (_, start) = crate::proc_stat(pid).context("read /proc/self/stat")?;
    Ok(group_of(pid, start))
}

fn group_of(pid: u32, start: u64) -> u32 {
    let low = u32::try_from(start & 0x1ff).unwrap_or(0);
    (pid & ((1 << PID_BITS) - 1)) | (low << PID_BITS)
}

/// Removes every lab bridge whose owner no longer runs, with the owner's veths: by link group,
/// so a bridge that another test made under the same name meanwhile is not touched.
fn remove_orphans() {
    for bridge in names_in("/sys/class/net", "pfb") {
        let group = fs::read_to_string(format!("/sys/class/net/{bridge}/netdev_group"))
            .ok()
            .and_then(|g| g.trim().parse::<u32>().ok());
        let Some(group) = group.filter(|g| *g != 0) else {
            continue;
        };
        let pid = group & ((1 << PID_BITS) - 1);
        let alive = crate::proc_stat(pid).is_some_and(|(_, start)| group_of(pid, start) == group);
        if !alive {
            let _ = ip(&["link", "del", "group", &group.to_string()]);
        }
    }
}

/// The primary group of `uid` in /etc/passwd.
fn primary_gid(uid: u32) -> Option<u32> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':').skip(2);
        let (user, group) = (fields.next()?, fields.next()?);
        if user.parse::<u32>().ok()? == uid {
            group.parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_names_its_owner() {
        let g = group_of(4_194_303, u64::MAX);
        assert_eq!(g & ((1 << PID_BITS) - 1), 4_194_303);
        assert!(i32::try_from(g).is_ok(), "ip takes it: {g}");
        assert_ne!(group_of(1234, 5), group_of(1234, 6), "a reused pid differs");
        assert_ne!(group_of(1, 0), 0, "never the default group");
    }

    #[test]
    fn lab_names_fit_interface_names() {
        assert!(bridge_name(255).len() <= 15);
        assert!("pf255v253".len() <= 15);
    }
}
