//! The shipped units (`systemd/*.service`): systemd accepts them, `systemd-analyze security`
//! rates them OK, and their directories are the ones the binaries use by default.
//!
//! Needs `systemd-analyze` (Debian's `systemd` package, installed when missing); no running
//! systemd.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use pilotfish_tests::{binary, workspace_root};

/// The highest exposure accepted, in `--threshold` units (tenths: 25 = 2.5, "OK").
const MAX_EXPOSURE: &str = "25";

const UNITS: [(&str, &str); 2] = [
    ("pilotfish-agent.service", "pilotfish-agent"),
    ("pilotfish-discovery.service", "pilotfish-discovery"),
];

fn systemd_analyze() -> Result<PathBuf> {
    let found = |p: &str| Path::new(p).exists().then(|| PathBuf::from(p));
    if let Some(p) = found("/usr/bin/systemd-analyze").or_else(|| found("/bin/systemd-analyze")) {
        return Ok(p);
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "systemd"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("systemd-analyze is missing and apt-get cannot run")?;
    if !status.success() {
        bail!("systemd-analyze is missing and `apt-get install systemd` failed");
    }
    Ok(PathBuf::from("/usr/bin/systemd-analyze"))
}

fn unit_text(name: &str) -> Result<String> {
    let path = workspace_root().join("systemd").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
}

/// `Key=value` of the unit's first line setting `key`.
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn systemd_verifies_both_units() -> Result<()> {
    let analyze = systemd_analyze()?;
    let dir = tempfile::tempdir()?;
    for (unit, bin) in UNITS {
        // verify insists that ExecStart= names an executable: point the copy at the one just
        // built (the package installs it at /usr/bin).
        let text = unit_text(unit)?;
        let shipped = format!("/usr/bin/{bin}");
        assert!(text.contains(&format!("ExecStart={shipped} ")), "{unit}");
        let copy = dir.path().join(unit);
        std::fs::write(
            &copy,
            text.replace(&shipped, &binary(bin)?.display().to_string()),
        )?;
        let out = Command::new(&analyze).arg("verify").arg(&copy).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Unknown keys or bad values are only warnings for systemd: any line fails the test.
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }
    Ok(())
}

/// The interception drop-in: systemd accepts the unit with it, and it grants exactly the two
/// capabilities interception and mesh DNS need.
#[test]
fn the_interception_drop_in_verifies_and_adds_only_its_capabilities() -> Result<()> {
    let analyze = systemd_analyze()?;
    let dir = tempfile::tempdir()?;
    let unit = "pilotfish-agent.service";
    let shipped = "/usr/bin/pilotfish-agent";
    let copy = dir.path().join(unit);
    std::fs::write(
        &copy,
        unit_text(unit)?.replace(shipped, &binary("pilotfish-agent")?.display().to_string()),
    )?;
    let drop_in = dir.path().join(format!("{unit}.d"));
    std::fs::create_dir_all(&drop_in)?;
    let text = unit_text("interception.conf")?;
    std::fs::write(drop_in.join("interception.conf"), &text)?;
    let out = Command::new(&analyze).arg("verify").arg(&copy).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {unit} + interception.conf: {}\n{stderr}",
        out.status
    );
    let caps = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE";
    assert_eq!(setting(&text, "CapabilityBoundingSet"), Some(caps));
    assert_eq!(setting(&text, "AmbientCapabilities"), Some(caps));
    assert!(setting(&text, "RestrictAddressFamilies").is_some_and(|f| f.contains("AF_NETLINK")));
    Ok(())
}

#[test]
fn both_units_are_rated_ok_by_systemd_analyze_security() -> Result<()> {
    let analyze = systemd_analyze()?;
    for (unit, _) in UNITS {
        let path = workspace_root().join("systemd").join(unit);
        let out = Command::new(&analyze)
            .args([
                "security",
                "--offline=true",
                &format!("--threshold={MAX_EXPOSURE}"),
            ])
            .arg(&path)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let overall = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .with_context(|| format!("{unit}: no overall exposure in:\n{stdout}"))?;
        println!("{overall}");
        assert!(
            out.status.success(),
            "{unit} is rated above 2.5:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(overall.contains(" OK"), "{overall}");
    }
    Ok(())
}

#[test]
fn the_units_directories_are_the_binaries_defaults() -> Result<()> {
    let agent = unit_text("pilotfish-agent.service")?;
    assert_eq!(
        Path::new("/var/lib").join(setting(&agent, "StateDirectory").unwrap_or_default()),
        Path::new(pilotfish_agent::config::DEFAULT_STATE_DIR)
    );
    assert_eq!(
        Path::new("/run").join(setting(&agent, "RuntimeDirectory").unwrap_or_default()),
        Path::new(pilotfish_agent::config::DEFAULT_RUN_DIR)
    );
    let discovery = unit_text("pilotfish-discovery.service")?;
    assert_eq!(
        Path::new("/var/lib").join(setting(&discovery, "StateDirectory").unwrap_or_default()),
        Path::new(pilotfish_discovery::config::DEFAULT_STATE_DIR)
    );
    for text in [&agent, &discovery] {
        assert_eq!(setting(text, "StateDirectoryMode"), Some("0700"));
        assert_eq!(setting(text, "ConfigurationDirectory"), Some("pilotfish"));
    }
    Ok(())
}
