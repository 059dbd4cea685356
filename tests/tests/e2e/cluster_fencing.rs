//! The fencing rule, both ways (ARCHITECTURE.md states it). Every node
//! reaches etcd through fault proxies of its own, and its peers through a
//! fault proxy in front of each node (its advertised address), while
//! agents dial the nodes directly. So a test cuts exactly the paths a
//! partition would:
//!
//! - one node cut off from etcd and from its peers drains its tunnels, and
//!   its agent moves to a node that still holds the cluster;
//! - every node cut off from etcd, still reaching each other, keeps its
//!   tunnels: the cluster lost etcd, not the node.

use std::time::{Duration, Instant};

use tentacle_tests::cluster::{HubCluster, exec, holder, joined_agent};
use tentacle_tests::etcd::etcd_or_skip;
use tentacle_tests::fault_proxy::{Fault, FaultProxy};

/// A cluster of 3 etcd members and 3 nodes whose etcd and peer paths run
/// through proxies: `etcd[node]` are that node's proxies to each member,
/// `peer[node]` the proxy its peers reach it through.
struct Partitionable {
    cluster: HubCluster,
    etcd: Vec<Vec<FaultProxy>>,
    peer: Vec<FaultProxy>,
    _runtime: tokio::runtime::Runtime,
}

fn partitionable() -> Partitionable {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut cluster = HubCluster::prepare(3, 3);
    let members: Vec<std::net::SocketAddr> = cluster
        .etcd
        .endpoints()
        .iter()
        .map(|e| e.parse().expect("endpoint"))
        .collect();
    let mut etcd = Vec::new();
    let mut peer = Vec::new();
    for node in 0..cluster.len() {
        let proxies: Vec<FaultProxy> = members
            .iter()
            .map(|m| runtime.block_on(FaultProxy::start(*m)).expect("etcd proxy"))
            .collect();
        let store = format!(
            "etcd://{}",
            proxies
                .iter()
                .map(|p| p.address().to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let port = cluster.node_mut(node).port;
        let front = runtime
            .block_on(FaultProxy::start(([127, 0, 0, 1], port).into()))
            .expect("peer proxy");
        cluster.node_mut(node).store = Some(store);
        cluster.node_mut(node).advertise = Some(format!("https://{}", front.address()));
        etcd.push(proxies);
        peer.push(front);
    }
    for node in 0..cluster.len() {
        cluster.start_node(node);
    }
    Partitionable {
        cluster,
        etcd,
        peer,
        _runtime: runtime,
    }
}

#[test]
fn a_node_cut_off_from_etcd_and_its_peers_drains_and_its_agent_moves() {
    if !etcd_or_skip(
        "cluster_fencing::a_node_cut_off_from_etcd_and_its_peers_drains_and_its_agent_moves",
    ) {
        return;
    }
    let rig = partitionable();
    let cluster = &rig.cluster;
    let agent = joined_agent(cluster, 0, "web-01");
    let cut = holder(cluster, "web-01").expect("the agent is present on a node");
    for proxy in &rig.etcd[cut] {
        proxy.set(Fault::Kill);
    }
    for (node, proxy) in rig.peer.iter().enumerate() {
        if node != cut {
            proxy.set(Fault::Kill);
        }
    }
    // Within the presence TTL and a check, the node fences itself off and
    // its agent moves.
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        if let Some(now) = holder(cluster, "web-01")
            && now != cut
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the agent stayed on the cut-off node\nagent:\n{}\n{}",
            agent.log_text(),
            cluster.all_logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        cluster.log(cut).contains("fencing this node off"),
        "{}",
        cluster.log(cut)
    );
    let out = exec(cluster, moved, &agent, "web-01", "echo moved")
        .output()
        .expect("exec");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("moved"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.all_logs()
    );
    for node in 0..cluster.len() {
        if node != cut {
            assert!(
                !cluster.log(node).contains("fencing this node off"),
                "{}",
                cluster.log(node)
            );
        }
    }
}

#[test]
fn nodes_that_lose_etcd_but_reach_each_other_keep_their_tunnels() {
    if !etcd_or_skip(
        "cluster_fencing::nodes_that_lose_etcd_but_reach_each_other_keep_their_tunnels",
    ) {
        return;
    }
    let rig = partitionable();
    let cluster = &rig.cluster;
    let agent = joined_agent(cluster, 0, "web-01");
    let at = holder(cluster, "web-01").expect("the agent is present on a node");
    for proxies in &rig.etcd {
        for proxy in proxies {
            proxy.set(Fault::Kill);
        }
    }
    // Well past the presence TTL (3 s) and several checks of the rule.
    std::thread::sleep(Duration::from_secs(8));
    for node in 0..cluster.len() {
        assert!(
            !cluster.log(node).contains("fencing this node off"),
            "{}",
            cluster.all_logs()
        );
    }
    let out = exec(cluster, at, &agent, "web-01", "echo still here")
        .output()
        .expect("exec");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("still here"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.all_logs()
    );
}
