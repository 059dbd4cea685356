//! [`Hub`]: the control plane's state and its one way to reach any agent.
//!
//! It holds the registered agents and operators, the pool of connections to
//! listening agents, and the [`Registry`] of tunnels from polling agents.
//! [`Hub::channel`] gives an [`AgentChannel`] for any target; the generated
//! tonic clients run over it unchanged. [`Hub::serve`] (in
//! [`crate::serve`]) serves it on a listener.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::incoming::AcceptSettings;
use tentacle_proto::trust::CertificateValidity;
use tentacle_proto::tunnel::HeartbeatSettings;
use tentacle_proto::v1::TunnelDrain;
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tonic::transport::Channel;

use crate::channel::{AgentChannel, DEFAULT_PICKUP_TIMEOUT, PollingChannel};
use crate::client::AgentClient;
use crate::cluster::Cluster;
use crate::registry::Registry;
pub use crate::rotation::RotationApproval;
use crate::rotation::{PendingRotation, PendingRotationFile, RotationOutcome, audit};
use crate::target::{AgentId, Target};
pub use crate::trust::{AgentMode, TrustedAgent};
use crate::{credentials, grouped, rotation, trust};

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
    /// How long a new tunnel may take to send its hello.
    pub tunnel_setup_timeout: Duration,
    /// How long an agent's old certificate stays trusted after a rotation,
    /// unless the agent asks for another overlap.
    pub rotation_overlap: Duration,
    /// The longest overlap an agent may ask for: the overlap comes from the
    /// network, and a retired certificate must not stay trusted for ever.
    pub max_rotation_overlap: Duration,
    /// The longest pickup timeout an operator may ask for in a forwarded
    /// call's `tentacle-pickup-timeout` metadata, so one call cannot hold a
    /// waiter in the registry for ever. `pickup_timeout` is always allowed.
    pub max_pickup_timeout: Duration,
    /// How often the registry file is checked for edits by other processes
    /// (a `stat`, unless it changed), rotations are retired and approved
    /// ones applied.
    pub registry_reload_interval: Duration,
    /// How many failed registrations a source address may make.
    pub registration_limits: crate::limits::RegistrationLimits,
    /// What a certificate rotation needs besides the current certificate
    /// and the proof of possession of the new key.
    pub rotation_approval: RotationApproval,
    /// Whether peers' certificate validity dates are checked besides their
    /// thumbprints (ignored by default; SECURITY.md says why).
    pub certificate_validity: CertificateValidity,
    /// The largest registration or fleet request accepted.
    pub max_message_bytes: usize,
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
            max_rotation_overlap: Duration::from_secs(7 * 24 * 60 * 60),
            max_pickup_timeout: Duration::from_secs(60 * 60),
            registry_reload_interval: Duration::from_secs(1),
            registration_limits: crate::limits::RegistrationLimits::default(),
            rotation_approval: RotationApproval::default(),
            certificate_validity: CertificateValidity::default(),
            // tonic's own default: registrations and fleet lists are small.
            max_message_bytes: 4 * 1024 * 1024,
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
    #[error(
        "thumbprint {0} is not registered with this hub; register the agent before rotating its certificate"
    )]
    NotRegistered(Thumbprint),
    #[error("thumbprint {0} is being retired; rotate from the current certificate")]
    AlreadyRotating(Thumbprint),
    #[error(
        "the new certificate's thumbprint {0} belongs to another agent; make a new certificate for this one"
    )]
    ThumbprintInUse(Thumbprint),
    #[error("could not store the rotation: {0}")]
    Store(trust::TrustFileError),
    #[error("could not record the rotation for approval: {0}")]
    Pending(#[from] rotation::PendingError),
    #[error(
        "this hub approves rotations by operator but has no home to keep them in; run `tentacle-hub server` to serve one that does"
    )]
    NoPendingStore,
}

/// Where a rotation stands once the hub accepted its announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotated {
    /// Both certificates are trusted; the old one retires then (Unix
    /// seconds).
    Trusted { retire_old_at: u64 },
    /// Recorded; waits for `tentacle-hub server rotations approve`.
    Pending,
}

/// Why a registration was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    NameTaken(#[from] trust::NameTaken),
    #[error("could not store the registration: {0}")]
    Store(Arc<trust::TrustFileError>),
    #[error(transparent)]
    Interrupted(#[from] grouped::Interrupted),
}

impl RegisterError {
    /// Whether the registration is certainly not stored. After
    /// `Interrupted` it may or may not be.
    pub fn stored_nothing(&self) -> bool {
        matches!(self, Self::NameTaken(_) | Self::Store(_))
    }
}

/// Why the hub could not do something.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Dial(#[from] dial::DialError),
    #[error("the hub's TLS configuration is not usable: {0}")]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    #[error("the hub's server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Where a hub keeps its registry and credentials.
#[derive(Debug)]
pub struct HubStore {
    pub agents: trust::AgentTrustFile,
    pub credentials: credentials::CredentialStore,
    /// Rotations waiting for an operator.
    pub rotations: PendingRotationFile,
}

impl HubStore {
    /// `agents.toml`, `credentials.toml` and `rotations.toml` in `dir`.
    pub fn in_dir(dir: &std::path::Path) -> Self {
        Self {
            agents: trust::AgentTrustFile::new(dir.join("agents.toml")),
            credentials: credentials::CredentialStore::new(dir.join("credentials.toml")),
            rotations: PendingRotationFile::new(dir.join("rotations.toml")),
        }
    }

    /// This store with writers waiting up to `timeout` for another
    /// process's write (`tentacle-hub --lock-timeout`).
    pub fn with_lock_timeout(self, timeout: Duration) -> Self {
        Self {
            agents: self.agents.with_lock_timeout(timeout),
            credentials: self.credentials.with_lock_timeout(timeout),
            rotations: self.rotations.with_lock_timeout(timeout),
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
    /// concurrent registrations neither overwrite each other nor both pass
    /// the check that their name is free.
    agents_write: Mutex<()>,
    /// Listening connections, each with the thumbprints it accepts (more
    /// than one while the agent rotates its certificate).
    pool: Mutex<HashMap<(ListeningAddress, Thumbprint), Pooled>>,
    /// Registrations waiting to be stored together.
    grouped: Arc<grouped::GroupedRegistrations<Result<(), RegisterError>>>,
    /// The cluster this hub is a node of, once it joined one.
    cluster: OnceLock<Cluster>,
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
        let tls_trust = TrustStore::new([own]);
        tls_trust.set_certificate_validity(settings.certificate_validity);
        Arc::new(Self {
            identity,
            store,
            settings,
            registry: Arc::default(),
            agents: ArcSwap::from_pointee(Vec::new()),
            tls_trust,
            operators: ArcSwap::from_pointee(vec![own]),
            agents_write: Mutex::new(()),
            pool: Mutex::new(HashMap::new()),
            grouped: Arc::default(),
            cluster: OnceLock::new(),
        })
    }

    /// Makes this hub a node of `cluster`: calls for polling agents whose
    /// tunnels are on other nodes are forwarded there (`crate::peers`).
    /// A hub joins once; a second cluster is handed back.
    pub fn join_cluster(&self, cluster: Cluster) -> Result<(), Cluster> {
        self.cluster.set(cluster)
    }

    /// The cluster this hub is a node of, if it joined one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.get()
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    /// Thumbprints allowed to finish a TLS handshake with this hub.
    pub(crate) fn tls_trust(&self) -> &Arc<TrustStore> {
        &self.tls_trust
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

    /// Stores a registration and trusts it at once. It replaces the entry
    /// with its thumbprint, and is refused if its name belongs to another
    /// agent.
    pub fn register(&self, agent: TrustedAgent) -> Result<(), RegisterError> {
        self.register_all(vec![agent])
            .into_iter()
            .next()
            .unwrap_or(Err(RegisterError::Interrupted(grouped::Interrupted)))
    }

    /// Stores registrations in order with at most one write of the store,
    /// and trusts them at once; returns one outcome per registration, in
    /// order. Each is checked against the registry as the ones before it
    /// left it, so of two registrations of one name by different agents,
    /// in one batch or in two, exactly one is stored.
    pub fn register_all(&self, batch: Vec<TrustedAgent>) -> Vec<Result<(), RegisterError>> {
        let count = batch.len();
        let stored = self.update_agents(|agents| {
            batch
                .into_iter()
                .map(|agent| trust::register_into(agents, agent).map_err(RegisterError::from))
                .collect::<Vec<_>>()
        });
        match stored {
            Ok(outcomes) => outcomes,
            Err(error) => vec![Err(RegisterError::Store(Arc::new(error))); count],
        }
    }

    /// Changes the agent list under `agents_write`, so the name check of a
    /// registration and its insert are one step that no other change can
    /// come between. With a store, `change` sees the file's entries (edits
    /// by other processes included) and memory follows what was written, so
    /// a reload never sees one without the other.
    fn update_agents<T>(
        &self,
        change: impl FnOnce(&mut Vec<TrustedAgent>) -> T,
    ) -> Result<T, trust::TrustFileError> {
        let _write = self
            .agents_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (outcome, agents) = match &self.store {
            Some(store) => store.agents.update(change)?,
            None => {
                let mut agents = (*self.agents.load_full()).clone();
                let outcome = change(&mut agents);
                (outcome, agents)
            }
        };
        if *self.agents.load_full() != agents {
            self.set_agents(agents);
        }
        Ok(outcome)
    }

    /// Stores `agent` together with registrations that arrive while the
    /// registry file is being written; returns its own outcome once its
    /// group is on disk.
    pub async fn register_grouped(
        self: &Arc<Self>,
        agent: TrustedAgent,
    ) -> Result<(), RegisterError> {
        let hub = self.clone();
        let write: grouped::GroupWriter<_> =
            Arc::new(move |batch: Vec<TrustedAgent>| hub.register_all(batch));
        self.grouped.register(agent, write).await?
    }

    /// Whether grouped registrations are being written now.
    pub fn grouped_is_writing(&self) -> bool {
        self.grouped.is_writing()
    }

    /// Picks up edits made to the store by other processes (`tentacle-hub
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
        self.update_agents(|agents| agents.retain(|a| !a.has_thumbprint(thumbprint)))
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

    /// Adds or replaces one trusted agent, in memory only: an operator's
    /// decision, so it may take a name from another agent.
    pub fn trust_agent(&self, agent: TrustedAgent) {
        let _write = self
            .agents_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut agents = (*self.agents.load_full()).clone();
        trust::upsert_into(&mut agents, agent);
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
                trust.set_certificate_validity(self.settings.certificate_validity);
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

    /// Trusts `new` for the agent that holds `current`, keeping `current`
    /// for `overlap`. Returns when `current` will be retired (Unix seconds).
    pub fn rotate(
        &self,
        current: &Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> Result<u64, RotateError> {
        // Read and changed under one lock: two rotations from one
        // certificate cannot both be told they succeeded.
        self.update_agents(|agents| {
            if agents
                .iter()
                .any(|a| a.has_thumbprint(&new) && !a.has_thumbprint(current))
            {
                return Err(RotateError::ThumbprintInUse(new));
            }
            let agent = agents
                .iter_mut()
                .find(|a| a.has_thumbprint(current))
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
            Ok(retire_at)
        })
        .map_err(RotateError::Store)?
    }

    /// The name of the agent with `thumbprint`, current or being retired,
    /// for logs; empty if none has it.
    pub fn agent_name(&self, thumbprint: &Thumbprint) -> String {
        self.agents
            .load()
            .iter()
            .find(|a| a.has_thumbprint(thumbprint))
            .map(|a| a.name.clone())
            .unwrap_or_default()
    }

    /// An announced rotation, under the hub's approval policy: trusted at
    /// once ([`Self::rotate`]), or, when operators approve rotations,
    /// recorded as pending unless it was already approved and applied.
    pub fn request_rotation(
        &self,
        current: &Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> Result<Rotated, RotateError> {
        if self.settings.rotation_approval != RotationApproval::Operator {
            let retire_old_at = self.rotate(current, new, overlap)?;
            return Ok(Rotated::Trusted { retire_old_at });
        }
        let store = self.store.as_ref().ok_or(RotateError::NoPendingStore)?;
        let agents = self.agents.load();
        if agents
            .iter()
            .any(|a| a.has_thumbprint(&new) && !a.has_thumbprint(current))
        {
            return Err(RotateError::ThumbprintInUse(new));
        }
        let agent = agents
            .iter()
            .find(|a| a.has_thumbprint(current))
            .ok_or(RotateError::NotRegistered(*current))?;
        if agent.thumbprint == new {
            // Approved and applied: the agent asks again to learn the
            // retirement time.
            return Ok(Rotated::Trusted {
                retire_old_at: agent.retire_previous_at.unwrap_or_else(unix_now),
            });
        }
        if agent.thumbprint != *current {
            return Err(RotateError::AlreadyRotating(*current));
        }
        store.rotations.request(PendingRotation {
            agent: agent.name.clone(),
            current: *current,
            new,
            overlap_seconds: overlap.as_secs(),
            requested_unix: unix_now(),
            approved: false,
        })?;
        Ok(Rotated::Pending)
    }

    /// Applies the rotations operators approved since the last call; each
    /// is an audit event (approved, or refused if the registry changed
    /// under it). Returns how many were applied.
    pub fn apply_approved_rotations(&self) -> usize {
        let Some(store) = &self.store else {
            return 0;
        };
        let approved = match store.rotations.take_approved() {
            Ok(approved) => approved,
            Err(error) => {
                tracing::warn!(%error, "could not read the approved rotations");
                return 0;
            }
        };
        let mut applied = 0;
        for rotation in approved {
            let overlap = Duration::from_secs(rotation.overlap_seconds);
            match self.rotate(&rotation.current, rotation.new, overlap) {
                Ok(_) => {
                    applied += 1;
                    audit(
                        RotationOutcome::Approved,
                        &rotation.agent,
                        &rotation.current,
                        &rotation.new,
                        "approved by an operator",
                    );
                }
                Err(error) => audit(
                    RotationOutcome::Refused,
                    &rotation.agent,
                    &rotation.current,
                    &rotation.new,
                    &format!("approved, but could not be applied: {error}"),
                ),
            }
        }
        applied
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
            tunnel.outbound.ordered_later(Kind::Drain(TunnelDrain {
                reason: "the hub is shutting down".into(),
            }));
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

#[cfg(test)]
mod tests;
