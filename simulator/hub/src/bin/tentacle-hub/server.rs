//! `tentacle-hub server`: run the hub, and manage the agents it trusts.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tentacle_hub::credentials::CredentialKind;
use tentacle_hub::home::HubHome;
use tentacle_hub::rotation::RotationApproval;
use tentacle_hub::store::open::{OpenStore, StoreArgs};
use tentacle_hub::{AgentMode, HubSettings, TrustedAgent};
use tentacle_proto::Thumbprint;
use tentacle_proto::trust::CertificateValidity;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    command: Option<ServerCommand>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    cluster: crate::cluster_args::ClusterArgs,
    /// Where to listen for polling agents and operators.
    #[arg(long, env = "TENTACLE_HUB_LISTEN", default_value = "0.0.0.0:10943")]
    listen: SocketAddr,
    /// First start from the environment, for containers: make the
    /// certificate if there is none (unless --certificate names one), and
    /// store the API key in TENTACLE_HUB_API_KEY (hashed) if it is not yet
    /// stored. Safe on every start.
    #[arg(long)]
    from_env: bool,
    /// How long a call waits for a polling agent to connect.
    #[arg(long, env = "TENTACLE_HUB_PICKUP_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pickup_timeout: Duration,
    /// How long tunnels get to finish their calls when the hub stops.
    #[arg(long, env = "TENTACLE_HUB_DRAIN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Send heartbeats on idle tunnels this often.
    #[arg(long, env = "TENTACLE_HUB_HEARTBEAT_INTERVAL", default_value = "20s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Serve Prometheus metrics at http://ADDRESS/metrics, with /livez and
    /// /readyz for `tentacle-hub probe`.
    #[arg(long, env = tentacle_proto::probe::METRICS_LISTEN_VARIABLE, value_name = "ADDRESS")]
    metrics_listen: Option<SocketAddr>,
    /// A tunnel that is silent for this long is closed.
    #[arg(long, env = "TENTACLE_HUB_HEARTBEAT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    #[command(flatten)]
    registration_limits: tentacle_hub::args::RegistrationLimitArgs,
    /// What an agent's certificate rotation needs besides its current
    /// certificate and proof that it holds the new key: none; api-key (the
    /// request carries a hub API key); operator (it waits for `tentacle-hub
    /// server rotations approve`).
    #[arg(long, env = "TENTACLE_HUB_ROTATION_APPROVAL", default_value = "none")]
    rotation_approval: RotationApproval,
    /// Whether peers' certificate validity dates count besides their
    /// thumbprints: ignored (the default; SECURITY.md says why) or enforced.
    #[arg(long, env = "TENTACLE_HUB_CERTIFICATE_VALIDITY", default_value = "ignored", value_parser = parse_validity)]
    certificate_validity: CertificateValidity,
    /// The largest registration or fleet request accepted, in bytes.
    #[arg(long, env = "TENTACLE_HUB_MAX_MESSAGE_BYTES", default_value_t = HubSettings::default().max_message_bytes)]
    max_message_bytes: usize,
}

fn parse_validity(text: &str) -> Result<CertificateValidity, String> {
    match text {
        "ignored" => Ok(CertificateValidity::Ignored),
        "enforced" => Ok(CertificateValidity::Enforced),
        other => Err(format!(
            "`{other}` is not a validity policy; use ignored or enforced"
        )),
    }
}

impl ServerArgs {
    /// Whether these flags run the hub (rather than a `trust`, `token` or
    /// `api-key` verb).
    pub fn is_serve(&self) -> bool {
        self.command.is_none()
    }
}

#[derive(Debug, clap::Subcommand)]
enum ServerCommand {
    /// The agents this hub trusts.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// One-time registration tokens for `tentacle register-with --token`.
    #[command(subcommand)]
    Token(CredentialCommand),
    /// API keys for `tentacle register-with --api-key`; each registers any
    /// number of agents.
    #[command(subcommand)]
    ApiKey(CredentialCommand),
    /// Certificate rotations waiting for an operator (`--rotation-approval
    /// operator`).
    #[command(subcommand)]
    Rotations(RotationsCommand),
}

#[derive(Debug, clap::Subcommand)]
enum RotationsCommand {
    /// Lists the rotations waiting for approval.
    List,
    /// Approves the pending rotation of an agent, named or by its current or
    /// new thumbprint; the running hub trusts the new certificate within a
    /// second, and the agent's next `tentacle rotate-certificate` finishes.
    Approve {
        /// The agent's name, or its current or new thumbprint.
        agent_or_thumbprint: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum CredentialCommand {
    /// Prints a new secret; only its hash is stored.
    Create {
        /// How long it stays valid (tokens default to 1h; API keys do not expire
        /// unless given).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum TrustCommand {
    /// Trusts an agent (replaces an entry with the same thumbprint).
    Add {
        /// The agent's certificate thumbprint (`tentacle show-thumbprint`).
        #[arg(long)]
        thumbprint: Thumbprint,
        /// Its name; for a polling agent, its agent id (poll://NAME).
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["polling", "listening"])]
        mode: String,
        /// For a listening agent, https://HOST:PORT.
        #[arg(long)]
        address: Option<String>,
        /// A role the agent has (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// An environment the agent is in (repeatable).
        #[arg(long = "environment")]
        environments: Vec<String>,
    },
    /// Lists the trusted agents.
    List,
    /// Stops trusting an agent; its open tunnels are closed.
    Remove {
        #[arg(long)]
        thumbprint: Thumbprint,
    },
}

pub async fn run(home: &HubHome, args: ServerArgs) -> anyhow::Result<ExitCode> {
    let Some(command) = args.command else {
        return serve(home, args).await;
    };
    let opened = args.store.open(home).await?;
    let store = opened.store.as_ref();
    match command {
        ServerCommand::Trust(command) => trust(store, command).await,
        ServerCommand::Token(CredentialCommand::Create { ttl }) => {
            let ttl = ttl.unwrap_or(Duration::from_secs(3600));
            println!(
                "{}",
                store
                    .create_credential(CredentialKind::Token, Some(ttl))
                    .await?
            );
            Ok(ExitCode::SUCCESS)
        }
        ServerCommand::ApiKey(CredentialCommand::Create { ttl }) => {
            println!(
                "{}",
                store.create_credential(CredentialKind::ApiKey, ttl).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        ServerCommand::Rotations(command) => rotations(store, command).await,
    }
}

async fn trust(
    store: &dyn tentacle_hub::store::RegistryStore,
    command: TrustCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        TrustCommand::Add {
            thumbprint,
            name,
            mode,
            address,
            roles,
            environments,
        } => {
            tentacle_hub::target::AgentId::parse(&name).map_err(|_| {
                anyhow::anyhow!("name `{name}` is not valid: use letters, digits, `-`, `_` or `.`")
            })?;
            let mode = if mode == "polling" {
                AgentMode::Polling
            } else {
                AgentMode::Listening
            };
            if let Some(address) = &address {
                address.parse::<tentacle_proto::dial::ListeningAddress>()?;
            }
            store
                .upsert(TrustedAgent {
                    thumbprint,
                    name,
                    mode,
                    address,
                    roles,
                    environments,
                    previous_thumbprint: None,
                    retire_previous_at: None,
                })
                .await?;
            println!("Saved in {}", store.describe());
        }
        TrustCommand::List => {
            for agent in store.load().await? {
                let mode = match agent.mode {
                    AgentMode::Polling => "polling",
                    AgentMode::Listening => "listening",
                };
                println!(
                    "{}  {:<9}  {}  {}  roles={} environments={}",
                    agent.thumbprint,
                    mode,
                    agent.name,
                    agent.address.unwrap_or_default(),
                    agent.roles.join(","),
                    agent.environments.join(",")
                );
            }
        }
        TrustCommand::Remove { thumbprint } => {
            if !store.remove(thumbprint).await?.0 {
                anyhow::bail!("{thumbprint} is not in {}", store.describe());
            }
            println!("Removed {thumbprint}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn rotations(
    store: &dyn tentacle_hub::store::RegistryStore,
    command: RotationsCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        RotationsCommand::List => {
            let pending = store.pending_rotations().await?;
            if pending.is_empty() {
                println!("No rotation is waiting for approval.");
            }
            for rotation in pending {
                let requested =
                    std::time::UNIX_EPOCH + Duration::from_secs(rotation.requested_unix);
                println!(
                    "{}  {} -> {}  requested {}  overlap {}{}",
                    rotation.agent,
                    rotation.current,
                    rotation.new,
                    humantime::format_rfc3339_seconds(requested),
                    humantime::format_duration(Duration::from_secs(rotation.overlap_seconds)),
                    if rotation.approved {
                        "  approved, not yet applied (is the hub running?)"
                    } else {
                        ""
                    }
                );
            }
        }
        RotationsCommand::Approve {
            agent_or_thumbprint,
        } => {
            let rotation = store.approve_rotation(agent_or_thumbprint).await?;
            tracing::info!(
                target: tentacle_hub::rotation::AUDIT_TARGET,
                event = "certificate_rotation_approval",
                agent = %rotation.agent,
                old = %rotation.current,
                new = %rotation.new,
                "an operator approved a certificate rotation"
            );
            println!(
                "Approved the rotation of {} from {} to {}; the running hub applies it within a second, then `tentacle rotate-certificate` on the agent finishes it.",
                rotation.agent, rotation.current, rotation.new
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The variable `--from-env` reads an operator-chosen API key from.
const API_KEY_VARIABLE: &str = "TENTACLE_HUB_API_KEY";

/// `--from-env`'s first-start steps; each does nothing when already done.
async fn prepare_from_env(home: &HubHome, store: &OpenStore) -> anyhow::Result<()> {
    // A certificate named outside the home is an operator's (a mounted
    // Secret): never made here, so a wrong path fails instead of quietly
    // giving the hub a new identity.
    if !home.has_identity_files()
        && let Some(identity) = home.new_identity(false, true)?
    {
        tracing::info!(
            thumbprint = %identity.thumbprint(),
            path = %home.certificate_path().display(),
            "made the hub's certificate"
        );
    }
    match std::env::var(API_KEY_VARIABLE) {
        Ok(key) if !key.trim().is_empty() => {
            let stored = store
                .store
                .add_credential(CredentialKind::ApiKey, key, None)
                .await
                .with_context(|| format!("{API_KEY_VARIABLE} cannot be used"))?;
            if stored {
                tracing::info!("stored the API key from {API_KEY_VARIABLE} (hashed)");
            }
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => {}
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{API_KEY_VARIABLE} is not valid UTF-8")
        }
    }
    Ok(())
}

async fn serve(home: &HubHome, args: ServerArgs) -> anyhow::Result<ExitCode> {
    let opened = args.store.open(home).await?;
    if args.from_env {
        prepare_from_env(home, &opened).await?;
    } else if std::env::var_os(API_KEY_VARIABLE).is_some() {
        tracing::warn!("{API_KEY_VARIABLE} is set but only read with --from-env; ignoring it");
    }
    let identity = home.identity()?;
    let thumbprint = identity.thumbprint();
    let settings = HubSettings {
        pickup_timeout: args.pickup_timeout,
        drain_grace: args.drain_grace,
        heartbeat: tentacle_proto::tunnel::HeartbeatSettings {
            interval: args.heartbeat_interval,
            timeout: args.heartbeat_timeout,
        },
        registration_limits: args.registration_limits.limits(),
        rotation_approval: args.rotation_approval,
        certificate_validity: args.certificate_validity,
        max_message_bytes: args.max_message_bytes,
        ..HubSettings::default()
    };
    if let Some(address) = args.metrics_listen {
        tentacle_proto::metrics::spawn_metrics(address)
            .await
            .with_context(|| format!("could not serve metrics on {address}"))?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "could not listen on {}; is another hub running?",
                args.listen
            )
        })?;
    let node = crate::cluster_args::Joined::start(
        &args.cluster,
        &opened,
        identity,
        settings,
        listener.local_addr()?,
    )
    .await?;
    let hub = node.hub().clone();
    tracing::info!(
        address = %listener.local_addr()?,
        %thumbprint,
        agents = hub.agents().len(),
        store = %opened.store.describe(),
        rotation_approval = %args.rotation_approval,
        "hub listening"
    );
    // Serving includes the reload that picks up `server trust add/remove`
    // from another shell (or, on etcd, the watch that sees them).
    hub.serve(listener, shutdown_signal()).await?;
    node.leave().await;
    tracing::info!("hub stopped");
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down: draining tunnels");
}
