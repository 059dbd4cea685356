//! `tentacle`: the agent's command line. Verbs follow the original Tentacle's
//! where they fit.

mod commands;
mod from_env;
mod registration;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tentacle deployment agent.
#[derive(Debug, Parser)]
#[command(name = "tentacle", version, about, propagate_version = true)]
struct Cli {
    /// The instance home: configuration, certificate, work and files.
    #[arg(
        long,
        global = true,
        env = "TENTACLE_HOME",
        default_value = "/var/lib/tentacle"
    )]
    home: PathBuf,
    /// Logs on stderr as `text` or `json` lines.
    #[arg(long, global = true, default_value = "text")]
    log_format: tentacle_proto::telemetry::LogFormat,
    /// Export spans over OTLP/gRPC to this endpoint, e.g. http://127.0.0.1:4317
    /// (OTEL_EXPORTER_OTLP_ENDPOINT works too). Off when neither is set.
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics, with /livez and
    /// /readyz for `tentacle probe` (`run` only).
    #[arg(
        long,
        global = true,
        value_name = "ADDRESS",
        env = tentacle_proto::probe::METRICS_LISTEN_VARIABLE
    )]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the instance home and a default tentacle.toml.
    CreateInstance,
    /// Makes a new self-signed certificate (ECDSA P-256) for this agent.
    NewCertificate {
        /// Do nothing if a certificate already exists.
        #[arg(long, conflicts_with = "force")]
        if_blank: bool,
        /// Replace an existing certificate. Servers that trust the old
        /// thumbprint will refuse the new one until they are told.
        #[arg(long)]
        force: bool,
    },
    /// Prints the SHA-256 thumbprint of this agent's certificate.
    ShowThumbprint,
    /// Changes settings in tentacle.toml. A running agent applies trust
    /// changes within a second; other changes at the next start.
    Configure(commands::ConfigureArgs),
    /// Registers this agent with a hub, then trusts the hub.
    RegisterWith(Box<registration::RegisterArgs>),
    /// Replaces this agent's certificate without downtime: hubs trust both
    /// for an overlap, the running agent switches, the old one is retired.
    RotateCertificate(registration::RotateArgs),
    /// Removes this agent from a hub's registry.
    DeregisterFrom(registration::DeregisterArgs),
    /// Sets the HTTP CONNECT proxy polling connections go through.
    PollingProxy(commands::PollingProxyArgs),
    /// Prints the effective configuration.
    ShowConfiguration,
    /// Runs the agent in the foreground until SIGTERM or SIGINT.
    #[command(alias = "agent")]
    Run {
        /// First configure the agent from TENTACLE_* variables (for
        /// containers): make the instance and certificate if missing, apply
        /// the variables that are set, and register with TENTACLE_SERVER
        /// once. Safe on every start.
        #[arg(long)]
        from_env: bool,
    },
    /// Asks the running agent's metrics endpoint whether it serves (GET
    /// /readyz); exits 0 if so, else prints why and exits 1. For container
    /// health checks.
    Probe(tentacle_proto::probe::ProbeArgs),
    /// Writes and manages a hardened systemd unit that runs this agent
    /// (`--print` shows it without root or systemd).
    Service(tentacle_proto::systemd::ServiceArgs),
    /// Prints the version.
    Version,
}

fn main() -> ExitCode {
    // The host of a detached script (see `tentacle_agent::scripts::host`):
    // not a verb for people, so it is kept out of the parser and the help.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(
            tentacle_agent::scripts::host::SUBCOMMAND,
        ))
    {
        return tentacle_agent::scripts::host::main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CreateInstance => commands::create_instance(&cli.home),
        Command::NewCertificate { if_blank, force } => {
            commands::new_certificate(&cli.home, if_blank, force)
        }
        Command::ShowThumbprint => commands::show_thumbprint(&cli.home),
        Command::Configure(args) => commands::configure(&cli.home, args),
        Command::PollingProxy(args) => commands::polling_proxy(&cli.home, args),
        Command::RegisterWith(args) => {
            commands::block_on(registration::register_with(&cli.home, *args))
        }
        Command::RotateCertificate(args) => {
            commands::block_on(registration::rotate_certificate(&cli.home, args))
        }
        Command::DeregisterFrom(args) => {
            commands::block_on(registration::deregister_from(&cli.home, args))
        }
        Command::ShowConfiguration => commands::show_configuration(&cli.home),
        Command::Run { from_env } => {
            // Checked before anything starts or changes.
            match from_env
                .then(from_env::Environment::from_process)
                .transpose()
            {
                Ok(environment) => commands::run(
                    &cli.home,
                    cli.log_format,
                    cli.otlp_endpoint.as_deref(),
                    cli.metrics_listen,
                    environment,
                ),
                Err(error) => Err(error),
            }
        }
        Command::Probe(args) => commands::probe(args),
        Command::Service(args) => return commands::service(&cli.home, &args),
        Command::Version => {
            println!("tentacle {}", tentacle_agent::VERSION);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tentacle: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
