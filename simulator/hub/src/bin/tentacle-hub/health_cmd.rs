//! `tentacle-hub health`: checks every agent, a bounded number at a time.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tentacle_hub::home::HubHome;

use crate::operator::{Member, fleet};
use tentacle_hub::args::{HubArgs, HubEndpointArgs};

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Only agents with this role.
    #[arg(long, default_value = "")]
    role: String,
    /// Only agents in this environment.
    #[arg(long, default_value = "")]
    environment: String,
    /// Agents checked at once.
    #[arg(long, default_value_t = 10)]
    parallelism: usize,
    /// An agent that has not answered by then is unreachable.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubEndpointArgs,
}

/// One agent's health, as printed.
#[derive(Debug, Serialize)]
struct Report {
    name: String,
    target: String,
    reachable: bool,
    rtt_ms: Option<f64>,
    agent_version: Option<String>,
    os: Option<String>,
    arch: Option<String>,
    free_disk_bytes: Option<u64>,
    /// `None` when the hub has no tooling bundle.
    tooling_current: Option<bool>,
    error: Option<String>,
}

async fn check(member: Member, tooling: Option<String>, timeout: Duration) -> Report {
    let mut report = Report {
        name: member.name.clone(),
        target: member.target.clone(),
        reachable: false,
        rtt_ms: None,
        agent_version: None,
        os: None,
        arch: None,
        free_disk_bytes: None,
        tooling_current: None,
        error: None,
    };
    let probe = async {
        let started = Instant::now();
        let capabilities = member.client.capabilities().await?;
        let rtt = started.elapsed();
        let health = member.client.health().await?;
        let tooling_current = match &tooling {
            Some(sha) => Some(member.client.package_status(sha).await?.present),
            None => None,
        };
        Ok::<_, tentacle_hub::client::ClientError>((capabilities, rtt, health, tooling_current))
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok((capabilities, rtt, health, tooling_current))) => {
            report.reachable = true;
            report.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
            report.agent_version = Some(capabilities.agent_version);
            report.os = Some(capabilities.os);
            report.arch = Some(capabilities.arch);
            report.free_disk_bytes = Some(health.free_disk_bytes);
            report.tooling_current = tooling_current;
        }
        Ok(Err(error)) => report.error = Some(error.to_string()),
        Err(_) => {
            report.error = Some(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            ))
        }
    }
    report
}

pub async fn run(home: &HubHome, args: HealthArgs) -> anyhow::Result<ExitCode> {
    let hub = HubArgs {
        endpoint: args.hub.clone(),
        // A stopped polling agent should count as unreachable, not be waited for.
        pickup_timeout: Some(args.timeout),
    };
    let members = fleet(home, &hub, &args.role, &args.environment).await?;
    let tooling = match home.tooling_bundle() {
        Some(bundle) => Some(tentacle_hub::client::hash_file(&bundle).await?.1),
        None => None,
    };
    let mut reports: Vec<Report> = futures::stream::iter(members)
        .map(|member| check(member, tooling.clone(), args.timeout))
        .buffer_unordered(args.parallelism.max(1))
        .collect()
        .await;
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print_table(&reports);
    }
    Ok(if reports.iter().all(|r| r.reachable) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_table(reports: &[Report]) {
    let width = reports
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!(
        "{:<width$}  {:<11}  {:>8}  {:<8}  {:<12}  {:>9}  {:<7}  target",
        "name", "reachable", "rtt", "version", "platform", "free disk", "tooling"
    );
    for r in reports {
        let free = r
            .free_disk_bytes
            .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_else(|| "-".into());
        let tooling = match r.tooling_current {
            Some(true) => "current",
            Some(false) => "missing",
            None => "-",
        };
        let platform = match (&r.os, &r.arch) {
            (Some(os), Some(arch)) => format!("{os}/{arch}"),
            _ => "-".into(),
        };
        println!(
            "{:<width$}  {:<11}  {:>8}  {:<8}  {:<12}  {:>9}  {:<7}  {}{}",
            r.name,
            if r.reachable { "yes" } else { "NO" },
            r.rtt_ms
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".into()),
            r.agent_version.as_deref().unwrap_or("-"),
            platform,
            free,
            tooling,
            r.target,
            r.error
                .as_ref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default(),
        );
    }
    let unreachable = reports.iter().filter(|r| !r.reachable).count();
    println!(
        "{} reachable, {unreachable} unreachable",
        reports.len() - unreachable
    );
}
