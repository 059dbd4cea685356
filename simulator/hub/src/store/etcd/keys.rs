//! Where each thing lives in etcd, under the cluster's prefix
//! (`/tentacle/` by default):
//!
//! - `agents/NAME`: one registered agent, as JSON;
//! - `thumbprints/HEX`: the name of the agent holding that thumbprint;
//! - `credentials/SHA256`: a hashed token or API key, as JSON;
//! - `rotations/NAME`: a rotation waiting for an operator, as JSON;
//! - `nodes/ID`: a hub node's peer address, on the node's lease;
//! - `presence/AGENT/NODE/TUNNEL`: a tunnel the agent holds on that node,
//!   on the node's lease.

use tentacle_proto::Thumbprint;

/// The keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    fn key(&self, parts: &[&str]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.push_str(&parts.join("/"));
        key.into_bytes()
    }

    /// The prefix of every agent's key.
    pub fn agents(&self) -> Vec<u8> {
        self.key(&["agents", ""])
    }

    pub fn agent(&self, name: &str) -> Vec<u8> {
        self.key(&["agents", name])
    }

    /// The agent name a key under [`Self::agents`] holds.
    pub fn agent_name<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key.strip_prefix(self.agents().as_slice())?).ok()
    }

    pub fn thumbprint(&self, thumbprint: &Thumbprint) -> Vec<u8> {
        self.key(&["thumbprints", &thumbprint.to_string()])
    }

    pub fn credential(&self, sha256: &str) -> Vec<u8> {
        self.key(&["credentials", sha256])
    }

    pub fn rotations(&self) -> Vec<u8> {
        self.key(&["rotations", ""])
    }

    pub fn rotation(&self, agent: &str) -> Vec<u8> {
        self.key(&["rotations", agent])
    }

    pub fn nodes(&self) -> Vec<u8> {
        self.key(&["nodes", ""])
    }

    pub fn node(&self, node: &str) -> Vec<u8> {
        self.key(&["nodes", node])
    }

    /// The node id a key under [`Self::nodes`] holds.
    pub fn node_id<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key.strip_prefix(self.nodes().as_slice())?).ok()
    }

    pub fn presences(&self) -> Vec<u8> {
        self.key(&["presence", ""])
    }

    pub fn presence(&self, agent: &str, node: &str, tunnel: u64) -> Vec<u8> {
        self.key(&["presence", agent, node, &tunnel.to_string()])
    }

    /// The agent, node and tunnel a key under [`Self::presences`] names.
    pub fn parse_presence<'k>(&self, key: &'k [u8]) -> Option<(&'k str, &'k str, u64)> {
        let rest = std::str::from_utf8(key.strip_prefix(self.presences().as_slice())?).ok()?;
        let mut parts = rest.split('/');
        let (agent, node, tunnel) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        Some((agent, node, tunnel.parse().ok()?))
    }
}

/// The end of the range of every key starting with `prefix`, as etcd's
/// "with prefix" computes it.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back_to_what_they_name() {
        let keys = Keys::new("/tentacle");
        assert_eq!(keys.agent("web-01"), b"/tentacle/agents/web-01");
        assert_eq!(keys.agent_name(b"/tentacle/agents/web-01"), Some("web-01"));
        assert_eq!(keys.agent_name(b"/other/agents/web-01"), None);
        let key = keys.presence("web-01", "hub-a", 42);
        assert_eq!(keys.parse_presence(&key), Some(("web-01", "hub-a", 42)));
        assert_eq!(
            keys.parse_presence(b"/tentacle/presence/web-01/hub-a"),
            None
        );
        assert_eq!(keys.node_id(&keys.node("hub-b")), Some("hub-b"));
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
    }
}
