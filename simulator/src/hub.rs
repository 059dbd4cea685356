//! The hub: one control-plane API that reaches every agent, listening or
//! polling.
//!
//! It listens (10943 by default) for polling agents' tunnels and for
//! operators' calls, both over pinned mTLS. [`Hub::channel`] gives an
//! [`AgentChannel`] for any target; the generated tonic clients run over it
//! unchanged.
//!
//! - `registry`: open tunnels and calls waiting for an agent.
//! - `tunnels`: the `TunnelService` that polling agents call.
//! - `proxy`: forwards operators' calls to the agent they name.
//! - `trust`: the agents this hub trusts, on disk.
//! - `grouped`: registrations that arrive together share one write.

pub mod credentials;
pub mod grouped;
pub mod proxy;
pub mod registration;
pub mod registry;
pub mod trust;
pub mod tunnels;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::incoming::{AcceptSettings, accept_tls};
use tentacle_proto::tunnel::HeartbeatSettings;
use tentacle_proto::v1::fleet_service_server::FleetServiceServer;
use tentacle_proto::v1::registration_service_server::RegistrationServiceServer;
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::v1::tunnel_service_server::TunnelServiceServer;
use tentacle_proto::v1::{TunnelDrain, TunnelFrame};
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Channel, Server};

use crate::channel::{AgentChannel, DEFAULT_PICKUP_TIMEOUT, PollingChannel};
use crate::client::AgentClient;
use crate::target::{AgentId, Target};
pub use registry::Registry;
pub use trust::{AgentMode, TrustedAgent};

/// The port a hub listens on unless told otherwise.
pub const DEFAULT_HUB_PORT: u16 = 10943;

/// How the hub behaves.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// How long a call waits for a polling agent to connect.
    pub pickup_timeout: Duration,
    pub heartbeat: HeartbeatSettings,
    /// How long draining tunnels get to finish their calls at shutdown.
    pub drain_grace: Duration,
    pub dial: DialSettings,
    pub accept: AcceptSettings,
    /// How long a new tunnel may take to finish its inner HTTP/2 handshake.
    pub tunnel_setup_timeout: Duration,
    /// How long an agent's old certificate stays trusted after a rotation,
    /// unless the agent asks for another overlap.
    pub rotation_overlap: Duration,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            pickup_timeout: DEFAULT_PICKUP_TIMEOUT,
            heartbeat: HeartbeatSettings::default(),
            drain_grace: Duration::from_secs(30),
            dial: DialSettings::default(),
            accept: AcceptSettings::default(),
            tunnel_setup_timeout: Duration::from_secs(30),
            rotation_overlap: Duration::from_secs(10 * 60),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a certificate rotation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("thumbprint {0} is not registered with this hub")]
    NotRegistered(Thumbprint),
    #[error("thumbprint {0} is being retired; rotate from the current certificate")]
    AlreadyRotating(Thumbprint),
    #[error(transparent)]
    Store(trust::TrustFileError),
}

/// Why the hub could not do something.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Dial(#[from] dial::DialError),
    #[error(transparent)]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    #[error("the hub's server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Where a hub keeps its registry and credentials.
#[derive(Debug)]
pub struct HubStore {
    pub agents: trust::AgentTrustFile,
    pub credentials: credentials::CredentialStore,
}

impl HubStore {
    /// `agents.toml` and `credentials.toml` in `dir`.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            agents: trust::AgentTrustFile::new(dir.join("agents.toml")),
            credentials: credentials::CredentialStore::new(dir.join("credentials.toml")),
        }
    }
}

/// The control plane's connection to every agent.
#[derive(Debug)]
pub struct Hub {
    identity: Identity,
    store: Option<HubStore>,
    settings: HubSettings,
    registry: Arc<Registry>,
    agents: ArcSwap<Vec<TrustedAgent>>,
    /// Thumbprints allowed to complete a handshake: agents, this hub's own
    /// certificate (operators who share its home) and extra operators.
    tls_trust: Arc<TrustStore>,
    operators: ArcSwap<Vec<Thumbprint>>,
    /// Serialises read-modify-write changes to the agent list, so
    /// concurrent registrations do not overwrite each other.
    agents_write: Mutex<()>,
    /// Listening connections, each with the thumbprints it accepts (more
    /// than one while the agent rotates its certificate).
    pool: Mutex<HashMap<(ListeningAddress, Thumbprint), Pooled>>,
    /// Registrations waiting to be stored together.
    grouped: grouped::GroupedRegistrations,
}

/// A pooled connection to a listening agent and the thumbprints it accepts.
type Pooled = (Channel, Arc<TrustStore>);

impl Hub {
    /// A hub that keeps its registry in memory only and takes no
    /// registrations.
    pub fn new(identity: Identity, settings: HubSettings) -> Arc<Self> {
        Self::build(identity, settings, None)
    }

    /// A hub that loads its registry from `store`, keeps it there, and takes
    /// registrations.
    pub fn with_store(
        identity: Identity,
        settings: HubSettings,
        store: HubStore,
    ) -> Result<Arc<Self>, trust::TrustFileError> {
        let agents = store.agents.load()?;
        let hub = Self::build(identity, settings, Some(store));
        hub.set_agents(agents);
        Ok(hub)
    }

    fn build(identity: Identity, settings: HubSettings, store: Option<HubStore>) -> Arc<Self> {
        let own = identity.thumbprint();
        Arc::new(Self {
            identity,
            store,
            settings,
            registry: Arc::default(),
            agents: ArcSwap::from_pointee(Vec::new()),
            tls_trust: TrustStore::new([own]),
            operators: ArcSwap::from_pointee(vec![own]),
            agents_write: Mutex::new(()),
            pool: Mutex::new(HashMap::new()),
            grouped: grouped::GroupedRegistrations::default(),
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn store(&self) -> Option<&HubStore> {
        self.store.as_ref()
    }

    /// The registered agents.
    pub fn agents(&self) -> Arc<Vec<TrustedAgent>> {
        self.agents.load_full()
    }

    /// Stores a registration (replacing one with the same thumbprint or
    /// name) and trusts it at once.
    pub fn register(&self, agent: TrustedAgent) -> Result<(), trust::TrustFileError> {
        self.register_all(vec![agent])
    }

    /// Stores registrations in order with one write of the store, and
    /// trusts them at once.
    pub fn register_all(&self, batch: Vec<TrustedAgent>) -> Result<(), trust::TrustFileError> {
        // File and memory change under one lock, so a reload of the file
        // never sees one without the other.
        let _write = self
            .agents_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(store) = &self.store {
            store.agents.upsert_all(batch.clone())?;
        }
        self.replace_agents(batch);
        Ok(())
    }

    /// Picks up edits made to the store by other processes (`tentacle-sim
    /// server trust add/remove`). Returns whether anything changed.
    pub fn reload_agents(&self) -> Result<bool, trust::TrustFileError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let _write = self
            .agents_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let agents = store.agents.load()?;
        if *self.agents.load_full() == agents {
            return Ok(false);
        }
        self.set_agents(agents);
        Ok(true)
    }

    /// Forgets an agent; its connections are closed.
    pub fn deregister(&self, thumbprint: &Thumbprint) -> Result<(), trust::TrustFileError> {
        let _write = self
            .agents_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(store) = &self.store {
            store.agents.remove(thumbprint)?;
        }
        let mut agents = (*self.agents.load_full()).clone();
        agents.retain(|a| !a.has_thumbprint(thumbprint));
        self.set_agents(agents);
        Ok(())
    }

    /// Replaces the list of trusted agents. Connections from agents that
    /// are no longer listed are closed.
    pub fn set_agents(&self, agents: Vec<TrustedAgent>) {
        self.registry.set_aliases(
            agents
                .iter()
                .filter_map(|a| Some((AgentId::parse(&a.name).ok()?, a.thumbprints().collect()))),
        );
        self.agents.store(Arc::new(agents));
        self.refresh_tls_trust();
        for ((_, thumbprint), (_, trust)) in self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            trust.replace(self.same_agent(thumbprint));
        }
    }

    /// `thumbprint` and every other thumbprint registered for its agent.
    fn same_agent(&self, thumbprint: &Thumbprint) -> Vec<Thumbprint> {
        let agents = self.agents.load();
        match agents.iter().find(|a| a.has_thumbprint(thumbprint)) {
            Some(agent) => agent.thumbprints().collect(),
            None => vec![*thumbprint],
        }
    }

    /// Adds or replaces one trusted agent.
    pub fn trust_agent(&self, agent: TrustedAgent) {
        let _write = self
            .agents_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.replace_agents([agent]);
    }

    /// Adds or replaces agents in order; the caller holds `agents_write`.
    fn replace_agents(&self, batch: impl IntoIterator<Item = TrustedAgent>) {
        let mut agents = (*self.agents.load_full()).clone();
        for agent in batch {
            trust::upsert_into(&mut agents, agent);
        }
        self.set_agents(agents);
    }

    /// Allows a client with this thumbprint to send calls through the hub.
    pub fn trust_operator(&self, thumbprint: Thumbprint) {
        let mut operators = (*self.operators.load_full()).clone();
        if !operators.contains(&thumbprint) {
            operators.push(thumbprint);
        }
        self.operators.store(Arc::new(operators));
        self.refresh_tls_trust();
    }

    fn refresh_tls_trust(&self) {
        let agents = self.agents.load();
        let operators = self.operators.load();
        self.tls_trust.replace(
            agents
                .iter()
                .flat_map(|a| a.thumbprints())
                .chain(operators.iter().copied()),
        );
    }

    pub fn is_operator(&self, thumbprint: &Thumbprint) -> bool {
        self.operators.load().contains(thumbprint)
    }

    /// Whether `thumbprint` may open tunnels as `agent_id`.
    pub fn allows_tunnel(&self, thumbprint: &Thumbprint, agent_id: &str) -> bool {
        self.agents.load().iter().any(|a| {
            a.has_thumbprint(thumbprint) && a.mode == AgentMode::Polling && a.name == agent_id
        })
    }

    /// A channel to `target`, whose certificate must have `thumbprint`.
    /// Listening connections are pooled; polling calls wait for the agent's
    /// tunnel up to the pickup timeout.
    pub async fn channel(
        &self,
        target: &Target,
        thumbprint: Thumbprint,
    ) -> Result<AgentChannel, HubError> {
        match target {
            Target::Polling(agent) => Ok(AgentChannel::Polling(PollingChannel::new(
                self.registry.clone(),
                agent.clone(),
                thumbprint,
                self.settings.pickup_timeout,
            ))),
            Target::Listening(address) => {
                let key = (address.clone(), thumbprint);
                if let Some(channel) = self
                    .pool
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&key)
                {
                    return Ok(AgentChannel::Direct(channel.0.clone()));
                }
                let trust = TrustStore::new(self.same_agent(&thumbprint));
                let tls = tentacle_proto::tls::client_config(&self.identity, trust.clone())?;
                let channel = dial::channel(address, tls, &self.settings.dial).await?;
                self.pool
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(key)
                    .or_insert((channel.clone(), trust));
                Ok(AgentChannel::Direct(channel))
            }
        }
    }

    /// A typed client for `target`.
    pub async fn client(
        &self,
        target: &Target,
        thumbprint: Thumbprint,
    ) -> Result<AgentClient, HubError> {
        Ok(AgentClient::new(self.channel(target, thumbprint).await?))
    }

    /// Serves tunnels and operators' calls on `listener` until `shutdown`,
    /// then drains: every tunnel is told, gets up to the drain grace to
    /// finish its calls, and is closed.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), HubError> {
        // A hub that takes registrations lets unknown certificates finish the
        // handshake; every service then authorises each call itself.
        let open = self.store.is_some();
        let identity = tentacle_proto::tls::IdentityCell::new(self.identity.clone())?;
        let tls = if open {
            tentacle_proto::tls::server_config_open_to_registration(
                identity,
                self.tls_trust.clone(),
            )?
        } else {
            tentacle_proto::tls::server_config(identity, self.tls_trust.clone())?
        };
        let retiring = tokio::spawn(self.clone().retire_rotated_certificates());
        let mut accept = self.settings.accept.clone();
        accept.require_trusted_peers = !open;
        let incoming = accept_tls(
            listener,
            TlsAcceptor::from(tls),
            self.tls_trust.clone(),
            accept,
        );
        let tunnels = TunnelServiceServer::new(tunnels::TunnelApi::new(self.clone()))
            .max_decoding_message_size(tentacle_proto::tunnel::MAX_FRAME);
        let registration = registration::RegistrationApi::new(self.clone());
        let router = Routes::new(tunnels)
            .add_service(RegistrationServiceServer::new(registration.clone()))
            .add_service(FleetServiceServer::new(registration))
            .into_axum_router()
            .fallback_service(proxy::Forwarder::new(self.clone()));
        let hub = self.clone();
        let drained = CancellationToken::new();
        let signal = {
            let drained = drained.clone();
            async move {
                shutdown.await;
                hub.drain().await;
                drained.cancel();
            }
        };
        let builder = Server::builder()
            .http2_keepalive_interval(Some(self.settings.heartbeat.interval))
            .http2_keepalive_timeout(Some(self.settings.heartbeat.timeout))
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .max_frame_size(Some(256 * 1024));
        let serving = tentacle_proto::telemetry::with_server_spans(builder, "hub")
            .add_routes(Routes::from(router))
            .serve_with_incoming_shutdown(incoming, signal);
        // tonic waits for every connection to close after the drain; a
        // connection that never does must not keep the hub alive forever.
        tokio::pin!(serving);
        let result = tokio::select! {
            result = &mut serving => result,
            () = async {
                drained.cancelled().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            } => {
                tracing::warn!("connections still open after the drain; stopping anyway");
                Ok(())
            }
        };
        retiring.abort();
        Ok(result?)
    }

    /// Retires thumbprints whose rotation overlap has passed.
    async fn retire_rotated_certificates(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = unix_now();
            let due: Vec<TrustedAgent> = self
                .agents()
                .iter()
                .filter(|a| {
                    a.previous_thumbprint.is_some()
                        && a.retire_previous_at.is_some_and(|t| t <= now)
                })
                .cloned()
                .collect();
            for mut agent in due {
                tracing::info!(
                    name = %agent.name,
                    retired = ?agent.previous_thumbprint,
                    "retired an agent's previous certificate"
                );
                agent.previous_thumbprint = None;
                agent.retire_previous_at = None;
                if let Err(error) = self.register(agent) {
                    tracing::error!(%error, "could not store a retired certificate");
                }
            }
        }
    }

    /// Trusts `new` for the agent that holds `current`, keeping `current`
    /// for `overlap`. Returns when `current` will be retired (Unix seconds).
    pub fn rotate(
        &self,
        current: &Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> Result<u64, RotateError> {
        let mut agent = self
            .agents()
            .iter()
            .find(|a| a.has_thumbprint(current))
            .cloned()
            .ok_or(RotateError::NotRegistered(*current))?;
        if agent.thumbprint == new {
            // Announced twice: nothing changes.
            return Ok(agent.retire_previous_at.unwrap_or_else(unix_now));
        }
        if agent.thumbprint != *current {
            return Err(RotateError::AlreadyRotating(*current));
        }
        let retire_at = unix_now().saturating_add(overlap.as_secs());
        agent.previous_thumbprint = Some(agent.thumbprint);
        agent.thumbprint = new;
        agent.retire_previous_at = Some(retire_at);
        self.register(agent).map_err(RotateError::Store)?;
        Ok(retire_at)
    }

    /// Refuses new tunnels, tells every open one the hub is going away,
    /// waits for their calls, and closes them.
    pub async fn drain(&self) {
        // Closed first: a tunnel accepted during the drain would miss the
        // snapshot below and outlive this hub, holding its agent captive.
        self.registry.close();
        let tunnels = self.registry.tunnels();
        tracing::info!(tunnels = tunnels.len(), "draining tunnels");
        for tunnel in &tunnels {
            tunnel.start_draining();
            let _ = tunnel.control.try_send(TunnelFrame {
                kind: Some(Kind::Drain(TunnelDrain {
                    reason: "the hub is shutting down".into(),
                })),
            });
        }
        let idle = async {
            while tunnels.iter().any(|t| t.in_flight() > 0) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(self.settings.drain_grace, idle)
            .await
            .is_err()
        {
            tracing::warn!(
                "calls still running after the drain grace period; closing their tunnels"
            );
        }
        for tunnel in &tunnels {
            tunnel.stop.cancel();
        }
    }
}
