//! What one hub node knows of the other nodes of its cluster: who it is,
//! and which nodes hold tunnels from which agents ([`Presence`]).
//!
//! A hub without a cluster (the file registry) has none of this and serves
//! every call from its own tunnels. With the etcd store, every node
//! publishes its tunnels ([`PresenceSink`]) and reads everyone else's
//! ([`Presence`]); a call for an agent whose tunnels are on another node
//! is forwarded there.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tentacle_proto::dial::ListeningAddress;
use tokio::sync::watch;

use crate::target::AgentId;

/// The metadata key a node puts on a call it forwards to another node: the
/// receiver serves it from its own tunnels and never forwards it again.
pub const HOP_HEADER: &str = "tentacle-hop";
/// The metadata key naming the node a forwarded call is meant for. All
/// nodes share one certificate, so the certificate alone cannot tell the
/// forwarder it reached the node it meant to.
pub const NODE_HEADER: &str = "tentacle-node";

/// A hub node's name within its cluster: 1 to 64 ASCII letters, digits,
/// `-`, `_` or `.` (a host name or a pod name fits).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

/// Not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a node id: use 1 to 64 letters, digits, `-`, `_` or `.` (e.g. the host or pod name)"
)]
pub struct ParseNodeIdError(String);

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(ParseNodeIdError(text.to_owned()))
        }
    }
}

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node and the address its peers reach it on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    pub id: NodeId,
    pub address: ListeningAddress,
}

/// Which nodes hold tunnels from which agents, as this node last heard.
pub trait Presence: Send + Sync + fmt::Debug {
    /// The other nodes holding a tunnel from `agent` now, best first. Never
    /// includes this node.
    fn holders(&self, agent: &AgentId) -> Vec<Node>;

    /// Bumped whenever any agent's holders change, so a call waiting for an
    /// agent that is connected nowhere wakes when it connects to any node.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Where a node announces the tunnels it holds.
pub trait PresenceSink: Send + Sync + fmt::Debug {
    /// A tunnel from `agent` opened here; `tunnel` is unique on this node.
    fn tunnel_opened(&self, agent: &AgentId, tunnel: u64);
    /// That tunnel closed.
    fn tunnel_closed(&self, agent: &AgentId, tunnel: u64);
}

/// This node within its cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// This node.
    pub node: Node,
    pub presence: Arc<dyn Presence>,
}
