//! `pilotfish-agent --config agent.toml [--check]`

use std::path::PathBuf;
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
        let problems = pilotfish_agent::config::check_enrolment(&config, &args.config);
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
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(on_signal(shutdown.clone()));
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

/// SIGTERM (systemd) or SIGINT (a terminal) starts a graceful shutdown.
async fn on_signal(shutdown: CancellationToken) {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PILOTFISH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
