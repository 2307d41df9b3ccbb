//! The Debian packages (`scripts/package.sh`): lintian finds no error in them, and installed
//! the way `apt install ./x.deb` installs them, into a throwaway copy of this machine's root,
//! they put every file in place with the right owner and mode, create the pilotfish user and
//! the state directories, enable the units, ship configs that `--check` accepts, and
//! `dpkg --purge` takes it all away again (except the user, as Debian policy wants).
//!
//! It packages the binaries of the test run's own profile (`cargo test` builds debug ones;
//! `scripts/package.sh` alone builds release ones), so it adds about half a minute to the suite
//! (mostly lintian). Needs root and Debian's tools: it installs `lintian` with apt-get when
//! missing. The
//! throwaway root: a private mount namespace (`unshare --mount`) with an overlay whose lower
//! layer is `/` and whose upper layer is a tmpfs, chrooted into; whatever the maintainer
//! scripts write goes to the tmpfs and vanishes with the namespace.
//!
//! Run it alone: `cargo test -p pilotfish-tests --test packages -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pilotfish_tests::{envoy_binary, target_dir, workspace_root};

fn ensure_tool(command: &str, package: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()?
        .status
        .success();
    if found {
        return Ok(());
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("{command} is missing and apt-get cannot run"))?;
    if !status.success() {
        bail!("{command} is missing and `apt-get install {package}` failed");
    }
    Ok(())
}

/// Runs `scripts/package.sh` with this test run's target directory and profile (so the binaries
/// are the ones the rest of the suite tested, already built: `cargo test --release` packages
/// release binaries); the two .deb paths.
fn build_packages() -> Result<(PathBuf, PathBuf)> {
    let bins = target_dir();
    let target = bins.parent().map(Path::to_path_buf).context("target dir")?;
    let profile = if bins.ends_with("debug") {
        "dev"
    } else {
        "release"
    };
    let started = Instant::now();
    let mut command = Command::new(workspace_root().join("scripts/package.sh"));
    command
        .args(["--profile", profile])
        .env("CARGO_TARGET_DIR", &target);
    // What `cargo test` sets for its test binaries would differ from a plain `cargo build` and
    // make build scripts (ring's, through cc) rebuild everything, twice.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR")
            || key == "CARGO"
            || key == "LD_LIBRARY_PATH"
            || key.starts_with("RUSTC")
        {
            command.env_remove(key.as_ref());
        }
    }
    let out = command.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("scripts/package.sh failed: {}\n{stderr}", out.status);
    }
    println!("scripts/package.sh took {:?}", started.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = |pkg: &str| {
        stdout
            .lines()
            .find(|l| {
                Path::new(l)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
            })
            .map(PathBuf::from)
            .with_context(|| format!("package.sh printed no {pkg} package: {stdout}"))
    };
    let (agent, discovery) = (deb("pilotfish-agent")?, deb("pilotfish-discovery")?);
    for d in [&agent, &discovery] {
        assert!(
            d.to_string_lossy().ends_with(&format!(
                "_{}_{}.deb",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::ARCH.replace("x86_64", "amd64")
            )),
            "{}",
            d.display()
        );
    }
    Ok((agent, discovery))
}

/// What the script run in the throwaway root prints: `key value` lines.
const IN_ROOT: &str = r#"
set -u
report() { printf '%s %s\n' "$1" "$2"; }
mode() { stat -c '%U:%G %a' "$1" 2>/dev/null || echo missing; }
export DEBIAN_FRONTEND=noninteractive
# As `apt install ./x.deb` does: dependencies from the system, maintainer scripts run.
apt-get install -y -q --no-install-recommends "$AGENT_DEB" "$DISCOVERY_DEB" >/tmp/apt.log 2>&1
report install $?
report user "$(getent passwd pilotfish | cut -d: -f1,6,7)"
report group "$(getent group pilotfish | cut -d: -f1)"
for p in /usr/bin/pilotfish-agent /usr/bin/pilotfish-discovery /usr/bin/pilotfish-ctl \
         /lib/systemd/system/pilotfish-agent.service /lib/systemd/system/pilotfish-discovery.service \
         /etc/pilotfish /etc/pilotfish/agent.toml /etc/pilotfish/discovery.toml /etc/pilotfish/registry.d \
         /var/lib/pilotfish /var/lib/pilotfish/agent /var/lib/pilotfish/discovery; do
  report "mode:$p" "$(mode "$p")"
done
report conffiles "$(dpkg-query -W -f='${Conffiles}\n' pilotfish-agent pilotfish-discovery | awk 'NF {print $1}' | sort | tr '\n' ' ')"
for u in pilotfish-agent pilotfish-discovery; do
  report "enabled:$u" "$(readlink /etc/systemd/system/multi-user.target.wants/$u.service || echo no)"
done
# The operator's first steps: discovery's CA and a join token, as the pilotfish user.
runuser -u pilotfish -- pilotfish-discovery --check --config /etc/pilotfish/discovery.toml >/tmp/check-d.log 2>&1
report check-discovery $?
runuser -u pilotfish -- pilotfish-discovery --config /etc/pilotfish/discovery.toml ca bundle >/etc/pilotfish/root.pem 2>/tmp/ca.log
report ca-bundle $?
runuser -u pilotfish -- pilotfish-discovery --config /etc/pilotfish/discovery.toml token create --node vm-b >/etc/pilotfish/token 2>/tmp/token.log
report token $?
chown pilotfish:pilotfish /etc/pilotfish/token && chmod 0600 /etc/pilotfish/token
report "mode:/var/lib/pilotfish/discovery/ca" "$(mode /var/lib/pilotfish/discovery/ca)"
# The shipped agent.toml names `envoy`, found on PATH.
runuser -u pilotfish -- env PATH="$ENVOY_DIR:$PATH" pilotfish-agent --check --config /etc/pilotfish/agent.toml >/tmp/check-a.log 2>&1
report check-agent $?
report check-agent-says "$(tr '\n' ' ' </tmp/check-a.log)"
dpkg --purge pilotfish-agent pilotfish-discovery >/tmp/purge.log 2>&1
report purge $?
for p in /usr/bin/pilotfish-agent /usr/bin/pilotfish-ctl /lib/systemd/system/pilotfish-agent.service \
         /etc/pilotfish /var/lib/pilotfish /etc/systemd/system/multi-user.target.wants/pilotfish-agent.service \
         /var/lib/systemd/deb-systemd-helper-enabled/pilotfish-agent.service.dsh-also; do
  if [ -e "$p" ] || [ -L "$p" ]; then report "left:$p" yes; else report "left:$p" no; fi
done
report user-after-purge "$(getent passwd pilotfish | cut -d: -f1)"
for f in /tmp/apt.log /tmp/check-d.log /tmp/purge.log; do sed "s|^|log:$f |" "$f"; done
"#;

/// Runs IN_ROOT in a throwaway root (see the module comment); its report as a map.
fn install_in_throwaway_root(
    agent: &Path,
    discovery: &Path,
) -> Result<(BTreeMap<String, String>, String)> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let script = dir.join("in-root.sh");
    std::fs::write(&script, IN_ROOT)?;
    let envoy = envoy_binary()?;
    let envoy_dir = envoy.parent().context("envoy dir")?;
    // Everything written lands in a tmpfs: never on this machine's disk, gone at exit.
    let outer = format!(
        r#"set -e
d={dir}
mkdir -p "$d/rw" "$d/root"
mount -t tmpfs tmpfs "$d/rw"
mkdir -p "$d/rw/upper" "$d/rw/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$d/rw/upper,workdir=$d/rw/work" "$d/root"
mount -t proc proc "$d/root/proc"
mount --rbind /dev "$d/root/dev"
mount -t tmpfs tmpfs "$d/root/tmp"
mount -t tmpfs tmpfs "$d/root/run"
cp {script} {agent} {discovery} "$d/root/tmp/"
exec chroot "$d/root" env AGENT_DEB=/tmp/{agent_name} DISCOVERY_DEB=/tmp/{discovery_name} \
  ENVOY_DIR={envoy_dir} PATH=/usr/sbin:/usr/bin:/sbin:/bin sh /tmp/in-root.sh
"#,
        dir = dir.display(),
        script = script.display(),
        agent = agent.display(),
        discovery = discovery.display(),
        agent_name = agent.file_name().context("name")?.to_string_lossy(),
        discovery_name = discovery.file_name().context("name")?.to_string_lossy(),
        envoy_dir = envoy_dir.display(),
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--fork",
            "sh",
            "-c",
            &outer,
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "the throwaway root failed ({}): {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = stdout
        .lines()
        .filter(|l| !l.starts_with("log:"))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok((report, stdout))
}

#[test]
fn packages_install_check_and_purge_cleanly() -> Result<()> {
    ensure_tool("dpkg-deb", "dpkg")?;
    ensure_tool("lintian", "lintian")?;
    let (agent, discovery) = build_packages()?;

    for deb in [&agent, &discovery] {
        let started = Instant::now();
        let out = Command::new("lintian")
            .args(["--fail-on", "error", "--tag-display-limit", "0"])
            .arg(deb)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!(
            "lintian {} ({:?}):\n{text}",
            deb.display(),
            started.elapsed()
        );
        assert!(
            out.status.success(),
            "lintian reports errors in {}:\n{text}{}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.lines().any(|l| l.starts_with("E: ")), "{text}");
    }

    let started = Instant::now();
    let (r, raw) = install_in_throwaway_root(&agent, &discovery)?;
    println!("install, check, purge: {:?}", started.elapsed());
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("(not reported)");
    let check = |k: &str, want: &str| {
        assert_eq!(get(k), want, "{k}; the whole report:\n{raw}");
    };
    check("install", "0");
    check("user", "pilotfish:/var/lib/pilotfish:/usr/sbin/nologin");
    check("group", "pilotfish");
    for bin in ["pilotfish-agent", "pilotfish-discovery", "pilotfish-ctl"] {
        check(&format!("mode:/usr/bin/{bin}"), "root:root 755");
    }
    for unit in ["pilotfish-agent", "pilotfish-discovery"] {
        check(
            &format!("mode:/lib/systemd/system/{unit}.service"),
            "root:root 644",
        );
        check(
            &format!("enabled:{unit}"),
            &format!("/lib/systemd/system/{unit}.service"),
        );
    }
    check("mode:/etc/pilotfish", "root:root 755");
    check("mode:/etc/pilotfish/agent.toml", "root:root 644");
    check("mode:/etc/pilotfish/discovery.toml", "root:root 644");
    check("mode:/etc/pilotfish/registry.d", "root:root 755");
    check(
        "conffiles",
        "/etc/pilotfish/agent.toml /etc/pilotfish/discovery.toml ",
    );
    check("mode:/var/lib/pilotfish", "root:root 755");
    check("mode:/var/lib/pilotfish/agent", "pilotfish:pilotfish 700");
    check(
        "mode:/var/lib/pilotfish/discovery",
        "pilotfish:pilotfish 700",
    );

    check("check-discovery", "0");
    check("ca-bundle", "0");
    check("token", "0");
    check(
        "mode:/var/lib/pilotfish/discovery/ca",
        "pilotfish:pilotfish 700",
    );
    check("check-agent", "0");
    assert!(
        get("check-agent-says").contains("/etc/pilotfish/agent.toml: ok"),
        "{raw}"
    );

    check("purge", "0");
    for left in [
        "/usr/bin/pilotfish-agent",
        "/usr/bin/pilotfish-ctl",
        "/lib/systemd/system/pilotfish-agent.service",
        "/etc/pilotfish",
        "/var/lib/pilotfish",
        "/etc/systemd/system/multi-user.target.wants/pilotfish-agent.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/pilotfish-agent.service.dsh-also",
    ] {
        check(&format!("left:{left}"), "no");
    }
    check("user-after-purge", "pilotfish");
    Ok(())
}
