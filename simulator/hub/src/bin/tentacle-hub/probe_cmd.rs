//! `tentacle-hub probe`: the container health check. Asks the hub's own
//! metrics endpoint for `/readyz` over plain HTTP on loopback; calls to the
//! hub itself stay behind mTLS.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The hub's --metrics-listen address (a wildcard one is probed on
    /// loopback).
    #[arg(
        long,
        env = tentacle_proto::probe::METRICS_LISTEN_VARIABLE,
        default_value_t = tentacle_proto::probe::DEFAULT_ADDRESS
    )]
    address: SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    tentacle_proto::probe::probe(args.address, args.timeout).await?;
    println!("ready");
    Ok(ExitCode::SUCCESS)
}
