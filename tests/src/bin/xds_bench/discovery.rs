//! The discovery process under test: started fresh for each run (insecure for the push runs,
//! with its own CA for the storm), and read from the outside only: `/status` for snapshot
//! times, `/proc/<pid>` for memory and CPU.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use pilotfish_tests::{binary, free_port, http_get, Process};

use crate::registry::REGISTRY_DIR;

pub const TRUST_DOMAIN: &str = "pilotfish.local";
/// Discovery's state directory, under the work directory; its CA is in `state/ca/`.
pub const STATE_DIR: &str = "state";

pub struct Discovery {
    process: Process,
    /// Discovery itself, also when it runs under `PILOTFISH_BENCH_WRAP`.
    pub pid: u32,
    wrapped: bool,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// The latest mesh snapshot as `/status` reports it.
#[derive(Debug, Clone)]
pub struct SnapshotStatus {
    pub generation: u64,
    pub kind: String,
    pub learned_unix_ms: f64,
    pub built_unix_ms: f64,
}

impl Discovery {
    /// Starts discovery on the registry in `dir/registry.d` and waits for its first snapshot.
    /// `secure`: TLS with its own CA in `dir/state/ca` (the storm); otherwise `insecure = true`.
    pub async fn start(dir: &Path, secure: bool) -> Result<Discovery> {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let grpc = SocketAddr::new(ip, free_port(ip));
        let http = SocketAddr::new(ip, free_port(ip));
        let config = dir.join("discovery.toml");
        let insecure = if secure { "" } else { "insecure = true\n" };
        std::fs::write(
            &config,
            format!(
                "{insecure}trust_domain = \"{TRUST_DOMAIN}\"\nstate_dir = \"{STATE_DIR}\"\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\n[registry.files]\npaths = [\"{REGISTRY_DIR}\"]\n"
            ),
        )?;
        // PILOTFISH_BENCH_WRAP=heaptrack (or `perf record -g --`) runs discovery under a
        // profiler.
        let program = binary("pilotfish-discovery")?;
        let wrap = std::env::var("PILOTFISH_BENCH_WRAP").unwrap_or_default();
        let mut words: Vec<String> = wrap.split_whitespace().map(str::to_string).collect();
        words.extend([
            program.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ]);
        let argv: Vec<&str> = words.iter().skip(1).map(String::as_str).collect();
        let process = Process::spawn(
            "discovery",
            Path::new(&words[0]),
            &argv,
            dir.join("discovery.log"),
        )?;
        let mut pid = process.pid().context("discovery pid")?;
        let mut discovery = Discovery {
            process,
            pid,
            wrapped: !wrap.is_empty(),
            grpc,
            http,
        };
        pilotfish_tests::wait_for("discovery serving", Duration::from_secs(60), || async {
            Ok(discovery
                .status()
                .await
                .ok()
                .filter(|s| s.generation > 0)
                .map(|_| ()))
        })
        .await?;
        if discovery.wrapped {
            // The wrapper's child is discovery.
            pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .ok()
                .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
                .unwrap_or(pid);
            discovery.pid = pid;
        }
        Ok(discovery)
    }

    pub fn log(&self) -> &Path {
        &self.process.log
    }

    pub async fn status(&self) -> Result<SnapshotStatus> {
        let http = self.http;
        let r = pilotfish_tests::blocking(move || http_get(http, "discovery", "/status")).await?;
        let v: serde_json::Value = serde_json::from_str(&r.body).context("/status is not JSON")?;
        let s = &v["snapshot"];
        Ok(SnapshotStatus {
            generation: s["generation"].as_u64().unwrap_or(0),
            kind: s["kind"].as_str().unwrap_or("?").to_string(),
            learned_unix_ms: s["learned_unix_ms"].as_f64().unwrap_or(f64::NAN),
            built_unix_ms: s["built_unix_ms"].as_f64().unwrap_or(f64::NAN),
        })
    }

    pub fn memory(&self) -> Mem {
        memory(self.pid)
    }

    /// Resets VmHWM to the current RSS (Linux's `clear_refs` 5; needs the same user or root),
    /// so the next reading is the peak of the phase that follows. False if the kernel refused:
    /// the peak then counts from the start of the process.
    pub fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").is_ok()
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = text.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |n: usize| f.get(n).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
        let hz = 100.0; // USER_HZ on Linux
        (ticks(11) + ticks(12)) as f64 / hz
    }

    pub fn stop(mut self) {
        if self.wrapped {
            // The wrapper does not pass SIGTERM on: stop discovery itself first.
            let _ = std::process::Command::new("kill")
                .arg(self.pid.to_string())
                .status();
        }
        self.process.terminate(Duration::from_secs(5));
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Mem {
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Private memory (heap, stacks): RSS without the mapped binary and shared libraries.
    pub anon_kb: u64,
}

pub fn memory(pid: u32) -> Mem {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Mem {
        rss_kb: field("VmRSS:"),
        hwm_kb: field("VmHWM:"),
        anon_kb: field("RssAnon:"),
    }
}

pub fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The work directory of one run.
pub fn work_dir(label: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("pilotfish-xds-bench-{label}-"))
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    Ok((tmp, dir))
}
