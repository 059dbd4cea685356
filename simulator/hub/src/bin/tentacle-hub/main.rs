//! `tentacle-hub`: the control plane for people at a shell: the hub server
//! and the operator verbs that reach agents directly or through it.

mod cluster_args;
mod commands;
mod deploy_cmd;
mod health_cmd;
mod operator;
mod probe_cmd;
mod server;
mod service_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tentacle's control plane: the hub, and operator verbs for agents.
#[derive(Debug, Parser)]
#[command(name = "tentacle-hub", version, about, propagate_version = true)]
struct Cli {
    /// Where the hub keeps its certificate, registry and credentials
    /// [default: $TENTACLE_HUB_HOME, else $TENTACLE_SIM_HOME, else ~/.tentacle-hub].
    #[arg(long, global = true, default_value_os_t = tentacle_hub::home::default_dir(), hide_default_value = true)]
    home: PathBuf,
    /// The certificate to use instead of the home's (e.g. a Kubernetes
    /// Secret mounted read-only); with --key.
    #[arg(
        long,
        global = true,
        env = "TENTACLE_HUB_CERTIFICATE",
        value_name = "PATH",
        requires = "key"
    )]
    certificate: Option<PathBuf>,
    /// The private key that goes with --certificate.
    #[arg(
        long,
        global = true,
        env = "TENTACLE_HUB_KEY",
        value_name = "PATH",
        requires = "certificate"
    )]
    key: Option<PathBuf>,
    /// How long a change to the registry or credentials waits for another
    /// process's change (the running hub, another `server trust` or `token
    /// create`) before giving up.
    #[arg(long, global = true, env = "TENTACLE_HUB_LOCK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    lock_timeout: std::time::Duration,
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
    /// Runs the hub (default port 10943), or manages the agents it trusts.
    Server(Box<server::ServerArgs>),
    /// The hub's registry store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Asks the running hub's metrics endpoint whether it serves (GET
    /// /readyz); exits 0 if so, else prints why and exits 1. For container
    /// health checks.
    Probe(tentacle_proto::probe::ProbeArgs),
    /// Writes and manages a hardened systemd unit that runs `tentacle-hub
    /// server` with the flags after `--` (`--print` shows it without root
    /// or systemd).
    Service(service_cmd::ServiceCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copies this home's file registry (agents, hashed credentials,
    /// pending rotations) into the store given with --store, e.g. etcd, so
    /// this hub's agents need not register again. Entries already there
    /// are kept; running it twice copies nothing twice.
    Migrate {
        #[command(flatten)]
        store: tentacle_hub::store::open::StoreArgs,
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
    if let Command::Service(service) = &cli.command {
        return service_cmd::run(&cli, service);
    }
    // A long-running hub reports what it does; one-shot verbs stay quiet.
    let default_log = match &cli.command {
        Command::Server(_) => "info,h2=warn,hyper=warn,tower=warn",
        _ => "warn",
    };
    let mut home = tentacle_hub::home::HubHome::new(&cli.home).with_lock_timeout(cli.lock_timeout);
    if let (Some(certificate), Some(key)) = (cli.certificate, cli.key) {
        home = home.with_identity_files(certificate, key);
    }
    tentacle_proto::telemetry::run_program(
        "tentacle-hub",
        cli.otlp_endpoint.as_deref(),
        cli.log_format,
        default_log,
        commands::dispatch(home, cli.command),
    )
}
