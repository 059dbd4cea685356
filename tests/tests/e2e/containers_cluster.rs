//! The hub cluster in containers, partitioned the way a real one is: one
//! etcd member, three hub nodes sharing one identity, and polling agents
//! that know every node (see `tentacle_tests::containers::cluster` for the
//! networks). A node cut off from etcd and from its peers while its agents
//! still reach it must fence itself off, and its agents move to the nodes
//! that still hold the cluster, losing nothing of a script that was running.
//!
//! Black-box: images, flags and the host's `tentacle-hub` and `etcdctl`
//! only. Without Docker, or while the images cannot be built, each test
//! prints `skipped: <test>: <why>` and passes, unless `CI=true`, where it
//! fails.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tentacle_tests::containers::cluster::ClusterFleet;
use tentacle_tests::containers::{self, Running, Scenario, say};

fn secs(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const AGENTS: [&str; 3] = ["poll-a", "poll-b", "poll-c"];

#[test]
fn a_node_partitioned_from_etcd_and_its_peers_hands_its_agents_over_and_a_running_script_loses_nothing()
 {
    containers::run_scenario(
        module_path!(),
        "a_node_partitioned_from_etcd_and_its_peers_hands_its_agents_over_and_a_running_script_loses_nothing",
        partitioned_node,
    );
}

fn partitioned_node(scenario: &Scenario) {
    const LINES: usize = 30;
    let fleet = ClusterFleet::start(scenario, 3, &AGENTS);
    say(&format!("networks: {}", fleet.network_names().join(", ")));

    // Where each agent's tunnels are, and the node holding the most: that
    // one is cut off.
    let mut held = Vec::new();
    for agent in AGENTS {
        let nodes = fleet.holders(agent).unwrap_or_else(|e| panic!("{e}"));
        held.push((agent, nodes));
    }
    say(&format!(
        "tunnels before the partition: {}",
        describe(&held)
    ));
    for (agent, nodes) in &held {
        assert_eq!(
            nodes.len(),
            1,
            "{agent} holds its tunnels on one node\n{}",
            fleet.all_logs()
        );
    }
    let count = |id: &str| held.iter().filter(|(_, nodes)| nodes.contains(id)).count();
    let cut_id = (0..fleet.node_count())
        .map(|i| fleet.node(i).id.clone())
        .max_by_key(|id| count(id))
        .expect("nodes");
    let cut = fleet.node_index(&cut_id).expect("a node");
    let moving: Vec<&str> = held
        .iter()
        .filter(|(_, nodes)| nodes.contains(&cut_id))
        .map(|(agent, _)| *agent)
        .collect();
    let staying: Vec<(&str, BTreeSet<String>)> = held
        .iter()
        .filter(|(_, nodes)| !nodes.contains(&cut_id))
        .cloned()
        .collect();
    let target = moving[0];
    // The call goes through a node that does not hold the agent: it is
    // forwarded to the holder over the backplane, until the holder is cut
    // off.
    let caller = (0..fleet.node_count())
        .find(|&i| i != cut)
        .expect("another node");
    say(&format!(
        "cutting {cut_id} off; its agents {moving:?} must move; the script on {target} runs through {}",
        fleet.node(caller).id
    ));

    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.5; done; exit 7");
    let exec = Running::spawn(fleet.exec_command(caller, target, &script));
    assert!(
        exec.wait_for_line("line 3", Duration::from_secs(30)),
        "the script started: {:?}\n{}",
        exec.lines(),
        fleet.all_logs()
    );
    fleet.partition(cut);
    let cut_at = Instant::now();
    let seen_at_cut = exec.lines().len();
    say(&format!(
        "{cut_id} disconnected from the backplane after {seen_at_cut} line(s)"
    ));

    // Within the presence TTL and a check of the rule, the cut-off node
    // drains its tunnels and its agents reconnect elsewhere.
    let mut moved = Vec::new();
    for agent in &moving {
        let now = fleet
            .wait_held(
                agent,
                |nodes| !nodes.is_empty() && !nodes.contains(&cut_id),
                Duration::from_secs(60),
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", fleet.all_logs()));
        moved.push(format!(
            "{agent} → {} after {}",
            join(&now),
            secs(cut_at.elapsed())
        ));
    }
    say(&format!("moved: {}", moved.join(", ")));

    // When the script's output comes again after the cut (reported, not
    // asserted: how long a call waits on a node gone silent is the hub's
    // timing, not this test's).
    let resumed = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if exec.lines().len() > seen_at_cut + 1 {
                break Some(cut_at.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (code, lines, stderr) = exec.finish(Duration::from_secs(120));
    say(&format!(
        "the script's output came again {} after the cut; it ended {} after the cut with exit code {code:?}, {} line(s)",
        resumed.map_or_else(|| "never".to_owned(), secs),
        secs(cut_at.elapsed()),
        lines.len()
    ));
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(
        lines,
        expected,
        "every line exactly once, in order\nstderr:\n{stderr}\n{}",
        fleet.all_logs()
    );
    assert_eq!(
        code,
        Some(7),
        "the script's own exit code\nstderr:\n{stderr}\n{}",
        fleet.all_logs()
    );
    assert!(
        seen_at_cut < LINES,
        "the script was still running when the node was cut off"
    );

    // The cut-off node says why it let its agents go; no other node fenced
    // itself off, and the agents it did not hold stayed where they were.
    let fenced = |i: usize| fleet.node_log(i).contains("fencing this node off");
    assert!(fenced(cut), "{}", fleet.node_log(cut));
    for i in (0..fleet.node_count()).filter(|&i| i != cut) {
        assert!(
            !fenced(i),
            "{} fenced itself off:\n{}",
            fleet.node(i).id,
            fleet.node_log(i)
        );
    }
    for (agent, before) in &staying {
        let now = fleet.holders(agent).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&now, before, "{agent} stayed where it was");
    }

    // New calls through every node still in the cluster reach every agent.
    let started = Instant::now();
    let mut calls = 0;
    for node in (0..fleet.node_count()).filter(|&i| i != cut) {
        let id = fleet.node(node).id.clone();
        for agent in AGENTS {
            let out = fleet.exec(node, agent, &format!("echo \"$(hostname) via {id}\""));
            assert_eq!(
                text(&out.stdout),
                format!("{} via {id}\n", agent_host(scenario, agent)),
                "{agent} through {id}: {}\n{}",
                text(&out.stderr),
                fleet.all_logs()
            );
            assert_eq!(out.status.code(), Some(0));
            calls += 1;
        }
    }
    say(&format!(
        "{calls} new calls through the {} remaining nodes reached every agent in {}",
        fleet.node_count() - 1,
        secs(started.elapsed())
    ));
}

/// The container (and host) name of `agent` in this scenario.
fn agent_host(scenario: &Scenario, agent: &str) -> String {
    format!("{}-{agent}", scenario.prefix())
}

fn join(nodes: &BTreeSet<String>) -> String {
    nodes.iter().cloned().collect::<Vec<_>>().join(",")
}

fn describe(held: &[(&str, BTreeSet<String>)]) -> String {
    held.iter()
        .map(|(agent, nodes)| format!("{agent} on {}", join(nodes)))
        .collect::<Vec<_>>()
        .join(", ")
}
