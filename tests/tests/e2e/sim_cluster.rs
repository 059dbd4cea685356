//! `tentacle-sim run` against a hub cluster: three real `tentacle-hub
//! server` nodes on one etcd, one hub identity. The virtual polling agents
//! get every node as a server under the one thumbprint, so each holds its
//! tunnel on one node; operator calls go to the nodes in turn and are
//! forwarded to the holder. Mid-wave the scenario kills node 2 with
//! SIGKILL and starts it again with the restart command the run was
//! given; the run's invariants (no lost script, no repeated line, ...)
//! must hold across the loss, and the report must chart every node.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tentacle_tests::bin;
use tentacle_tests::cluster::{HubCluster, TEST_PRESENCE_TTL};
use tentacle_tests::etcd::etcd_or_skip;

const NODES: usize = 3;
const AGENTS: u64 = 36;
/// The node the scenario kills, 1-based as in the scenario.
const KILLED: usize = 2;

/// One deploy wave whose scripts (3 to 6 s) are running when node 2 dies
/// two seconds into the stages; health checks before and after, and a
/// short soak so the restarted node is sampled for a while.
fn scenario() -> String {
    format!(
        r#"
name = "sim-cluster"
time_limit = "100s"
[fleet]
agents = {AGENTS}
source_addresses = 2
connect_timeout = "40s"
[fleet.scripts]
min_duration = "3s"
max_duration = "6s"
min_lines = 5
max_lines = 20
[[stage]]
kind = "health"
[[stage]]
kind = "scripts"
waves = 1
concurrency = {AGENTS}
[[stage]]
kind = "health"
[[stage]]
kind = "soak"
duration = "3s"
[[chaos.hub_node_kill]]
node = {KILLED}
at = "2s"
down_for = "4s"
"#
    )
}

/// Processes serving `home` as node `id`, found by their command line:
/// the node the simulator restarts is not the fixture's child.
fn node_pids(home: &Path, id: &str) -> Vec<u32> {
    let home = home.to_string_lossy();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours = args.iter().any(|a| *a == home)
                && args.windows(2).any(|w| w[0] == "--node-id" && w[1] == id)
                && args.iter().any(|a| a == "server");
            ours.then_some(pid)
        })
        .collect()
}

/// Kills whatever still serves the cluster's home when the test ends,
/// including a node the simulator restarted.
struct Reaper {
    home: PathBuf,
    ids: Vec<String>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for id in &self.ids {
            for pid in node_pids(&self.home, id) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// What starts node `i` again: the fixture's own command line, `exec`ed so
/// the shell's pid is the node's.
fn restart_command(cluster: &HubCluster, i: usize) -> String {
    let port = cluster
        .url(i)
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    format!(
        "exec '{}' --home '{}' server --listen 127.0.0.1:{port} --advertise https://127.0.0.1:{port} --node-id {} --presence-ttl {TEST_PRESENCE_TTL}",
        bin("tentacle-hub").display(),
        cluster.home.0.path().display(),
        cluster.node_id(i),
    )
}

fn per_node(timeline: &[Value], node: usize, field: &str) -> Vec<u64> {
    timeline
        .iter()
        .filter_map(|s| s["nodes"][node][field].as_u64())
        .collect()
}

#[test]
fn a_run_against_three_nodes_survives_one_node_killed_and_charts_every_node() {
    if !etcd_or_skip("sim_cluster") {
        return;
    }
    let cluster = HubCluster::start(1, NODES);
    let home = cluster.home.0.path().to_owned();
    let _reaper = Reaper {
        home: home.clone(),
        ids: (0..NODES).map(|i| cluster.node_id(i).to_owned()).collect(),
    };
    let key = cluster.run(&["server", "api-key", "create"]);
    assert!(key.status.success(), "{key:?}");
    let key = String::from_utf8_lossy(&key.stdout).trim().to_owned();
    let pids: Vec<u32> = (0..NODES)
        .map(|i| {
            let found = node_pids(&home, cluster.node_id(i));
            assert_eq!(found.len(), 1, "one process for {}", cluster.node_id(i));
            found[0]
        })
        .collect();

    let work = tempfile::tempdir().expect("tempdir");
    let scenario_path = work.path().join("cluster.toml");
    std::fs::write(&scenario_path, scenario()).expect("scenario");
    let out = work.path().join("report");
    let hubs = (0..NODES)
        .map(|i| cluster.url(i))
        .collect::<Vec<_>>()
        .join(",");
    let pid_list = pids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let commands: Vec<String> = (0..NODES).map(|i| restart_command(&cluster, i)).collect();
    let mut args: Vec<&str> = vec![
        "run",
        "--scenario",
        scenario_path.to_str().expect("path"),
        "--hub",
        &hubs,
        "--api-key",
        &key,
        "--hub-pid",
        &pid_list,
        "--out",
        out.to_str().expect("path"),
    ];
    for command in &commands {
        args.extend(["--hub-restart-command", command]);
    }
    let output = cluster.home.run_sim(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = || {
        let restarted =
            std::fs::read_to_string(out.join(format!("hub-node-{KILLED}.log"))).unwrap_or_default();
        format!(
            "{stdout}\n{stderr}\n--- restarted node:\n{restarted}\n{}",
            cluster.all_logs()
        )
    };
    assert!(output.status.success(), "the run passes\n{}", context());

    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    let report: Value = serde_json::from_str(&text).expect("report.json is JSON");
    for invariant in report["invariants"].as_array().expect("invariants") {
        assert_eq!(invariant["passed"], true, "{invariant}\n{}", context());
    }
    assert_eq!(report["scripts"]["dispatched"], AGENTS, "{}", context());
    assert_eq!(report["scripts"]["abandoned"], 0, "{}", context());
    assert_eq!(report["chaos"]["hub_node_kill"], 1, "{}", report["chaos"]);
    assert_eq!(
        report["chaos"]["hub_node_restart"], 1,
        "{}",
        report["chaos"]
    );

    let nodes = report["hub_nodes"].as_array().expect("hub_nodes");
    assert_eq!(nodes.len(), NODES, "{nodes:?}");
    let killed = &nodes[KILLED - 1];
    assert_eq!(
        (killed["kills"].as_u64(), killed["restarts"].as_u64()),
        (Some(1), Some(1))
    );
    assert_ne!(
        killed["pid"].as_u64(),
        Some(u64::from(pids[KILLED - 1])),
        "a new process"
    );

    let timeline = report["timeline"].as_array().expect("timeline");
    assert!(
        timeline
            .iter()
            .all(|s| s["nodes"].as_array().map(Vec::len) == Some(NODES)),
        "every sample has a figure per node"
    );
    for node in 0..NODES {
        let connected = per_node(timeline, node, "connected");
        assert!(
            connected.iter().any(|n| *n > 0),
            "node {} had agents at some point: {connected:?}",
            node + 1
        );
        let rss = per_node(timeline, node, "rss_bytes");
        assert!(
            rss.iter().any(|n| *n > 0),
            "node {} memory: {rss:?}",
            node + 1
        );
    }
    // The killed node lost its agents; they were held elsewhere meanwhile.
    let on_killed = per_node(timeline, KILLED - 1, "connected");
    let first_held = on_killed.iter().position(|n| *n > 0).unwrap_or(usize::MAX);
    assert!(
        on_killed.iter().skip(first_held).any(|n| *n == 0),
        "node {KILLED} dropped to no agents after holding some: {on_killed:?}"
    );
    // Sampled again under its new pid once it was back.
    assert!(
        per_node(timeline, KILLED - 1, "rss_bytes").last() > Some(&0),
        "the restarted node's memory is charted"
    );

    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    for text in [
        "Connected agents by node",
        "CPU by node",
        "Resident memory by node",
    ] {
        assert!(html.contains(text), "report.html has {text}");
    }
    for node in 1..=NODES {
        assert!(
            html.contains(&format!(">node {node}</text>")),
            "node {node} in the legends"
        );
    }
    assert!(stdout.contains(&format!("hub node {KILLED} ")), "{stdout}");
}
