//! `register-with` and `deregister-from`: joining and leaving a hub's fleet.

use std::path::Path;

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tentacle_agent::config::{AgentConfig, Home, PollingServer};
use tentacle_agent::polling::{Dialer, TcpDialer};
use tentacle_proto::dial::{self, DialSettings, ListeningAddress, ParseTargetError};
use tentacle_proto::rotation::ChannelBinding;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tonic::transport::{Endpoint, Uri};

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The hub, https://HOST:PORT (port 10943 by default). A polling agent
    /// adds it to the servers it polls. For a hub cluster, registering with
    /// one node is enough: add the others with `tentacle configure --server
    /// URL --server-thumbprint T` under the same thumbprint, and the agent
    /// holds its tunnels on one node at a time.
    #[arg(long)]
    server: String,
    /// The hub's certificate thumbprint (`tentacle-hub show-thumbprint`).
    #[arg(long)]
    server_thumbprint: Thumbprint,
    /// The name to register under; polling agents are addressed as poll://NAME.
    #[arg(long)]
    name: String,
    /// A role (repeatable), e.g. web.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// An environment (repeatable), e.g. prod.
    #[arg(long = "environment")]
    environments: Vec<String>,
    /// polling: this agent dials the hub; listening: the hub dials this agent.
    #[arg(long, value_parser = ["polling", "listening"])]
    mode: String,
    /// Listening mode: the host name the hub should dial (default: the
    /// address this registration comes from).
    #[arg(long)]
    public_hostname: Option<String>,
    /// Listening mode: the port the hub should dial (default: the configured one).
    #[arg(long)]
    port: Option<u16>,
    /// A one-time token from `tentacle-hub server token create`.
    #[arg(long, required_unless_present = "api_key", conflicts_with = "api_key")]
    token: Option<String>,
    /// An API key from `tentacle-hub server api-key create`.
    #[arg(long)]
    api_key: Option<String>,
}

/// `server` as the address registrations and tunnels dial: port 10943
/// unless one is given.
pub fn hub_address(server: &str) -> Result<ListeningAddress, ParseTargetError> {
    let with_port = if server
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        server.to_owned()
    } else {
        format!("{}:10943", server.trim_end_matches('/'))
    };
    with_port.parse()
}

/// A registration secret; never printed, not even by `{:?}`.
#[derive(Clone)]
pub enum Credential {
    Token(String),
    ApiKey(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Token(_) => "Token(********)",
            Self::ApiKey(_) => "ApiKey(********)",
        })
    }
}

/// What a registration asks a hub for.
#[derive(Debug, Clone)]
pub struct Registration {
    pub server: ListeningAddress,
    pub server_thumbprint: Thumbprint,
    pub name: String,
    pub roles: Vec<String>,
    pub environments: Vec<String>,
    /// Polling (the agent dials the hub) rather than listening.
    pub polling: bool,
    /// Listening: the host the hub dials (default: where the registration
    /// comes from).
    pub public_hostname: Option<String>,
    /// Listening: the port the hub dials (default: the configured one).
    pub port: Option<u16>,
    pub credential: Credential,
}

/// Why a registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The hub could not be reached (not up yet, no route, name unknown):
    /// worth trying again.
    #[error("could not reach the hub at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The hub answered, but the TLS handshake failed: a wrong thumbprint.
    #[error("could not connect to the hub at {url}: {reason}")]
    Handshake { url: String, reason: String },
    #[error("the hub refused the registration: {reason}")]
    Refused { code: tonic::Code, reason: String },
    #[error(transparent)]
    Local(#[from] anyhow::Error),
}

impl RegisterError {
    /// Whether trying again later may succeed: the hub was not there, or
    /// said it was unavailable (starting or stopping), or refused this
    /// address for a while because of failed registrations from it (another
    /// agent behind the same NAT, say). A refusal of the credential or the
    /// name is final.
    pub fn is_worth_retrying(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { code, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::ResourceExhausted
                )
            }
            Self::Handshake { .. } | Self::Local(_) => false,
        }
    }
}

/// A registration client over one connection to `address`, made the way a
/// polling tunnel is: through the configured proxy or `HTTPS_PROXY`, so an
/// agent that reaches its hub only through a proxy can register too.
async fn connect(
    identity: &Identity,
    address: &ListeningAddress,
    hub: Thumbprint,
    config: &AgentConfig,
) -> Result<RegistrationServiceClient<tonic::transport::Channel>, RegisterError> {
    Ok(connect_bound(identity, address, hub, config).await?.0)
}

/// [`connect`], with the connection's TLS channel binding, which a
/// rotation's proof of possession signs.
async fn connect_bound(
    identity: &Identity,
    address: &ListeningAddress,
    hub: Thumbprint,
    config: &AgentConfig,
) -> Result<
    (
        RegistrationServiceClient<tonic::transport::Channel>,
        Option<ChannelBinding>,
    ),
    RegisterError,
> {
    let url = address.to_string();
    let timeout = config.polling.connect_timeout;
    let unreachable = |reason: String| RegisterError::Unreachable {
        url: url.clone(),
        reason,
    };
    let handshake = |reason: String| RegisterError::Handshake {
        url: url.clone(),
        reason,
    };
    let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([hub]))
        .map_err(anyhow::Error::from)?;
    let dialer = TcpDialer {
        proxy: config.polling.proxy.clone(),
    };
    let dialed = dialer
        .dial(address, timeout)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let server_name =
        ServerName::try_from(address.host().to_owned()).map_err(|e| handshake(e.to_string()))?;
    let tls = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(tls).connect(server_name, dialed.stream),
    )
    .await
    .map_err(|_| unreachable("the TLS handshake timed out".into()))?
    .map_err(|e| handshake(dial::describe_connect_error(&e)))?;
    let binding = tentacle_proto::rotation::channel_binding(&**tls.get_ref().1);
    let tls = dial::wait_until_accepted(tls, timeout)
        .await
        .map_err(|e| handshake(dial::describe_connect_error(&e)))?;
    // One call (or a few) over exactly this connection.
    let mut once = Some(tls);
    let channel = DialSettings::default()
        .http2
        .apply_to_endpoint(Endpoint::from_static("http://tentacle-hub"))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = once.take();
            async move {
                tls.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the connection to the hub is gone"))
            }
        }))
        .await
        .map_err(|e| unreachable(dial::describe_connect_error(&e)))?;
    Ok((RegistrationServiceClient::new(channel), binding))
}

/// [`connect`] for the verbs that only report errors.
async fn connect_or_fail(
    identity: &Identity,
    address: &ListeningAddress,
    hub: Thumbprint,
    config: &AgentConfig,
) -> anyhow::Result<RegistrationServiceClient<tonic::transport::Channel>> {
    Ok(connect(identity, address, hub, config).await?)
}

fn load_identity(home: &Home) -> anyhow::Result<(AgentConfig, Identity)> {
    let config = home.load()?;
    let identity = Identity::load(
        &home.resolve(&config.certificate.certificate),
        &home.resolve(&config.certificate.key),
    )?;
    Ok((config, identity))
}

pub async fn register_with(home: &Path, args: RegisterArgs) -> anyhow::Result<()> {
    let registration = Registration {
        server: hub_address(&args.server)?,
        server_thumbprint: args.server_thumbprint,
        name: args.name,
        roles: args.roles,
        environments: args.environments,
        polling: args.mode == "polling",
        public_hostname: args.public_hostname,
        port: args.port,
        credential: match (args.token, args.api_key) {
            (Some(token), _) => Credential::Token(token),
            (None, Some(key)) => Credential::ApiKey(key),
            (None, None) => bail!("give --token or --api-key"),
        },
    };
    let registered = register(&Home::new(home), &registration).await?;
    println!(
        "Registered as {} ({}) with the hub at {}; roles: {}; environments: {}",
        registered.name,
        registered.target,
        registration.server,
        registered.roles.join(", "),
        registered.environments.join(", ")
    );
    Ok(())
}

/// Registers with a hub and then trusts it the way the mode needs,
/// recording it in `hubs`: what `register-with` and `run --from-env` do.
pub async fn register(
    home: &Home,
    registration: &Registration,
) -> Result<pb::RegisteredAgent, RegisterError> {
    let (mut config, identity) = load_identity(home)?;
    let polling = registration.polling;
    let request = pb::RegisterRequest {
        credential: Some(match &registration.credential {
            Credential::Token(token) => pb::register_request::Credential::Token(token.clone()),
            Credential::ApiKey(key) => pb::register_request::Credential::ApiKey(key.clone()),
        }),
        name: registration.name.clone(),
        mode: if polling {
            pb::AgentMode::Polling
        } else {
            pb::AgentMode::Listening
        } as i32,
        roles: registration.roles.clone(),
        environments: registration.environments.clone(),
        public_hostname: registration.public_hostname.clone().unwrap_or_default(),
        port: u32::from(registration.port.unwrap_or(config.listen.port)),
    };
    let thumbprint = registration.server_thumbprint;
    let mut client = connect(&identity, &registration.server, thumbprint, &config).await?;
    let registered = client
        .register(request)
        .await
        .map_err(|status| RegisterError::Refused {
            // A call that never reached the hub is as good as unreachable.
            code: if std::error::Error::source(&status).is_some() {
                tonic::Code::Unavailable
            } else {
                status.code()
            },
            reason: dial::describe_status(&status),
        })?
        .into_inner()
        .agent
        .context("the hub's reply has no registry entry")?;

    // Now trust the hub the way the chosen mode needs.
    let url = registration.server.to_string();
    config.hubs.retain(|h| h.url != url);
    config.hubs.push(PollingServer {
        url: url.clone(),
        thumbprint,
    });
    if polling {
        config.polling.enabled = true;
        config.listen.enabled = false;
        config.polling.agent_id = registration.name.clone();
        config.polling.servers.retain(|s| s.url != url);
        config.polling.servers.push(PollingServer {
            url: url.clone(),
            thumbprint,
        });
    } else {
        config.listen.enabled = true;
        if let Some(port) = registration.port {
            config.listen.port = port;
        }
        if !config.trust.thumbprints.contains(&thumbprint) {
            config.trust.thumbprints.push(thumbprint);
        }
    }
    home.save(&config).map_err(anyhow::Error::from)?;
    Ok(registered)
}

#[derive(Debug, clap::Args)]
pub struct DeregisterArgs {
    /// The hub, https://HOST:PORT.
    #[arg(long)]
    server: String,
    /// The hub's thumbprint; by default the one this agent polls or trusts
    /// for that URL.
    #[arg(long)]
    server_thumbprint: Option<Thumbprint>,
}

pub async fn deregister_from(home: &Path, args: DeregisterArgs) -> anyhow::Result<()> {
    let home = Home::new(home);
    let (mut config, identity) = load_identity(&home)?;
    let address = hub_address(&args.server)?;
    let url = address.to_string();
    let thumbprint = args
        .server_thumbprint
        .or_else(|| {
            config
                .polling
                .servers
                .iter()
                .find(|s| s.url == url)
                .map(|s| s.thumbprint)
        })
        .with_context(|| format!("this agent does not poll {url}; give --server-thumbprint"))?;
    let mut client = connect_or_fail(&identity, &address, thumbprint, &config).await?;
    client
        .deregister(pb::DeregisterRequest {})
        .await
        .map_err(|status| anyhow::anyhow!("the hub refused: {}", dial::describe_status(&status)))?;
    config.polling.servers.retain(|s| s.url != url);
    config.hubs.retain(|h| h.url != url);
    if config.polling.servers.is_empty() {
        config.polling.enabled = false;
    }
    config.trust.thumbprints.retain(|t| *t != thumbprint);
    home.save(&config)?;
    println!("Deregistered from the hub at {url}");
    Ok(())
}

#[derive(clap::Args)]
pub struct RotateArgs {
    /// How long hubs keep trusting the current certificate after the switch.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    overlap: std::time::Duration,
    /// A hub API key, for hubs that ask for one to rotate
    /// (`--rotation-approval api-key`).
    #[arg(long, env = "TENTACLE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// For hubs whose operator approves rotations: keep asking for up to
    /// this long, and finish as soon as the rotation is approved.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    wait_for_approval: std::time::Duration,
}

impl std::fmt::Debug for RotateArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the API key.
        f.debug_struct("RotateArgs")
            .field("overlap", &self.overlap)
            .field("api_key", &self.api_key.as_ref().map(|_| "********"))
            .field("wait_for_approval", &self.wait_for_approval)
            .finish()
    }
}

/// Where a new certificate waits while a hub's operator has yet to
/// approve its rotation; the next `rotate-certificate` announces it again.
const PENDING_CERTIFICATE: &str = "tentacle-pending.crt.pem";
const PENDING_KEY: &str = "tentacle-pending.key.pem";

/// How often `--wait-for-approval` asks again.
const APPROVAL_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// What one hub said to the announcement.
enum Announced {
    Trusted { retire_old_at_unix: u64 },
    Pending,
}

/// Announces `next` to one hub over a connection authenticated by
/// `current`, proving possession of `next`'s key over that connection.
async fn announce(
    current: &Identity,
    next: &Identity,
    hub: &PollingServer,
    config: &AgentConfig,
    args: &RotateArgs,
) -> anyhow::Result<Announced> {
    let address = hub_address(&hub.url)?;
    let (mut client, binding) = connect_bound(current, &address, hub.thumbprint, config).await?;
    let binding = binding
        .context("the TLS connection to the hub gave no keying material to bind the proof to")?;
    let message = tentacle_proto::rotation::proof_message(
        &current.thumbprint(),
        &next.thumbprint(),
        &hub.thumbprint,
        &binding,
    );
    let proof = tentacle_proto::rotation::sign(next, &message)?;
    let answer = client
        .rotate_certificate(pb::RotateCertificateRequest {
            new_certificate: next.certificate().to_vec(),
            overlap_seconds: args.overlap.as_secs().max(1),
            proof_signature: proof.signature,
            proof_scheme: u32::from(proof.scheme),
            api_key: args.api_key.clone().unwrap_or_default(),
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the hub at {} refused the new certificate (nothing was changed): {}",
                hub.url,
                dial::describe_status(&status)
            )
        })?
        .into_inner();
    Ok(if answer.pending_approval {
        Announced::Pending
    } else {
        Announced::Trusted {
            retire_old_at_unix: answer.retire_old_at_unix,
        }
    })
}

/// Makes a new certificate, tells every hub this agent registered with or
/// polls, and then points the configuration at it; a running agent switches
/// within a second, opening new tunnels before it drains the old ones. A
/// hub whose operator approves rotations keeps the new certificate pending:
/// it is kept aside and announced again by the next run (or by this one,
/// every second for `--wait-for-approval`), and the switch waits for every
/// hub to trust it.
pub async fn rotate_certificate(home: &Path, args: RotateArgs) -> anyhow::Result<()> {
    let home = Home::new(home);
    let (mut config, current) = load_identity(&home)?;
    let pending_files = (
        home.resolve(Path::new(PENDING_CERTIFICATE)),
        home.resolve(Path::new(PENDING_KEY)),
    );
    let next = if pending_files.0.exists() && pending_files.1.exists() {
        let next = Identity::load(&pending_files.0, &pending_files.1)?;
        println!(
            "Announcing again the certificate {} that waits for approval",
            next.thumbprint()
        );
        next
    } else {
        Identity::generate("Tentacle")?
    };
    let mut hubs: Vec<PollingServer> = config.hubs.clone();
    for server in &config.polling.servers {
        if !hubs.iter().any(|h| h.url == server.url) {
            hubs.push(server.clone());
        }
    }
    if hubs.is_empty() {
        eprintln!(
            "tentacle: warning: this agent is registered with no hub; clients that pin the old thumbprint will refuse the new one"
        );
    }
    let give_up = tokio::time::Instant::now() + args.wait_for_approval;
    let mut waiting = Vec::new();
    for hub in &hubs {
        let mut told = false;
        loop {
            match announce(&current, &next, hub, &config, &args).await? {
                Announced::Trusted { retire_old_at_unix } => {
                    let retires =
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(retire_old_at_unix);
                    println!(
                        "{} trusts {} now and retires {} at {} (UTC)",
                        hub.url,
                        next.thumbprint(),
                        current.thumbprint(),
                        humantime::format_rfc3339_seconds(retires)
                    );
                    break;
                }
                Announced::Pending => {
                    if !told {
                        // Kept aside so that the approved certificate is the
                        // one this agent switches to, in this run or the next.
                        next.save(&pending_files.0, &pending_files.1)?;
                        println!(
                            "{} recorded the rotation to {} and waits for its operator: `tentacle-hub server rotations approve {}`",
                            hub.url,
                            next.thumbprint(),
                            next.thumbprint()
                        );
                        told = true;
                    }
                    if tokio::time::Instant::now() + APPROVAL_POLL > give_up {
                        waiting.push(hub.url.clone());
                        break;
                    }
                    tokio::time::sleep(APPROVAL_POLL).await;
                }
            }
        }
    }
    if !waiting.is_empty() {
        bail!(
            "the rotation to {} is pending approval at {}; nothing was switched. Once approved, run `tentacle rotate-certificate` again (before the old certificate's overlap ends) to finish",
            next.thumbprint(),
            waiting.join(", ")
        );
    }
    // New files, then one atomic switch of the configuration: a running
    // agent never reads a certificate without its key.
    let short = next.thumbprint().short();
    let certificate = std::path::PathBuf::from(format!("tentacle-{short}.crt.pem"));
    let key = std::path::PathBuf::from(format!("tentacle-{short}.key.pem"));
    next.save(&home.resolve(&certificate), &home.resolve(&key))?;
    for path in [&pending_files.0, &pending_files.1] {
        let _ = std::fs::remove_file(path);
    }
    let old = config.certificate.clone();
    config.certificate.certificate = certificate;
    config.certificate.key = key;
    home.save(&config)?;
    // Give a running agent time to load the new pair before the old files go.
    tokio::time::sleep(config.server.trust_reload_interval * 3).await;
    for path in [&old.certificate, &old.key] {
        let _ = std::fs::remove_file(home.resolve(path));
    }
    println!("{}", next.thumbprint());
    Ok(())
}
