//! What each `tentacle-hub` verb does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tentacle_hub::args::HubArgs;
use tentacle_hub::channel::{AgentChannel, HubRouted};
use tentacle_hub::client::{AgentClient, FollowSettings};
use tentacle_hub::home::HubHome;
use tentacle_hub::target::Target;
use tentacle_proto::dial::DialSettings;
use tentacle_proto::v1 as pb;
use tentacle_proto::{Thumbprint, TrustStore};
use tokio_util::sync::CancellationToken;

use super::Command;

pub async fn dispatch(home: HubHome, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::NewCertificate { if_blank, force } => {
            match home.new_identity(force, if_blank)? {
                Some(identity) => println!("{}", identity.thumbprint()),
                None => println!(
                    "A certificate already exists at {}; left as it is.",
                    home.certificate_path().display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ShowThumbprint => {
            println!("{}", home.identity()?.thumbprint());
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec(args) => exec(&home, *args).await,
        Command::Upload(args) => {
            let client = args.target.connect(&home).await?;
            let stored = client.upload(&args.local, &args.remote, 256 * 1024).await?;
            println!(
                "{} {} bytes sha256:{}",
                stored.path, stored.size, stored.sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Download(args) => {
            let client = args.target.connect(&home).await?;
            let header = client
                .download(&args.remote, &args.local, !args.no_resume)
                .await?;
            println!(
                "{} {} bytes sha256:{} (resumed from byte {})",
                args.local.display(),
                header.size,
                header.sha256,
                header.offset
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Capabilities(target) => {
            let client = target.connect(&home).await?;
            let caps = client.capabilities().await?;
            println!("agent version: {}", caps.agent_version);
            println!("platform:      {}/{}", caps.os, caps.arch);
            for service in &caps.services {
                println!("service:       {} v{}", service.name, service.version);
            }
            println!("interpreters:  {}", caps.interpreters.join(", "));
            println!("features:      {}", caps.features.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Server(args) => crate::server::run(&home, *args).await,
        Command::Store(super::StoreCommand::Migrate { store }) => {
            if store.etcd_settings().is_none() {
                anyhow::bail!(
                    "give the store to copy into: --store etcd://HOST:PORT[,HOST:PORT...]; the files of --home are what is copied"
                );
            }
            let to = store.open(&home).await?;
            let migrated =
                tentacle_hub::store::migrate::migrate(&home.store(), to.store.as_ref()).await?;
            println!(
                "Copied {} agents ({} already there), {} credentials and {} pending rotations from {} into {}",
                migrated.agents,
                migrated.agents_already_there,
                migrated.credentials,
                migrated.rotations,
                home.dir().display(),
                to.store.describe()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe(args) => crate::probe_cmd::run(args).await,
        // main runs it before any runtime or telemetry starts.
        Command::Service(_) => unreachable!("`service` is dispatched in main"),
        Command::Deploy(args) => crate::deploy_cmd::run(&home, args).await,
        Command::Health(args) => crate::health_cmd::run(&home, args).await,
        Command::Tooling(super::ToolingCommand::Set { file }) => {
            let stored = home
                .set_tooling_bundle(&file)
                .with_context(|| format!("storing {} as the tooling bundle", file.display()))?;
            let (size, sha256) = tentacle_hub::client::hash_file(&stored).await?;
            println!("{} {size} bytes sha256:{sha256}", stored.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Tooling(super::ToolingCommand::Show) => match home.tooling_bundle() {
            Some(bundle) => {
                let (size, sha256) = tentacle_hub::client::hash_file(&bundle).await?;
                println!("{} {size} bytes sha256:{sha256}", bundle.display());
                Ok(ExitCode::SUCCESS)
            }
            None => bail!("no tooling bundle is set; set one with `tentacle-hub tooling set FILE`"),
        },
    }
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// The agent: https://HOST:PORT for a listening agent, poll://AGENT-ID
    /// for a polling agent (reached through the hub given by --hub).
    #[arg(long)]
    target: Target,
    /// The agent's certificate thumbprint (`tentacle show-thumbprint`).
    #[arg(long)]
    thumbprint: Thumbprint,
    /// The hub a polling agent is reached through.
    #[command(flatten)]
    hub: HubArgs,
    /// Give up connecting after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
}

impl TargetArgs {
    async fn connect(&self, home: &HubHome) -> anyhow::Result<AgentClient> {
        let identity = home.identity()?;
        let settings = DialSettings {
            connect_timeout: self.connect_timeout,
            ..DialSettings::default()
        };
        match &self.target {
            Target::Listening(address) => {
                Ok(
                    AgentClient::connect_listening(address, self.thumbprint, &identity, &settings)
                        .await?,
                )
            }
            Target::Polling(_) => {
                let hub_thumbprint = self.hub.endpoint.thumbprint_or(&identity);
                let tls = tentacle_proto::tls::client_config(
                    &identity,
                    TrustStore::new([hub_thumbprint]),
                )?;
                let hub =
                    tentacle_proto::dial::channel(&self.hub.endpoint.hub, tls, &settings).await?;
                let routed =
                    HubRouted::new(hub, &self.target, self.thumbprint, self.hub.pickup_timeout)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(AgentClient::new(AgentChannel::ViaHub(routed)))
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The script body.
    #[arg(
        long,
        conflicts_with = "script_file",
        required_unless_present = "script_file"
    )]
    script: Option<String>,
    /// Read the script body from this file.
    #[arg(long)]
    script_file: Option<PathBuf>,
    /// bash, sh, pwsh, or an absolute path to an interpreter.
    #[arg(long, default_value = "bash")]
    interpreter: String,
    /// An argument for the script (repeatable).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    arguments: Vec<String>,
    /// An environment variable NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    environment: Vec<String>,
    /// A sensitive environment variable NAME=VALUE; its value is masked in
    /// the output (repeatable).
    #[arg(long = "sensitive-env", value_name = "NAME=VALUE")]
    sensitive_environment: Vec<String>,
    /// An extra file NAME=LOCAL_PATH placed next to the script (repeatable).
    #[arg(long = "file", value_name = "NAME=PATH")]
    files: Vec<String>,
    /// full: run alone under the mutex; none: run beside other none scripts.
    #[arg(long, default_value = "full", value_parser = ["full", "none"])]
    isolation: String,
    /// The isolation mutex's name.
    #[arg(long)]
    mutex: Option<String>,
    /// How long to wait for the mutex.
    #[arg(long, value_parser = humantime::parse_duration)]
    mutex_timeout: Option<Duration>,
    /// Kill the script after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// The ticket; a fresh one by default. Reusing a ticket shows that run.
    #[arg(long)]
    ticket: Option<String>,
    /// Keep the workspace on the agent instead of deleting it afterwards.
    #[arg(long)]
    keep_workspace: bool,
}

fn split_pair(pair: &str, what: &str) -> anyhow::Result<(String, String)> {
    match pair.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => bail!("{what} `{pair}` is not NAME=VALUE"),
    }
}

async fn exec(home: &HubHome, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let body = match (&args.script, &args.script_file) {
        (Some(body), _) => body.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the script {}", path.display()))?,
        (None, None) => bail!("give the script with --script or --script-file"),
    };
    let (interpreter, interpreter_path) = match args.interpreter.as_str() {
        "bash" => (pb::Interpreter::Bash, String::new()),
        "sh" => (pb::Interpreter::Sh, String::new()),
        "pwsh" => (pb::Interpreter::Pwsh, String::new()),
        path if path.starts_with('/') => (pb::Interpreter::Custom, path.to_owned()),
        other => bail!("interpreter `{other}` is not bash, sh, pwsh or an absolute path"),
    };
    let mut environment = Vec::new();
    for (pairs, sensitive) in [
        (&args.environment, false),
        (&args.sensitive_environment, true),
    ] {
        for pair in pairs {
            let (name, value) = split_pair(pair, "environment variable")?;
            environment.push(pb::EnvironmentVariable {
                name,
                value,
                sensitive,
            });
        }
    }
    let mut files = Vec::new();
    for pair in &args.files {
        let (name, path) = split_pair(pair, "file")?;
        let content = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
        files.push(pb::ScriptFile { name, content });
    }
    let ticket = args
        .ticket
        .clone()
        .unwrap_or_else(|| format!("exec-{}", uuid::Uuid::new_v4().simple()));
    let request = pb::StartScriptRequest {
        ticket: ticket.clone(),
        script_body: body,
        interpreter: interpreter as i32,
        interpreter_path,
        arguments: args.arguments.clone(),
        environment,
        files,
        isolation: if args.isolation == "none" {
            pb::Isolation::None
        } else {
            pb::Isolation::Full
        } as i32,
        mutex_name: args.mutex.clone().unwrap_or_default(),
        mutex_timeout: args.mutex_timeout.and_then(|d| d.try_into().ok()),
        execution_timeout: args.timeout.and_then(|d| d.try_into().ok()),
        sensitive_values: Vec::new(),
    };
    let client = args.target.connect(home).await?;
    let cancel = CancellationToken::new();
    let on_interrupt = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("tentacle-hub: cancelling the script on the agent…");
            on_interrupt.cancel();
        }
    });
    // One trace for the whole execution: start, watch and complete.
    let span = tracing::info_span!(
        target: tentacle_proto::telemetry::TRACE_TARGET,
        "exec",
        otel.name = format!("exec {}", args.target.target),
        ticket = %ticket,
        exit_code = tracing::field::Empty,
    );
    let run = async {
        let end = client
            .run_script(
                request,
                tentacle_hub::client::print_line,
                &cancel,
                &FollowSettings::default(),
            )
            .await?;
        tracing::Span::current().record("exit_code", end.exit_code);
        if !args.keep_workspace {
            client.complete_script(&ticket).await?;
        }
        Ok::<_, anyhow::Error>(end)
    };
    let end = tracing::Instrument::instrument(run, span).await?;
    Ok(exit_code(end.exit_code))
}

/// Maps a script's exit code to this process's exit status.
fn exit_code(code: i32) -> ExitCode {
    use tentacle_proto::exit_code as reserved;
    let mapped = match code {
        0..=255 => return ExitCode::from(code as u8),
        reserved::TIMED_OUT => 124,
        reserved::CANCELED => 130,
        _ => 1,
    };
    let meaning = match code {
        reserved::FATAL => "the agent could not run the script",
        reserved::CANCELED => "the script was cancelled",
        reserved::TIMED_OUT => "the script timed out",
        reserved::UNKNOWN_TICKET => "the agent does not know this ticket",
        reserved::AGENT_RESTARTED => "the agent restarted while the script ran",
        _ => "unexpected exit code",
    };
    eprintln!("tentacle-hub: {meaning} (exit code {code})");
    ExitCode::from(mapped)
}

#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The local file to send.
    local: PathBuf,
    /// Where to put it on the agent, relative to its files root.
    remote: String,
}

#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The file on the agent, relative to its files root.
    remote: String,
    /// Where to write it locally.
    local: PathBuf,
    /// Start over instead of continuing LOCAL.partial.
    #[arg(long)]
    no_resume: bool,
}
