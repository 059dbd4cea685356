//! A polling agent configured with several servers under one thumbprint
//! treats them as the nodes of one hub cluster: it holds its tunnels on
//! exactly one node, moves to the other when that node is killed or
//! drains, and still gives independent hubs (other thumbprints) tunnels
//! each. The "cluster" here is two real `tentacle-hub server` processes
//! serving copies of one home: one certificate, one registry.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tentacle_tests::{
    AgentProcess, FAST_POLLING, HubHome, bin, free_port, http_get, metric, tentacle,
};

/// Tunnels the agent keeps to each hub: more than one, so that "on one
/// node" is about the whole set.
const TUNNELS: u32 = 2;

/// One running `tentacle-hub server` with its metrics endpoint.
struct HubNode {
    child: Option<Child>,
    url: String,
    metrics_port: u16,
    /// The node's stderr, for failure messages.
    log: tempfile::NamedTempFile,
}

impl HubNode {
    /// Serves `home` on a free port; `extra` goes after `server`.
    fn start(home: &HubHome, extra: &[&str]) -> Self {
        let port = free_port();
        let metrics_port = free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(bin("tentacle-hub"))
            .arg("--home")
            .arg(home.0.path())
            .args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("start the hub");
        let node = Self {
            child: Some(child),
            url: format!("https://127.0.0.1:{port}"),
            metrics_port,
            log,
        };
        assert!(
            wait_until(Duration::from_secs(20), || {
                node.load().is_some() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "the hub at {} listens and serves metrics",
            node.url
        );
        node
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn metrics(&self) -> Option<String> {
        http_get(self.metrics_port, "/metrics")
    }

    /// (connected agents, open tunnels), or None when it does not answer.
    fn load(&self) -> Option<(f64, f64)> {
        let text = self.metrics()?;
        Some((
            metric(&text, "tentacle_hub_connected_agents")?,
            metric(&text, "tentacle_hub_tunnels_open")?,
        ))
    }

    fn pid(&self) -> nix::unistd::Pid {
        let id = self.child.as_ref().map(Child::id).expect("running");
        nix::unistd::Pid::from_raw(i32::try_from(id).expect("pid"))
    }

    fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal the hub");
    }

    /// SIGKILL: the node vanishes without a drain.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for HubNode {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}

/// Copies the files of `from` (the hub's certificate, key and registry)
/// into a fresh home: a second node with the same identity and state.
fn copy_home(from: &HubHome) -> HubHome {
    fn copy_dir(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).expect("read the home") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                std::fs::create_dir_all(&target).expect("mkdir");
                copy_dir(&entry.path(), &target);
            } else if kind.is_file() {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }
    let copy = HubHome(tempfile::tempdir().expect("tempdir"), Vec::new());
    copy_dir(from.0.path(), copy.0.path());
    copy
}

/// Makes `agent` poll every hub in `hubs` (URL, pinned thumbprint), with
/// fast reconnects and [`TUNNELS`] tunnels.
fn poll(agent: &AgentProcess, hubs: &[(&str, &str)]) {
    for (url, thumbprint) in hubs {
        tentacle(
            agent.home(),
            &[
                "configure",
                "--mode",
                "polling",
                "--server",
                url,
                "--server-thumbprint",
                thumbprint,
            ],
        );
    }
    agent.configure(FAST_POLLING);
    agent.configure(&format!("[polling]\ntunnels = {TUNNELS}\n"));
}

/// Runs `echo NEEDLE` on `agent` through the hub at `node`; its stdout,
/// or its stderr as the error.
fn exec(
    home: &HubHome,
    node: &HubNode,
    agent: &AgentProcess,
    needle: &str,
) -> Result<String, String> {
    let output = home.run(&[
        "exec",
        "--target",
        &format!("poll://{}", agent.agent_id()),
        "--thumbprint",
        &agent.thumbprint.to_string(),
        "--hub",
        &node.url,
        "--pickup-timeout",
        "10s",
        "--isolation",
        "none",
        "--script",
        &format!("echo {needle}"),
    ]);
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Two nodes of one cluster (copies of one home that trusts `agent`'s
/// future certificate) and the agent polling both, started.
struct Cluster {
    nodes: [HubNode; 2],
    agent: AgentProcess,
    home: HubHome,
    /// The second node's copy of `home`, kept for as long as it serves.
    _copy: HubHome,
}

impl Cluster {
    fn start(node_args: &[&str]) -> Self {
        let home = HubHome::new();
        // The agent is made first so that both copies of the home trust it.
        let mut agent = AgentProcess::prepare(&[], "");
        home.trust_polling(&agent);
        let second_home = copy_home(&home);
        let thumbprint = home.thumbprint();
        assert_eq!(thumbprint, second_home.thumbprint());
        let nodes = [
            HubNode::start(&home, node_args),
            HubNode::start(&second_home, node_args),
        ];
        poll(
            &agent,
            &[(&nodes[0].url, &thumbprint), (&nodes[1].url, &thumbprint)],
        );
        agent.spawn();
        Self {
            nodes,
            agent,
            home,
            _copy: second_home,
        }
    }

    /// The node holding all of the agent's tunnels once they are all open,
    /// checking that the other node holds none.
    fn holder(&mut self) -> usize {
        let wanted = (1.0, f64::from(TUNNELS));
        let mut loads = Vec::new();
        let settled = wait_until(Duration::from_secs(20), || {
            loads = self.nodes.iter().map(HubNode::load).collect();
            loads.contains(&Some(wanted))
        });
        assert!(
            settled,
            "one node holds every tunnel: {loads:?}; log:\n{}",
            self.agent.log_text()
        );
        let holder = loads
            .iter()
            .position(|l| *l == Some(wanted))
            .expect("a holder");
        // The other node stays empty a while, not just at one sample.
        for _ in 0..10 {
            assert_eq!(
                self.nodes[1 - holder].load(),
                Some((0.0, 0.0)),
                "the other node holds no tunnel; log:\n{}\nnodes:\n{}\n\n{}",
                self.agent.log_text(),
                self.nodes[0].log_text(),
                self.nodes[1].log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        holder
    }
}

#[test]
fn a_killed_node_hands_the_agent_to_the_other_node() {
    let mut cluster = Cluster::start(&[]);
    let holder = cluster.holder();
    let other = 1 - holder;
    assert_eq!(
        exec(
            &cluster.home,
            &cluster.nodes[holder],
            &cluster.agent,
            "before"
        ),
        Ok("before".to_owned())
    );

    cluster.nodes[holder].kill();
    // Within the reconnect window (FAST_POLLING: 1s at most per wait) the
    // agent is on the other node; the bound here only guards against a hang.
    let mut load = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            load = cluster.nodes[other].load();
            load == Some((1.0, f64::from(TUNNELS)))
        }),
        "the other node took every tunnel: {load:?}; log:\n{}",
        cluster.agent.log_text()
    );
    assert_eq!(
        exec(
            &cluster.home,
            &cluster.nodes[other],
            &cluster.agent,
            "after"
        ),
        Ok("after".to_owned())
    );
    let log = cluster.agent.log_text();
    assert!(
        log.contains("moving this agent's tunnels to another node")
            && log.contains("cannot be reached")
            && log.contains(&format!("trying={}", cluster.nodes[other].url)),
        "one line says which node was left, why, and which is tried; log:\n{log}"
    );
}

#[test]
fn a_draining_node_hands_the_agent_over_before_it_closes() {
    // A long drain grace and a call in flight keep the draining node up
    // (and its old tunnel open) for a long while: the agent must move on
    // hearing the drain, not when the node finally closes.
    let mut cluster = Cluster::start(&["--drain-grace", "60s"]);
    let holder = cluster.holder();
    let other = 1 - holder;
    let mut long_call = Command::new(bin("tentacle-hub"))
        .arg("--home")
        .arg(cluster.home.0.path())
        .args([
            "exec",
            "--target",
            &format!("poll://{}", cluster.agent.agent_id()),
            "--thumbprint",
            &cluster.agent.thumbprint.to_string(),
            "--hub",
            &cluster.nodes[holder].url,
            "--isolation",
            "none",
            "--script",
            "echo started; sleep 60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the long call");
    // Its watch is in flight once the script has printed.
    let mut first_line = String::new();
    {
        use std::io::BufRead;
        let stdout = long_call.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("read");
    }
    assert_eq!(first_line.trim(), "started");

    cluster.nodes[holder].signal(nix::sys::signal::Signal::SIGTERM);
    let mut load = None;
    assert!(
        wait_until(Duration::from_secs(20), || {
            load = cluster.nodes[other].load();
            load == Some((1.0, f64::from(TUNNELS)))
        }),
        "the other node took every tunnel: {load:?}; log:\n{}",
        cluster.agent.log_text()
    );
    assert_eq!(
        exec(
            &cluster.home,
            &cluster.nodes[other],
            &cluster.agent,
            "moved"
        ),
        Ok("moved".to_owned())
    );
    assert!(
        cluster.nodes[holder].is_running(),
        "the agent moved while the drained node was still finishing its call"
    );
    let log = cluster.agent.log_text();
    assert!(
        log.contains("moving this agent's tunnels to another node")
            && log.contains("the node is draining"),
        "log:\n{log}"
    );
    let _ = long_call.kill();
    let _ = long_call.wait();
}

#[test]
fn independent_hubs_each_get_the_agents_tunnels() {
    let homes = [HubHome::new(), HubHome::new()];
    assert_ne!(homes[0].thumbprint(), homes[1].thumbprint());
    let nodes = [
        HubNode::start(&homes[0], &[]),
        HubNode::start(&homes[1], &[]),
    ];
    let mut agent = AgentProcess::prepare(&[], "");
    poll(
        &agent,
        &[
            (&nodes[0].url, &homes[0].thumbprint()),
            (&nodes[1].url, &homes[1].thumbprint()),
        ],
    );
    for home in &homes {
        home.trust_polling(&agent);
    }
    agent.spawn();
    let mut loads = Vec::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            loads = nodes.iter().map(HubNode::load).collect();
            loads.iter().all(|l| *l == Some((1.0, f64::from(TUNNELS))))
        }),
        "both hubs hold the agent's tunnels: {loads:?}; log:\n{}",
        agent.log_text()
    );
    for (home, node) in homes.iter().zip(&nodes) {
        assert_eq!(exec(home, node, &agent, "both"), Ok("both".to_owned()));
    }
    assert!(!agent.log_text().contains("moving this agent's tunnels"));
}
