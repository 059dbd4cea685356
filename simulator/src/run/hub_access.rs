//! The hub a run talks through: one started in this process (which chaos
//! may restart), or an external one reached as an operator. Either way a
//! virtual agent is reached through the same [`AgentChannel`] API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
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

/// How the run reaches agents.
#[derive(Debug)]
pub enum HubAccess {
    Local(Box<LocalHub>),
    External {
        address: ListeningAddress,
        thumbprint: Thumbprint,
        channel: Channel,
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

    /// Reaches the hub at `address` as the operator `identity`.
    pub async fn connect_external(
        address: ListeningAddress,
        thumbprint: Thumbprint,
        identity: &Identity,
    ) -> Result<Self, HubAccessError> {
        let connect = |reason: String| HubAccessError::Connect {
            address: address.to_string(),
            reason,
        };
        let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([thumbprint]))
            .map_err(|e| connect(e.to_string()))?;
        let channel = dial::channel(&address, tls, &DialSettings::default())
            .await
            .map_err(|e| connect(e.to_string()))?;
        Ok(Self::External {
            address,
            thumbprint,
            channel,
        })
    }

    /// Where agents find the hub, and its thumbprint.
    pub fn endpoint(&self) -> (ListeningAddress, Thumbprint) {
        match self {
            Self::Local(local) => (
                ListeningAddress::new(local.address.ip().to_string(), local.address.port()),
                local.identity.thumbprint(),
            ),
            Self::External {
                address,
                thumbprint,
                ..
            } => (address.clone(), *thumbprint),
        }
    }

    /// Names the hub in the report.
    pub fn describe(&self) -> String {
        match self {
            Self::Local(_) => "in-process".into(),
            Self::External { address, .. } => address.to_string(),
        }
    }

    /// A channel to one agent.
    pub async fn channel(
        &self,
        target: &Target,
        thumbprint: Thumbprint,
    ) -> Result<AgentChannel, tonic::Status> {
        match self {
            Self::Local(local) => local
                .current
                .load_full()
                .channel(target, thumbprint)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string())),
            Self::External { channel, .. } => {
                HubRouted::new(channel.clone(), target, thumbprint, None)
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
