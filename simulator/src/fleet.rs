//! Virtual tentacles: many polling agents in one process. Each has its own
//! certificate and registers with the hub like a real agent; each runs the
//! real transport, tunnel and service code. Only script execution is
//! simulated ([`executor`]).

pub mod executor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tentacle_agent::files::{FileSettings, Files};
use tentacle_agent::grpc::{CapabilitiesApi, FileApi, PackageApi, ScriptApi};
use tentacle_agent::packages::{PackageSettings, Packages};
use tentacle_agent::polling::{self, HubEndpoint, PollingSettings};
use tentacle_agent::scripts::{ScriptSettings, Scripts};
use tentacle_agent::server::{self, ServeSettings, Services};
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::tls::IdentityCell;
use tentacle_proto::tunnel::HeartbeatSettings;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use executor::{ScriptModel, SimulatedExecutor};

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub agents: usize,
    /// Agents are named `<prefix>-<index>`.
    pub name_prefix: String,
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
    pub heartbeat: HeartbeatSettings,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
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

/// One virtual tentacle.
#[derive(Debug)]
pub struct VirtualAgent {
    pub name: String,
    pub thumbprint: Thumbprint,
    pub scripts: Arc<Scripts>,
    task: JoinHandle<()>,
}

/// A running fleet; dropping it stops every agent.
#[derive(Debug)]
pub struct Fleet {
    pub agents: Vec<VirtualAgent>,
    stop: CancellationToken,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
        for agent in &self.agents {
            agent.task.abort();
        }
    }
}

impl Fleet {
    /// Registers and starts `settings.agents` agents.
    pub async fn start(settings: FleetSettings) -> Result<Self, FleetError> {
        let stop = CancellationToken::new();
        let settings = Arc::new(settings);
        let mut agents = Vec::with_capacity(settings.agents);
        {
            let starts = (0..settings.agents)
                .map(|index| start_agent(settings.clone(), index, stop.clone()));
            let mut results = futures::stream::iter(starts)
                .buffer_unordered(settings.registration_parallelism.max(1));
            while let Some(result) = results.next().await {
                agents.push(result?);
            }
        }
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { agents, stop })
    }

    /// Stops every agent.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn start_agent(
    settings: Arc<FleetSettings>,
    index: usize,
    stop: CancellationToken,
) -> Result<VirtualAgent, FleetError> {
    let name = format!("{}-{index}", settings.name_prefix);
    let identity = Identity::generate(&name)?;
    register(&settings, &name, &identity).await?;

    let dir = settings.work_dir.join(&name);
    let storage = |source| FleetError::Storage {
        path: dir.clone(),
        source,
    };
    let scripts = Scripts::new(
        ScriptSettings::new(dir.join("work")),
        Arc::new(SimulatedExecutor::new(
            settings.model.clone(),
            settings.seed,
        )),
    );
    let mut file_settings = FileSettings::new(dir.join("files"));
    file_settings.min_free_bytes = 0;
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
            capabilities: CapabilitiesApi::new(),
        },
        &serve,
    )
    .await?;
    let polling = PollingSettings {
        agent_id: name.clone(),
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
        dialer: Arc::new(tentacle_agent::polling::TcpDialer::default()),
    };
    let thumbprint = identity.thumbprint();
    let cell = IdentityCell::new(identity)?;
    let task = tokio::spawn(polling::run(polling, cell, routes, serve, stop));
    Ok(VirtualAgent {
        name,
        thumbprint,
        scripts,
        task,
    })
}

async fn register(
    settings: &FleetSettings,
    name: &str,
    identity: &Identity,
) -> Result<(), FleetError> {
    let tls =
        tentacle_proto::tls::client_config(identity, TrustStore::new([settings.hub_thumbprint]))?;
    let channel = dial::channel(&settings.hub, tls, &DialSettings::default()).await?;
    RegistrationServiceClient::new(channel)
        .register(pb::RegisterRequest {
            credential: Some(pb::register_request::Credential::ApiKey(
                settings.api_key.clone(),
            )),
            name: name.to_owned(),
            mode: pb::AgentMode::Polling as i32,
            roles: settings.roles.clone(),
            environments: settings.environments.clone(),
            public_hostname: String::new(),
            port: 0,
        })
        .await
        .map_err(|status| FleetError::Register {
            name: name.to_owned(),
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
