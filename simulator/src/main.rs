//! `tentacle-sim`: a control plane for people at a shell.

mod commands;
mod deploy_cmd;
mod fleet_cmd;
mod health_cmd;
mod operator;
mod run_cmd;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tentacle control plane and simulator.
#[derive(Debug, Parser)]
#[command(name = "tentacle-sim", version, about, propagate_version = true)]
struct Cli {
    /// Where the control plane keeps its certificate.
    #[arg(long, global = true, env = "TENTACLE_SIM_HOME", default_value_os_t = default_home())]
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

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".tentacle-sim")
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes this control plane's certificate (ECDSA P-256).
    NewCertificate {
        /// Do nothing if a certificate already exists.
        #[arg(long, conflicts_with = "force")]
        if_blank: bool,
        /// Replace an existing certificate.
        #[arg(long)]
        force: bool,
    },
    /// Prints this control plane's certificate thumbprint; give it to
    /// `tentacle configure --trust`.
    ShowThumbprint,
    /// Runs a script on an agent, streams its output, and exits with its exit
    /// code (124 if it timed out, 130 if it was cancelled, 1 for other agent
    /// errors).
    Exec(Box<commands::ExecArgs>),
    /// Uploads a file to an agent.
    Upload(commands::UploadArgs),
    /// Downloads a file from an agent, resuming a partial download.
    Download(commands::DownloadArgs),
    /// Shows what an agent supports.
    Capabilities(commands::TargetArgs),
    /// Runs a script on every registered agent with a role, through the hub,
    /// and exits non-zero if any target failed.
    Deploy(deploy_cmd::DeployArgs),
    /// Checks every registered agent: reachable, round trip, version,
    /// platform, free disk, and whether it has the current tooling bundle.
    Health(health_cmd::HealthArgs),
    /// The tooling bundle pushed to agents before each deployment.
    #[command(subcommand)]
    Tooling(ToolingCommand),
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
    /// Runs the hub (default port 10943), or manages the agents it trusts.
    Server(server::ServerArgs),
    /// Starts a listening agent with fresh certificates in a temporary home,
    /// runs a script through it and prints the output.
    Demo {
        /// The script to run instead of the built-in one.
        #[arg(long)]
        script: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ToolingCommand {
    /// Makes FILE (.tar.gz or .zip) the bundle every deployment makes sure
    /// agents have, at $TENTACLE_TOOLING_PATH.
    Set { file: PathBuf },
    /// Prints the bundle's path and SHA-256.
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A long-running hub reports what it does; one-shot verbs stay quiet.
    let default_log = match &cli.command {
        Command::Server(_) => "info,h2=warn,hyper=warn,tower=warn",
        // Chaos makes thousands of expected connection warnings; the
        // report counts them instead.
        Command::Run(_) => "error",
        _ => "warn",
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tentacle-sim: error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Dropped at the end of this block, which flushes the spans.
        let _telemetry = tentacle_proto::telemetry::init(
            "tentacle-sim",
            cli.otlp_endpoint.as_deref(),
            cli.log_format,
            default_log,
        )?;
        commands::dispatch(&cli.home, cli.command).await
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tentacle-sim: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
