//! `tentacle-sim fleet`: runs N virtual tentacles against a hub until
//! Ctrl-C or a time limit, printing how many are connected.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tentacle_hub::home::HubHome;
use tentacle_proto::Thumbprint;
use tentacle_proto::dial::ListeningAddress;
use tentacle_sim::fleet::{self, Fleet, FleetSettings};

#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// How many virtual tentacles.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// The hub they poll and register with. Repeat it, or separate
    /// addresses with commas, for the nodes of a hub cluster: every agent
    /// gets them all as servers pinned to the one thumbprint, holds its
    /// tunnel on one node (spread by the agent's own hash of its id) and
    /// fails over to the next; registrations spread over the nodes.
    #[arg(long, value_delimiter = ',', default_values_t = [tentacle_hub::args::default_hub()])]
    hub: Vec<ListeningAddress>,
    /// The hub's certificate thumbprint (one for all nodes of a cluster);
    /// by default the thumbprint of this home's certificate.
    #[arg(long)]
    hub_thumbprint: Option<Thumbprint>,
    /// An API key of the hub (`tentacle-hub server api-key create`).
    #[arg(long)]
    api_key: String,
    /// Agents are named PREFIX-0, PREFIX-1, …
    #[arg(long, default_value = "virtual")]
    name_prefix: String,
    /// A role for every agent (repeatable).
    #[arg(long = "role", default_value = "sim")]
    roles: Vec<String>,
    /// Seed for the simulated scripts; printed so a run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this long (runs until Ctrl-C otherwise).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Where the agents keep their workspaces (a temporary directory by default).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How many of the agents listen (each on its own loopback port)
    /// instead of polling.
    #[arg(long, default_value_t = 0)]
    listening: usize,
    /// Polling agents dial a loopback hub from 127.0.0.1 ..= 127.0.0.N, so
    /// that thousands of connections do not exhaust one address's ephemeral
    /// ports. Ignored for a hub that is not on loopback.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..))]
    source_addresses: u8,
    /// Spread the agents' starts evenly over this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    ramp: Duration,
}

pub async fn run(home: &HubHome, args: FleetArgs) -> anyhow::Result<ExitCode> {
    let limit = fleet::raise_open_file_limit().context("raising the open-file limit")?;
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("open-file limit {limit}; seed {seed} (replay with --seed {seed})");
    let hub_thumbprint = match args.hub_thumbprint {
        Some(thumbprint) => thumbprint,
        None => home.identity()?.thumbprint(),
    };
    let temp = tempfile::tempdir()?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let started = Instant::now();
    let mut settings = FleetSettings::new(
        args.agents,
        args.hub
            .first()
            .cloned()
            .unwrap_or_else(tentacle_hub::args::default_hub),
        hub_thumbprint,
        args.api_key.clone(),
        work_dir,
    );
    settings.hubs = args.hub.clone();
    settings.name_prefix = args.name_prefix.clone();
    settings.roles = args.roles.clone();
    settings.seed = seed;
    settings.listening = args.listening.min(args.agents);
    settings.source_addresses = args.source_addresses;
    settings.ramp = args.ramp;
    let fleet = Fleet::start(settings).await?;
    let listening = fleet.agents.iter().filter(|a| a.port.is_some()).count();
    eprintln!(
        "{} virtual tentacles registered in {:.1?} ({} polling from {} source address(es), {listening} listening)",
        fleet.agents.len(),
        started.elapsed(),
        fleet.agents.len() - listening,
        args.source_addresses,
    );
    let until = async {
        match args.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = until => {}
        _ = tokio::signal::ctrl_c() => eprintln!("stopping the fleet"),
    }
    fleet.stop();
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        fleet: FleetArgs,
    }

    fn hubs(args: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(["fleet", "--api-key", "k"].iter().chain(args).copied())
            .expect("arguments parse");
        cli.fleet.hub.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn hub_takes_one_address_several_or_a_list() {
        assert_eq!(
            hubs(&[]),
            vec![tentacle_hub::args::default_hub().to_string()]
        );
        assert_eq!(hubs(&["--hub", "https://a:1"]), vec!["https://a:1"]);
        let both = vec!["https://a:1", "https://b:2"];
        assert_eq!(
            hubs(&["--hub", "https://a:1", "--hub", "https://b:2"]),
            both
        );
        assert_eq!(hubs(&["--hub", "https://a:1,https://b:2"]), both);
        assert!(Cli::try_parse_from(["fleet", "--api-key", "k", "--hub", "not a url"]).is_err());
    }
}
