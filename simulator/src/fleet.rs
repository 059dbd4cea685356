//! Virtual tentacles: many polling agents in one process. Each has its own
//! certificate and registers with the hub like a real agent; each runs the
//! real transport, tunnel and service code. Only script execution is
//! simulated ([`executor`]).

pub mod executor;
pub mod faults;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use tentacle_agent::files::{FileSettings, Files};
use tentacle_agent::grpc::{CapabilitiesApi, FileApi, HealthSource, PackageApi, ScriptApi};
use tentacle_agent::packages::{PackageSettings, Packages};
use tentacle_agent::polling::{self, HubEndpoint, PollingSettings};
use tentacle_agent::scripts::{ScriptSettings, Scripts};
use tentacle_agent::server::{self, ServeSettings, Services};
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::incoming::{AcceptSettings, accept_tls};
use tentacle_proto::tls::IdentityCell;
use tentacle_proto::tunnel::HeartbeatSettings;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::target::{AgentId, Target};

pub use executor::{ExecutionLedger, ScriptModel, SimulatedExecutor};
pub use faults::{FaultDialer, Faults, FaultyStream};

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
    pub hub: ListeningAddress,
    pub hub_thumbprint: Thumbprint,
    /// Registers every agent (`tentacle-sim server api-key create`).
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
    /// Counts every script start, if given.
    pub ledger: Option<Arc<ExecutionLedger>>,
}

impl FleetSettings {
    /// `agents` polling agents for `hub`, with the defaults of `tentacle-sim fleet`.
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
            hub,
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
    identity: Identity,
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
    /// connections break, its server stops. Nothing on disk is touched.
    pub fn crash(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(running) = running {
            running.scripts.halt();
            running.stop.cancel();
            self.faults.cut();
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

    fn stop(&self) {
        if let Some(running) = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            running.stop.cancel();
            running.scripts.stop_all();
            running.task.abort();
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
    let agent = VirtualAgent {
        thumbprint: identity.thumbprint(),
        target,
        faults: Arc::default(),
        source: faults::spread_source(index, settings.source_addresses),
        name,
        port,
        identity,
        dir,
        running: Mutex::new(None),
    };
    register(settings, &agent).await?;
    let running = launch(settings, &agent).await?;
    *agent.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(running);
    Ok(agent)
}

/// Builds the agent's services over its directory and connects it.
async fn launch(settings: &FleetSettings, agent: &VirtualAgent) -> Result<Running, FleetError> {
    let dir = &agent.dir;
    let storage = |source| FleetError::Storage {
        path: dir.clone(),
        source,
    };
    let mut executor = SimulatedExecutor::new(settings.model.clone(), settings.seed);
    if let Some(ledger) = &settings.ledger {
        executor = executor.with_ledger(ledger.clone(), agent.name.clone());
    }
    let scripts = Scripts::new(ScriptSettings::new(dir.join("work")), Arc::new(executor));
    scripts.recover().map_err(storage)?;
    let mut file_settings = FileSettings::new(dir.join("files"));
    file_settings.min_free_bytes = 0;
    file_settings.discard_uploads = true;
    let files = Files::new(file_settings).map_err(storage)?;
    let mut package_settings = PackageSettings::new(dir.join("packages"), dir.join("apps"));
    package_settings.min_free_bytes = 0;
    let packages = Packages::new(package_settings).map_err(storage)?;
    let serve = ServeSettings::default();
    let (routes, _health) = server::routes(
        Services {
            scripts: ScriptApi::new(scripts.clone()),
            files: FileApi::new(files),
            packages: PackageApi::new(packages),
            capabilities: CapabilitiesApi::with_health(HealthSource {
                files_root: dir.join("files"),
                scripts: scripts.clone(),
                started: std::time::Instant::now(),
            }),
        },
        &serve,
    )
    .await?;
    let stop = CancellationToken::new();
    let cell = IdentityCell::new(agent.identity.clone())?;
    let task = match agent.port {
        Some(port) => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .map_err(storage)?;
            let trust = TrustStore::new([settings.hub_thumbprint]);
            let tls = tentacle_proto::tls::server_config(cell, trust.clone())?;
            let faults = agent.faults.clone();
            // Every connection obeys the agent's faults, so a crash or a
            // cut also ends the calls the hub has open on it.
            let incoming = accept_tls(
                listener,
                tokio_rustls::TlsAcceptor::from(tls),
                trust,
                AcceptSettings::default(),
            )
            .map(move |accepted| accepted.map(|tls| FaultyStream::new(tls, faults.clone())));
            let stopped = stop.clone();
            tokio::spawn(async move {
                let shutdown = stopped.cancelled_owned();
                if let Err(error) = server::serve(routes, incoming, shutdown, &serve).await {
                    tracing::warn!(%error, "a virtual listening agent stopped serving");
                }
            })
        }
        None => {
            let polling = PollingSettings {
                agent_id: agent.name.clone(),
                hubs: vec![HubEndpoint {
                    address: settings.hub.clone(),
                    thumbprint: settings.hub_thumbprint,
                }],
                tunnels: 1,
                heartbeat: settings.heartbeat.clone(),
                reconnect_initial: settings.reconnect_initial,
                reconnect_max: settings.reconnect_max,
                connect_timeout: Duration::from_secs(30),
                shutdown_grace: Duration::from_secs(5),
                dialer: Arc::new(FaultDialer {
                    faults: agent.faults.clone(),
                    source: agent.source,
                }),
            };
            tokio::spawn(polling::run(polling, cell, routes, serve, stop.clone()))
        }
    };
    Ok(Running {
        scripts,
        stop,
        task,
    })
}

async fn register(settings: &FleetSettings, agent: &VirtualAgent) -> Result<(), FleetError> {
    let tls = tentacle_proto::tls::client_config(
        &agent.identity,
        TrustStore::new([settings.hub_thumbprint]),
    )?;
    let channel = dial::channel(&settings.hub, tls, &DialSettings::default()).await?;
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
