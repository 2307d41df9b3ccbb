//! Every example config is loaded by the real binaries, and the demo runs end to end.

use std::process::Command;

use anyhow::{Context, Result};
use pilotfish_tests::{binary, envoy_binary, workspace_root};

fn path_with_envoy() -> Result<std::ffi::OsString> {
    let envoy = envoy_binary()?;
    let mut dirs = vec![envoy.parent().map(|p| p.to_path_buf()).unwrap_or_default()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    Ok(std::env::join_paths(dirs)?)
}

#[test]
fn example_discovery_config_checks_clean() -> Result<()> {
    let config = workspace_root().join("examples/demo/discovery.toml");
    let out = Command::new(binary("pilotfish-discovery")?)
        .args(["--check", "--config"])
        .arg(&config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn example_agent_configs_check_clean() -> Result<()> {
    // As an operator would: the mesh root and a join token per host exist before agents start.
    let work = tempfile::tempdir()?;
    pilotfish_tests::prepare_demo(work.path())?;
    for node in ["vm-a", "vm-b", "vm-c"] {
        let config = work.path().join(format!("agents/{node}.toml"));
        let out = Command::new(binary("pilotfish-agent")?)
            .args(["--check", "--config"])
            .arg(&config)
            .env("PATH", path_with_envoy()?)
            .output()?;
        assert!(
            out.status.success(),
            "{node}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn example_registry_validates() -> Result<()> {
    let dir = workspace_root().join("examples/demo/registry.d");
    let out = Command::new(binary("pilotfish-discovery")?)
        .arg("validate")
        .arg(&dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("reviews"),
        "validate summarises the services: {text}"
    );
    Ok(())
}

#[test]
fn a_typo_in_a_config_is_an_error_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = dir.path().join("agent.toml");
    std::fs::write(
        &agent,
        "node = \"vm-x\"\naddres = \"10.0.0.1\"\ninsecure = true\n",
    )?;
    let out = Command::new(binary("pilotfish-agent")?)
        .args(["--check", "--config"])
        .arg(&agent)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("addres"), "names the unknown key: {err}");

    let discovery = dir.path().join("discovery.toml");
    std::fs::write(&discovery, "insecure = true\ngrcp = \"127.0.0.1:1\"\n")?;
    let out = Command::new(binary("pilotfish-discovery")?)
        .args(["--check", "--config"])
        .arg(&discovery)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("grcp"), "names the unknown key: {err}");
    Ok(())
}

/// The README's first command: the demo brings the mesh up, shows the split, moves traffic
/// with a live TOML edit, and refuses a broken edit.
#[test]
fn the_demo_runs() -> Result<()> {
    let work = tempfile::tempdir()?;
    let out = Command::new(binary("pilotfish-demo")?)
        .env("PILOTFISH_DEMO_DIR", work.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("reviews-v1") && stdout.contains("reviews-v2"),
        "{stdout}"
    );
    assert!(stdout.contains("applied within"), "{stdout}");
    Ok(())
}

/// Every binary answers `--help` and `--version` with exit 0, and bad usage exits 64 for the
/// product's binaries.
#[test]
fn every_binary_answers_help_and_version() -> Result<()> {
    for name in [
        "pilotfish-agent",
        "pilotfish-discovery",
        "pilotfish-ctl",
        "pilotfish-sample-app",
        "pilotfish-demo",
        "pilotfish-xds-bench",
    ] {
        for flag in ["--help", "--version"] {
            let out = Command::new(binary(name)?).arg(flag).output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{name} {flag}: {:?}", out.status);
            assert!(!stdout.trim().is_empty(), "{name} {flag} printed nothing");
            if flag == "--version" {
                assert!(
                    stdout.contains(env!("CARGO_PKG_VERSION")),
                    "{name} --version: {stdout}"
                );
            }
        }
    }
    for name in ["pilotfish-agent", "pilotfish-discovery", "pilotfish-ctl"] {
        let out = Command::new(binary(name)?).arg("--no-such-flag").output()?;
        assert_eq!(out.status.code(), Some(64), "{name} --no-such-flag");
    }
    Ok(())
}

/// Issue 9: the unit's `ExecStartPre=--check` checks discovery.toml only, so a broken registry
/// file no longer keeps discovery from starting (it is a warning, with file:line:column);
/// `validate` still fails on it.
#[test]
fn check_warns_about_a_broken_registry_file_and_validate_fails() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = dir.path().join("registry.d");
    std::fs::create_dir(&registry)?;
    std::fs::write(registry.join("broken.toml"), "[services.web]\nport = \n")?;
    let config = dir.path().join("discovery.toml");
    std::fs::write(
        &config,
        "insecure = true\nstate_dir = \"state\"\n\n[registry.files]\npaths = [\"registry.d\"]\n",
    )?;
    let out = Command::new(binary("pilotfish-discovery")?)
        .args(["--check", "--config"])
        .arg(&config)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "--check passes: {err}");
    assert!(
        err.contains("warning: ") && err.contains("broken.toml:2:"),
        "the problem is a warning with file:line:column: {err}"
    );

    let out = Command::new(binary("pilotfish-discovery")?)
        .arg("validate")
        .arg(&registry)
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("broken.toml:2:"), "{text}");
    Ok(())
}

/// `dir/agent.toml`, parsed as the agent would (`binary = "envoy"` is looked up on a PATH that
/// has the Envoy the tests use).
fn example_agent(dir: &std::path::Path) -> Result<pilotfish_agent::config::AgentConfig> {
    let agent = dir.join("agent.toml");
    let text = std::fs::read_to_string(&agent)?;
    let envoy = envoy_binary()?;
    let path = envoy.parent().map(|p| p.as_os_str().to_owned());
    pilotfish_agent::config::parse(&agent, &text, dir, path.as_deref())
        .map_err(|p| anyhow::anyhow!("{p:?}"))
}

/// The configs the packages install as /etc/pilotfish/{agent,discovery}.toml parse as they are
/// (the package test runs `--check` on the installed copies, with a root and a token in place).
#[test]
fn production_examples_parse() -> Result<()> {
    let dir = workspace_root().join("examples/production");
    let discovery = dir.join("discovery.toml");
    let text = std::fs::read_to_string(&discovery)?;
    let config = pilotfish_discovery::config::Config::parse(&text, &discovery)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(
        config.state_dir,
        std::path::Path::new(pilotfish_discovery::config::DEFAULT_STATE_DIR)
    );

    let config = example_agent(&dir)?;
    assert_eq!(
        config.state_dir,
        std::path::Path::new(pilotfish_agent::config::DEFAULT_STATE_DIR)
    );
    assert_eq!(
        config.run_dir,
        std::path::Path::new(pilotfish_agent::config::DEFAULT_RUN_DIR)
    );
    Ok(())
}

/// The interception example: interception both ways and mesh DNS on 127.0.0.153:53 (the
/// interception e2e test runs the same tables).
#[test]
fn interception_example_parses() -> Result<()> {
    let dir = workspace_root().join("examples/interception");
    let config = example_agent(&dir)?;
    let interception = config.interception.context("[interception] is on")?;
    assert!(interception.outbound && interception.inbound);
    assert_eq!(interception.exclude_ports, [22]);
    assert_eq!(interception.listener().to_string(), "127.0.0.1:15002");
    let dns = config
        .dns
        .context("mesh DNS follows outbound interception")?;
    assert_eq!(dns.listen.to_string(), "127.0.0.153:53");
    assert_eq!(dns.domain, "mesh");
    Ok(())
}
