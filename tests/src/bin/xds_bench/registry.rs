//! The bench's registry: one TOML file per service (rewritten for an endpoint change) and one
//! policy file naming every service (rewritten for a global change).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;

/// The directory under the work directory that discovery watches.
pub const REGISTRY_DIR: &str = "registry.d";
/// The file a global change rewrites.
pub const POLICIES_FILE: &str = "policies.toml";

/// The load balancers a global change alternates between. Neither is the default
/// (round_robin), so the first change changes every cluster too.
pub const LB_ALTERNATES: [(&str, LbPolicy); 2] = [
    ("least_request", LbPolicy::LeastRequest),
    ("random", LbPolicy::Random),
];

pub fn service_name(j: usize) -> String {
    format!("svc-{j:05}")
}

pub fn cluster_name(j: usize) -> String {
    format!("outbound|{}", service_name(j))
}

/// Service `j`; instance `k` at 10.a.b.(k+1), not on a mesh node (so its port is its EDS
/// port). `port0` overrides instance 0's port.
pub fn service_toml(j: usize, instances: usize, port0: u16) -> String {
    let name = service_name(j);
    let mut s = format!("[services.{name}]\nprotocol = \"http\"\nport = 8080\n");
    for k in 0..instances {
        let port = if k == 0 { port0 } else { 8080 };
        let _ = write!(
            s,
            "\n[[services.{name}.instances]]\naddress = \"10.{}.{}.{}\"\nport = {port}\n",
            j / 256,
            j % 256,
            k + 1
        );
    }
    s
}

/// `[policies.<service>] load_balancer = "<lb>"` for every service: one write that changes
/// the Cluster of every service, which every (full-visibility) proxy holds.
pub fn policies_toml(services: usize, lb: &str) -> String {
    let mut s = String::with_capacity(services * 48);
    for j in 0..services {
        let _ = writeln!(
            s,
            "[policies.{}]\nload_balancer = \"{lb}\"\n",
            service_name(j)
        );
    }
    s
}

/// Writes `registry.d/<name>` by rename, so discovery never reads half a file.
pub fn write_atomically(dir: &Path, name: &str, content: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, dir.join(REGISTRY_DIR).join(name))?;
    Ok(())
}

/// The starting registry: every service with `instances` instances, no policies.
pub fn write_registry(dir: &Path, services: usize, instances: usize) -> Result<()> {
    std::fs::create_dir_all(dir.join(REGISTRY_DIR))?;
    for j in 0..services {
        write_atomically(
            dir,
            &format!("{}.toml", service_name(j)),
            &service_toml(j, instances, 8080),
        )?;
    }
    Ok(())
}
