//! The fencing rule. A node that cannot reach etcd cannot tell a cluster
//! that lost etcd from a node that lost the cluster, so it asks its peers:
//!
//! - cut off from etcd **and** from a majority of the nodes it knows (itself
//!   counted), it is the one that is lost: it drains its tunnels, so its
//!   agents move to nodes that still hold the cluster, and takes no new
//!   ones until etcd answers again;
//! - cut off from etcd but reaching a majority, the whole cluster has lost
//!   etcd: it keeps its tunnels, so connected agents stay reachable.
//!
//! "Cut off from etcd" means etcd has not renewed this node's presence lease
//! for a whole TTL: by then etcd (if it still has a quorum) has expired the
//! lease, and the other nodes already route around this one. A peer is
//! reached when a TLS handshake with the shared hub identity completes.

use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::dial::ListeningAddress;
use tentacle_proto::{Identity, TrustStore};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::presence::EtcdPresence;
use crate::hub::Hub;

/// How often the rule is checked, and how long a peer gets to answer.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a node that reaches `reachable` of its `peers` other known
/// nodes holds a majority of the cluster, itself counted.
pub fn holds_a_majority(reachable: usize, peers: usize) -> bool {
    2 * (reachable + 1) > peers + 1
}

/// Applies the rule to `hub` until `stop`.
pub async fn guard(hub: Arc<Hub>, presence: Arc<EtcdPresence>, stop: CancellationToken) {
    let identity = hub.identity().clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = stop.cancelled() => return,
        }
        if presence.etcd_silent_for() < presence.ttl() {
            hub.unfence();
            continue;
        }
        let peers = presence.peers();
        let probes = peers.iter().map(|peer| reaches(&identity, &peer.address));
        let reachable = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter(|reached| *reached)
            .count();
        if holds_a_majority(reachable, peers.len()) {
            // The whole cluster lost etcd: keep serving what is connected.
            hub.unfence();
        } else {
            hub.fence(&format!(
                "etcd silent for {}s and {reachable} of {} peers reachable",
                presence.etcd_silent_for().as_secs(),
                peers.len()
            ))
            .await;
        }
    }
}

/// Whether a TLS handshake with the node at `address`, as the shared hub
/// identity, completes in time.
async fn reaches(identity: &Identity, address: &ListeningAddress) -> bool {
    let Ok(tls) =
        tentacle_proto::tls::client_config(identity, TrustStore::new([identity.thumbprint()]))
    else {
        return false;
    };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((address.host(), address.port())).await?;
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(address.host().to_owned())
            .map_err(std::io::Error::other)?;
        TlsConnector::from(tls).connect(name, tcp).await?;
        Ok::<(), std::io::Error>(())
    };
    matches!(
        tokio::time::timeout(PEER_TIMEOUT, connect).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::holds_a_majority;

    #[test]
    fn a_majority_counts_the_node_itself() {
        // Alone in a cluster of one: etcd is all there is; never fence.
        assert!(holds_a_majority(0, 0));
        // Three nodes: reaching one peer is two of three.
        assert!(holds_a_majority(1, 2));
        assert!(!holds_a_majority(0, 2));
        // Four nodes: two of four is no majority.
        assert!(!holds_a_majority(1, 3));
        assert!(holds_a_majority(2, 3));
    }
}
