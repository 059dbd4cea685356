//! Virtual tentacles: many agents in one process. Each has its own
//! certificate and registers with the hub like a real agent.
//!
//! Architecture Invariant: a virtual tentacle is the real agent
//! ([`tentacle_agent::runtime::Agent`]) built through its builder, with only
//! these parts swapped: script execution is simulated ([`executor`]),
//! uploads are verified then discarded, tunnels dial through a
//! [`FaultDialer`] and accepted connections are wrapped in a
//! [`FaultyStream`] ([`faults`]), the configuration and identity live in
//! memory, and free space comes from a shared fake disk. The script table
//! and its cleaner, the free-space checks, routes, serve settings, health
//! and shutdown are the agent's own. `fleet::tests` keeps this true.

pub mod executor;
pub mod faults;
pub mod nodes;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tentacle_agent::config::{AgentConfig, Home, PollingServer, ScriptsConfig};
use tentacle_agent::files::{FakeFreeSpace, UploadSink};
use tentacle_agent::runtime::{Agent, AgentError, ConfigSource, StreamLayer};
use tentacle_agent::scripts::Scripts;
use tentacle_agent::server;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::tunnel::HeartbeatSettings;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tentacle_hub::target::{AgentId, Target};

pub use executor::{ExecutionLedger, ScriptModel, SimulatedExecutor};
pub use faults::{FaultDialer, Faults, FaultyStream};
pub use nodes::{LastNode, NodeLinks};

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub agents: usize,
    /// Agents are named `<prefix>-<index>`; indices start here, so shards
    /// of one fleet hold disjoint identities.
    pub name_prefix: String,
    pub first_index: usize,
    /// How many of the agents listen instead of polling (the first ones).
    pub listening: usize,
    /// The hub's addresses: one hub, or every node of a hub cluster. All
    /// share `hub_thumbprint`, so a polling agent treats several as one
    /// cluster and holds its tunnel on one node at a time, failing over to
    /// the next when that node is lost.
    pub hubs: Vec<ListeningAddress>,
    pub hub_thumbprint: Thumbprint,
    /// Registers every agent (`tentacle-hub server api-key create`).
    pub api_key: String,
    pub roles: Vec<String>,
    pub environments: Vec<String>,
    /// Workspaces of all agents live under it.
    pub work_dir: PathBuf,
    pub model: ScriptModel,
    pub seed: u64,
    /// Registrations in flight at once.
    pub registration_parallelism: usize,
    /// Agent starts are spread evenly over this long.
    pub ramp: Duration,
    /// Polling agents dial from 127.0.0.1 ..= 127.0.0.N (1 = the default
    /// source address).
    pub source_addresses: u8,
    pub heartbeat: HeartbeatSettings,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// How long a stopping agent lets open calls finish.
    pub shutdown_grace: Duration,
    /// Each agent's cleaner deletes complete workspaces older than this,
    /// looking every `cleanup_interval`.
    pub workspace_max_age: Duration,
    pub cleanup_interval: Duration,
    /// The disk every agent's free-space checks ask: one for the whole
    /// fleet, as they share one real disk whose free space says nothing
    /// about any one agent.
    pub free_space: Arc<FakeFreeSpace>,
    /// Counts every script start, if given.
    pub ledger: Option<Arc<ExecutionLedger>>,
    /// Open connections per hub node, in the order of `hubs`; made by
    /// [`FleetSettings::new`], and again by [`Fleet::start`] if `hubs`
    /// changed since.
    pub node_links: Arc<NodeLinks>,
}

/// What the fleet's fake disk reports unless told otherwise: plenty.
pub const FAKE_FREE_BYTES: u64 = 1 << 50;

impl FleetSettings {
    /// `agents` polling agents for the hub at `hub`, with the defaults of
    /// `tentacle-sim fleet`; set `hubs` for the nodes of a cluster.
    pub fn new(
        agents: usize,
        hub: ListeningAddress,
        hub_thumbprint: Thumbprint,
        api_key: String,
        work_dir: PathBuf,
    ) -> Self {
        Self {
            agents,
            name_prefix: "virtual".into(),
            first_index: 0,
            listening: 0,
            node_links: Arc::new(NodeLinks::new(std::slice::from_ref(&hub))),
            hubs: vec![hub],
            hub_thumbprint,
            api_key,
            roles: vec!["sim".into()],
            environments: Vec::new(),
            work_dir,
            model: ScriptModel::default(),
            seed: 0,
            registration_parallelism: 32,
            ramp: Duration::ZERO,
            source_addresses: 1,
            heartbeat: HeartbeatSettings::default(),
            reconnect_initial: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            workspace_max_age: ScriptsConfig::default().workspace_max_age,
            cleanup_interval: ScriptsConfig::default().cleanup_interval,
            free_space: Arc::new(FakeFreeSpace::new(FAKE_FREE_BYTES)),
            ledger: None,
        }
    }
}

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Identity(#[from] tentacle_proto::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    #[error(transparent)]
    Dial(#[from] dial::DialError),
    #[error("agent {name} could not register: {reason}")]
    Register { name: String, reason: String },
    #[error("could not prepare {path}: {source}")]
    Storage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Routes(#[from] server::RoutesError),
    /// Boxed: the agent's error is large and this one travels far.
    #[error("agent {name} could not start: {source}")]
    Agent {
        name: String,
        source: Box<AgentError>,
    },
}

/// One virtual tentacle. It can crash (everything in flight is abandoned,
/// as if its process were killed) and restart over the same workspace.
#[derive(Debug)]
pub struct VirtualAgent {
    pub name: String,
    pub thumbprint: Thumbprint,
    /// The listening port, for a listening agent.
    pub port: Option<u16>,
    /// Where the hub reaches this agent.
    pub target: Target,
    pub faults: Arc<Faults>,
    /// The hub node this polling agent last dialed.
    pub hub_node: Arc<LastNode>,
    identity: Identity,
    /// The agent's global index.
    index: usize,
    source: Option<std::net::IpAddr>,
    dir: PathBuf,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    scripts: Arc<Scripts>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl VirtualAgent {
    /// The agent's script table while it runs.
    pub fn scripts(&self) -> Option<Arc<Scripts>> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|r| r.scripts.clone())
    }

    pub fn is_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Kills the agent: scripts are abandoned without an outcome, its
    /// connections break, its server stops. Nothing on disk is touched, and
    /// none of the agent's shutdown path runs, as for a killed process.
    pub fn crash(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(running) = running {
            running.scripts.halt();
            self.faults.cut();
            // Dropping the serve future also stops its cleaner and tunnels.
            running.task.abort();
        }
    }

    /// Starts a crashed agent again over its workspace; scripts it had
    /// running complete as "agent restarted".
    pub async fn restart(&self, settings: &FleetSettings) -> Result<(), FleetError> {
        if self.is_running() {
            return Ok(());
        }
        let running = launch(settings, self).await?;
        *self.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(running);
        Ok(())
    }

    /// Shuts the agent down the way a real one does on SIGTERM: health
    /// turns NOT_SERVING, open calls get the shutdown grace, scripts are
    /// stopped. The task finishes by itself within the grace period.
    fn stop(&self) {
        if let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            running.stop.cancel();
            running.scripts.stop_all();
            drop(running.task);
        }
    }
}

/// A running fleet; dropping it stops every agent.
#[derive(Debug)]
pub struct Fleet {
    pub agents: Vec<Arc<VirtualAgent>>,
    settings: Arc<FleetSettings>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Fleet {
    /// Registers and starts `settings.agents` agents, spreading the starts
    /// over `settings.ramp`.
    pub async fn start(settings: FleetSettings) -> Result<Self, FleetError> {
        Self::start_observed(settings, |_| {}).await
    }

    /// [`Fleet::start`], calling `started` as each agent comes up.
    pub async fn start_observed(
        settings: FleetSettings,
        mut started: impl FnMut(&Arc<VirtualAgent>),
    ) -> Result<Self, FleetError> {
        let mut settings = settings;
        // Keep links a caller shares (to watch them) if they fit the hubs.
        if !settings.node_links.is_for(&settings.hubs) {
            settings.node_links = Arc::new(NodeLinks::new(&settings.hubs));
        }
        let settings = Arc::new(settings);
        let mut agents = Vec::with_capacity(settings.agents);
        let began = tokio::time::Instant::now();
        {
            let starts = (0..settings.agents).map(|slot| {
                let settings = settings.clone();
                async move {
                    let offset = if settings.agents > 1 {
                        settings.ramp.mul_f64(slot as f64 / settings.agents as f64)
                    } else {
                        Duration::ZERO
                    };
                    tokio::time::sleep_until(began + offset).await;
                    start_agent(&settings, slot).await
                }
            });
            let mut results = futures::stream::iter(starts)
                .buffer_unordered(settings.registration_parallelism.max(1));
            while let Some(result) = results.next().await {
                let agent = Arc::new(result?);
                started(&agent);
                agents.push(agent);
            }
        }
        agents.sort_by_key(|a| (a.name.len(), a.name.clone()));
        Ok(Self { agents, settings })
    }

    pub fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    /// Stops every agent.
    pub fn stop(&self) {
        for agent in &self.agents {
            agent.stop();
        }
    }
}

async fn start_agent(settings: &FleetSettings, slot: usize) -> Result<VirtualAgent, FleetError> {
    let agent = prepare(settings, slot)?;
    register(settings, &agent).await?;
    let running = launch(settings, &agent).await?;
    *agent.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(running);
    Ok(agent)
}

/// The agent in `slot`: its identity, directory and, if it listens, port.
fn prepare(settings: &FleetSettings, slot: usize) -> Result<VirtualAgent, FleetError> {
    let index = settings.first_index + slot;
    let name = format!("{}-{index}", settings.name_prefix);
    let identity = Identity::generate(&name)?;
    let dir = settings.work_dir.join(&name);
    let listening = slot < settings.listening;
    // A listening agent keeps its port across restarts.
    let port = if listening {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| FleetError::Storage {
                path: dir.clone(),
                source,
            })?;
        Some(
            listener
                .local_addr()
                .map_err(|source| FleetError::Storage {
                    path: dir.clone(),
                    source,
                })?
                .port(),
        )
    } else {
        None
    };
    let target = match port {
        Some(port) => Target::Listening(ListeningAddress::new("127.0.0.1", port)),
        None => Target::Polling(AgentId::parse(&name).map_err(|e| FleetError::Register {
            name: name.clone(),
            reason: e.to_string(),
        })?),
    };
    Ok(VirtualAgent {
        thumbprint: identity.thumbprint(),
        target,
        faults: Arc::default(),
        hub_node: Arc::default(),
        index,
        source: faults::spread_source(index, settings.source_addresses),
        name,
        port,
        identity,
        dir,
        running: Mutex::new(None),
    })
}

/// The agent's configuration: what a real agent's `tentacle.toml` would
/// say, with its directories relative to the agent's own.
fn agent_config(settings: &FleetSettings, agent: &VirtualAgent) -> AgentConfig {
    let mut config = AgentConfig::default();
    config.trust.thumbprints = vec![settings.hub_thumbprint];
    config.scripts.workspace_max_age = settings.workspace_max_age;
    config.scripts.cleanup_interval = settings.cleanup_interval;
    config.server.shutdown_grace = settings.shutdown_grace;
    config.listen.enabled = agent.port.is_some();
    config.listen.address = std::net::Ipv4Addr::LOCALHOST.into();
    config.listen.port = agent.port.unwrap_or(0);
    let polling = &mut config.polling;
    polling.enabled = agent.port.is_none();
    polling.agent_id = agent.name.clone();
    polling.servers = settings
        .hubs
        .iter()
        .map(|hub| PollingServer {
            url: hub.to_string(),
            thumbprint: settings.hub_thumbprint,
        })
        .collect();
    polling.tunnels = 1;
    polling.heartbeat_interval = settings.heartbeat.interval;
    polling.heartbeat_timeout = settings.heartbeat.timeout;
    polling.reconnect_initial = settings.reconnect_initial;
    polling.reconnect_max = settings.reconnect_max;
    config
}

/// Builds the real agent over the virtual agent's directory, with the
/// fleet's parts swapped in, and starts serving it.
async fn launch(settings: &FleetSettings, agent: &VirtualAgent) -> Result<Running, FleetError> {
    let failed = |source| FleetError::Agent {
        name: agent.name.clone(),
        source: Box::new(source),
    };
    let mut executor = SimulatedExecutor::new(settings.model.clone(), settings.seed);
    if let Some(ledger) = &settings.ledger {
        executor = executor.with_ledger(ledger.clone(), agent.name.clone());
    }
    let layer = {
        let faults = agent.faults.clone();
        // Every connection obeys the agent's faults, so a crash or a cut
        // also ends the calls the hub has open on it.
        StreamLayer::new(move |io| Box::new(FaultyStream::new(io, faults.clone())))
    };
    let built = Agent::builder(Home::new(&agent.dir))
        .config_source(ConfigSource::InMemory {
            config: agent_config(settings, agent),
            identity: agent.identity.clone(),
        })
        .executor(Arc::new(executor))
        .upload_sink(UploadSink::Discard)
        .dialer(Arc::new(FaultDialer {
            faults: agent.faults.clone(),
            source: agent.source,
            nodes: Some((settings.node_links.clone(), agent.hub_node.clone())),
        }))
        .stream_layer(layer)
        .free_space(settings.free_space.clone())
        .build()
        .map_err(failed)?;
    let listener = match agent.port {
        Some(_) => Some(bind(&built).await.map_err(failed)?),
        None => None,
    };
    let scripts = built.scripts().clone();
    let stop = CancellationToken::new();
    let name = agent.name.clone();
    let shutdown = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        if let Err(error) = built.serve(listener, shutdown).await {
            tracing::warn!(agent = %name, %error, "a virtual agent stopped serving");
        }
    });
    Ok(Running {
        scripts,
        stop,
        task,
    })
}

/// Binds the agent's fixed port, waiting briefly for a crashed
/// predecessor's aborted task to let go of it.
async fn bind(agent: &Agent) -> Result<tokio::net::TcpListener, AgentError> {
    let mut attempts = 0;
    loop {
        match agent.bind().await {
            Err(AgentError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && attempts < 40 =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            result => return result,
        }
    }
}

/// Registers `agent` with the hub. With several nodes, agent `i` starts
/// at node `i % n` (so registrations spread over the cluster, which shares
/// one registry) and tries the others in turn if that node cannot be dialed.
async fn register(settings: &FleetSettings, agent: &VirtualAgent) -> Result<(), FleetError> {
    let tls = tentacle_proto::tls::client_config(
        &agent.identity,
        TrustStore::new([settings.hub_thumbprint]),
    )?;
    let nodes = settings.hubs.len().max(1);
    let first = agent.index % nodes;
    let mut last_error = None;
    let mut channel = None;
    for hub in (0..nodes).filter_map(|k| settings.hubs.get((first + k) % nodes)) {
        match dial::channel(hub, tls.clone(), &DialSettings::default()).await {
            Ok(dialed) => {
                channel = Some(dialed);
                break;
            }
            Err(error) => last_error = Some(error),
        }
    }
    let channel = match (channel, last_error) {
        (Some(channel), _) => channel,
        (None, Some(error)) => return Err(error.into()),
        (None, None) => {
            return Err(FleetError::Register {
                name: agent.name.clone(),
                reason: "the fleet was given no hub address".into(),
            });
        }
    };
    let mode = match agent.port {
        Some(_) => pb::AgentMode::Listening,
        None => pb::AgentMode::Polling,
    };
    RegistrationServiceClient::new(channel)
        .register(pb::RegisterRequest {
            credential: Some(pb::register_request::Credential::ApiKey(
                settings.api_key.clone(),
            )),
            name: agent.name.clone(),
            mode: mode as i32,
            roles: settings.roles.clone(),
            environments: settings.environments.clone(),
            public_hostname: if agent.port.is_some() {
                "127.0.0.1".into()
            } else {
                String::new()
            },
            port: agent.port.map_or(0, u32::from),
        })
        .await
        .map_err(|status| FleetError::Register {
            name: agent.name.clone(),
            reason: dial::describe_status(&status),
        })?;
    Ok(())
}

/// Raises the soft limit on open files to the hard limit; returns the new
/// soft limit. Each virtual agent holds a few descriptors.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    Ok(hard)
}

#[cfg(test)]
mod tests;
