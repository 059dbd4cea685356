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
use tentacle_sim::run::{self, HubChoice, Live, Plant, RunSettings, Shard};
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
    /// Load-test this hub instead of starting one in this process.
    #[arg(long)]
    hub: Option<ListeningAddress>,
    /// The external hub's thumbprint; by default this home's own.
    #[arg(long, requires = "hub")]
    hub_thumbprint: Option<Thumbprint>,
    /// An API key of the external hub (`tentacle-hub server api-key create`).
    #[arg(long, requires = "hub")]
    api_key: Option<String>,
    /// The external hub's process id, for its CPU and memory chart.
    #[arg(long, requires = "hub")]
    hub_pid: Option<u32>,
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
    let hub = match &args.hub {
        None => HubChoice::InProcess,
        Some(address) => HubChoice::External {
            address: address.clone(),
            thumbprint: match args.hub_thumbprint {
                Some(thumbprint) => thumbprint,
                None => home.identity()?.thumbprint(),
            },
            api_key: args.api_key.clone().context(
                "--hub needs --api-key: create one with `tentacle-hub server api-key create`",
            )?,
            operator: home.identity()?,
            pid: args.hub_pid,
        },
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
