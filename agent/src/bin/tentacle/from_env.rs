//! `tentacle run --from-env`: an agent configured by environment variables,
//! for containers and Kubernetes.
//!
//! Every start, before running: the instance and its certificate are made
//! if missing, the variables that are set are applied to `tentacle.toml`,
//! and the agent registers with `TENTACLE_SERVER` unless `hubs` already
//! records that hub. A restart with the same environment therefore changes
//! nothing and does not register again (which a one-time token would not
//! allow). The hub may start after the agent, so a registration the hub
//! could not take yet is retried for `TENTACLE_REGISTER_TIMEOUT`.
//!
//! The variables are read and checked before anything is changed, and a
//! bad one stops the start with one line naming it. Secrets
//! (`TENTACLE_API_KEY`, `TENTACLE_TOKEN`) appear in no log and no error.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tentacle_agent::config::{AgentConfig, Home, PollingServer};
use tentacle_proto::backoff::Backoff;
use tentacle_proto::dial::ListeningAddress;
use tentacle_proto::{Identity, Thumbprint};

use crate::registration::{self, Credential, RegisterError, Registration};

/// How long a registration is retried when `TENTACLE_REGISTER_TIMEOUT` is
/// not set: long enough for a hub started at the same moment.
const DEFAULT_REGISTER_TIMEOUT: Duration = Duration::from_secs(120);

/// Which connections the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Listening,
    Polling,
    Both,
}

impl Mode {
    fn listens(self) -> bool {
        matches!(self, Self::Listening | Self::Both)
    }

    fn polls(self) -> bool {
        matches!(self, Self::Polling | Self::Both)
    }
}

/// Everything `--from-env` reads, checked.
#[derive(Debug)]
pub struct Environment {
    pub mode: Mode,
    pub listen_address: Option<IpAddr>,
    pub port: Option<u16>,
    pub trust: Vec<Thumbprint>,
    /// `TENTACLE_SERVER` (with its port) and `TENTACLE_SERVER_THUMBPRINT`.
    pub server: Option<(ListeningAddress, Thumbprint)>,
    pub credential: Option<Credential>,
    /// `TENTACLE_NAME`, else the host name; the error says why there is
    /// none, for when one is needed.
    name: Result<String, String>,
    pub roles: Vec<String>,
    pub environments: Vec<String>,
    pub public_hostname: Option<String>,
    pub tunnels: Option<u32>,
    pub heartbeat_interval: Option<Duration>,
    pub heartbeat_timeout: Option<Duration>,
    pub reconnect_initial: Option<Duration>,
    pub reconnect_max: Option<Duration>,
    pub register_timeout: Duration,
}

/// One variable's value, trimmed; empty counts as unset, as a Kubernetes
/// `value: ""` should.
fn read(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    var(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn list(value: Option<String>) -> Vec<String> {
    value
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The rule hubs apply to names: 1-128 letters, digits, `-`, `_` or `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn duration(
    var: &dyn Fn(&str) -> Option<String>,
    name: &str,
    zero_allowed: bool,
) -> anyhow::Result<Option<Duration>> {
    let Some(value) = read(var, name) else {
        return Ok(None);
    };
    match humantime::parse_duration(&value) {
        Ok(d) if zero_allowed || !d.is_zero() => Ok(Some(d)),
        _ => bail!("{name}=`{value}` is not a duration such as 20s, 2m or 1h30m"),
    }
}

impl Environment {
    /// Reads this process's environment and `/etc/hostname`.
    pub fn from_process() -> anyhow::Result<Self> {
        let host_file = std::fs::read_to_string("/etc/hostname").ok();
        Self::parse(
            &|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()),
            host_file.as_deref(),
        )
    }

    /// Reads the variables through `var`; `host_file` is the content of
    /// `/etc/hostname`, if any.
    pub fn parse(
        var: &dyn Fn(&str) -> Option<String>,
        host_file: Option<&str>,
    ) -> anyhow::Result<Self> {
        let server = match (
            read(var, "TENTACLE_SERVER"),
            read(var, "TENTACLE_SERVER_THUMBPRINT"),
        ) {
            (Some(url), Some(thumbprint)) => {
                let address = registration::hub_address(&url).map_err(|_| {
                    anyhow::anyhow!(
                        "TENTACLE_SERVER=`{url}` is not a hub address: expected https://HOST:PORT, e.g. https://tentacle-hub:10943"
                    )
                })?;
                let thumbprint = thumbprint
                    .parse::<Thumbprint>()
                    .map_err(|e| anyhow::anyhow!("TENTACLE_SERVER_THUMBPRINT: {e}"))?;
                Some((address, thumbprint))
            }
            (Some(_), None) => bail!(
                "TENTACLE_SERVER is set but TENTACLE_SERVER_THUMBPRINT is not: set it to the hub's thumbprint (`tentacle-hub show-thumbprint`)"
            ),
            (None, Some(_)) => bail!(
                "TENTACLE_SERVER_THUMBPRINT is set but TENTACLE_SERVER is not: set it to the hub, https://HOST:10943"
            ),
            (None, None) => None,
        };
        // The secrets' values are never part of a message.
        let credential = match (read(var, "TENTACLE_API_KEY"), read(var, "TENTACLE_TOKEN")) {
            (Some(_), Some(_)) => bail!("set TENTACLE_API_KEY or TENTACLE_TOKEN, not both"),
            (Some(key), None) => Some(Credential::ApiKey(key)),
            (None, Some(token)) => Some(Credential::Token(token)),
            (None, None) => None,
        };
        if credential.is_some() && server.is_none() {
            bail!(
                "a registration credential is set but TENTACLE_SERVER is not: set TENTACLE_SERVER and TENTACLE_SERVER_THUMBPRINT to the hub to register with"
            );
        }
        let mode = match read(var, "TENTACLE_MODE").as_deref() {
            None if server.is_some() => Mode::Polling,
            None => Mode::Listening,
            Some("listening") => Mode::Listening,
            Some("polling") => Mode::Polling,
            Some("both") => Mode::Both,
            Some(other) => bail!("TENTACLE_MODE=`{other}` is not listening, polling or both"),
        };
        let listen_address = read(var, "TENTACLE_LISTEN_ADDRESS")
            .map(|value| {
                value.parse::<IpAddr>().map_err(|_| {
                    anyhow::anyhow!(
                        "TENTACLE_LISTEN_ADDRESS=`{value}` is not an IP address, e.g. 0.0.0.0 or 127.0.0.1"
                    )
                })
            })
            .transpose()?;
        let port = read(var, "TENTACLE_PORT")
            .map(|value| match value.parse::<u16>() {
                Ok(port) if port > 0 => Ok(port),
                // What Kubernetes sets for a Service named `tentacle`.
                _ if value.starts_with("tcp://") => Err(anyhow::anyhow!(
                    "TENTACLE_PORT=`{value}` is not a port number (1-65535); Kubernetes sets this for a Service named `tentacle`: rename the Service or set `enableServiceLinks: false`"
                )),
                _ => Err(anyhow::anyhow!(
                    "TENTACLE_PORT=`{value}` is not a port number (1-65535)"
                )),
            })
            .transpose()?;
        let trust = list(read(var, "TENTACLE_TRUST"))
            .into_iter()
            .map(|item| {
                item.parse::<Thumbprint>()
                    .map_err(|e| anyhow::anyhow!("TENTACLE_TRUST: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let host_name = read(var, "HOSTNAME").or_else(|| {
            host_file
                .map(|text| text.trim().to_owned())
                .filter(|h| !h.is_empty())
        });
        let name = match (read(var, "TENTACLE_NAME"), &host_name) {
            (Some(name), _) if valid_name(&name) => Ok(name),
            (Some(name), _) => bail!(
                "TENTACLE_NAME=`{name}` is not a valid name: use 1-128 letters, digits, `-`, `_` or `.`"
            ),
            (None, Some(host)) if valid_name(host) => Ok(host.clone()),
            (None, Some(host)) => Err(format!(
                "the host name `{host}` is not a valid agent name: set TENTACLE_NAME to 1-128 letters, digits, `-`, `_` or `.`"
            )),
            (None, None) => Err(
                "this agent needs a name and there is no host name (HOSTNAME, /etc/hostname): set TENTACLE_NAME".to_owned(),
            ),
        };
        let tunnels = read(var, "TENTACLE_TUNNELS")
            .map(|value| match value.parse::<u32>() {
                Ok(n @ 1..=64) => Ok(n),
                _ => Err(anyhow::anyhow!(
                    "TENTACLE_TUNNELS=`{value}` is not a number of tunnels (1-64)"
                )),
            })
            .transpose()?;
        Ok(Self {
            mode,
            listen_address,
            port,
            trust,
            server,
            credential,
            name,
            roles: list(read(var, "TENTACLE_ROLES")),
            environments: list(read(var, "TENTACLE_ENVIRONMENTS")),
            public_hostname: read(var, "TENTACLE_PUBLIC_HOSTNAME").or(host_name),
            tunnels,
            heartbeat_interval: duration(var, "TENTACLE_HEARTBEAT_INTERVAL", false)?,
            heartbeat_timeout: duration(var, "TENTACLE_HEARTBEAT_TIMEOUT", false)?,
            reconnect_initial: duration(var, "TENTACLE_RECONNECT_INITIAL", false)?,
            reconnect_max: duration(var, "TENTACLE_RECONNECT_MAX", false)?,
            register_timeout: duration(var, "TENTACLE_REGISTER_TIMEOUT", true)?
                .unwrap_or(DEFAULT_REGISTER_TIMEOUT),
        })
    }

    /// The agent's name, or why it has none.
    pub fn name(&self) -> anyhow::Result<&str> {
        self.name.as_deref().map_err(|why| anyhow::anyhow!("{why}"))
    }

    /// Sets in `config` what the variables say; leaves the rest alone.
    pub fn apply(&self, config: &mut AgentConfig) -> anyhow::Result<()> {
        config.listen.enabled = self.mode.listens();
        config.polling.enabled = self.mode.polls();
        if let Some(address) = self.listen_address {
            config.listen.address = address;
        }
        if let Some(port) = self.port {
            config.listen.port = port;
        }
        // Added, never removed: a thumbprint trusted another way (a
        // registration, `tentacle configure`) stays trusted.
        let mut trusted: Vec<Thumbprint> = self.trust.clone();
        if let Some((address, thumbprint)) = &self.server {
            if self.mode.polls() {
                let url = address.to_string();
                config.polling.servers.retain(|s| s.url != url);
                config.polling.servers.push(PollingServer {
                    url,
                    thumbprint: *thumbprint,
                });
            }
            if self.mode.listens() {
                trusted.push(*thumbprint);
            }
        }
        for thumbprint in trusted {
            if !config.trust.thumbprints.contains(&thumbprint) {
                config.trust.thumbprints.push(thumbprint);
            }
        }
        if self.mode.polls() {
            config.polling.agent_id = self.name()?.to_owned();
        }
        if let Some(tunnels) = self.tunnels {
            config.polling.tunnels = tunnels;
        }
        let polling = &mut config.polling;
        for (value, setting) in [
            (self.heartbeat_interval, &mut polling.heartbeat_interval),
            (self.heartbeat_timeout, &mut polling.heartbeat_timeout),
            (self.reconnect_initial, &mut polling.reconnect_initial),
            (self.reconnect_max, &mut polling.reconnect_max),
        ] {
            if let Some(value) = value {
                *setting = value;
            }
        }
        Ok(())
    }

    /// The registration to make, when there is a hub and a credential and
    /// `config` does not record that hub yet.
    pub fn pending_registration(
        &self,
        config: &AgentConfig,
    ) -> anyhow::Result<Option<Registration>> {
        let (Some((address, thumbprint)), Some(credential)) = (&self.server, &self.credential)
        else {
            return Ok(None);
        };
        let url = address.to_string();
        if config
            .hubs
            .iter()
            .any(|hub| hub.url == url && hub.thumbprint == *thumbprint)
        {
            return Ok(None);
        }
        let polling = self.mode.polls();
        Ok(Some(Registration {
            server: address.clone(),
            server_thumbprint: *thumbprint,
            name: self.name()?.to_owned(),
            roles: self.roles.clone(),
            environments: self.environments.clone(),
            polling,
            public_hostname: (!polling).then(|| self.public_hostname.clone()).flatten(),
            port: None,
            credential: credential.clone(),
        }))
    }
}

/// Makes the instance and its certificate if missing, applies `env`, and
/// registers if needed; then the agent is ready for `run`.
pub async fn prepare(home: &Path, env: &Environment) -> anyhow::Result<()> {
    let home = Home::new(home);
    if !home.exists() {
        crate::commands::new_instance(&home)?;
        tracing::info!(home = %home.dir().display(), "created an instance");
    }
    let config = home.load()?;
    let certificate = home.resolve(&config.certificate.certificate);
    if !certificate.exists() {
        let identity = Identity::generate("Tentacle")?;
        identity.save(&certificate, &home.resolve(&config.certificate.key))?;
        tracing::info!(thumbprint = %identity.thumbprint(), "made this agent's certificate");
    }
    apply_and_save(&home, env)?;

    let config = home.load()?;
    match env.pending_registration(&config)? {
        Some(registration) => {
            let registered = register_within(&home, &registration, env.register_timeout).await?;
            tracing::info!(
                name = %registered.name,
                target = %registered.target,
                hub = %registration.server,
                roles = %registered.roles.join(","),
                environments = %registered.environments.join(","),
                "registered"
            );
            // Registering sets the mode it registered for; `both` wants
            // both back.
            apply_and_save(&home, env)?;
        }
        None if env.server.is_some() && env.credential.is_none() => {
            tracing::info!(
                "TENTACLE_SERVER is set without TENTACLE_API_KEY or TENTACLE_TOKEN: not registering; the hub must trust this agent already (`tentacle-hub server trust add`)"
            );
        }
        None => {}
    }
    Ok(())
}

/// Applies `env` and writes the file only if that changed something.
fn apply_and_save(home: &Home, env: &Environment) -> anyhow::Result<()> {
    let before = home.load()?;
    let mut config = before.clone();
    env.apply(&mut config)?;
    if config != before {
        home.save(&config)?;
        tracing::info!(path = %home.config_path().display(), "applied the environment");
    }
    Ok(())
}

/// Registers, retrying what may succeed later until `timeout` has passed.
async fn register_within(
    home: &Home,
    registration: &Registration,
    timeout: Duration,
) -> anyhow::Result<tentacle_proto::v1::RegisteredAgent> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        // An attempt never outlasts the deadline by much, whatever the
        // connect timeout.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = tokio::time::timeout(
            left.max(Duration::from_secs(1)),
            registration::register(home, registration),
        )
        .await
        .unwrap_or_else(|_| {
            Err(RegisterError::Unreachable {
                url: registration.server.to_string(),
                reason: "no answer in time".into(),
            })
        });
        let error = match attempt {
            Ok(registered) => return Ok(registered),
            Err(error) if error.is_worth_retrying() => error,
            Err(error) => return Err(error.into()),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(error).with_context(|| {
                format!(
                    "gave up registering after {} (TENTACLE_REGISTER_TIMEOUT); is the hub running?",
                    humantime::format_duration(timeout)
                )
            });
        }
        let delay = backoff.next_delay(&mut rand::rng()).min(left);
        tracing::warn!(%error, retry_in = ?delay, "could not register yet; trying again");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests;
