//! More than one discovery: a root kept apart, an intermediate per replica, and another
//! discovery process beside a [`Mesh`]'s own, on its own intermediate ([`Replica::start`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

pub use crate::mesh::Replica;
use crate::mesh::{wait_port, Mesh};
use crate::{binary, free_port, Process};

/// Runs `pilotfish-discovery --config CONFIG ARGS...`; its stderr (what it tells people).
pub fn discovery_cmd(config: &Path, args: &[&str]) -> Result<String> {
    Ok(String::from_utf8_lossy(&crate::discovery_run(config, args)?.stderr).to_string())
}

/// A keeper's discovery config with a root of its own (`ca bundle` makes it on first use);
/// returns the config and the root's PEM.
pub fn root_keeper(dir: &Path) -> Result<(PathBuf, String)> {
    let config = dir.join("discovery.toml");
    std::fs::write(
        &config,
        "trust_domain = \"pilotfish.local\"\nstate_dir = \"state\"\n[registry.files]\npaths = [\"r\"]\n",
    )?;
    let root = crate::discovery_run(&config, &["ca", "bundle"])?.stdout;
    Ok((config, String::from_utf8(root)?))
}

/// Runs `ca intermediate` for a replica in `dir` and `ca sign-intermediate` at the keeper;
/// the replica's `[ca] cert_file` and `key_file`.
pub fn intermediate_for(keeper_config: &Path, dir: &Path, name: &str) -> Result<(String, String)> {
    let int_dir = dir.join("int");
    let int = int_dir.display().to_string();
    let next = discovery_cmd(
        keeper_config,
        &["ca", "intermediate", "--out", &int, "--name", name],
    )?;
    assert!(next.contains("sign-intermediate"), "{next}");
    let csr = int_dir.join("intermediate.csr").display().to_string();
    let cert = int_dir.join("intermediate.pem").display().to_string();
    discovery_cmd(
        keeper_config,
        &[
            "ca",
            "sign-intermediate",
            &csr,
            "--out",
            &cert,
            "--ttl",
            "30d",
        ],
    )?;
    Ok((cert, int_dir.join("intermediate.key").display().to_string()))
}

impl Replica {
    /// Starts replica `name` beside `mesh` with the mesh's config (so the same registry, trust domain and
    /// `[store.consul]`), its own ports on the mesh's discovery address, its own
    /// `state_dir = "state-<name>"`, and each `(from, to)` of `replace` applied to the text
    /// (its own intermediate's files, say). Returns once its gRPC port accepts connections.
    pub fn start(mesh: &Mesh, name: &str, replace: &[(&str, &str)]) -> Result<Replica> {
        let ip = mesh.grpc.ip();
        let grpc = SocketAddr::new(ip, free_port(ip));
        let http = SocketAddr::new(ip, free_port(ip));
        let config = mesh.path(&format!("discovery-{name}.toml"));
        let mut text = std::fs::read_to_string(&mesh.config)?
            .replace(&mesh.grpc.to_string(), &grpc.to_string())
            .replace(&mesh.http.to_string(), &http.to_string())
            .replace(
                "state_dir = \"state\"",
                &format!("state_dir = \"state-{name}\""),
            );
        for (from, to) in replace {
            text = text.replace(from, to);
        }
        std::fs::write(&config, text)?;
        let log = mesh.path(&format!("discovery-{name}.log"));
        let process = Process::spawn_env(
            &format!("discovery-{name}"),
            &binary("pilotfish-discovery")?,
            &["--config", &config.display().to_string()],
            log.clone(),
            &[],
        )?;
        wait_port(grpc, Duration::from_secs(30))?;
        Ok(Replica {
            process,
            grpc,
            http,
            config,
            log,
        })
    }
}
