//! A hub node on etcd: its view of the registry follows etcd's watch, its
//! tunnels are announced in etcd's presence, and it reads every other
//! node's. [`ClusterNode::leave`] takes it out at once at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::Identity;
use tokio_util::sync::CancellationToken;

use super::EtcdStore;
use super::presence::EtcdPresence;
use crate::cluster::{Cluster, Node};
use crate::hub::{Hub, HubSettings};
use crate::store::StoreError;

/// A hub serving as one node of a cluster on etcd.
#[derive(Debug)]
pub struct ClusterNode {
    hub: Arc<Hub>,
    presence: Arc<EtcdPresence>,
    stop: CancellationToken,
}

impl ClusterNode {
    /// Loads the registry from etcd into a new hub, follows it, and joins
    /// the cluster's presence as `node`, whose entries vanish `presence_ttl`
    /// after it stops keeping them alive.
    pub async fn join(
        etcd: EtcdStore,
        identity: Identity,
        settings: HubSettings,
        node: Node,
        presence_ttl: Duration,
    ) -> Result<Self, StoreError> {
        let stop = CancellationToken::new();
        let hub =
            Hub::with_registry_store(identity, settings, Arc::new(etcd.clone()), true).await?;
        super::watch::follow(etcd.clone(), hub.clone(), stop.child_token()).await?;
        let presence =
            EtcdPresence::start(etcd, node.clone(), presence_ttl, stop.child_token()).await?;
        hub.registry().announce_to(presence.clone());
        // A hub made a moment ago has joined no cluster: this cannot be
        // refused.
        let _ = hub.join_cluster(Cluster {
            node,
            presence: presence.clone(),
        });
        tokio::spawn(super::fence::guard(
            hub.clone(),
            presence.clone(),
            stop.child_token(),
        ));
        Ok(Self {
            hub,
            presence,
            stop,
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn presence(&self) -> &Arc<EtcdPresence> {
        &self.presence
    }

    /// Stops following etcd and takes this node's presence out of it.
    pub async fn leave(&self) {
        self.presence.leave().await;
        self.stop.cancel();
    }
}
