//! Which hub node each virtual tentacle's connections go to, as the agents
//! see it: the fleet is given the hub's addresses (one, or every node of a
//! cluster), and every connection a polling agent dials counts against the
//! node it dialed until it closes. The agent itself picks the node (it
//! holds a cluster's tunnels on one node at a time); this only watches, so
//! the run can chart connected agents per node without asking the hub, and
//! route an operator call to the node that holds the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tentacle_proto::dial::ListeningAddress;

/// No connection dialed yet.
const NONE: usize = usize::MAX;

/// Open connections per hub node, in the order the nodes were given.
#[derive(Debug, Default)]
pub struct NodeLinks {
    addresses: Vec<ListeningAddress>,
    open: Vec<AtomicU64>,
}

impl NodeLinks {
    pub fn new(addresses: &[ListeningAddress]) -> Self {
        Self {
            addresses: addresses.to_vec(),
            open: addresses.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether these are the links of exactly `addresses`.
    pub fn is_for(&self, addresses: &[ListeningAddress]) -> bool {
        self.addresses == addresses
    }

    /// The node at `address`, if it is one of the fleet's.
    pub fn index_of(&self, address: &ListeningAddress) -> Option<usize> {
        self.addresses.iter().position(|a| a == address)
    }

    /// Counts a connection to node `node` until the guard drops.
    pub fn opened(self: &Arc<Self>, node: usize) -> OpenLink {
        if let Some(open) = self.open.get(node) {
            open.fetch_add(1, Ordering::Relaxed);
        }
        OpenLink {
            links: self.clone(),
            node,
        }
    }

    /// Connections open now, per node.
    pub fn open(&self) -> Vec<u64> {
        self.open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// One open connection to a node; dropping it uncounts it.
#[derive(Debug)]
pub struct OpenLink {
    links: Arc<NodeLinks>,
    node: usize,
}

impl Drop for OpenLink {
    fn drop(&mut self) {
        if let Some(open) = self.links.open.get(self.node) {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The node an agent last dialed: where its tunnel is, or was.
#[derive(Debug)]
pub struct LastNode(AtomicUsize);

impl Default for LastNode {
    fn default() -> Self {
        Self(AtomicUsize::new(NONE))
    }
}

impl LastNode {
    pub fn set(&self, node: usize) {
        self.0.store(node, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<usize> {
        let node = self.0.load(Ordering::Relaxed);
        (node != NONE).then_some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_count_until_they_close() {
        let a = ListeningAddress::new("127.0.0.1", 1);
        let b = ListeningAddress::new("127.0.0.1", 2);
        let links = Arc::new(NodeLinks::new(&[a.clone(), b.clone()]));
        assert_eq!(links.index_of(&b), Some(1));
        assert_eq!(links.index_of(&ListeningAddress::new("127.0.0.1", 3)), None);
        let first = links.opened(1);
        let second = links.opened(1);
        let other = links.opened(0);
        assert_eq!(links.open(), vec![1, 2]);
        drop(first);
        drop(other);
        assert_eq!(links.open(), vec![0, 1]);
        drop(second);
        assert_eq!(links.open(), vec![0, 0]);
        let last = LastNode::default();
        assert_eq!(last.get(), None);
        last.set(1);
        assert_eq!(last.get(), Some(1));
    }
}
