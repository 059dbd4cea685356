//! A hub cluster on loopback for end-to-end tests: a real etcd cluster
//! ([`EtcdCluster`]) and several real `tentacle-hub server` processes on
//! it, sharing one home's identity (as every node of a cluster shares the
//! certificate agents pin), each on a fixed port so it can be killed and
//! started again where agents expect it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::EtcdCluster;
use crate::{AgentProcess, FAST_POLLING, HubHome, bin, free_port, stdout_of, tentacle_output};

/// One hub node process.
#[derive(Debug)]
pub struct HubNode {
    pub id: String,
    pub port: u16,
    /// `--store` for this node alone (e.g. etcd through fault proxies).
    pub store: Option<String>,
    /// `--advertise` for this node alone (e.g. a fault proxy in front of
    /// it, so its peers' traffic can be cut while agents still reach it).
    pub advertise: Option<String>,
    child: Option<Child>,
    log: PathBuf,
}

/// etcd and the hub nodes on it.
#[derive(Debug)]
pub struct HubCluster {
    pub etcd: EtcdCluster,
    pub home: HubHome,
    nodes: Vec<HubNode>,
    /// Extra `tentacle-hub server` flags every node gets.
    pub node_flags: Vec<String>,
}

/// The presence TTL the test nodes use: a killed node's tunnels are
/// forgotten this soon.
pub const TEST_PRESENCE_TTL: &str = "3s";

impl HubCluster {
    /// `etcd_members` etcd members and `nodes` hub nodes, all serving.
    pub fn start(etcd_members: usize, nodes: usize) -> Self {
        let mut cluster = Self::prepare(etcd_members, nodes);
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i);
        }
        cluster
    }

    /// etcd serving and `nodes` hub nodes chosen (ports, ids) but not
    /// started, so a test can set a node's store or address first.
    pub fn prepare(etcd_members: usize, nodes: usize) -> Self {
        let etcd = EtcdCluster::start(etcd_members);
        let mut home = HubHome::new();
        home.1.push(("TENTACLE_HUB_STORE".into(), etcd.store_url()));
        let nodes = (0..nodes)
            .map(|i| HubNode {
                id: format!("node-{}", (b'a' + i as u8) as char),
                port: free_port(),
                store: None,
                advertise: None,
                child: None,
                log: home.0.path().join(format!("node-{i}.log")),
            })
            .collect();
        Self {
            etcd,
            home,
            nodes,
            node_flags: Vec::new(),
        }
    }

    /// Node `i`, to set its store or address before it starts.
    pub fn node_mut(&mut self, i: usize) -> &mut HubNode {
        &mut self.nodes[i]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `https://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn node_id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    /// The hub identity's thumbprint, which every node presents.
    pub fn thumbprint(&self) -> String {
        self.home.thumbprint()
    }

    /// Runs a `tentacle-hub` verb on the cluster's store.
    pub fn run(&self, args: &[&str]) -> Output {
        self.home.run(args)
    }

    /// Starts node `i` and waits until it serves.
    pub fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let listen = format!("127.0.0.1:{}", node.port);
        let advertise = node
            .advertise
            .clone()
            .unwrap_or_else(|| format!("https://{listen}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("node log");
        let child = Command::new(bin("tentacle-hub"))
            .arg("--home")
            .arg(self.home.0.path())
            .args(["server", "--listen", &listen, "--advertise", &advertise])
            .args(["--node-id", &node.id, "--presence-ttl", TEST_PRESENCE_TTL])
            .args(&self.node_flags)
            .envs(self.home.1.iter().map(|(k, v)| (k, v)))
            .envs(node.store.iter().map(|store| ("TENTACLE_HUB_STORE", store)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a hub node");
        node.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = self.log_lines_from(i);
        while !self.log(i)[started..].contains("hub listening") {
            assert!(
                Instant::now() < deadline,
                "{} did not start; log:\n{}",
                self.nodes[i].id,
                self.log(i)
            );
            if let Some(child) = self.nodes[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} exited with {status}; log:\n{}",
                    self.nodes[i].id,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_lines_from(&self, i: usize) -> usize {
        self.log(i).len()
    }

    /// Everything node `i` logged, across its restarts.
    pub fn log(&self, i: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.nodes[i].log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// SIGKILL: the node dies without draining or leaving.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the drain to end.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Every node's log, for a failed assertion's message.
    pub fn all_logs(&self) -> String {
        (0..self.len())
            .map(|i| format!("--- {}:\n{}", self.nodes[i].id, self.log(i)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for HubCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}

/// Registers `agent` as `name` (role web) through node `node` with
/// `token`.
pub fn register(
    cluster: &HubCluster,
    agent: &AgentProcess,
    node: usize,
    name: &str,
    token: &str,
) -> std::process::Output {
    let url = cluster.url(node);
    let thumbprint = cluster.thumbprint();
    tentacle_output(
        agent.home(),
        &[
            "register-with",
            "--server",
            &url,
            "--server-thumbprint",
            &thumbprint,
            "--name",
            name,
            "--role",
            "web",
            "--mode",
            "polling",
            "--token",
            token,
        ],
    )
}

/// A polling agent registered as `name` through node `node`, knowing
/// every node of the cluster, and running.
pub fn joined_agent(cluster: &HubCluster, node: usize, name: &str) -> AgentProcess {
    let token = stdout_of(&cluster.run(&["server", "token", "create"]));
    let mut agent = AgentProcess::prepare(&[], FAST_POLLING);
    let joined = register(cluster, &agent, node, name, &token);
    assert!(
        joined.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&joined.stderr),
        cluster.all_logs()
    );
    let thumbprint = cluster.thumbprint();
    for node in 0..cluster.len() {
        let url = cluster.url(node);
        let configured = tentacle_output(
            agent.home(),
            &[
                "configure",
                "--server",
                &url,
                "--server-thumbprint",
                &thumbprint,
            ],
        );
        assert!(
            configured.status.success(),
            "{}",
            String::from_utf8_lossy(&configured.stderr)
        );
    }
    agent.spawn();
    agent
}

/// `tentacle-hub exec` of `script` on `poll://name` through node `node`.
pub fn exec(
    cluster: &HubCluster,
    node: usize,
    agent: &AgentProcess,
    name: &str,
    script: &str,
) -> Command {
    let mut command = Command::new(bin("tentacle-hub"));
    command
        .arg("--home")
        .arg(cluster.home.0.path())
        .args(["exec", "--target", &format!("poll://{name}")])
        .args(["--thumbprint", &agent.thumbprint.to_string()])
        .args(["--hub", &cluster.url(node), "--pickup-timeout", "60s"])
        .args(["--script", script])
        .envs(cluster.home.1.iter().map(|(k, v)| (k, v)));
    command
}

/// The node holding `name`'s tunnels, from presence in etcd.
pub fn holder(cluster: &HubCluster, name: &str) -> Option<usize> {
    let key = format!("/tentacle/presence/{name}/");
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let listed = cluster
            .etcd
            .etcdctl(
                &(0..cluster.etcd.len()).collect::<Vec<_>>(),
                crate::etcd::Credentials::ClientCertificate,
                &["get", "--prefix", "--keys-only", &key],
            )
            .unwrap_or_default();
        for i in 0..cluster.len() {
            if listed.contains(&format!("{key}{}/", cluster.node_id(i))) {
                return Some(i);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
