//! `pilotfish-agent --config agent.toml [--check]`
//!
//! SIGTERM or SIGINT: drain Envoy, stop it, exit 0. SIGHUP (`systemctl reload`): check the
//! config with the binary now installed, then re-execute that binary in place (same pid); the
//! new image takes over the running Envoy with a hot restart (see `envoy::handover`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "Pilotfish agent: bootstraps and supervises Envoy and relays its xDS"
)]
struct Args {
    /// The agent config file.
    #[arg(long, default_value = "/etc/pilotfish/agent.toml")]
    config: PathBuf,
    /// Validate the config, list every problem, and exit (0 good, 64 bad).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // Run as the keeper between the agent and Envoy (see `envoy::keep`): no logging, no
    // runtime, just Envoy's exit code.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == pilotfish_agent::envoy::KEEPER_ARG)
    {
        let Some(program) = argv.get(2) else {
            return ExitCode::from(EXIT_BAD_CONFIG);
        };
        let code = pilotfish_agent::envoy::keep(program, &argv[3..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // While this is the only thread: mesh DNS's sockets from the image before a reload.
    pilotfish_agent::dns::handover::take();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; bad usage exits 64 like bad config.
            return if e.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing();
    let config = match pilotfish_agent::config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if args.check {
        let mut problems = pilotfish_agent::config::check_enrolment(&config, &args.config);
        problems.extend(pilotfish_agent::config::check_interception(
            &config,
            &args.config,
            std::env::var_os("PATH").as_deref(),
        ));
        if !problems.is_empty() {
            eprintln!(
                "{}",
                pilotfish_agent::config::ConfigError::Invalid { problems }
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    // One thread is plenty for relaying xDS and supervising one Envoy, and it keeps the
    // agent's memory small (no per-worker allocator arenas or queues).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    // The path this binary was started from, as it is now: a package upgrade replaces the
    // file there, and a reload executes the new one.
    let exe = std::env::current_exe().ok();
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(on_signal(shutdown.clone(), exe, args.config.clone()));
        let result = pilotfish_agent::run(config, shutdown.clone()).await;
        shutdown.cancel();
        let _ = signals.await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (systemd) or SIGINT (a terminal) starts a graceful shutdown; SIGHUP reloads.
async fn on_signal(shutdown: CancellationToken, exe: Option<PathBuf>, config: PathBuf) {
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = hup.recv() => {
                match &exe {
                    Some(exe) => reload(exe, &config).await,
                    None => error!("SIGHUP: the agent's own path is unknown; restart it instead"),
                }
                continue;
            }
            _ = shutdown.cancelled() => return,
        }
        break;
    }
    shutdown.cancel();
}

/// Checks `config` with the binary at `exe`, then executes that binary in place of this one.
/// Returns only when the reload was refused (the agent carries on as it was).
async fn reload(exe: &Path, config: &Path) {
    use std::os::unix::process::CommandExt;
    info!(binary = %exe.display(), config = %config.display(), "SIGHUP: reloading");
    let check = tokio::process::Command::new(exe)
        .arg("--check")
        .arg("--config")
        .arg(config)
        .output()
        .await;
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            error!(
                problems = %String::from_utf8_lossy(&out.stderr).trim(),
                "reload refused: the new config does not check; the agent and Envoy carry on unchanged"
            );
            return;
        }
        Err(e) => {
            error!(binary = %exe.display(), error = %e, "reload refused: cannot run the agent binary");
            return;
        }
    }
    // systemd shows the unit reloading until the new image reports READY=1 (its notify part
    // does once Envoy serves again).
    pilotfish_agent::notify::reloading();
    info!("re-executing the agent; Envoy keeps serving and is taken over by a hot restart");
    let mut command = std::process::Command::new(exe);
    command.args(std::env::args_os().skip(1));
    // Mesh DNS's sockets go to the new image, so lookups wait rather than fail meanwhile.
    if let Some(fds) = pilotfish_agent::dns::handover::prepare() {
        command.env(pilotfish_agent::dns::handover::ENV, fds);
    }
    let e = command.exec();
    pilotfish_agent::dns::handover::cancel();
    error!(binary = %exe.display(), error = %e, "cannot re-execute the agent; carrying on");
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let spec = std::env::var("PILOTFISH_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_new(&spec)
        .ok()
        .filter(|_| !spec.is_empty())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // hickory-server logs every DNS query it answers at info; the mesh DNS answers all of the
    // host's. Unless the operator asked for hickory's logs by name, only its warnings.
    if !spec.contains("hickory") {
        if let Ok(quiet) = "hickory_server=warn".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    // No colour codes unless a person is watching (journald would store them).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var("PILOTFISH_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
