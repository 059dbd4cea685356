//! The etcd backend of [`RegistryStore`], shared by every node of a hub
//! cluster.
//!
//! One key per agent (`agents/NAME`, its entry as JSON) plus an index from
//! each of its thumbprints to its name (`thumbprints/HEX`). A change reads
//! the entries it concerns, applies the same rule the file backend applies
//! to its whole list ([`crate::trust::register_into`] and friends), and
//! writes the difference in one transaction that holds only if none of
//! the keys it read changed since (their mod revisions), retrying a few
//! times if one did. So a name belongs to one thumbprint, a rotation's two
//! thumbprints lead to one agent, and a one-time token is deleted by one
//! transaction in the whole cluster. A transaction touches a handful of
//! keys, far from etcd's 128 operations and 1.5 MiB.
//!
//! Tokens with a lifetime hang on an etcd lease of that lifetime, so etcd
//! expires them on its own: no node has to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;
use tentacle_proto::Thumbprint;

use super::{Registered, RegistryStore, StoreError, Synced};
use crate::credentials::{
    self, ChosenSecretError, CredentialError, CredentialKind, Redeemed, StoredCredential,
};
use crate::hub::{RotateError, TrustedAgent, unix_now};
use crate::rotation::{self, PendingError, PendingRotation};
use crate::trust;

pub mod fence;
pub mod keys;
pub mod node;
pub mod presence;
pub mod watch;

use keys::Keys;

/// How a hub reaches etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// Every key this hub cluster uses starts with this.
    pub prefix: String,
    /// Client certificates for an etcd that serves TLS.
    pub tls: Option<EtcdTls>,
    /// How long one request may take before it counts as etcd not
    /// answering. It covers an election after etcd's leader is lost, which
    /// takes up to twice etcd's election timeout.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl EtcdSettings {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/tentacle/".into(),
            tls: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// [`EtcdSettings::request_timeout`]'s default (`--etcd-timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// PEM files for TLS to etcd: the CA that signed etcd's certificates, and
/// this hub's client certificate and key.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// The etcd store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("could not read {path} for TLS to etcd: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not reach etcd at {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
    #[error("TLS to etcd takes --etcd-ca, --etcd-cert and --etcd-key together; also give {0}")]
    IncompleteTls(String),
}

/// The registry in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// Whether `error` is worth sending the request again for: it never
/// reached a member, or etcd was between leaders ("request timed out",
/// "leader changed", "no leader"), which a member that just lost its
/// leader answers until the election ends. Every write here is guarded by
/// the revisions it read, so one that did land the first time is refused
/// the second time, never applied twice.
fn worth_retrying(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable
                && [
                    "connect",
                    "request timed out",
                    "leader changed",
                    "no leader",
                ]
                .iter()
                .any(|m| status.message().contains(m))
        }
        _ => false,
    }
}

/// How many times a transaction is tried while the keys it read keep
/// changing under it.
const ATTEMPTS: u32 = 16;

/// Entries one change concerns, as read, with each key's mod revision
/// (0: absent) for the transaction's guard.
#[derive(Debug, Default)]
struct Read {
    agents: BTreeMap<String, (TrustedAgent, i64)>,
    absent: BTreeSet<String>,
    index: HashMap<Thumbprint, (String, i64)>,
    unindexed: BTreeSet<Thumbprint>,
}

impl EtcdStore {
    /// Connects to etcd. Members may be down: the client tries each.
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, OpenError> {
        let endpoints = settings.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_timeout(settings.request_timeout)
            .with_connect_timeout(settings.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), settings.request_timeout);
        let scheme = match &settings.tls {
            Some(tls) => {
                let read = |path: &PathBuf| {
                    std::fs::read(path).map_err(|source| OpenError::TlsFile {
                        path: path.clone(),
                        source,
                    })
                };
                let ca = etcd_client::Certificate::from_pem(read(&tls.ca)?);
                let identity =
                    etcd_client::Identity::from_pem(read(&tls.certificate)?, read(&tls.key)?);
                options = options.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(ca)
                        .identity(identity),
                );
                "https"
            }
            None => "http",
        };
        let urls: Vec<String> = settings
            .endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let client =
            Client::connect(urls, Some(options))
                .await
                .map_err(|e| OpenError::Connect {
                    endpoints: endpoints.clone(),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            client,
            keys: Keys::new(&settings.prefix),
            endpoints,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn unavailable(&self, error: impl std::fmt::Display) -> StoreError {
        StoreError::EtcdUnavailable {
            endpoints: self.endpoints.clone(),
            reason: error.to_string(),
        }
    }

    fn corrupt(&self, key: &[u8], reason: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            endpoints: self.endpoints.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            reason: reason.to_string(),
        }
    }

    fn contended(&self) -> StoreError {
        StoreError::Contended {
            endpoints: self.endpoints.clone(),
            attempts: ATTEMPTS,
        }
    }

    pub(crate) fn parse_agent(&self, key: &[u8], value: &[u8]) -> Result<TrustedAgent, StoreError> {
        serde_json::from_slice(value).map_err(|e| self.corrupt(key, e))
    }

    /// Runs one request, again (up to 4 times, 500 ms apart) when it did
    /// not reach any member (the client's balancer learns that a member is
    /// down from the first request that picks it) or etcd was electing a
    /// leader ([`worth_retrying`]).
    async fn request<T, F, Fut>(&self, mut call: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call(self.client.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(error) if attempt < 4 && worth_retrying(&error) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(self.unavailable(error)),
            }
        }
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.request(|mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// Deletes `key` if it is still at `revision` (compare-and-delete);
    /// returns whether this call deleted it.
    async fn delete_at(&self, key: Vec<u8>, revision: i64) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.txn(txn).await?.succeeded())
    }

    async fn get(
        &self,
        key: Vec<u8>,
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        self.request(|mut client| {
            let (key, options) = (key.clone(), options.clone());
            async move { client.get(key, Some(options)).await }
        })
        .await
    }

    /// The values of `keys`, read together (one revision), linearizably.
    async fn get_all(
        &self,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<etcd_client::KeyValue>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let txn = Txn::new().and_then(
            keys.iter()
                .map(|k| TxnOp::get(k.clone(), None))
                .collect::<Vec<_>>(),
        );
        let response = self.txn(txn).await?;
        Ok(response
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
                _ => None,
            })
            .collect())
    }

    /// Reads the entries named `names` and those holding `thumbprints`.
    async fn read(&self, names: &[String], thumbprints: &[Thumbprint]) -> Result<Read, StoreError> {
        let mut read = Read::default();
        let index_keys: Vec<Vec<u8>> = thumbprints
            .iter()
            .map(|t| self.keys.thumbprint(t))
            .collect();
        let mut wanted: BTreeSet<String> = names.iter().cloned().collect();
        for (thumbprint, kv) in thumbprints.iter().zip(self.get_all(&index_keys).await?) {
            match kv {
                Some(kv) => {
                    let name = String::from_utf8(kv.value().to_vec())
                        .map_err(|e| self.corrupt(kv.key(), e))?;
                    wanted.insert(name.clone());
                    read.index.insert(*thumbprint, (name, kv.mod_revision()));
                }
                None => {
                    read.unindexed.insert(*thumbprint);
                }
            }
        }
        let wanted: Vec<String> = wanted.into_iter().collect();
        let agent_keys: Vec<Vec<u8>> = wanted.iter().map(|n| self.keys.agent(n)).collect();
        for (name, kv) in wanted.into_iter().zip(self.get_all(&agent_keys).await?) {
            match kv {
                Some(kv) => {
                    let agent = self.parse_agent(kv.key(), kv.value())?;
                    read.agents.insert(name, (agent, kv.mod_revision()));
                }
                None => {
                    read.absent.insert(name);
                }
            }
        }
        Ok(read)
    }

    /// Applies `change` to the entries it concerns (those named `names`
    /// or holding `thumbprints`) as one guarded transaction, retried while
    /// they change under it. Returns what `change` returned and the
    /// revision written (none if nothing changed).
    async fn change_entries<T>(
        &self,
        names: Vec<String>,
        thumbprints: Vec<Thumbprint>,
        mut change: impl FnMut(&mut Vec<TrustedAgent>) -> T,
    ) -> Result<(T, Synced), StoreError> {
        for _ in 0..ATTEMPTS {
            let read = self.read(&names, &thumbprints).await?;
            let before: Vec<TrustedAgent> = read.agents.values().map(|(a, _)| a.clone()).collect();
            let mut after = before.clone();
            let outcome = change(&mut after);
            if after == before {
                return Ok((outcome, Synced::Unchanged));
            }
            let txn = self.guarded_write(&read, &before, &after)?;
            let response = self.txn(txn).await?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                return Ok((outcome, Synced::Revision(revision)));
            }
        }
        Err(self.contended())
    }

    /// The transaction that turns `before` into `after`, guarded by the
    /// mod revision of every key `read` saw (or its absence).
    fn guarded_write(
        &self,
        read: &Read,
        before: &[TrustedAgent],
        after: &[TrustedAgent],
    ) -> Result<Txn, StoreError> {
        let mut guards = Vec::new();
        for (name, (_, revision)) in &read.agents {
            guards.push(Compare::mod_revision(
                self.keys.agent(name),
                CompareOp::Equal,
                *revision,
            ));
        }
        for name in &read.absent {
            guards.push(Compare::version(self.keys.agent(name), CompareOp::Equal, 0));
        }
        for (thumbprint, (_, revision)) in &read.index {
            guards.push(Compare::mod_revision(
                self.keys.thumbprint(thumbprint),
                CompareOp::Equal,
                *revision,
            ));
        }
        for thumbprint in &read.unindexed {
            guards.push(Compare::version(
                self.keys.thumbprint(thumbprint),
                CompareOp::Equal,
                0,
            ));
        }
        let mut ops = Vec::new();
        let after_names: BTreeSet<&str> = after.iter().map(|a| a.name.as_str()).collect();
        for agent in after {
            if !before.contains(agent) {
                let value = serde_json::to_vec(agent)
                    .map_err(|e| self.corrupt(&self.keys.agent(&agent.name), e))?;
                ops.push(TxnOp::put(self.keys.agent(&agent.name), value, None));
            }
        }
        for agent in before {
            if !after_names.contains(agent.name.as_str()) {
                ops.push(TxnOp::delete(self.keys.agent(&agent.name), None));
            }
        }
        // The index follows: every thumbprint now held points at its
        // holder; one no longer held by anyone read here is deleted.
        let mut held: HashMap<Thumbprint, &str> = HashMap::new();
        for agent in after {
            for thumbprint in agent.thumbprints() {
                held.insert(thumbprint, agent.name.as_str());
            }
        }
        for (thumbprint, name) in &held {
            let indexed = read.index.get(thumbprint).map(|(n, _)| n.as_str());
            if indexed != Some(*name) {
                ops.push(TxnOp::put(
                    self.keys.thumbprint(thumbprint),
                    name.as_bytes(),
                    None,
                ));
            }
        }
        for agent in before {
            for thumbprint in agent.thumbprints() {
                if !held.contains_key(&thumbprint) {
                    ops.push(TxnOp::delete(self.keys.thumbprint(&thumbprint), None));
                }
            }
        }
        Ok(Txn::new().when(guards).and_then(ops))
    }

    /// The agent holding `thumbprint`, read linearizably: for a tunnel from
    /// an agent this node's watch has not told it about yet.
    pub async fn lookup_agent(
        &self,
        thumbprint: &Thumbprint,
    ) -> Result<Option<TrustedAgent>, StoreError> {
        let read = self.read(&[], &[*thumbprint]).await?;
        Ok(read
            .agents
            .into_values()
            .map(|(agent, _)| agent)
            .find(|a| a.has_thumbprint(thumbprint)))
    }

    async fn credential(
        &self,
        sha256: &str,
    ) -> Result<Option<(StoredCredential, i64)>, CredentialError> {
        let key = self.keys.credential(sha256);
        let found = self
            .get_all(std::slice::from_ref(&key))
            .await
            .map_err(CredentialError::Shared)?;
        match found.into_iter().next().flatten() {
            None => Ok(None),
            Some(kv) => {
                let stored: StoredCredential = serde_json::from_slice(kv.value())
                    .map_err(|e| CredentialError::Shared(self.corrupt(&key, e)))?;
                Ok(Some((stored, kv.mod_revision())))
            }
        }
    }

    /// Stores `credential` unless its key exists; on a lease of its
    /// remaining lifetime if it has one.
    async fn put_credential(&self, credential: &StoredCredential) -> Result<bool, CredentialError> {
        let key = self.keys.credential(&credential.sha256);
        let value = serde_json::to_vec(credential)
            .map_err(|e| CredentialError::Shared(self.corrupt(&key, e)))?;
        let options = match credential.expires_unix {
            None => None,
            Some(expires) => {
                let ttl =
                    i64::try_from(expires.saturating_sub(unix_now()).max(1)).unwrap_or(i64::MAX);
                let lease = self
                    .request(|mut client| async move { client.lease_grant(ttl, None).await })
                    .await
                    .map_err(CredentialError::Shared)?;
                Some(PutOptions::new().with_lease(lease.id()))
            }
        };
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, options)]);
        let response = self.txn(txn).await.map_err(CredentialError::Shared)?;
        Ok(response.succeeded())
    }

    async fn pending(&self) -> Result<Vec<(PendingRotation, i64)>, PendingError> {
        let prefix = self.keys.rotations();
        let response = self
            .get(prefix.clone(), GetOptions::new().with_prefix())
            .await
            .map_err(PendingError::Shared)?;
        let mut pending = Vec::new();
        for kv in response.kvs() {
            let rotation: PendingRotation = serde_json::from_slice(kv.value())
                .map_err(|e| PendingError::Shared(self.corrupt(kv.key(), e)))?;
            pending.push((rotation, kv.mod_revision()));
        }
        pending.sort_by_key(|(r, _)| r.requested_unix);
        Ok(pending)
    }

    /// Writes `rotation` under its agent's key if that key is still at
    /// `revision` (0: absent).
    async fn put_pending(
        &self,
        rotation: &PendingRotation,
        revision: i64,
    ) -> Result<bool, PendingError> {
        let key = self.keys.rotation(&rotation.agent);
        let value = serde_json::to_vec(rotation)
            .map_err(|e| PendingError::Shared(self.corrupt(&key, e)))?;
        let guard = match revision {
            0 => Compare::version(key.clone(), CompareOp::Equal, 0),
            revision => Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
        };
        let response = self
            .txn(
                Txn::new()
                    .when([guard])
                    .and_then([TxnOp::put(key, value, None)]),
            )
            .await
            .map_err(PendingError::Shared)?;
        Ok(response.succeeded())
    }
}

impl RegistryStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints)
    }

    fn is_watched(&self) -> bool {
        true
    }

    fn load(&self) -> BoxFuture<'_, Result<Vec<TrustedAgent>, StoreError>> {
        Box::pin(async move { Ok(watch::load_agents(self).await?.0) })
    }

    fn lookup(
        &self,
        thumbprint: Thumbprint,
    ) -> BoxFuture<'_, Result<Option<TrustedAgent>, StoreError>> {
        Box::pin(async move { self.lookup_agent(&thumbprint).await })
    }

    fn register_all(
        &self,
        batch: Vec<TrustedAgent>,
    ) -> BoxFuture<'_, Result<(Registered, Synced), StoreError>> {
        Box::pin(async move {
            // In order: each registration sees the ones before it.
            let mut outcomes = Vec::with_capacity(batch.len());
            let mut last = Synced::Unchanged;
            for agent in batch {
                let names = vec![agent.name.clone()];
                let thumbprints: Vec<Thumbprint> = agent.thumbprints().collect();
                let (outcome, synced) = self
                    .change_entries(names, thumbprints, |agents| {
                        trust::register_into(agents, agent.clone())
                    })
                    .await?;
                outcomes.push(outcome);
                if matches!(synced, Synced::Revision(_)) {
                    last = synced;
                }
            }
            Ok((outcomes, last))
        })
    }

    fn upsert(&self, agent: TrustedAgent) -> BoxFuture<'_, Result<Synced, StoreError>> {
        Box::pin(async move {
            let names = vec![agent.name.clone()];
            let thumbprints: Vec<Thumbprint> = agent.thumbprints().collect();
            let ((), synced) = self
                .change_entries(names, thumbprints, |agents| {
                    trust::upsert_into(agents, agent.clone())
                })
                .await?;
            Ok(synced)
        })
    }

    fn remove(&self, thumbprint: Thumbprint) -> BoxFuture<'_, Result<(bool, Synced), StoreError>> {
        Box::pin(async move {
            self.change_entries(Vec::new(), vec![thumbprint], |agents| {
                let before = agents.len();
                agents.retain(|a| !a.has_thumbprint(&thumbprint));
                agents.len() != before
            })
            .await
        })
    }

    fn rotate(
        &self,
        current: Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> BoxFuture<'_, Result<(u64, Synced), RotateError>> {
        Box::pin(async move {
            let now = unix_now();
            let (outcome, synced) = self
                .change_entries(Vec::new(), vec![current, new], |agents| {
                    rotation::rotate_in(agents, &current, new, overlap, now)
                })
                .await
                .map_err(RotateError::Store)?;
            Ok((outcome?, synced))
        })
    }

    fn retire(
        &self,
        agent: TrustedAgent,
        retired: Thumbprint,
    ) -> BoxFuture<'_, Result<(bool, Synced), StoreError>> {
        Box::pin(async move {
            let names = vec![agent.name.clone()];
            self.change_entries(names, Vec::new(), |agents| {
                rotation::retire_in(agents, &agent, &retired)
            })
            .await
        })
    }

    fn create_credential(
        &self,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<String, CredentialError>> {
        Box::pin(async move {
            let secret = credentials::new_secret(kind);
            self.put_credential(&StoredCredential::new(kind, &secret, ttl))
                .await?;
            Ok(secret)
        })
    }

    fn add_credential(
        &self,
        kind: CredentialKind,
        secret: String,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<bool, ChosenSecretError>> {
        Box::pin(async move {
            credentials::check_chosen(&secret)?;
            let stored = StoredCredential::new(kind, &secret, ttl);
            if let Some((existing, _)) = self.credential(&stored.sha256).await?
                && existing.is_valid(kind)
            {
                return Ok(false);
            }
            Ok(self.put_credential(&stored).await?)
        })
    }

    fn import_credential(
        &self,
        credential: StoredCredential,
    ) -> BoxFuture<'_, Result<bool, CredentialError>> {
        Box::pin(async move {
            if credential.expires_unix.is_some_and(|t| t <= unix_now()) {
                return Ok(false);
            }
            self.put_credential(&credential).await
        })
    }

    fn redeem(
        &self,
        secret: String,
        kind: CredentialKind,
    ) -> BoxFuture<'_, Result<Redeemed, CredentialError>> {
        Box::pin(async move {
            let sha256 = credentials::digest(&secret);
            let Some((stored, revision)) = self.credential(&sha256).await? else {
                return Err(CredentialError::Invalid);
            };
            if !stored.is_valid(kind) {
                return Err(CredentialError::Invalid);
            }
            if kind == CredentialKind::ApiKey {
                return Ok(Redeemed { used_up: None });
            }
            // Used up by the one transaction that deletes it at the revision
            // it was read at: of two nodes redeeming it at once, one wins.
            let key = self.keys.credential(&sha256);
            if !self
                .delete_at(key, revision)
                .await
                .map_err(CredentialError::Shared)?
            {
                return Err(CredentialError::Invalid);
            }
            Ok(Redeemed {
                used_up: Some(stored),
            })
        })
    }

    fn restore(&self, redeemed: Redeemed) -> BoxFuture<'_, Result<(), CredentialError>> {
        Box::pin(async move {
            if let Some(token) = redeemed.used_up {
                self.put_credential(&token).await?;
            }
            Ok(())
        })
    }

    fn request_rotation(
        &self,
        rotation: PendingRotation,
    ) -> BoxFuture<'_, Result<(), PendingError>> {
        Box::pin(async move {
            for _ in 0..ATTEMPTS {
                let pending = self.pending().await?;
                let old = pending.iter().find(|(r, _)| r.agent == rotation.agent);
                let revision = old.map_or(0, |(_, revision)| *revision);
                let merged = rotation::merge_request(old.map(|(r, _)| r), rotation.clone());
                if self.put_pending(&merged, revision).await? {
                    return Ok(());
                }
            }
            Err(PendingError::Shared(self.contended()))
        })
    }

    fn pending_rotations(&self) -> BoxFuture<'_, Result<Vec<PendingRotation>, PendingError>> {
        Box::pin(async move { Ok(self.pending().await?.into_iter().map(|(r, _)| r).collect()) })
    }

    fn approve_rotation(
        &self,
        selector: String,
    ) -> BoxFuture<'_, Result<PendingRotation, PendingError>> {
        Box::pin(async move {
            for _ in 0..ATTEMPTS {
                let pending = self.pending().await?;
                let (mut found, revision) = pending
                    .into_iter()
                    .find(|(r, _)| rotation::selects(&selector, r))
                    .ok_or_else(|| PendingError::NoMatch(selector.trim().to_owned()))?;
                found.approved = true;
                if self.put_pending(&found, revision).await? {
                    return Ok(found);
                }
            }
            Err(PendingError::Shared(self.contended()))
        })
    }

    fn take_approved_rotations(&self) -> BoxFuture<'_, Result<Vec<PendingRotation>, PendingError>> {
        Box::pin(async move {
            let mut taken = Vec::new();
            for (rotation, revision) in self.pending().await? {
                if !rotation.approved {
                    continue;
                }
                // Taken by the node whose delete holds; the others skip it.
                let key = self.keys.rotation(&rotation.agent);
                if self
                    .delete_at(key, revision)
                    .await
                    .map_err(PendingError::Shared)?
                {
                    taken.push(rotation);
                }
            }
            Ok(taken)
        })
    }
}

#[cfg(test)]
mod tests;
