//! Presence in etcd: which node holds which agent's tunnels.
//!
//! Each node holds one lease of the presence TTL and keeps it alive. Its
//! peer address (`nodes/ID`) and one key per tunnel it holds
//! (`presence/AGENT/NODE/TUNNEL`) hang on that lease, so when a node dies
//! its entries vanish within the TTL with nobody deleting them. A node
//! deletes its own keys only with a guard on its lease (compare-and-delete),
//! never another node's. If the lease is lost (etcd expired it while the
//! node could not reach it) the node takes a new one and writes its
//! entries again.
//!
//! Every node reads everyone's presence (paged, then watched) into
//! [`Presence`], which routing asks and waits on.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, KeyValue, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tentacle_proto::dial::ListeningAddress;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::EtcdStore;
use super::keys::prefix_end;
use super::watch::load_range;
use crate::cluster::{Node, NodeId, Presence, PresenceSink};
use crate::store::StoreError;
use crate::target::AgentId;

/// What `nodes/ID` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeEntry {
    address: String,
}

/// One node's tunnels: opened and closed here, written to etcd in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Opened,
    Closed,
}

/// Every node's tunnels, as this node last heard.
#[derive(Debug, Default)]
struct View {
    tunnels: HashMap<String, BTreeSet<(String, u64)>>,
    nodes: HashMap<String, ListeningAddress>,
}

impl View {
    fn apply(&mut self, store: &EtcdStore, kv: &KeyValue, put: bool) {
        let keys = store.keys();
        if let Some(node) = keys.node_id(kv.key()) {
            if !put {
                self.nodes.remove(node);
                return;
            }
            let address = serde_json::from_slice::<NodeEntry>(kv.value())
                .ok()
                .and_then(|entry| entry.address.parse::<ListeningAddress>().ok());
            match address {
                Some(address) => {
                    self.nodes.insert(node.to_owned(), address);
                }
                None => tracing::error!(node, "skipped a node entry without a usable address"),
            }
        } else if let Some((agent, node, tunnel)) = keys.parse_presence(kv.key()) {
            let held = self.tunnels.entry(agent.to_owned()).or_default();
            if put {
                held.insert((node.to_owned(), tunnel));
            } else {
                held.remove(&(node.to_owned(), tunnel));
                if held.is_empty() {
                    self.tunnels.remove(agent);
                }
            }
        }
    }
}

/// This node's presence in etcd, and everyone's as seen from here.
#[derive(Debug)]
pub struct EtcdPresence {
    store: EtcdStore,
    node: Node,
    ttl: Duration,
    lease: std::sync::atomic::AtomicI64,
    view: Mutex<View>,
    changes: watch::Sender<u64>,
    writes: mpsc::UnboundedSender<(Vec<u8>, Change)>,
    /// The tunnels this node holds now, written again under a new lease.
    mine: Mutex<HashSet<Vec<u8>>>,
    /// When etcd last renewed this node's lease.
    renewed: Mutex<std::time::Instant>,
    stop: CancellationToken,
}

impl EtcdPresence {
    /// Joins the cluster's presence as `node`, with entries that vanish
    /// `ttl` after this node stops keeping them alive.
    pub async fn start(
        store: EtcdStore,
        node: Node,
        ttl: Duration,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, StoreError> {
        let (writes, queue) = mpsc::unbounded_channel();
        let presence = Arc::new(Self {
            store,
            node,
            ttl,
            lease: std::sync::atomic::AtomicI64::new(0),
            view: Mutex::default(),
            changes: watch::Sender::new(0),
            writes,
            mine: Mutex::default(),
            renewed: Mutex::new(std::time::Instant::now()),
            stop,
        });
        presence.take_lease().await?;
        let revision = presence.load().await?;
        tokio::spawn(presence.clone().keep_alive());
        tokio::spawn(presence.clone().write(queue));
        tokio::spawn(presence.clone().watch(revision));
        Ok(presence)
    }

    fn lease(&self) -> i64 {
        self.lease.load(std::sync::atomic::Ordering::Acquire)
    }

    fn ttl_seconds(&self) -> i64 {
        i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX)
    }

    /// A new lease, with this node's address and every tunnel it holds on
    /// it.
    async fn take_lease(&self) -> Result<(), StoreError> {
        let mut client = self.store.client();
        let lease = client
            .lease_grant(self.ttl_seconds(), None)
            .await
            .map_err(|e| self.store.unavailable(e))?
            .id();
        self.lease
            .store(lease, std::sync::atomic::Ordering::Release);
        let entry = NodeEntry {
            address: self.node.address.to_string(),
        };
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        let with_lease = || Some(PutOptions::new().with_lease(lease));
        let mut ops = vec![TxnOp::put(
            self.store.keys().node(self.node.id.as_str()),
            value,
            with_lease(),
        )];
        let mine: Vec<Vec<u8>> = self
            .mine
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        // etcd takes at most 128 operations per transaction.
        for chunk in mine.chunks(100) {
            ops.extend(
                chunk
                    .iter()
                    .map(|key| TxnOp::put(key.clone(), "", with_lease())),
            );
            client
                .txn(Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .map_err(|e| self.store.unavailable(e))?;
        }
        if !ops.is_empty() {
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| self.store.unavailable(e))?;
        }
        Ok(())
    }

    /// Keeps the lease alive at a third of its TTL; takes a new one if etcd
    /// let it expire.
    async fn keep_alive(self: Arc<Self>) {
        let period = (self.ttl / 3).max(Duration::from_millis(200));
        let mut outage = false;
        loop {
            let alive = async {
                let mut client = self.store.client();
                let (mut keeper, mut answers) = client.lease_keep_alive(self.lease()).await?;
                loop {
                    keeper.keep_alive().await?;
                    match answers.message().await? {
                        Some(answer) if answer.ttl() > 0 => {
                            *self.renewed.lock().unwrap_or_else(PoisonError::into_inner) =
                                std::time::Instant::now();
                        }
                        _ => return Ok::<bool, etcd_client::Error>(false),
                    }
                    if outage {
                        tracing::info!("this node's presence lease in etcd is kept alive again");
                        outage = false;
                    }
                    tokio::time::sleep(period).await;
                }
            };
            let expired = tokio::select! {
                kept = alive => match kept {
                    Ok(expired) => !expired,
                    Err(error) => {
                        if !outage {
                            tracing::warn!(%error, "could not keep this node's presence lease alive in etcd");
                            outage = true;
                        }
                        false
                    }
                },
                () = self.stop.cancelled() => return,
            };
            if expired {
                tracing::warn!("etcd expired this node's presence lease; taking a new one");
                if let Err(error) = self.take_lease().await {
                    tracing::warn!(%error, "could not take a new presence lease");
                }
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Writes this node's tunnel changes in order, a batch per
    /// transaction.
    async fn write(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<(Vec<u8>, Change)>) {
        let mut batch: BTreeMap<Vec<u8>, Change> = BTreeMap::new();
        loop {
            let first = tokio::select! {
                next = queue.recv() => next,
                () = self.stop.cancelled() => return,
            };
            let Some((key, change)) = first else { return };
            batch.insert(key, change);
            // A key opened and closed within one batch was never worth
            // writing; etcd refuses one key twice in a transaction anyway.
            while batch.len() < 100 {
                match queue.try_recv() {
                    Ok((key, change)) => {
                        if batch.get(&key).is_some_and(|c| *c != change) {
                            batch.remove(&key);
                        } else {
                            batch.insert(key, change);
                        }
                    }
                    Err(_) => break,
                }
            }
            let pending = std::mem::take(&mut batch);
            let mut backoff = Duration::from_millis(100);
            loop {
                let lease = self.lease();
                let ops: Vec<TxnOp> = pending
                    .iter()
                    .map(|(key, change)| match change {
                        Change::Opened => {
                            TxnOp::put(key.clone(), "", Some(PutOptions::new().with_lease(lease)))
                        }
                        // Compare-and-delete: only a key on this node's lease.
                        Change::Closed => TxnOp::txn(
                            Txn::new()
                                .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
                                .and_then([TxnOp::delete(key.clone(), None)]),
                        ),
                    })
                    .collect();
                match self.store.client().txn(Txn::new().and_then(ops)).await {
                    Ok(_) => break,
                    Err(error) => {
                        tracing::debug!(%error, "could not write presence; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = self.stop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
    }

    fn range(&self) -> (Vec<u8>, Vec<u8>) {
        // `nodes/` and `presence/` sort next to each other: one range, one
        // watch.
        let keys = self.store.keys();
        (keys.nodes(), prefix_end(&keys.presences()))
    }

    /// Reads everyone's presence; returns the revision read at.
    async fn load(&self) -> Result<i64, StoreError> {
        let (start, end) = self.range();
        let (kvs, revision) = load_range(&self.store.client(), &start, &end)
            .await
            .map_err(|e| self.store.unavailable(e))?;
        let mut view = View::default();
        for kv in &kvs {
            view.apply(&self.store, kv, true);
        }
        *self.view.lock().unwrap_or_else(PoisonError::into_inner) = view;
        self.changes.send_modify(|n| *n += 1);
        Ok(revision)
    }

    async fn watch(self: Arc<Self>, mut revision: i64) {
        loop {
            let ended = tokio::select! {
                ended = self.watch_once(&mut revision) => ended,
                () = self.stop.cancelled() => return,
            };
            match ended {
                Some(compacted) if compacted => match self.load().await {
                    Ok(fresh) => revision = fresh,
                    Err(error) => tracing::warn!(%error, "could not read presence again"),
                },
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One watch from `revision + 1`; `Some(true)` if etcd compacted past
    /// it.
    async fn watch_once(&self, revision: &mut i64) -> Option<bool> {
        let (start, end) = self.range();
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(*revision + 1);
        let mut stream = self.store.client().watch(start, Some(options)).await.ok()?;
        while let Ok(Some(response)) = stream.message().await {
            if response.compact_revision() > 0 {
                return Some(true);
            }
            if response.canceled() {
                return Some(false);
            }
            if response.events().is_empty() {
                continue;
            }
            {
                let mut view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    view.apply(&self.store, kv, event.event_type() == EventType::Put);
                    *revision = (*revision).max(kv.mod_revision());
                }
            }
            self.changes.send_modify(|n| *n += 1);
        }
        None
    }

    /// Leaves the cluster at once: the lease goes, and with it this node's
    /// address and every presence entry, so peers stop forwarding here.
    pub async fn leave(&self) {
        self.stop.cancel();
        if let Err(error) = self.store.client().lease_revoke(self.lease()).await {
            tracing::warn!(%error, "could not revoke this node's presence lease; its entries expire with the TTL");
        }
    }

    /// How long since etcd last renewed this node's lease: how long this
    /// node has been cut off from etcd's quorum, if it is.
    pub fn etcd_silent_for(&self) -> Duration {
        self.renewed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// This node's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The other nodes this node last heard of, with their addresses.
    pub fn peers(&self) -> Vec<Node> {
        let view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        view.nodes
            .iter()
            .filter(|(id, _)| id.as_str() != self.node.id.as_str())
            .filter_map(|(id, address)| {
                Some(Node {
                    id: id.parse::<NodeId>().ok()?,
                    address: address.clone(),
                })
            })
            .collect()
    }

    fn send(&self, agent: &AgentId, tunnel: u64, change: Change) {
        let key = self
            .store
            .keys()
            .presence(agent.as_str(), self.node.id.as_str(), tunnel);
        {
            let mut mine = self.mine.lock().unwrap_or_else(PoisonError::into_inner);
            match change {
                Change::Opened => mine.insert(key.clone()),
                Change::Closed => mine.remove(&key),
            };
        }
        // The writer is gone only when the node stops.
        let _ = self.writes.send((key, change));
    }
}

impl Presence for EtcdPresence {
    fn holders(&self, agent: &AgentId) -> Vec<Node> {
        let view = self.view.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(held) = view.tunnels.get(agent.as_str()) else {
            return Vec::new();
        };
        // Most tunnels first: the node the agent is settled on.
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for (node, _) in held {
            if node != self.node.id.as_str() {
                *counts.entry(node.as_str()).or_insert(0) += 1;
            }
        }
        let mut nodes: Vec<(&str, usize)> = counts.into_iter().collect();
        nodes.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
        nodes
            .into_iter()
            .filter_map(|(id, _)| {
                Some(Node {
                    id: id.parse::<NodeId>().ok()?,
                    address: view.nodes.get(id)?.clone(),
                })
            })
            .collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl PresenceSink for EtcdPresence {
    fn tunnel_opened(&self, agent: &AgentId, tunnel: u64) {
        self.send(agent, tunnel, Change::Opened);
    }

    fn tunnel_closed(&self, agent: &AgentId, tunnel: u64) {
        self.send(agent, tunnel, Change::Closed);
    }
}
