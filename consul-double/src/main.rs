//! `pilotfish-consul-double --listen 127.0.0.1:8500`: the Consul test double as a process.

use std::net::SocketAddr;

use clap::Parser;
use pilotfish_consul_double::{ConsulDouble, DoubleConfig};

#[derive(Parser)]
#[command(about = "A test double of the Consul HTTP API subset Pilotfish reads")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8500")]
    listen: SocketAddr,
    /// Datacenters served; the first is the agent's own. Repeatable.
    #[arg(long = "datacenter", default_value = "dc1")]
    datacenters: Vec<String>,
    /// Enables ACLs with these known tokens. Repeatable.
    #[arg(long = "token")]
    tokens: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let config = DoubleConfig {
        datacenters: args.datacenters,
        tokens: (!args.tokens.is_empty()).then(|| args.tokens.into_iter().collect()),
        ..DoubleConfig::default()
    };
    let double = ConsulDouble::start_with(args.listen, config).await?;
    tracing::info!(addr = %double.addr(), "consul double listening");
    println!("listening on {}", double.url());
    tokio::signal::ctrl_c().await?;
    double.shutdown().await;
    Ok(())
}
