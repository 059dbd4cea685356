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
use crate::{HubHome, bin, free_port};

/// One hub node process.
#[derive(Debug)]
pub struct HubNode {
    pub id: String,
    pub port: u16,
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
        let etcd = EtcdCluster::start(etcd_members);
        let mut home = HubHome::new();
        home.1.push(("TENTACLE_HUB_STORE".into(), etcd.store_url()));
        let nodes = (0..nodes)
            .map(|i| HubNode {
                id: format!("node-{}", (b'a' + i as u8) as char),
                port: free_port(),
                child: None,
                log: home.0.path().join(format!("node-{i}.log")),
            })
            .collect();
        let mut cluster = Self {
            etcd,
            home,
            nodes,
            node_flags: Vec::new(),
        };
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i);
        }
        cluster
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
        let advertise = format!("https://{listen}");
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

    /// Whether node `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `tentacle configure` flags naming every node, for an agent that
    /// knows the cluster.
    pub fn server_flags(&self) -> Vec<String> {
        let thumbprint = self.thumbprint();
        (0..self.len())
            .flat_map(|i| {
                [
                    "--server".to_owned(),
                    self.url(i),
                    "--server-thumbprint".to_owned(),
                    thumbprint.clone(),
                ]
            })
            .collect()
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
