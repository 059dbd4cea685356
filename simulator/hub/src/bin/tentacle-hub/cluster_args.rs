//! `tentacle-hub server`'s cluster flags, and starting the hub as one node
//! of a cluster on etcd or as a hub on its own files.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tentacle_hub::cluster::{Node, NodeId};
use tentacle_hub::store::etcd::node::ClusterNode;
use tentacle_hub::store::open::OpenStore;
use tentacle_hub::{Hub, HubSettings};
use tentacle_proto::Identity;
use tentacle_proto::dial::ListeningAddress;

/// How this hub takes part in a cluster (with `--store etcd://…`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// This node's name in the cluster [default: the host name].
    #[arg(long, env = "TENTACLE_HUB_NODE_ID")]
    node_id: Option<NodeId>,
    /// Where the other nodes reach this one, https://HOST:PORT [default:
    /// the --listen address, unless it is 0.0.0.0 or [::]].
    #[arg(long, env = "TENTACLE_HUB_ADVERTISE")]
    advertise: Option<ListeningAddress>,
    /// How soon after this node dies its presence entries vanish from etcd
    /// (its lease's TTL), so calls stop going to it.
    #[arg(long, env = "TENTACLE_HUB_PRESENCE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    presence_ttl: Duration,
}

impl ClusterArgs {
    fn node(&self, listen: SocketAddr) -> anyhow::Result<Node> {
        let id = match &self.node_id {
            Some(id) => id.clone(),
            None => {
                let host = nix::unistd::gethostname()
                    .context("no --node-id given and the host name is unreadable")?;
                let host = host.to_string_lossy();
                host.parse::<NodeId>().with_context(|| {
                    format!("the host name `{host}` is no node id; pass --node-id")
                })?
            }
        };
        let address = match &self.advertise {
            Some(address) => address.clone(),
            None if listen.ip().is_unspecified() => anyhow::bail!(
                "--listen {listen} is every address; pass --advertise https://HOST:PORT so the other nodes can reach this one"
            ),
            None => ListeningAddress::new(listen.ip().to_string(), listen.port()),
        };
        Ok(Node { id, address })
    }
}

/// The hub, on its own or as a node of a cluster.
#[derive(Debug)]
pub enum Joined {
    Alone(Arc<Hub>),
    Node(ClusterNode),
}

impl Joined {
    pub async fn start(
        args: &ClusterArgs,
        store: &OpenStore,
        identity: Identity,
        settings: HubSettings,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let Some(etcd) = &store.etcd else {
            let hub =
                Hub::with_registry_store(identity, settings, store.store.clone(), false).await?;
            return Ok(Self::Alone(hub));
        };
        let node = args.node(listen)?;
        tracing::info!(node = %node.id, advertise = %node.address, "joining the hub cluster on etcd");
        let joined =
            ClusterNode::join(etcd.clone(), identity, settings, node, args.presence_ttl).await?;
        Ok(Self::Node(joined))
    }

    pub fn hub(&self) -> &Arc<Hub> {
        match self {
            Self::Alone(hub) => hub,
            Self::Node(node) => node.hub(),
        }
    }

    pub async fn leave(&self) {
        if let Self::Node(node) = self {
            node.leave().await;
        }
    }
}
