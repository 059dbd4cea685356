//! `tentacle-sim`: virtual fleets and scenario runs that load-test a hub,
//! and the demo.

mod bench_cmd;
mod commands;
mod fleet_cmd;
mod run_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tentacle's load simulator: virtual fleets, scenario runs, and a demo.
#[derive(Debug, Parser)]
#[command(name = "tentacle-sim", version, about, propagate_version = true)]
struct Cli {
    /// The hub's home, whose certificate is the operator identity and
    /// whose thumbprint is the default hub thumbprint [default:
    /// $TENTACLE_HUB_HOME, else $TENTACLE_SIM_HOME, else ~/.tentacle-hub].
    #[arg(long, global = true, default_value_os_t = tentacle_hub::home::default_dir(), hide_default_value = true)]
    home: PathBuf,
    /// Logs on stderr as `text` or `json` lines.
    #[arg(long, global = true, default_value = "text")]
    log_format: tentacle_proto::telemetry::LogFormat,
    /// Export spans over OTLP/gRPC to this endpoint, e.g. http://127.0.0.1:4317
    /// (OTEL_EXPORTER_OTLP_ENDPOINT works too). Off when neither is set.
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs N virtual tentacles (real transport and services, simulated
    /// scripts) that register with a hub and poll it.
    Fleet(fleet_cmd::FleetArgs),
    /// Plays a scenario file against a hub (one in this process unless
    /// --hub is given): virtual tentacles, stages, chaos. Writes a JSON and
    /// an HTML report and exits non-zero if an invariant broke.
    Run(Box<run_cmd::RunArgs>),
    /// Works with reports of `run`.
    #[command(subcommand)]
    Report(run_cmd::ReportCommand),
    /// Measures Tentacle beside OpenSSH and the machine's own limits (disk,
    /// raw TLS) in one run; prints a table and can write JSON.
    Bench(bench_cmd::BenchArgs),
    /// The bench's plain tonic baseline, started by `bench` itself: serves a
    /// constant `GetCapabilities` over pinned mTLS and prints `ADDRESS
    /// THUMBPRINT`.
    #[command(hide = true)]
    BenchUnaryPeer {
        /// The only client certificate it accepts.
        #[arg(long)]
        trust: tentacle_proto::Thumbprint,
    },
    /// Starts a listening agent with fresh certificates in a temporary home,
    /// runs a script through it and prints the output.
    Demo {
        /// The script to run instead of the built-in one.
        #[arg(long)]
        script: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One-shot verbs stay quiet.
    let default_log = match &cli.command {
        // Chaos makes thousands of expected connection warnings; the
        // report counts them instead.
        Command::Run(_) => "error",
        _ => "warn",
    };
    tentacle_proto::telemetry::run_program(
        "tentacle-sim",
        cli.otlp_endpoint.as_deref(),
        cli.log_format,
        default_log,
        commands::dispatch(&cli.home, cli.command),
    )
}
