//! [`Hub`]: the control plane's state and its one way to reach any agent.
//!
//! It holds the registered agents and operators, the pool of connections to
//! listening agents, and the [`Registry`] of tunnels from polling agents.
//! [`Hub::channel`] gives an [`AgentChannel`] for any target; the generated
//! tonic clients run over it unchanged. [`Hub::serve`] (in
//! [`crate::serve`]) serves it on a listener.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
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
use crate::store::{RegistryStore, StoreError, Synced};
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
    Store(StoreError),
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
    Store(StoreError),
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
    store: Option<Arc<dyn RegistryStore>>,
    settings: HubSettings,
    registry: Arc<Registry>,
    agents: RwLock<AgentIndex>,
    /// The store's revision this hub's view has caught up with, for a store
    /// that is watched (etcd): a writer waits for its own write to arrive.
    watched_revision: tokio::sync::watch::Sender<i64>,
    /// Thumbprints allowed to complete a handshake: agents, this hub's own
    /// certificate (operators who share its home) and extra operators.
    tls_trust: Arc<TrustStore>,
    operators: ArcSwap<Vec<Thumbprint>>,
    /// Serialises a change to the store with its arrival in this hub's
    /// view, for a store that returns the whole list (the files): a view
    /// of an older write must not replace that of a newer one.
    agents_write: tokio::sync::Mutex<()>,
    /// Serialises read-modify-write changes of a hub without a store, so
    /// concurrent changes neither overwrite each other nor both pass the
    /// check that a name is free.
    memory_write: Mutex<()>,
    /// Listening connections, each with the thumbprints it accepts (more
    /// than one while the agent rotates its certificate).
    pool: Mutex<HashMap<(ListeningAddress, Thumbprint), Pooled>>,
    /// Registrations waiting to be stored together.
    grouped: Arc<grouped::GroupedRegistrations<Result<(), RegisterError>>>,
    /// The cluster this hub is a node of, once it joined one.
    cluster: OnceLock<Cluster>,
    /// Whether this node fenced itself off: cut off from etcd and from
    /// most of its peers, it drained its tunnels and takes no new ones.
    fenced: std::sync::atomic::AtomicBool,
}

/// A pooled connection to a listening agent and the thumbprints it accepts.
type Pooled = (Channel, Arc<TrustStore>);

/// The registered agents, by name and by thumbprint, so a tunnel's check
/// and an incremental change from the store's watch cost the same at
/// 50,000 agents as at 5.
#[derive(Debug, Default)]
struct AgentIndex {
    by_name: HashMap<String, TrustedAgent>,
    by_thumbprint: HashMap<Thumbprint, String>,
    /// Names in the order the store lists them (the file's order; new
    /// names from a watch go last).
    order: Vec<String>,
    /// [`Hub::agents`], built once per change.
    listing: Option<Arc<Vec<TrustedAgent>>>,
}

impl AgentIndex {
    fn from_list(agents: Vec<TrustedAgent>) -> Self {
        let mut index = Self::default();
        for agent in agents {
            index.put(agent);
        }
        index
    }

    fn owner(&self, thumbprint: &Thumbprint) -> Option<&TrustedAgent> {
        self.by_name.get(self.by_thumbprint.get(thumbprint)?)
    }

    /// Adds or replaces the entry of `agent.name`; returns the one it
    /// replaced.
    fn put(&mut self, agent: TrustedAgent) -> Option<TrustedAgent> {
        self.listing = None;
        let name = agent.name.clone();
        for thumbprint in agent.thumbprints() {
            self.by_thumbprint.insert(thumbprint, name.clone());
        }
        let old = self.by_name.insert(name.clone(), agent);
        match &old {
            Some(old) => self.unindex(old),
            None => self.order.push(name),
        }
        old
    }

    fn delete(&mut self, name: &str) -> Option<TrustedAgent> {
        let old = self.by_name.remove(name)?;
        self.listing = None;
        self.order.retain(|n| n != name);
        self.unindex(&old);
        Some(old)
    }

    /// Drops `old`'s thumbprints from the index unless another entry (or
    /// `old`'s successor under its name) holds them now.
    fn unindex(&mut self, old: &TrustedAgent) {
        for thumbprint in old.thumbprints() {
            let held = self
                .by_thumbprint
                .get(&thumbprint)
                .and_then(|name| self.by_name.get(name))
                .is_some_and(|a| a.has_thumbprint(&thumbprint));
            if !held {
                self.by_thumbprint.remove(&thumbprint);
            }
        }
    }

    fn listing(&mut self) -> Arc<Vec<TrustedAgent>> {
        if let Some(listing) = &self.listing {
            return listing.clone();
        }
        let listing: Arc<Vec<TrustedAgent>> = Arc::new(
            self.order
                .iter()
                .filter_map(|name| self.by_name.get(name).cloned())
                .collect(),
        );
        self.listing = Some(listing.clone());
        listing
    }
}

impl Hub {
    /// A hub that keeps its registry in memory only and takes no
    /// registrations.
    pub fn new(identity: Identity, settings: HubSettings) -> Arc<Self> {
        Self::build(identity, settings, None)
    }

    /// A hub that loads its registry from the files of `store`, keeps it
    /// there, and takes registrations.
    pub fn with_store(
        identity: Identity,
        settings: HubSettings,
        store: HubStore,
    ) -> Result<Arc<Self>, trust::TrustFileError> {
        let agents = store.agents.load()?;
        let store: Arc<dyn RegistryStore> = Arc::new(crate::store::files::FileRegistry::new(store));
        let hub = Self::build(identity, settings, Some(store));
        hub.set_agents(agents);
        Ok(hub)
    }

    /// A hub on any store. A watched store (etcd) fills the hub's view
    /// through its watch ([`Self::apply_put`] and friends); any other is
    /// loaded here.
    pub async fn with_registry_store(
        identity: Identity,
        settings: HubSettings,
        store: Arc<dyn RegistryStore>,
        watched: bool,
    ) -> Result<Arc<Self>, StoreError> {
        let agents = if watched {
            Vec::new()
        } else {
            store.load().await?
        };
        let hub = Self::build(identity, settings, Some(store));
        hub.set_agents(agents);
        Ok(hub)
    }

    fn build(
        identity: Identity,
        settings: HubSettings,
        store: Option<Arc<dyn RegistryStore>>,
    ) -> Arc<Self> {
        let own = identity.thumbprint();
        let tls_trust = TrustStore::new([own]);
        tls_trust.set_certificate_validity(settings.certificate_validity);
        Arc::new(Self {
            identity,
            store,
            settings,
            registry: Arc::default(),
            agents: RwLock::default(),
            watched_revision: tokio::sync::watch::Sender::new(0),
            tls_trust,
            operators: ArcSwap::from_pointee(vec![own]),
            agents_write: tokio::sync::Mutex::new(()),
            memory_write: Mutex::new(()),
            pool: Mutex::new(HashMap::new()),
            grouped: Arc::default(),
            cluster: OnceLock::new(),
            fenced: std::sync::atomic::AtomicBool::new(false),
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

    pub fn store(&self) -> Option<&Arc<dyn RegistryStore>> {
        self.store.as_ref()
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, AgentIndex> {
        self.agents.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, AgentIndex> {
        self.agents.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The registered agents.
    pub fn agents(&self) -> Arc<Vec<TrustedAgent>> {
        self.index_mut().listing()
    }

    /// The registered agent with `thumbprint`, current or being retired.
    pub fn agent_with(&self, thumbprint: &Thumbprint) -> Option<TrustedAgent> {
        self.index().owner(thumbprint).cloned()
    }

    /// Stores a registration and trusts it at once. It replaces the entry
    /// with its thumbprint, and is refused if its name belongs to another
    /// agent.
    pub async fn register(&self, agent: TrustedAgent) -> Result<(), RegisterError> {
        self.register_all(vec![agent])
            .await
            .into_iter()
            .next()
            .unwrap_or(Err(RegisterError::Interrupted(grouped::Interrupted)))
    }

    /// Stores registrations in order with at most one write of the store,
    /// and trusts them at once; returns one outcome per registration, in
    /// order. Each is checked against the registry as the ones before it
    /// left it, so of two registrations of one name by different agents,
    /// in one batch or in two, exactly one is stored.
    pub async fn register_all(&self, batch: Vec<TrustedAgent>) -> Vec<Result<(), RegisterError>> {
        let count = batch.len();
        let Some(store) = &self.store else {
            return self.change_in_memory(|agents| {
                batch
                    .into_iter()
                    .map(|agent| trust::register_into(agents, agent).map_err(RegisterError::from))
                    .collect()
            });
        };
        let stored = self
            .write_store(
                store.is_watched(),
                store.register_all(batch),
                |(_, synced)| synced,
            )
            .await;
        match stored {
            Ok((outcomes, _)) => outcomes
                .into_iter()
                .map(|o| o.map_err(RegisterError::from))
                .collect(),
            Err(error) => vec![Err(RegisterError::Store(error)); count],
        }
    }

    /// Runs one write of the store and brings this hub's view up to it
    /// before returning: the whole list replaces the view (under
    /// `agents_write`, so an older write's list never lands after a newer
    /// one's), or the writer waits for its revision to come through the
    /// watch.
    async fn write_store<T, E>(
        &self,
        watched: bool,
        write: impl std::future::Future<Output = Result<T, E>>,
        synced: impl FnOnce(&T) -> &Synced,
    ) -> Result<T, E> {
        // A watched store orders its writes by revision; only whole lists
        // need this hub to order them.
        let _write = match watched {
            true => None,
            false => Some(self.agents_write.lock().await),
        };
        let outcome = write.await?;
        match synced(&outcome) {
            Synced::Whole(agents) => {
                if *self.agents() != *agents {
                    self.set_agents(agents.clone());
                }
            }
            Synced::Revision(revision) => self.caught_up_with(*revision).await,
            Synced::Unchanged => {}
        }
        Ok(outcome)
    }

    /// Waits (briefly) until the store's watch has brought this hub's view
    /// up to `revision`. A watch that lags longer is not waited for: the
    /// write is stored, and a tunnel that arrives first is checked against
    /// the store itself ([`Self::refresh_unknown`]).
    async fn caught_up_with(&self, revision: i64) {
        let mut watched = self.watched_revision.subscribe();
        let caught_up = watched.wait_for(|seen| *seen >= revision);
        if tokio::time::timeout(Duration::from_secs(5), caught_up)
            .await
            .is_err()
        {
            tracing::warn!(
                revision,
                "the store's watch is more than 5s behind this hub's own write"
            );
        }
    }

    /// Stores `agent` together with registrations that arrive while the
    /// registry is being written; returns its own outcome once its group
    /// is stored.
    pub async fn register_grouped(
        self: &Arc<Self>,
        agent: TrustedAgent,
    ) -> Result<(), RegisterError> {
        // A watched store (etcd) takes each registration as its own
        // transaction, many at once; grouping only pays for whole-file
        // writes.
        if self.store.as_ref().is_some_and(|s| s.is_watched()) {
            return self.register(agent).await;
        }
        let hub = self.clone();
        let write: grouped::GroupWriter<_> = Arc::new(move |batch: Vec<TrustedAgent>| {
            let hub = hub.clone();
            Box::pin(async move { hub.register_all(batch).await })
        });
        self.grouped.register(agent, write).await?
    }

    /// Whether grouped registrations are being written now.
    pub fn grouped_is_writing(&self) -> bool {
        self.grouped.is_writing()
    }

    /// Picks up edits made to the store by other processes (`tentacle-hub
    /// server trust add/remove`) when it is not watched. Returns whether
    /// anything changed.
    pub async fn reload_agents(&self) -> Result<bool, StoreError> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let _write = self.agents_write.lock().await;
        let agents = store.load().await?;
        if *self.agents() == agents {
            return Ok(false);
        }
        self.set_agents(agents);
        Ok(true)
    }

    /// A thumbprint this hub's view does not know, looked up in the store
    /// itself: an agent registered on another node a moment ago may open a
    /// tunnel here before this node's watch brings its entry. Returns
    /// whether the view learnt it.
    pub async fn refresh_unknown(&self, thumbprint: &Thumbprint) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        match store.lookup(*thumbprint).await {
            Ok(Some(agent)) => {
                self.apply_put(agent);
                true
            }
            Ok(None) => false,
            Err(error) => {
                tracing::warn!(%error, %thumbprint, "could not look up an unknown thumbprint in the store");
                false
            }
        }
    }

    /// Forgets an agent; its connections are closed.
    pub async fn deregister(&self, thumbprint: &Thumbprint) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            self.change_in_memory(|agents| agents.retain(|a| !a.has_thumbprint(thumbprint)));
            return Ok(());
        };
        self.write_store(
            store.is_watched(),
            store.remove(*thumbprint),
            |(_, synced)| synced,
        )
        .await
        .map(|_| ())
    }

    /// Replaces the list of trusted agents. Connections from agents that
    /// are no longer listed are closed.
    pub fn set_agents(&self, agents: Vec<TrustedAgent>) {
        self.registry.set_aliases(
            agents
                .iter()
                .filter_map(|a| Some((AgentId::parse(&a.name).ok()?, a.thumbprints().collect()))),
        );
        *self.index_mut() = AgentIndex::from_list(agents);
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

    /// Applies one entry from the store's watch: trusted at once, and the
    /// thumbprints it no longer has are no longer trusted (their
    /// connections close). Costs the same at any fleet size.
    pub fn apply_put(&self, agent: TrustedAgent) {
        let thumbprints: Vec<Thumbprint> = agent.thumbprints().collect();
        if let Ok(id) = AgentId::parse(&agent.name) {
            self.registry.set_alias(id, thumbprints.clone());
        }
        let old = self.index_mut().put(agent);
        for thumbprint in &thumbprints {
            self.tls_trust.insert(*thumbprint);
        }
        if let Some(old) = old {
            self.untrust_unless_held(&old);
        }
        self.refresh_pool(&thumbprints);
    }

    /// Applies a deletion from the store's watch.
    pub fn apply_delete(&self, name: &str) {
        let old = self.index_mut().delete(name);
        if let Ok(id) = AgentId::parse(name) {
            self.registry.remove_alias(&id);
        }
        if let Some(old) = old {
            self.untrust_unless_held(&old);
            let thumbprints: Vec<Thumbprint> = old.thumbprints().collect();
            self.refresh_pool(&thumbprints);
        }
    }

    /// Records that the view has caught up with the store's `revision`.
    pub fn set_watched_revision(&self, revision: i64) {
        self.watched_revision.send_if_modified(|seen| {
            let newer = revision > *seen;
            if newer {
                *seen = revision;
            }
            newer
        });
    }

    /// Stops trusting `old`'s thumbprints for TLS unless an entry or an
    /// operator still holds them.
    fn untrust_unless_held(&self, old: &TrustedAgent) {
        let index = self.index();
        let operators = self.operators.load();
        for thumbprint in old.thumbprints() {
            if index.owner(&thumbprint).is_none() && !operators.contains(&thumbprint) {
                self.tls_trust.remove(&thumbprint);
            }
        }
    }

    /// Refreshes what pooled listening connections accept, for entries
    /// that changed.
    fn refresh_pool(&self, changed: &[Thumbprint]) {
        for ((_, thumbprint), (_, trust)) in self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            if changed.contains(thumbprint) {
                trust.replace(self.same_agent(thumbprint));
            }
        }
    }

    /// `thumbprint` and every other thumbprint registered for its agent.
    fn same_agent(&self, thumbprint: &Thumbprint) -> Vec<Thumbprint> {
        match self.index().owner(thumbprint) {
            Some(agent) => agent.thumbprints().collect(),
            None => vec![*thumbprint],
        }
    }

    /// Adds or replaces one trusted agent, in memory only: an operator's
    /// decision, so it may take a name from another agent.
    pub fn trust_agent(&self, agent: TrustedAgent) {
        self.change_in_memory(|agents| trust::upsert_into(agents, agent));
    }

    /// Changes the agent list in memory only, as one step no other change
    /// comes between.
    fn change_in_memory<T>(&self, change: impl FnOnce(&mut Vec<TrustedAgent>) -> T) -> T {
        let _write = self
            .memory_write
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut agents = (*self.agents()).clone();
        let outcome = change(&mut agents);
        if *self.agents() != agents {
            self.set_agents(agents);
        }
        outcome
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
        let operators = self.operators.load();
        let index = self.index();
        self.tls_trust.replace(
            index
                .by_thumbprint
                .keys()
                .copied()
                .chain(operators.iter().copied()),
        );
    }

    pub fn is_operator(&self, thumbprint: &Thumbprint) -> bool {
        self.operators.load().contains(thumbprint)
    }

    /// Whether `thumbprint` may open tunnels as `agent_id`.
    pub fn allows_tunnel(&self, thumbprint: &Thumbprint, agent_id: &str) -> bool {
        self.index()
            .owner(thumbprint)
            .is_some_and(|a| a.mode == AgentMode::Polling && a.name == agent_id)
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
    pub async fn rotate(
        &self,
        current: &Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> Result<u64, RotateError> {
        let Some(store) = &self.store else {
            return self.change_in_memory(|agents| {
                rotation::rotate_in(agents, current, new, overlap, unix_now())
            });
        };
        // Read and changed in one step of the store: two rotations from
        // one certificate cannot both be told they succeeded.
        let (retire_at, _) = self
            .write_store(
                store.is_watched(),
                store.rotate(*current, new, overlap),
                |(_, synced)| synced,
            )
            .await?;
        Ok(retire_at)
    }

    /// The name of the agent with `thumbprint`, current or being retired,
    /// for logs; empty if none has it.
    pub fn agent_name(&self, thumbprint: &Thumbprint) -> String {
        self.index()
            .owner(thumbprint)
            .map(|a| a.name.clone())
            .unwrap_or_default()
    }

    /// An announced rotation, under the hub's approval policy: trusted at
    /// once ([`Self::rotate`]), or, when operators approve rotations,
    /// recorded as pending unless it was already approved and applied.
    pub async fn request_rotation(
        &self,
        current: &Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> Result<Rotated, RotateError> {
        if self.settings.rotation_approval != RotationApproval::Operator {
            let retire_old_at = self.rotate(current, new, overlap).await?;
            return Ok(Rotated::Trusted { retire_old_at });
        }
        let store = self.store.as_ref().ok_or(RotateError::NoPendingStore)?;
        let (agent, new_owner) = {
            let index = self.index();
            (index.owner(current).cloned(), index.owner(&new).cloned())
        };
        if new_owner.is_some_and(|a| !a.has_thumbprint(current)) {
            return Err(RotateError::ThumbprintInUse(new));
        }
        let agent = agent.ok_or(RotateError::NotRegistered(*current))?;
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
        store
            .request_rotation(PendingRotation {
                agent: agent.name.clone(),
                current: *current,
                new,
                overlap_seconds: overlap.as_secs(),
                requested_unix: unix_now(),
                approved: false,
            })
            .await?;
        Ok(Rotated::Pending)
    }

    /// Applies the rotations operators approved since the last call; each
    /// is an audit event (approved, or refused if the registry changed
    /// under it). Returns how many were applied.
    pub async fn apply_approved_rotations(&self) -> usize {
        let Some(store) = &self.store else {
            return 0;
        };
        let approved = match store.take_approved_rotations().await {
            Ok(approved) => approved,
            Err(error) => {
                tracing::warn!(%error, "could not read the approved rotations");
                return 0;
            }
        };
        let mut applied = 0;
        for rotation in approved {
            let overlap = Duration::from_secs(rotation.overlap_seconds);
            match self.rotate(&rotation.current, rotation.new, overlap).await {
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

    /// Retires thumbprints whose rotation overlap has passed. On several
    /// nodes at once, each retirement is stored and audited by one.
    pub async fn retire_rotated_certificates(&self) {
        let now = unix_now();
        let due: Vec<TrustedAgent> = self
            .agents()
            .iter()
            .filter(|a| {
                a.previous_thumbprint.is_some() && a.retire_previous_at.is_some_and(|t| t <= now)
            })
            .cloned()
            .collect();
        for agent in due {
            let Some(retired) = agent.previous_thumbprint else {
                continue;
            };
            let (name, current) = (agent.name.clone(), agent.thumbprint);
            let outcome = match &self.store {
                Some(store) => {
                    self.write_store(
                        store.is_watched(),
                        store.retire(agent, retired),
                        |(_, synced)| synced,
                    )
                    .await
                }
                None => Ok((
                    self.change_in_memory(|agents| rotation::retire_in(agents, &agent, &retired)),
                    Synced::Unchanged,
                )),
            };
            match outcome {
                Ok((true, _)) => audit(
                    RotationOutcome::Retired,
                    &name,
                    &retired,
                    &current,
                    "the overlap ended",
                ),
                Ok((false, _)) => {}
                Err(error) => tracing::error!(%error, "could not store a retired certificate"),
            }
        }
    }

    /// Whether this node is fenced off ([`Self::fence`]).
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Fences this node off: every tunnel is told to go (its agent moves
    /// to a node that still holds the cluster) and new ones are refused
    /// until [`Self::unfence`]. Calls running on the tunnels finish.
    pub async fn fence(&self, reason: &str) {
        if self.fenced.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let tunnels = self.registry.tunnels();
        tracing::warn!(
            tunnels = tunnels.len(),
            reason,
            "fencing this node off: its agents move to other nodes"
        );
        self.drain_tunnels(&tunnels, &format!("this hub node is fenced off: {reason}"))
            .await;
    }

    /// Takes tunnels again after [`Self::fence`].
    pub fn unfence(&self) {
        if self.fenced.swap(false, std::sync::atomic::Ordering::AcqRel) {
            tracing::info!("this node reaches etcd again; taking tunnels");
        }
    }

    /// Refuses new tunnels, tells every open one the hub is going away,
    /// waits for their calls, and closes them.
    pub async fn drain(&self) {
        // Closed first: a tunnel accepted during the drain would miss the
        // snapshot below and outlive this hub, holding its agent captive.
        self.registry.close();
        let tunnels = self.registry.tunnels();
        tracing::info!(tunnels = tunnels.len(), "draining tunnels");
        self.drain_tunnels(&tunnels, "the hub is shutting down")
            .await;
    }

    /// Tells each of `tunnels` to go, waits (up to the drain grace) for
    /// their calls to finish, and closes them.
    async fn drain_tunnels(&self, tunnels: &[Arc<crate::registry::Tunnel>], reason: &str) {
        for tunnel in tunnels {
            tunnel.start_draining();
            tunnel.outbound.ordered_later(Kind::Drain(TunnelDrain {
                reason: reason.to_owned(),
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
        for tunnel in tunnels {
            tunnel.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests;
