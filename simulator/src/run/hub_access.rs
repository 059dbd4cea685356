//! The hub a run talks through: one started in this process (which chaos
//! may restart), or an external one reached as an operator: one hub, or
//! the nodes of a hub cluster, each with its own channel. Either way a
//! virtual agent is reached through the same [`AgentChannel`] API.
//!
//! Calls to a cluster go to the nodes in turn (any node reaches any agent,
//! forwarding to the node that holds the agent's tunnel), or, with
//! [`CallRouting::Holder`], to the node the agent last dialed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use tentacle_hub::channel::{AgentChannel, HubRouted};
use tentacle_hub::credentials::CredentialKind;
use tentacle_hub::target::Target;
use tentacle_hub::{Hub, HubSettings, HubStore};

/// Why the hub could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum HubAccessError {
    #[error("could not start the in-process hub: {0}")]
    Start(String),
    #[error("could not reach the hub at {address}: {reason}")]
    Connect { address: String, reason: String },
}

/// A hub this process runs.
#[derive(Debug)]
pub struct LocalHub {
    identity: Identity,
    dir: PathBuf,
    address: SocketAddr,
    settings: HubSettings,
    current: ArcSwap<Hub>,
    serving: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
}

/// Which node of an external hub cluster an operator call goes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CallRouting {
    /// The nodes in turn: most calls reach an agent through a node that
    /// forwards them to the node holding its tunnel, as behind a load
    /// balancer.
    #[default]
    RoundRobin,
    /// The node the agent last dialed (where its tunnel is), else the next
    /// in turn: no forwarding hop while the agent stays put.
    Holder,
}

/// One node of an external hub and the operator channel to it.
#[derive(Debug)]
pub struct ExternalNode {
    pub address: ListeningAddress,
    channel: Channel,
}

/// How the run reaches agents.
#[derive(Debug)]
pub enum HubAccess {
    Local(Box<LocalHub>),
    External {
        nodes: Vec<ExternalNode>,
        thumbprint: Thumbprint,
        routing: CallRouting,
        /// The next node in turn.
        turn: AtomicUsize,
    },
}

impl HubAccess {
    /// Starts a hub on 127.0.0.1 with its store in `dir`; returns it and an
    /// API key for the fleet's registrations.
    pub async fn start_local(dir: PathBuf) -> Result<(Self, String), HubAccessError> {
        let start = |e: &dyn std::fmt::Display| HubAccessError::Start(e.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| start(&e))?;
        let identity = Identity::generate("tentacle-sim-run").map_err(|e| start(&e))?;
        let settings = HubSettings {
            // Calls wait out a reconnect or an agent restart.
            pickup_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(2),
            ..HubSettings::default()
        };
        let store = HubStore::in_dir(&dir);
        let api_key = store
            .credentials
            .create(CredentialKind::ApiKey, None)
            .map_err(|e| start(&e))?;
        let hub =
            Hub::with_store(identity.clone(), settings.clone(), store).map_err(|e| start(&e))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| start(&e))?;
        let address = listener.local_addr().map_err(|e| start(&e))?;
        let local = LocalHub {
            identity,
            dir,
            address,
            settings,
            current: ArcSwap::new(hub.clone()),
            serving: Mutex::new(None),
        };
        local.serve(hub, listener).await;
        Ok((Self::Local(Box::new(local)), api_key))
    }

    /// Reaches the hub at `addresses` (one hub, or every node of a
    /// cluster, all presenting `thumbprint`) as the operator `identity`.
    /// Every node must answer now; channels reconnect by themselves later.
    pub async fn connect_external(
        addresses: &[ListeningAddress],
        thumbprint: Thumbprint,
        identity: &Identity,
        routing: CallRouting,
    ) -> Result<Self, HubAccessError> {
        let mut nodes = Vec::with_capacity(addresses.len());
        for address in addresses {
            let connect = |reason: String| HubAccessError::Connect {
                address: address.to_string(),
                reason,
            };
            let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([thumbprint]))
                .map_err(|e| connect(e.to_string()))?;
            let channel = dial::channel(address, tls, &DialSettings::default())
                .await
                .map_err(|e| connect(e.to_string()))?;
            nodes.push(ExternalNode {
                address: address.clone(),
                channel,
            });
        }
        if nodes.is_empty() {
            return Err(HubAccessError::Connect {
                address: "(none)".into(),
                reason: "no hub address was given".into(),
            });
        }
        Ok(Self::External {
            nodes,
            thumbprint,
            routing,
            turn: AtomicUsize::new(0),
        })
    }

    /// Where agents find the hub (each node of a cluster), and its
    /// thumbprint.
    pub fn endpoint(&self) -> (Vec<ListeningAddress>, Thumbprint) {
        match self {
            Self::Local(local) => (
                vec![ListeningAddress::new(
                    local.address.ip().to_string(),
                    local.address.port(),
                )],
                local.identity.thumbprint(),
            ),
            Self::External {
                nodes, thumbprint, ..
            } => (
                nodes.iter().map(|n| n.address.clone()).collect(),
                *thumbprint,
            ),
        }
    }

    /// Names the hub in the report.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(_) => "in-process".into(),
            Self::External { nodes, .. } => nodes
                .iter()
                .map(|n| n.address.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// A channel to one agent; `holder` is the cluster node the agent last
    /// dialed, if known.
    pub async fn channel(
        &self,
        target: &Target,
        thumbprint: Thumbprint,
        holder: Option<usize>,
    ) -> Result<AgentChannel, tonic::Status> {
        match self {
            Self::Local(local) => local
                .current
                .load_full()
                .channel(target, thumbprint)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string())),
            Self::External {
                nodes,
                routing,
                turn,
                ..
            } => {
                let next = || turn.fetch_add(1, Ordering::Relaxed) % nodes.len();
                let node = match (routing, holder) {
                    (CallRouting::Holder, Some(node)) if node < nodes.len() => node,
                    _ => next(),
                };
                let channel = nodes
                    .get(node)
                    .map(|n| n.channel.clone())
                    .ok_or_else(|| tonic::Status::unavailable("no hub node"))?;
                HubRouted::new(channel, target, thumbprint, None)
                    .map(AgentChannel::ViaHub)
                    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))
            }
        }
    }

    /// Stops the in-process hub, waits `down_for`, and starts a new one on
    /// the same port over the same store. Returns false for an external hub.
    pub async fn restart(&self, down_for: Duration) -> Result<bool, HubAccessError> {
        let Self::Local(local) = self else {
            return Ok(false);
        };
        local.restart(down_for).await.map(|()| true)
    }

    /// Stops an in-process hub.
    pub async fn shutdown(&self) {
        if let Self::Local(local) = self {
            local.stop().await;
        }
    }
}

impl LocalHub {
    async fn serve(&self, hub: Arc<Hub>, listener: TcpListener) {
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(error) = hub.serve(listener, shutdown).await {
                tracing::warn!(%error, "the in-process hub stopped");
            }
        });
        *self.serving.lock().await = Some((stop, task));
    }

    async fn stop(&self) {
        if let Some((stop, mut task)) = self.serving.lock().await.take() {
            stop.cancel();
            // Past the drain and its margin nothing of the old hub may linger
            // beside the next one.
            if tokio::time::timeout(self.settings.drain_grace * 2, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("the in-process hub did not stop in time; aborting it");
                task.abort();
            }
        }
    }

    async fn restart(&self, down_for: Duration) -> Result<(), HubAccessError> {
        let start = |e: &dyn std::fmt::Display| HubAccessError::Start(e.to_string());
        self.stop().await;
        tokio::time::sleep(down_for).await;
        let hub = Hub::with_store(
            self.identity.clone(),
            self.settings.clone(),
            HubStore::in_dir(&self.dir),
        )
        .map_err(|e| start(&e))?;
        // The old listener's port may take a moment to be free again.
        let mut attempt = 0;
        let listener = loop {
            match TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(error) if attempt < 50 => {
                    attempt += 1;
                    tracing::debug!(%error, "waiting for the hub's port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(start(&error)),
            }
        };
        self.current.store(hub.clone());
        self.serve(hub, listener).await;
        Ok(())
    }
}
