//! `tentacle-sim run --scenario FILE` and `tentacle-sim report merge`:
//! argument handling, the live progress display, and writing the JSON and
//! HTML reports.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tentacle_hub::home::HubHome;
use tentacle_proto::Thumbprint;
use tentacle_proto::dial::ListeningAddress;
use tentacle_sim::fleet;
use tentacle_sim::report::{Report, html};
use tentacle_sim::run::{self, CallRouting, HubChoice, Live, NodeSpec, Plant, RunSettings, Shard};
use tentacle_sim::scenario::Scenario;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The scenario (see simulator/scenarios/).
    #[arg(long)]
    scenario: PathBuf,
    /// Replays a run; overrides the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run only slice K of N of the fleet (1-based), e.g. 2/4; `job/N` in
    /// a Kubernetes Indexed Job takes K from JOB_COMPLETION_INDEX.
    #[arg(long, value_parser = Shard::parse, default_value = "1/1")]
    shard: Shard,
    /// Load-test this hub instead of starting one in this process. Repeat
    /// it, or separate addresses with commas, for the nodes of a hub
    /// cluster: every polling agent gets them all as servers pinned to the
    /// one thumbprint and holds its tunnel on one node; registrations
    /// spread over the nodes; operator calls follow --hub-calls.
    #[arg(long, value_delimiter = ',')]
    hub: Vec<ListeningAddress>,
    /// The external hub's thumbprint (one for every node); by default this
    /// home's own.
    #[arg(long, requires = "hub")]
    hub_thumbprint: Option<Thumbprint>,
    /// An API key of the external hub (`tentacle-hub server api-key create`).
    #[arg(long, requires = "hub")]
    api_key: Option<String>,
    /// The external hub's process id, for its CPU and memory charts and for
    /// `[[chaos.hub_node_kill]]`; with several --hub, one per node in the
    /// same order (repeat it or separate with commas).
    #[arg(long, requires = "hub", value_delimiter = ',')]
    hub_pid: Vec<u32>,
    /// Starts a hub node again after `[[chaos.hub_node_kill]]` killed it,
    /// run with `sh -c`: one per --hub in the same order, or one for every
    /// node with `{node}` replaced by the node's number (1, 2, ...). Its
    /// process is taken as the node's new pid, so `exec` the server; output
    /// goes to OUT/hub-node-N.log.
    #[arg(long, requires = "hub")]
    hub_restart_command: Vec<String>,
    /// A node's Prometheus endpoint (`tentacle-hub server --metrics-listen`),
    /// e.g. http://127.0.0.1:9464/metrics, for its own count of connected
    /// agents beside the agents' count; one per --hub in the same order.
    #[arg(long, requires = "hub", value_delimiter = ',')]
    hub_metrics: Vec<String>,
    /// Which node of a hub cluster an operator call goes to: the nodes in
    /// turn (through forwarding, as behind a load balancer), or the node
    /// holding the agent's tunnel as the agent last dialed it.
    #[arg(long, value_enum, default_value = "round-robin")]
    hub_calls: CallRouting,
    /// Where to write the report: DIR/report.json and DIR/report.html.
    #[arg(long, default_value = "tentacle-sim-report")]
    out: PathBuf,
    /// Where the agents keep their workspaces (a temporary directory by default).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Corrupt what was observed before checking it, to see the invariant
    /// checks fail (for testing the checks themselves).
    #[arg(long, value_enum)]
    plant: Option<Plant>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReportCommand {
    /// Combines shard reports of one scenario into one JSON and HTML report.
    Merge {
        /// The shards' report.json files.
        #[arg(required = true)]
        reports: Vec<PathBuf>,
        /// Where to write the merged report.json and report.html.
        #[arg(long, default_value = "tentacle-sim-report")]
        out: PathBuf,
    },
    /// Renders a report.json as HTML again (to DIR/report.html).
    Html {
        report: PathBuf,
        #[arg(long, default_value = "tentacle-sim-report")]
        out: PathBuf,
    },
}

pub async fn run(home: &HubHome, args: RunArgs) -> anyhow::Result<ExitCode> {
    let scenario = Scenario::load(&args.scenario)?;
    let open_file_limit = fleet::raise_open_file_limit().context("raising the open-file limit")?;
    let seed = args
        .seed
        .or(scenario.seed)
        .unwrap_or_else(rand::random::<u64>);
    let hub = if args.hub.is_empty() {
        HubChoice::InProcess
    } else {
        HubChoice::External {
            nodes: node_specs(&args)?,
            thumbprint: match args.hub_thumbprint {
                Some(thumbprint) => thumbprint,
                None => home.identity()?.thumbprint(),
            },
            api_key: args.api_key.clone().context(
                "--hub needs --api-key: create one with `tentacle-hub server api-key create`",
            )?,
            operator: home.identity()?,
            routing: args.hub_calls,
            log_dir: args.out.clone(),
        }
    };
    let temp = tempfile::tempdir()?;
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let mine = args.shard.slice(scenario.fleet.agents).len();
    eprintln!(
        "scenario {} · shard {} ({mine} of {} agents) · seed {seed} (replay with --seed {seed}) · open-file limit {open_file_limit}",
        scenario.name, args.shard, scenario.fleet.agents
    );
    // Each agent holds a few descriptors: its tunnel or listener, and the
    // hub's end when the hub runs here too.
    if (mine as u64) * 4 > open_file_limit {
        eprintln!(
            "warning: {mine} agents may need more than the open-file limit of {open_file_limit}; split the fleet with --shard K/N"
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let live = Arc::new(Live::default());
    *live
        .stage
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = "starting".into();
    let progress = tokio::spawn(show_progress(live.clone()));
    let result = run::run(
        RunSettings {
            scenario,
            seed,
            shard: args.shard,
            hub,
            work_dir,
            open_file_limit,
            plant: args.plant,
        },
        live,
    )
    .await;
    progress.abort();
    let report = result?;
    write_report(&report, &args.out)?;
    println!("{}", report.summary());
    Ok(verdict(&report))
}

/// One [`NodeSpec`] per `--hub`, with its pid, restart command and
/// metrics address from the flags given per node (or, for the restart
/// command, once for all with `{node}`).
fn node_specs(args: &RunArgs) -> anyhow::Result<Vec<NodeSpec>> {
    let nodes = args.hub.len();
    let per_node = |flag: &str, given: usize| {
        if given == 0 || given == nodes {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{given} {flag} value(s) for {nodes} --hub address(es): give one per --hub, in the same order"
            ))
        }
    };
    per_node("--hub-pid", args.hub_pid.len())?;
    per_node("--hub-metrics", args.hub_metrics.len())?;
    let commands = args.hub_restart_command.len();
    if commands > 1 {
        per_node("--hub-restart-command", commands)?;
    }
    for url in &args.hub_metrics {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--hub-metrics {url} is not a URL"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http") && uri.host().is_some(),
            "--hub-metrics {url}: give http://HOST:PORT/metrics"
        );
    }
    Ok(args
        .hub
        .iter()
        .enumerate()
        .map(|(i, address)| NodeSpec {
            address: address.clone(),
            pid: args.hub_pid.get(i).copied(),
            restart_command: match args.hub_restart_command.as_slice() {
                [] => None,
                [one] => Some(one.replace("{node}", &(i + 1).to_string())),
                all => all.get(i).cloned(),
            },
            metrics: args.hub_metrics.get(i).cloned(),
        })
        .collect())
}

pub fn report(command: ReportCommand) -> anyhow::Result<ExitCode> {
    match command {
        ReportCommand::Merge { reports, out } => {
            let parsed = reports
                .iter()
                .map(|path| read_report(path))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let merged = Report::merge(parsed)?;
            std::fs::create_dir_all(&out)?;
            write_report(&merged, &out)?;
            println!("{}", merged.summary());
            Ok(verdict(&merged))
        }
        ReportCommand::Html { report, out } => {
            let report = read_report(&report)?;
            std::fs::create_dir_all(&out)?;
            write_report(&report, &out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_report(path: &Path) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Report::parse(&path.display().to_string(), &text)?)
}

fn write_report(report: &Report, out: &Path) -> anyhow::Result<()> {
    let json = out.join("report.json");
    let page = out.join("report.html");
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&page, html::render(report))
        .with_context(|| format!("writing {}", page.display()))?;
    eprintln!("report: {} and {}", json.display(), page.display());
    Ok(())
}

/// 0 when every invariant held, 1 otherwise.
fn verdict(report: &Report) -> ExitCode {
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        let broken: Vec<&str> = report
            .invariants
            .iter()
            .filter(|i| !i.passed)
            .map(|i| i.name.as_str())
            .collect();
        eprintln!("tentacle-sim: invariants broken: {}", broken.join(", "));
        ExitCode::FAILURE
    }
}

/// Live bars on a terminal; a plain line every five seconds otherwise.
async fn show_progress(live: Arc<Live>) {
    let status = |live: &Live| {
        format!(
            "{} · {} connected · {} calls ({} failed) · scripts {}/{} · chaos {}",
            live.stage.lock().map(|s| s.clone()).unwrap_or_default(),
            live.connected.load(Ordering::Relaxed),
            live.calls.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
            live.scripts_done.load(Ordering::Relaxed),
            live.scripts_total.load(Ordering::Relaxed),
            live.chaos_events.load(Ordering::Relaxed),
        )
    };
    if !std::io::stderr().is_terminal() {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            eprintln!("{}", status(&live));
        }
    }
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>10} [{bar:40}] {pos}/{len} {per_sec} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    let agents = bars.add(indicatif::ProgressBar::new(0).with_style(style.clone()));
    agents.set_prefix("agents");
    let scripts = bars.add(indicatif::ProgressBar::new(0).with_style(style));
    scripts.set_prefix("scripts");
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        agents.set_length(live.agents.load(Ordering::Relaxed) as u64);
        agents.set_position(live.started_agents.load(Ordering::Relaxed) as u64);
        agents.set_message(status(&live));
        scripts.set_length(live.scripts_total.load(Ordering::Relaxed));
        scripts.set_position(live.scripts_done.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(["run", "--scenario", "s.toml"].iter().chain(args).copied())
            .map(|cli| cli.run)
    }

    fn specs(args: &[&str]) -> anyhow::Result<Vec<NodeSpec>> {
        node_specs(&parse(args)?)
    }

    #[test]
    fn one_hub_works_as_before() {
        let args = parse(&["--hub", "https://127.0.0.1:8443", "--hub-pid", "42"]).expect("parse");
        let nodes = node_specs(&args).expect("nodes");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].address.to_string(), "https://127.0.0.1:8443");
        assert_eq!(nodes[0].pid, Some(42));
        assert_eq!(args.hub_calls, CallRouting::RoundRobin);
        assert!(parse(&[]).expect("in-process").hub.is_empty());
        // The hub's flags mean nothing without a hub.
        assert!(parse(&["--hub-pid", "42"]).is_err());
        assert!(parse(&["--api-key", "k"]).is_err());
    }

    #[test]
    fn several_hubs_take_their_flags_in_order() {
        let listed = specs(&[
            "--hub",
            "https://127.0.0.1:1,https://127.0.0.1:2",
            "--hub",
            "https://127.0.0.1:3",
            "--hub-pid",
            "11,12",
            "--hub-pid",
            "13",
            "--hub-metrics",
            "http://127.0.0.1:91/metrics,http://127.0.0.1:92/metrics,http://127.0.0.1:93",
            "--hub-restart-command",
            "exec start-node --node {node}",
        ])
        .expect("nodes");
        let ports: Vec<u16> = listed.iter().map(|n| n.address.port()).collect();
        assert_eq!(ports, vec![1, 2, 3]);
        let pids: Vec<_> = listed.iter().map(|n| n.pid).collect();
        assert_eq!(pids, vec![Some(11), Some(12), Some(13)]);
        assert_eq!(
            listed[1].restart_command.as_deref(),
            Some("exec start-node --node 2")
        );
        assert_eq!(listed[2].metrics.as_deref(), Some("http://127.0.0.1:93"));

        // One command per node, commas and all, is taken as written.
        let each = specs(&[
            "--hub",
            "https://127.0.0.1:1,https://127.0.0.1:2",
            "--hub-restart-command",
            "exec a --x 1,2",
            "--hub-restart-command",
            "exec b",
        ])
        .expect("nodes");
        assert_eq!(each[0].restart_command.as_deref(), Some("exec a --x 1,2"));
        assert_eq!(each[1].restart_command.as_deref(), Some("exec b"));
        assert_eq!(each[0].pid, None);
    }

    #[test]
    fn per_node_flags_must_match_the_hubs() {
        let two = ["--hub", "https://127.0.0.1:1,https://127.0.0.1:2"];
        let error = specs(&[two[0], two[1], "--hub-pid", "1"]).expect_err("one pid for two");
        assert!(error.to_string().contains("one per --hub"), "{error}");
        let three_commands = [
            two[0],
            two[1],
            "--hub-restart-command",
            "a",
            "--hub-restart-command",
            "b",
            "--hub-restart-command",
            "c",
        ];
        assert!(specs(&three_commands).is_err());
        assert!(specs(&[two[0], two[1], "--hub-metrics", "https://x:1,http://y:2"]).is_err());
        assert!(parse(&["--hub", "https://127.0.0.1:1,nonsense"]).is_err());
        let routing = parse(&[two[0], two[1], "--hub-calls", "holder"]).expect("parse");
        assert_eq!(routing.hub_calls, CallRouting::Holder);
    }
}
