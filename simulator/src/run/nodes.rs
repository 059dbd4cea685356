//! The nodes of an external hub (one hub, or each node of a cluster), as
//! `--hub`, `--hub-pid`, `--hub-restart-command` and `--hub-metrics` name
//! them: their process ids, which a restart changes; the chaos that kills
//! a node with SIGKILL and runs its restart command; and each node's
//! figures every second (CPU and memory from `/proc`, connected agents as
//! the fleet's connections show them, and the node's own
//! `tentacle_hub_connected_agents` when its metrics are named).
//!
//! A restart command is run with `sh -c`, in its own process group (so a
//! Ctrl-C to the simulator does not reach the node), with its output
//! appended to `hub-node-K.log` in the report directory. Its process is
//! taken to be the node: a command that `exec`s the server keeps the CPU
//! and memory charts going after the restart. The simulator never stops a
//! node it restarted; the node outlives the run, as the cluster would.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tentacle_proto::dial::ListeningAddress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::sampler::ProcessSampler;
use crate::report::{HubNodeInfo, NodeSample};

/// How long a restarted node gets to accept connections again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// A metrics endpoint that does not answer within this is skipped for the
/// second.
const METRICS_TIMEOUT: Duration = Duration::from_millis(800);
/// The gauge of polling agents with a tunnel on this node.
const CONNECTED_GAUGE: &str = "tentacle_hub_connected_agents";

/// What the command line says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub address: ListeningAddress,
    /// Its process, for the charts and for SIGKILL.
    pub pid: Option<u32>,
    /// Starts it again after a kill, with `{node}` already replaced.
    pub restart_command: Option<String>,
    /// `http://HOST:PORT/metrics` of the node.
    pub metrics: Option<String>,
}

/// Why a node could not be killed or started again.
#[derive(Debug, thiserror::Error)]
pub enum NodeChaosError {
    #[error("hub node {0} has no --hub-pid to kill")]
    NoPid(usize),
    #[error("hub node {0} has no --hub-restart-command to start it again")]
    NoRestartCommand(usize),
    #[error("could not kill hub node {node} (pid {pid}): {reason}")]
    Kill {
        node: usize,
        pid: u32,
        reason: String,
    },
    #[error("could not run the restart command of hub node {node}: {reason}")]
    Restart { node: usize, reason: String },
    #[error("hub node {node} did not accept connections within {RESTART_TIMEOUT:?} of its restart")]
    NotBack { node: usize },
}

#[derive(Debug)]
struct Node {
    spec: NodeSpec,
    pid: Mutex<Option<u32>>,
    /// Milliseconds since the run started.
    killed_at_ms: Mutex<Vec<u64>>,
    back_at_ms: Mutex<Vec<u64>>,
}

/// The external hub's nodes, in the order of `--hub`.
#[derive(Debug)]
pub struct HubNodes {
    nodes: Vec<Node>,
    /// Where restarted nodes write their output.
    log_dir: PathBuf,
    /// The run's start, which kill and restart times count from.
    started: Instant,
}

impl HubNodes {
    pub fn new(specs: Vec<NodeSpec>, log_dir: PathBuf, started: Instant) -> Self {
        let nodes = specs
            .into_iter()
            .map(|spec| Node {
                pid: Mutex::new(spec.pid),
                spec,
                killed_at_ms: Mutex::default(),
                back_at_ms: Mutex::default(),
            })
            .collect();
        Self {
            nodes,
            log_dir,
            started,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Checks up front that node `index` (0-based) can be killed and
    /// started again, so a scenario's kill fails at the start of the run
    /// rather than half-way through it.
    pub fn can_kill(&self, index: usize) -> Result<(), NodeChaosError> {
        let number = index + 1;
        let node = self.nodes.get(index).ok_or(NodeChaosError::NoPid(number))?;
        if node.spec.pid.is_none() {
            return Err(NodeChaosError::NoPid(number));
        }
        if node.spec.restart_command.is_none() {
            return Err(NodeChaosError::NoRestartCommand(number));
        }
        Ok(())
    }

    fn pid(&self, index: usize) -> Option<u32> {
        let node = self.nodes.get(index)?;
        *node.pid.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// SIGKILLs node `index` (0-based): the node dies without draining, as
    /// a lost machine. Its pid is forgotten until it is started again.
    pub fn kill(&self, index: usize) -> Result<(), NodeChaosError> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let number = index + 1;
        let node = self.nodes.get(index).ok_or(NodeChaosError::NoPid(number))?;
        let pid = self.pid(index).ok_or(NodeChaosError::NoPid(number))?;
        let raw = i32::try_from(pid).map_err(|_| NodeChaosError::Kill {
            node: number,
            pid,
            reason: "not a process id".into(),
        })?;
        kill(Pid::from_raw(raw), Signal::SIGKILL).map_err(|e| NodeChaosError::Kill {
            node: number,
            pid,
            reason: e.to_string(),
        })?;
        *node.pid.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let now = self.now_ms();
        lock(&node.killed_at_ms).push(now);
        Ok(())
    }

    /// Runs node `index`'s restart command and waits until the node accepts
    /// connections on its address again.
    pub async fn restart(&self, index: usize) -> Result<(), NodeChaosError> {
        let number = index + 1;
        let node = self
            .nodes
            .get(index)
            .ok_or(NodeChaosError::NoRestartCommand(number))?;
        let command = node
            .spec
            .restart_command
            .as_deref()
            .ok_or(NodeChaosError::NoRestartCommand(number))?;
        let failed = |reason: String| NodeChaosError::Restart {
            node: number,
            reason,
        };
        let log_path = self.log_dir.join(format!("hub-node-{number}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| failed(format!("{}: {e}", log_path.display())))?;
        let err = log
            .try_clone()
            .map_err(|e| failed(format!("{}: {e}", log_path.display())))?;
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        *node.pid.lock().unwrap_or_else(PoisonError::into_inner) = child.id();
        // Reap it whenever it ends; dropping the handle leaves it running.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let deadline = tokio::time::Instant::now() + RESTART_TIMEOUT;
        let address = &node.spec.address;
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect((address.host(), address.port())),
            )
            .await;
            if matches!(attempt, Ok(Ok(_))) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(NodeChaosError::NotBack { node: number });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let now = self.now_ms();
        lock(&node.back_at_ms).push(now);
        Ok(())
    }

    /// The nodes for the report.
    pub fn info(&self) -> Vec<HubNodeInfo> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let killed_at_ms = lock(&node.killed_at_ms).clone();
                let back_at_ms = lock(&node.back_at_ms).clone();
                HubNodeInfo {
                    node: i + 1,
                    address: node.spec.address.to_string(),
                    pid: self.pid(i),
                    kills: killed_at_ms.len() as u64,
                    restarts: back_at_ms.len() as u64,
                    killed_at_ms,
                    back_at_ms,
                }
            })
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads every node's figures once a second.
#[derive(Debug, Default)]
pub struct NodeSampler {
    /// Per node: the process being read, if any.
    processes: Vec<Option<ProcessSampler>>,
}

impl NodeSampler {
    /// One sample per node; `connected` is the fleet's open connections
    /// per node.
    pub async fn sample(&mut self, nodes: &HubNodes, connected: &[u64]) -> Vec<NodeSample> {
        self.processes.resize_with(nodes.len(), || None);
        let metrics = futures::future::join_all(
            nodes
                .nodes
                .iter()
                .map(|n| async { connected_gauge(n.spec.metrics.as_deref()?).await }),
        )
        .await;
        let mut samples = Vec::with_capacity(nodes.len());
        for (i, hub_connected) in metrics.into_iter().enumerate() {
            let pid = nodes.pid(i);
            let slot = &mut self.processes[i];
            if slot.as_ref().map(ProcessSampler::pid) != pid {
                *slot = pid.map(ProcessSampler::new);
            }
            let (cpu_percent, rss_bytes) = slot.as_mut().map_or((0.0, 0), ProcessSampler::sample);
            samples.push(NodeSample {
                connected: connected.get(i).copied().unwrap_or(0),
                hub_connected,
                cpu_percent,
                rss_bytes,
            });
        }
        samples
    }
}

/// `tentacle_hub_connected_agents` at `url` (`http://HOST:PORT[/PATH]`,
/// `/metrics` by default), if it answers in time.
async fn connected_gauge(url: &str) -> Option<u64> {
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let path = match uri.path() {
        "" | "/" => "/metrics",
        path => path,
    };
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        // A metrics page is small; a larger answer is not one.
        stream.take(4 << 20).read_to_end(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(METRICS_TIMEOUT, fetch).await.ok()??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    gauge(body, CONNECTED_GAUGE)
}

/// The value of an unlabelled sample `name value` in Prometheus text.
fn gauge(text: &str, name: &str) -> Option<u64> {
    let value: f64 = text
        .lines()
        .filter_map(|line| line.strip_prefix(name))
        .find_map(|rest| rest.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())?;
    (value.is_finite() && value >= 0.0).then_some(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16) -> NodeSpec {
        NodeSpec {
            address: ListeningAddress::new("127.0.0.1", port),
            pid: None,
            restart_command: None,
            metrics: None,
        }
    }

    #[test]
    fn the_gauge_is_read_from_prometheus_text() {
        let text = "# TYPE tentacle_hub_connected_agents gauge\n\
                    tentacle_hub_connected_agents_total 3\n\
                    tentacle_hub_connected_agents 42\n";
        assert_eq!(gauge(text, CONNECTED_GAUGE), Some(42));
        assert_eq!(gauge("other 1\n", CONNECTED_GAUGE), None);
        assert_eq!(
            gauge("tentacle_hub_connected_agents -1\n", CONNECTED_GAUGE),
            None
        );
    }

    #[tokio::test]
    async fn the_gauge_is_fetched_from_a_metrics_endpoint() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = tokio::spawn(async move {
            for body in ["tentacle_hub_connected_agents 12\n", "nothing here\n"] {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut request = [0u8; 1024];
                let n = stream.read(&mut request).await.expect("read");
                let request = String::from_utf8_lossy(&request[..n]).into_owned();
                let reply = format!("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n{body}");
                stream.write_all(reply.as_bytes()).await.expect("write");
                assert!(request.starts_with("GET /metrics HTTP/1.0"), "{request}");
            }
        });
        let url = format!("http://127.0.0.1:{port}");
        assert_eq!(connected_gauge(&url).await, Some(12));
        assert_eq!(connected_gauge(&format!("{url}/metrics")).await, None);
        server.await.expect("server");
        // Nothing listens there any more, and https is not a metrics URL.
        assert_eq!(connected_gauge(&url).await, None);
        assert_eq!(connected_gauge("https://127.0.0.1:1/metrics").await, None);
    }

    #[tokio::test]
    async fn a_node_is_killed_restarted_and_sampled_under_its_new_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The node's port stays open here, so the restarted node counts as
        // back at once; the stand-in node is a sleeping process.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let mut first = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let mut node = spec(port);
        node.pid = Some(first.id());
        node.restart_command = Some("echo restarting; exec sleep 30".into());
        let nodes = HubNodes::new(vec![node, spec(1)], dir.path().to_owned(), Instant::now());
        assert!(nodes.can_kill(0).is_ok());
        assert!(matches!(nodes.can_kill(1), Err(NodeChaosError::NoPid(2))));
        assert!(matches!(nodes.can_kill(2), Err(NodeChaosError::NoPid(3))));

        nodes.kill(0).expect("kill");
        let status = first.wait().expect("wait");
        assert!(!status.success(), "killed: {status}");
        assert_eq!(nodes.info()[0].pid, None);
        nodes.restart(0).await.expect("restart");
        let info = nodes.info();
        assert_eq!((info[0].kills, info[0].restarts), (1, 1));
        assert!(info[0].killed_at_ms[0] <= info[0].back_at_ms[0], "{info:?}");
        let new_pid = info[0].pid.expect("the restarted node's pid");
        assert_ne!(new_pid, first.id());

        let mut sampler = NodeSampler::default();
        let samples = sampler.sample(&nodes, &[7]).await;
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].connected, 7);
        assert!(samples[0].rss_bytes > 0, "{samples:?}");
        assert_eq!((samples[1].connected, samples[1].rss_bytes), (0, 0));
        // The command's output goes to its log (it may not have run yet).
        let path = dir.path().join("hub-node-1.log");
        let mut log = String::new();
        for _ in 0..100 {
            log = std::fs::read_to_string(&path).expect("log");
            if log.contains("restarting") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(log.contains("restarting"), "{log}");
        nodes.kill(0).expect("clean up the restarted node");
        drop(listener);
    }
}
