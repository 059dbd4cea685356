//! `register-with` and `deregister-from`: joining and leaving a hub's fleet.

use std::path::Path;

use anyhow::{Context, bail};
use tentacle_agent::config::{Home, PollingServer};
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The hub, https://HOST:PORT (port 10943 by default).
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

fn hub_address(server: &str) -> anyhow::Result<ListeningAddress> {
    let with_port = if server
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        server.to_owned()
    } else {
        format!("{}:10943", server.trim_end_matches('/'))
    };
    Ok(with_port.parse()?)
}

async fn connect(
    identity: &Identity,
    address: &ListeningAddress,
    hub: Thumbprint,
) -> anyhow::Result<RegistrationServiceClient<tonic::transport::Channel>> {
    let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([hub]))?;
    let channel = dial::channel(address, tls, &DialSettings::default()).await?;
    Ok(RegistrationServiceClient::new(channel))
}

fn load_identity(home: &Home) -> anyhow::Result<(tentacle_agent::config::AgentConfig, Identity)> {
    let config = home.load()?;
    let identity = Identity::load(
        &home.resolve(&config.certificate.certificate),
        &home.resolve(&config.certificate.key),
    )?;
    Ok((config, identity))
}

pub async fn register_with(home: &Path, args: RegisterArgs) -> anyhow::Result<()> {
    let home = Home::new(home);
    let (mut config, identity) = load_identity(&home)?;
    let address = hub_address(&args.server)?;
    let polling = args.mode == "polling";
    let request = pb::RegisterRequest {
        credential: match (args.token, args.api_key) {
            (Some(token), _) => Some(pb::register_request::Credential::Token(token)),
            (None, Some(key)) => Some(pb::register_request::Credential::ApiKey(key)),
            (None, None) => bail!("give --token or --api-key"),
        },
        name: args.name.clone(),
        mode: if polling {
            pb::AgentMode::Polling
        } else {
            pb::AgentMode::Listening
        } as i32,
        roles: args.roles,
        environments: args.environments,
        public_hostname: args.public_hostname.unwrap_or_default(),
        port: u32::from(args.port.unwrap_or(config.listen.port)),
    };
    let mut client = connect(&identity, &address, args.server_thumbprint).await?;
    let registered = client
        .register(request)
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the hub refused the registration: {}",
                dial::describe_status(&status)
            )
        })?
        .into_inner()
        .agent
        .context("the hub's reply has no registry entry")?;

    // Now trust the hub the way the chosen mode needs.
    let url = address.to_string();
    config.hubs.retain(|h| h.url != url);
    config.hubs.push(PollingServer {
        url: url.clone(),
        thumbprint: args.server_thumbprint,
    });
    if polling {
        config.polling.enabled = true;
        config.listen.enabled = false;
        config.polling.agent_id = args.name.clone();
        config.polling.servers.retain(|s| s.url != url);
        config.polling.servers.push(PollingServer {
            url: url.clone(),
            thumbprint: args.server_thumbprint,
        });
    } else {
        config.listen.enabled = true;
        if let Some(port) = args.port {
            config.listen.port = port;
        }
        if !config.trust.thumbprints.contains(&args.server_thumbprint) {
            config.trust.thumbprints.push(args.server_thumbprint);
        }
    }
    home.save(&config)?;
    println!(
        "Registered as {} ({}) with the hub at {url}; roles: {}; environments: {}",
        registered.name,
        registered.target,
        registered.roles.join(", "),
        registered.environments.join(", ")
    );
    Ok(())
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
    let mut client = connect(&identity, &address, thumbprint).await?;
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

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// How long hubs keep trusting the current certificate after the switch.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    overlap: std::time::Duration,
}

/// Makes a new certificate, tells every hub this agent registered with or
/// polls, and then points the configuration at it; a running agent switches
/// within a second, opening new tunnels before it drains the old ones.
pub async fn rotate_certificate(home: &Path, args: RotateArgs) -> anyhow::Result<()> {
    let home = Home::new(home);
    let (mut config, current) = load_identity(&home)?;
    let next = Identity::generate("Tentacle")?;
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
    for hub in &hubs {
        let address = hub_address(&hub.url)?;
        let mut client = connect(&current, &address, hub.thumbprint).await?;
        let answer = client
            .rotate_certificate(pb::RotateCertificateRequest {
                new_certificate: next.certificate().to_vec(),
                overlap_seconds: args.overlap.as_secs().max(1),
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
        let retires =
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(answer.retire_old_at_unix);
        println!(
            "{} trusts {} now and retires {} at {} (UTC)",
            hub.url,
            answer.new_thumbprint,
            current.thumbprint(),
            humantime::format_rfc3339_seconds(retires)
        );
    }
    // New files, then one atomic switch of the configuration: a running
    // agent never reads a certificate without its key.
    let short = next.thumbprint().short();
    let certificate = std::path::PathBuf::from(format!("tentacle-{short}.crt.pem"));
    let key = std::path::PathBuf::from(format!("tentacle-{short}.key.pem"));
    next.save(&home.resolve(&certificate), &home.resolve(&key))?;
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
