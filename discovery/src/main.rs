//! `pilotfish-discovery`: parse flags, load the config, run discovery until SIGTERM/SIGINT
//! (SIGHUP reloads the CA), or run one operator command (`token ...`, `node ...`, `ca ...`, `validate`).
//!
//! Exit codes: 0 ok, 64 bad usage or configuration, 1 runtime failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pilotfish_discovery::admin::{self, AdminError, Output};
use pilotfish_discovery::config::Config;
use pilotfish_discovery::error_chain;
use pilotfish_registries::files::load_once;
use pilotfish_registries::model::Catalog;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Exit code for bad configuration or registry files (sysexits EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "pilotfish-discovery",
    version,
    about = "Pilotfish discovery: the mesh's xDS control plane"
)]
struct Cli {
    /// The discovery config file.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        default_value = "/etc/pilotfish/discovery.toml"
    )]
    config: PathBuf,
    /// Validate the config file, print every problem, and exit (0: good, 64: bad). Problems in
    /// registry files are printed as warnings and do not fail the check (discovery serves their
    /// last good versions); `validate DIR...` fails on them.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check registry files (every *.toml under each DIR) and print every problem.
    Validate {
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Join tokens: how a host enrols (once) to get its node certificate.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Hosts: list them, cut one off (revoke), bring it back (restore).
    #[command(subcommand)]
    Node(NodeCommand),
    /// The mesh CA: the trust bundle for hosts, root rotation, and replicas' intermediates.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// List nodes with certificates, join tokens or a revocation, and their state.
    List,
    /// Cut NODE off: discovery refuses and disconnects it, and every peer refuses its
    /// certificates, within a few seconds. Its unused join tokens are revoked.
    Revoke {
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Lift NODE's revocation; the host enrols again with a new join token.
    Restore {
        #[arg(value_name = "NODE")]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a single-use join token for NODE; prints only the token on stdout.
    Create {
        #[arg(long, value_name = "NODE")]
        node: String,
        /// How long it may be used (default 1h, at most 7d), e.g. "30m", "2h", "1d".
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// List join tokens (never their secrets).
    List,
    /// Revoke the join token with this ID.
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the trust bundle (PEM) to give agents as ca_file; creates the CA on first use.
    Bundle,
    /// List the trusted roots, their fingerprints, and which one signs.
    Roots,
    /// Rotation step 1: make the next root (trusted, not signing yet).
    #[command(alias = "prepare")]
    PrepareRotation,
    /// Rotation step 3: sign with the prepared root; the old one stays trusted.
    Switch,
    /// Rotation step 5: stop trusting the old root.
    Retire {
        /// Its SHA-256 fingerprint (hex, or at least 16 leading digits), from `ca roots`.
        #[arg(value_name = "FINGERPRINT")]
        fingerprint: String,
    },
    /// On a replica: make its signing key and a CSR for an intermediate (DIR/intermediate.key,
    /// DIR/intermediate.csr). Needs no root.
    Intermediate {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The replica's name, in the intermediate's subject (default: this host's name).
        #[arg(long, value_name = "REPLICA")]
        name: Option<String>,
    },
    /// Where the root key is: sign a replica's intermediate CSR; CERT gets the intermediate
    /// then the root, for the replica's [ca] cert_file.
    SignIntermediate {
        #[arg(value_name = "CSR")]
        csr: PathBuf,
        #[arg(long, value_name = "CERT")]
        out: PathBuf,
        /// Lifetime (default 365d), never past the root's.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// The root certificate (default: [ca] cert_file, else state_dir/ca/root.pem).
        #[arg(long, value_name = "FILE", requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The root's key (default: [ca] key_file, else state_dir/ca/root.key).
        #[arg(long, value_name = "FILE", requires = "root_cert")]
        root_key: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging();
    let command = match cli.command {
        Some(Command::Validate { dirs }) => return validate(&dirs),
        other => other,
    };
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => {
            for problem in e.problems() {
                eprintln!("{problem}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Some(command) = command {
        return run_admin(&config, command);
    }
    if cli.check {
        return check(&config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

fn init_logging() {
    let filter =
        EnvFilter::try_from_env("PILOTFISH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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

/// `token ...`, `node ...` and `ca ...`.
fn run_admin(config: &Config, command: Command) -> ExitCode {
    let result: Result<Output, AdminError> = match command {
        Command::Token(TokenCommand::Create { node, ttl }) => {
            admin::token_create(config, &node, ttl.as_deref())
        }
        Command::Token(TokenCommand::List) => admin::token_list(config),
        Command::Token(TokenCommand::Revoke { id }) => admin::token_revoke(config, &id),
        Command::Node(NodeCommand::List) => admin::node_list(config),
        Command::Node(NodeCommand::Revoke { node }) => admin::node_revoke(config, &node),
        Command::Node(NodeCommand::Restore { node }) => admin::node_restore(config, &node),
        Command::Ca(CaCommand::Bundle) => admin::ca_bundle(config),
        Command::Ca(CaCommand::Roots) => admin::ca_roots(config),
        Command::Ca(CaCommand::PrepareRotation) => admin::ca_prepare(config),
        Command::Ca(CaCommand::Switch) => admin::ca_switch(config),
        Command::Ca(CaCommand::Retire { fingerprint }) => admin::ca_retire(config, &fingerprint),
        Command::Ca(CaCommand::Intermediate { out, name }) => {
            admin::ca_intermediate(config, &out, name.as_deref())
        }
        Command::Ca(CaCommand::SignIntermediate {
            csr,
            out,
            ttl,
            root_cert,
            root_key,
        }) => admin::ca_sign_intermediate(
            config,
            &csr,
            &out,
            ttl.as_deref(),
            root_cert.as_deref().zip(root_key.as_deref()),
        ),
        Command::Validate { dirs } => return validate(&dirs),
    };
    match result {
        Ok(out) => {
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            if e.is_usage() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `validate DIR...`: problems on stdout, one per line, then warnings (`warning: ...`); a
/// summary when there are no problems.
fn validate(dirs: &[PathBuf]) -> ExitCode {
    let (catalog, problems) = load_once(dirs);
    for problem in &problems {
        println!("{problem}");
    }
    // Not errors: Consul (or a file not given here) may declare those services.
    for reference in pilotfish_registries::references::unresolved(&catalog) {
        println!("warning: {reference}");
    }
    if problems.is_empty() {
        println!("{}", summary(&catalog));
        // What would be pushed, by resource name.
        for line in pilotfish_discovery::translate::describe(&catalog) {
            println!("  {line}");
        }
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s)", problems.len());
        ExitCode::from(EXIT_BAD_CONFIG)
    }
}

/// `--check` (the unit's ExecStartPre): the config is valid, so discovery can start. Registry
/// problems are warnings: at start discovery serves the last good version of a broken file,
/// so refusing to start over one would only take the whole mesh's control plane down.
fn check(config: &Config) -> ExitCode {
    // With state_dir/rules.d: what the rules API wrote is part of the registry.
    let paths = pilotfish_discovery::rules_api::check_paths(config);
    let (catalog, problems) = load_once(&paths);
    for problem in &problems {
        eprintln!("warning: {problem}");
    }
    if !problems.is_empty() {
        eprintln!(
            "warning: {} registry problem(s); discovery serves the last good version of each \
             broken file (`validate DIR...` fails on them)",
            problems.len()
        );
    }
    println!(
        "{}: ok; registry: {}",
        config.source.display(),
        summary(&catalog)
    );
    ExitCode::SUCCESS
}

fn summary(catalog: &Catalog) -> String {
    let instances: usize = catalog.services.values().map(|s| s.instances.len()).sum();
    let names = |keys: Vec<&String>| {
        if keys.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                keys.iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    format!(
        "{} services{} with {} instances, {} routes{}, {} policies{}",
        catalog.services.len(),
        names(catalog.services.keys().collect()),
        instances,
        catalog.routes.len(),
        names(catalog.routes.keys().collect()),
        catalog.policies.len(),
        names(catalog.policies.keys().collect()),
    )
}

async fn serve(config: Config) -> ExitCode {
    let grpc = match bind("grpc", config.grpc).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let http = match bind("http", config.http).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let shutdown = CancellationToken::new();
    let run = pilotfish_discovery::run(config, grpc, http, shutdown.clone());
    tokio::pin!(run);
    let result = tokio::select! {
        result = &mut run => result,
        () = terminated() => {
            info!("signal received; shutting down");
            shutdown.cancel();
            run.await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %error_chain(&e), "discovery failed");
            ExitCode::FAILURE
        }
    }
}

async fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        error!("cannot bind the {what} listener on {addr}: {e}");
        ExitCode::FAILURE
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops discovery");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
