//! A hub that spans several nodes: a real 3-member etcd cluster and 3 real
//! `tentacle-hub server` processes on loopback sharing one identity. An
//! agent registered on one node is trusted and reachable through every
//! node; a token is used once in the whole cluster; a call through a node
//! that does not hold the agent's tunnel is forwarded, streams, and is
//! cancelled by Ctrl-C; the loss of the node holding the tunnel mid-script
//! loses no line; and the hubs ride out the loss of an etcd member, and of
//! etcd's quorum.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tentacle_tests::cluster::HubCluster;
use tentacle_tests::cluster::{exec, holder, joined_agent, register};
use tentacle_tests::etcd::etcd_or_skip;
use tentacle_tests::{AgentProcess, bin, process_alive, stdout_of};

#[test]
fn an_agent_registered_on_one_node_is_reachable_through_every_node() {
    if !etcd_or_skip("cluster::an_agent_registered_on_one_node_is_reachable_through_every_node") {
        return;
    }
    let cluster = HubCluster::start(3, 3);
    let agent = joined_agent(&cluster, 0, "web-01");
    let listed = stdout_of(&cluster.run(&["server", "trust", "list"]));
    assert!(listed.contains("web-01"), "{listed}");
    for node in 0..cluster.len() {
        let out = exec(&cluster, node, &agent, "web-01", "echo hi from $0")
            .output()
            .expect("exec");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hi from"),
            "through {}: {}\n{}",
            cluster.node_id(node),
            String::from_utf8_lossy(&out.stderr),
            cluster.all_logs()
        );
    }
}

#[test]
fn one_token_used_at_once_on_two_nodes_registers_one_agent() {
    if !etcd_or_skip("cluster::one_token_used_at_once_on_two_nodes_registers_one_agent") {
        return;
    }
    let cluster = HubCluster::start(3, 3);
    for round in 0..5 {
        let token = stdout_of(&cluster.run(&["server", "token", "create"]));
        let agents = [
            AgentProcess::prepare(&[], ""),
            AgentProcess::prepare(&[], ""),
        ];
        let names = [format!("race-{round}-a"), format!("race-{round}-b")];
        let barrier = std::sync::Barrier::new(2);
        let outcomes: Vec<std::process::Output> = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..2)
                .map(|i| {
                    let (cluster, agent, name, token, barrier) =
                        (&cluster, &agents[i], &names[i], &token, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        register(cluster, agent, i, name, token)
                    })
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().expect("thread"))
                .collect()
        });
        let won: Vec<usize> = (0..2).filter(|&i| outcomes[i].status.success()).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: {:?}",
            outcomes
                .iter()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .collect::<Vec<_>>()
        );
        let loser = 1 - won[0];
        let refused = String::from_utf8_lossy(&outcomes[loser].stderr);
        assert!(refused.contains("not valid"), "{refused}");
        let listed = stdout_of(&cluster.run(&["server", "trust", "list"]));
        assert!(listed.contains(&names[won[0]]), "{listed}");
        assert!(!listed.contains(&names[loser]), "{listed}");
    }
}

#[test]
fn an_exec_through_another_node_streams_and_ctrl_c_kills_the_script() {
    if !etcd_or_skip("cluster::an_exec_through_another_node_streams_and_ctrl_c_kills_the_script") {
        return;
    }
    let cluster = HubCluster::start(3, 3);
    let agent = joined_agent(&cluster, 0, "web-01");
    let at = holder(&cluster, "web-01").expect("the agent is present on a node");
    let through = (at + 1) % cluster.len();
    let pid_file = agent.home().join("script.pid");
    let script = format!(
        "echo $$ > {}; for i in $(seq 1 600); do echo line $i; sleep 0.1; done",
        pid_file.display()
    );
    let mut child = exec(&cluster, through, &agent, "web-01", &script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let started = Instant::now();
    // Lines arrive while the script runs: streamed, not buffered to its end.
    for expected in 1..=5 {
        let line = lines.next().expect("a line").expect("utf-8");
        assert_eq!(line, format!("line {expected}"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the script takes 60 s"
    );
    let script_pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(process_alive(script_pid));
    let exec_pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(exec_pid, nix::sys::signal::Signal::SIGINT).expect("ctrl-c");
    let status = child.wait().expect("exec ends");
    assert_eq!(status.code(), Some(130), "a cancelled script");
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(script_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !process_alive(script_pid),
        "the script on the agent was killed\n{}",
        cluster.all_logs()
    );
}

#[test]
fn losing_the_node_that_holds_the_tunnel_mid_script_loses_no_line() {
    if !etcd_or_skip("cluster::losing_the_node_that_holds_the_tunnel_mid_script_loses_no_line") {
        return;
    }
    let mut cluster = HubCluster::start(3, 3);
    let agent = joined_agent(&cluster, 0, "web-01");
    let at = holder(&cluster, "web-01").expect("the agent is present on a node");
    let through = (at + 1) % cluster.len();
    let mut child = exec(
        &cluster,
        through,
        &agent,
        "web-01",
        "for i in $(seq 1 40); do echo line $i; sleep 0.25; done; exit 7",
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("exec");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(lines.next().expect("a line").expect("utf-8"));
    }
    cluster.kill_node(at);
    for line in lines {
        seen.push(line.expect("utf-8"));
    }
    let status = child.wait().expect("exec ends");
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(
        seen,
        expected,
        "every line once, in order\n{}",
        cluster.all_logs()
    );
    assert_eq!(status.code(), Some(7), "the script's own exit code");
    let moved = holder(&cluster, "web-01").expect("the agent is present again");
    assert_ne!(moved, at, "the agent moved to a node that is up");
}

#[test]
fn a_deploy_in_progress_when_the_holding_node_dies_runs_its_script_once() {
    if !etcd_or_skip(
        "cluster::a_deploy_in_progress_when_the_holding_node_dies_runs_its_script_once",
    ) {
        return;
    }
    let mut cluster = HubCluster::start(3, 3);
    let agent = joined_agent(&cluster, 0, "web-01");
    let at = holder(&cluster, "web-01").expect("the agent is present on a node");
    let through = (at + 1) % cluster.len();
    let runs = agent.home().join("runs");
    let script = tempfile::NamedTempFile::new().expect("script");
    std::fs::write(
        script.path(),
        format!(
            "echo run >> {}\nfor i in $(seq 1 20); do echo step $i; sleep 0.25; done\necho done\n",
            runs.display()
        ),
    )
    .expect("write script");
    let script_path = script.path().to_string_lossy().into_owned();
    let hub = cluster.url(through);
    let deploy = Command::new(bin("tentacle-hub"))
        .arg("--home")
        .arg(cluster.home.0.path())
        .args([
            "deploy",
            "--role",
            "web",
            "--script",
            &script_path,
            "--hub",
            &hub,
        ])
        .envs(cluster.home.1.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("deploy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !runs.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(runs.exists(), "the deploy started\n{}", cluster.all_logs());
    std::thread::sleep(Duration::from_millis(500));
    cluster.kill_node(at);
    let out = deploy.wait_with_output().expect("deploy ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.all_logs()
    );
    assert!(stdout.contains("done"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&runs).expect("runs"),
        "run\n",
        "the script ran once"
    );
}

#[test]
fn the_hubs_keep_working_without_one_etcd_member_and_refuse_changes_without_a_quorum() {
    if !etcd_or_skip(
        "cluster::the_hubs_keep_working_without_one_etcd_member_and_refuse_changes_without_a_quorum",
    ) {
        return;
    }
    let mut cluster = HubCluster::start(3, 3);
    let agent = joined_agent(&cluster, 0, "web-01");
    let at = holder(&cluster, "web-01").expect("the agent is present on a node");

    // One member down: registrations and calls go on.
    cluster.etcd.kill(0);
    let second = joined_agent(&cluster, 1, "web-02");
    for (who, name) in [(&agent, "web-01"), (&second, "web-02")] {
        let out = exec(&cluster, 2, who, name, "echo still")
            .output()
            .expect("exec");
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.all_logs()
        );
    }

    // Quorum lost: the node holding an agent still reaches it...
    cluster.etcd.kill(1);
    let out = exec(&cluster, at, &agent, "web-01", "echo no quorum")
        .output()
        .expect("exec");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("no quorum"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.all_logs()
    );
    // ...while registrations and trust changes are refused, in one line
    // naming etcd.
    let refused = cluster.run(&[
        "server",
        "trust",
        "add",
        "--thumbprint",
        &"ab".repeat(32),
        "--name",
        "web-09",
        "--mode",
        "polling",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("etcd"), "{stderr}");

    // Back: changes are taken again.
    cluster.etcd.restart(0);
    cluster.etcd.restart(1);
    cluster
        .etcd
        .wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .expect("etcd is back");
    let third = joined_agent(&cluster, 2, "web-03");
    let out = exec(&cluster, 0, &third, "web-03", "echo back")
        .output()
        .expect("exec");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.all_logs()
    );
}
