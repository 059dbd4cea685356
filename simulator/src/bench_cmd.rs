//! `tentacle-sim bench`: runs the rows, prints them, writes the JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tentacle_sim::bench::{self, Settings};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Small sizes and two rounds: checks that every row still runs (CI
    /// does this); the figures mean little.
    #[arg(long)]
    quick: bool,
    /// Runs one row only (see the table for the names).
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
    /// Also writes the results as JSON (schema `tentacle-bench/1`) here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Where the bench writes its files: the filesystem it measures
    /// [default: a temporary directory in the current one].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Rounds per row [default: 5, or 2 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Polling agents in the fleet rows [default: 10000, or 200 with
    /// --quick].
    #[arg(long)]
    agents: Option<usize>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    // Dropped (and removed) at the end unless --dir names a directory.
    let scratch = match &args.dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix(".tentacle-bench-")
                .tempdir_in(".")
                .context("making a scratch directory in the current directory")?,
        ),
    };
    let dir = match (&args.dir, &scratch) {
        (Some(dir), _) => dir.clone(),
        (None, Some(scratch)) => scratch.path().to_owned(),
        (None, None) => unreachable!("one of them is set"),
    };
    let mut settings = if args.quick {
        Settings::quick(dir)
    } else {
        Settings::full(dir)
    };
    settings.only = args.only;
    if let Some(rounds) = args.rounds {
        anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
        settings.rounds = rounds;
    }
    if let Some(agents) = args.agents {
        anyhow::ensure!(agents > 0, "--agents must be at least 1");
        settings.fleet_agents = agents;
    }
    settings.check()?;
    println!(
        "{:<24} {:>10} {:<5} measure ({} rounds a row, median)",
        "row", "value", "unit", settings.rounds
    );
    let report = tokio::select! {
        report = bench::run(&settings, args.quick) => report?,
        _ = tokio::signal::ctrl_c() => {
            // The peers run in process groups of their own, out of the
            // terminal's reach: stop them before leaving.
            let stopped = bench::local::kill_groups();
            eprintln!("interrupted; stopped the bench's {stopped} process groups");
            return Ok(ExitCode::from(130));
        }
    };
    let ran = report.rows.iter().filter(|row| row.value.is_some()).count();
    println!(
        "{ran} of {} rows measured in {:.1}s on {} CPUs",
        report.rows.len(),
        report.seconds,
        report.machine.cpus
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the JSON")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
