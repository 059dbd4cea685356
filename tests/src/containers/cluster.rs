//! A hub cluster in containers: one etcd member, three hub nodes sharing
//! one identity, and polling agents that know every node, on networks laid
//! out so one node can be partitioned the way a real one is.
//!
//! Networks:
//!
//! - `backplane`: etcd and every hub node. Nodes advertise their container
//!   name (`https://PREFIX-hub-N:10943`), which resolves here, so
//!   node-to-node forwarding runs on it.
//! - `front-N`, one per node: node N and every agent. Agents reach node N
//!   by its container name through `front-N`. No two nodes share a front
//!   network: Docker resolves a container's name on every network it is on,
//!   so a shared front network would give a node cut off the backplane a
//!   second path to its peers, and partitioning it would cut etcd only.
//!
//! `docker network disconnect backplane NODE` therefore cuts that node off
//! etcd and its peers while its agents still reach it: what the fencing rule
//! is for. The host reaches etcd and every node through ports published on
//! 127.0.0.1, and drives everything with its own `tentacle-hub` and
//! `etcdctl`.

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use testcontainers::core::{IntoContainerPort, Mount, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

use super::docker::{self, Network, humanize, run_bounded};
use super::{
    AGENT_IMAGE, Agent, AgentSpec, DRAIN_GRACE, ETCD_IMAGE, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT,
    HUB_IMAGE, HUB_PORT, IMAGE_TAG, LABEL, OWNER_LABEL, PICKUP_TIMEOUT, RECONNECT_INITIAL,
    RECONNECT_MAX, STARTUP_TIMEOUT, Scenario, container_error, failed, fast_probe,
    hand_home_to_the_image_user, hub_cli_in, publish, say,
};

pub const ETCD_PORT: u16 = 2379;
/// The nodes' presence TTL: a node's entries vanish this soon after it
/// stops renewing them.
pub const PRESENCE_TTL: &str = "3s";
/// Where the hub keeps presence: `PREFIX/presence/AGENT/NODE/TUNNEL`.
const PRESENCE_PREFIX: &str = "/tentacle/presence/";

/// One hub node container.
#[derive(Debug)]
pub struct HubNode {
    /// Its `--node-id` (`hub-N`).
    pub id: String,
    /// Its container (and host) name, which it advertises.
    pub container_name: String,
    /// The front network its agents reach it on.
    pub front: String,
    container: Container<GenericImage>,
}

/// etcd, the nodes and the agents of one scenario.
#[derive(Debug)]
pub struct ClusterFleet {
    // Fields drop in this order: containers before the networks they are
    // on, and the hubs' home after the hubs.
    agents: Vec<Agent>,
    nodes: Vec<HubNode>,
    etcd: Container<GenericImage>,
    networks: Vec<Network>,
    /// The one hub identity every node presents; the host's CLI uses it too.
    pub home: tempfile::TempDir,
    pub hub_thumbprint: String,
    pub backplane: String,
    pub etcd_name: String,
}

impl ClusterFleet {
    /// Starts etcd, `nodes` hub nodes and the polling `agents` (each
    /// registered once with a token of its own, through node `i % nodes`,
    /// then configured with every node), and waits until every agent holds
    /// a tunnel on some node.
    pub fn start(scenario: &Scenario, nodes: usize, agents: &[&'static str]) -> Self {
        let started = Instant::now();
        let prefix = scenario.prefix();
        let run_id = scenario.run_id.as_str();
        let test = scenario.test.as_str();

        let mut networks = vec![
            Network::create(&format!("{prefix}-backplane"), run_id, false)
                .unwrap_or_else(|e| failed(test, "creating the backplane network", e)),
        ];
        for n in 1..=nodes {
            networks.push(
                Network::create(&format!("{prefix}-front-{n}"), run_id, false)
                    .unwrap_or_else(|e| failed(test, "creating a front network", e)),
            );
        }
        let backplane = networks[0].name.clone();

        let etcd_name = format!("{prefix}-etcd");
        let etcd = start_etcd(run_id, &backplane, &etcd_name)
            .unwrap_or_else(|e| failed(test, "starting etcd", e));

        let home = tempfile::Builder::new()
            .prefix("tentacle-hub-home.")
            .tempdir()
            .expect("a temporary hub home");
        let made = hub_cli_in(home.path(), &["new-certificate"], Duration::from_secs(30))
            .unwrap_or_else(|e| failed(test, "tentacle-hub new-certificate", e));
        assert!(
            made.status.success(),
            "tentacle-hub new-certificate: {}",
            String::from_utf8_lossy(&made.stderr)
        );
        let hub_thumbprint = String::from_utf8_lossy(&made.stdout).trim().to_owned();
        let user = hand_home_to_the_image_user(home.path());

        let store = format!("etcd://{etcd_name}:{ETCD_PORT}");
        let started_nodes: Vec<Result<HubNode, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..=nodes)
                .map(|n| {
                    let node = NodeSettings {
                        run_id,
                        id: format!("hub-{n}"),
                        container_name: format!("{prefix}-hub-{n}"),
                        backplane: &backplane,
                        front: networks[n].name.clone(),
                        store: &store,
                        home: home.path(),
                        user: user.as_deref(),
                    };
                    scope.spawn(move || start_node(node))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the start panicked".into()))
                })
                .collect()
        });
        let mut fleet = Self {
            agents: Vec::new(),
            nodes: Vec::new(),
            etcd,
            networks,
            home,
            hub_thumbprint,
            backplane,
            etcd_name,
        };
        let mut errors = Vec::new();
        for node in started_nodes {
            match node {
                Ok(node) => fleet.nodes.push(node),
                Err(error) => errors.push(error),
            }
        }
        assert!(
            errors.is_empty(),
            "{test}: starting hub nodes: {}",
            errors.join("; ")
        );
        say(&format!(
            "{test}: etcd and {} hub nodes up in {}",
            fleet.nodes.len(),
            humanize(started.elapsed())
        ));

        let agents_started = Instant::now();
        let prefix = prefix.as_str();
        let started_agents: Vec<Result<Agent, String>> = std::thread::scope(|scope| {
            let fleet = &fleet;
            let handles: Vec<_> = agents
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    scope.spawn(move || fleet.start_agent(run_id, prefix, name, i % nodes))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("the start panicked".into()))
                })
                .collect()
        });
        for agent in started_agents {
            match agent {
                Ok(agent) => fleet.agents.push(agent),
                Err(error) => errors.push(error),
            }
        }
        assert!(
            errors.is_empty(),
            "{test}: starting agents: {}",
            errors.join("; ")
        );
        for name in agents {
            fleet
                .wait_held(name, |held| !held.is_empty(), Duration::from_secs(60))
                .unwrap_or_else(|e| failed(test, "waiting for the agents' tunnels", e));
        }
        say(&format!(
            "{test}: {} polling agent(s) registered, configured with all {} nodes and holding tunnels in {}",
            agents.len(),
            fleet.nodes.len(),
            humanize(agents_started.elapsed())
        ));
        fleet
    }

    /// Starts agent `name` on node `via`'s front network, registering
    /// through that node with a fresh token; then connects it to the other
    /// front networks, adds the other nodes to its configuration
    /// (`tentacle configure`, as an operator would) and restarts it so it
    /// runs with all of them.
    fn start_agent(
        &self,
        run_id: &str,
        prefix: &str,
        name: &'static str,
        via: usize,
    ) -> Result<Agent, String> {
        let token = self.token()?;
        let container_name = format!("{prefix}-{name}");
        let home_node = &self.nodes[via];
        let env: Vec<(&str, String)> = vec![
            ("RUST_LOG", "info".into()),
            ("TENTACLE_NAME", name.into()),
            (
                "TENTACLE_SERVER",
                format!("https://{}:{HUB_PORT}", home_node.container_name),
            ),
            ("TENTACLE_SERVER_THUMBPRINT", self.hub_thumbprint.clone()),
            ("TENTACLE_TOKEN", token),
            ("TENTACLE_MODE", "polling".into()),
            ("TENTACLE_ROLES", format!("app,{name}")),
            ("TENTACLE_ENVIRONMENTS", "test".into()),
            ("TENTACLE_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL.into()),
            ("TENTACLE_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT.into()),
            ("TENTACLE_RECONNECT_INITIAL", RECONNECT_INITIAL.into()),
            (
                "TENTACLE_RECONNECT_MAX",
                format!("{}ms", RECONNECT_MAX.as_millis()),
            ),
        ];
        let mut request = GenericImage::new(AGENT_IMAGE, IMAGE_TAG)
            .with_wait_for(WaitFor::healthcheck())
            .with_network(&home_node.front)
            .with_container_name(&container_name)
            .with_hostname(&container_name)
            .with_label(LABEL, run_id)
            .with_label(OWNER_LABEL, docker::owner())
            .with_health_check(fast_probe("/usr/local/bin/tentacle"))
            .with_host_config_modifier(|config| publish(config, None))
            .with_startup_timeout(STARTUP_TIMEOUT);
        for (key, value) in env {
            request = request.with_env_var(key, value);
        }
        let container = request
            .start()
            .map_err(|e| format!("starting {name}: {}", container_error(&container_name, e)))?;
        for (i, node) in self.nodes.iter().enumerate() {
            if i == via {
                continue;
            }
            docker::docker(&["network", "connect", &node.front, &container_name])?;
            let url = format!("https://{}:{HUB_PORT}", node.container_name);
            let configured = exec_in(
                &container,
                &[
                    "tentacle",
                    "configure",
                    "--server",
                    &url,
                    "--server-thumbprint",
                    &self.hub_thumbprint,
                ],
            )?;
            if configured.0 != 0 {
                return Err(format!(
                    "{name}: tentacle configure --server {url}: {}",
                    configured.1
                ));
            }
        }
        container
            .stop_with_timeout(Some(10))
            .map_err(|e| format!("stopping {name}: {e}"))?;
        container
            .start()
            .map_err(|e| format!("starting {name} again: {e}"))?;
        docker::wait_healthy(&container_name, STARTUP_TIMEOUT)?;
        Ok(Agent {
            spec: AgentSpec::polling(name),
            container_name,
            network: home_node.front.clone(),
            container,
        })
    }

    /// A one-time registration token, made on the cluster's store from the
    /// host.
    fn token(&self) -> Result<String, String> {
        let out = self.hub_cli_on_store(&["server", "token", "create"])?;
        if !out.status.success() {
            return Err(format!(
                "server token create: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The host's `tentacle-hub ARGS --store etcd://127.0.0.1:PORT`.
    pub fn hub_cli_on_store(&self, args: &[&str]) -> Result<Output, String> {
        let store = format!("etcd://{}", self.etcd_endpoint());
        let mut all = args.to_vec();
        all.extend(["--store", &store]);
        hub_cli_in(self.home.path(), &all, Duration::from_secs(60))
    }

    /// etcd's client port on the host.
    pub fn etcd_endpoint(&self) -> String {
        let port = self
            .etcd
            .get_host_port_ipv4(ETCD_PORT)
            .expect("etcd's port is published on 127.0.0.1");
        format!("127.0.0.1:{port}")
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, i: usize) -> &HubNode {
        &self.nodes[i]
    }

    /// The index of the node whose id is `id`.
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Node `i`'s address on the host.
    pub fn node_url(&self, i: usize) -> String {
        let port = self.nodes[i]
            .container
            .get_host_port_ipv4(HUB_PORT)
            .expect("the node's port is published on 127.0.0.1");
        format!("https://127.0.0.1:{port}")
    }

    /// The ids of the nodes holding tunnels from `agent`, from presence in
    /// etcd (read with the host's `etcdctl`).
    pub fn holders(&self, agent: &str) -> Result<BTreeSet<String>, String> {
        let prefix = format!("{PRESENCE_PREFIX}{agent}/");
        let endpoint = self.etcd_endpoint();
        let out = run_bounded(
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &endpoint, "--dial-timeout", "2s"])
                .args(["--command-timeout", "3s", "get", "--prefix", "--keys-only"])
                .arg(&prefix),
            Duration::from_secs(10),
        )?;
        if !out.status.success() {
            return Err(format!(
                "etcdctl get {prefix}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|key| key.strip_prefix(&prefix))
            .filter_map(|rest| rest.split('/').next())
            .filter(|node| !node.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Waits until the nodes holding `agent`'s tunnels satisfy `wanted`;
    /// returns them.
    pub fn wait_held(
        &self,
        agent: &str,
        wanted: impl Fn(&BTreeSet<String>) -> bool,
        timeout: Duration,
    ) -> Result<BTreeSet<String>, String> {
        let started = Instant::now();
        loop {
            let held = self.holders(agent);
            if let Ok(held) = &held
                && wanted(held)
            {
                return Ok(held.clone());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "{agent}'s tunnels after {}: {held:?}",
                    humanize(timeout)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The registered agent's certificate thumbprint (`server trust list`
    /// on the cluster's store).
    pub fn thumbprint(&self, agent: &str) -> String {
        let out = self
            .hub_cli_on_store(&["server", "trust", "list"])
            .unwrap_or_else(|e| panic!("server trust list: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&agent))
            .and_then(|f| f.first().map(|t| (*t).to_owned()))
            .unwrap_or_else(|| panic!("{agent} is not in the cluster's registry:\n{text}"))
    }

    /// `tentacle-hub exec` of `script` on `poll://agent` through node
    /// `node`, as a command to run or spawn.
    pub fn exec_command(&self, node: usize, agent: &str, script: &str) -> Command {
        let mut command = Command::new(crate::bin("tentacle-hub"));
        command
            .arg("--home")
            .arg(self.home.path())
            .args(["exec", "--target", &format!("poll://{agent}")])
            .args(["--thumbprint", &self.thumbprint(agent)])
            .args(["--hub", &self.node_url(node), "--pickup-timeout", "30s"])
            .args(["--script", script]);
        command
    }

    /// Runs `exec` to its end (bounded).
    pub fn exec(&self, node: usize, agent: &str, script: &str) -> Output {
        run_bounded(
            &mut self.exec_command(node, agent, script),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("exec on {agent} through node {node}: {e}"))
    }

    /// Cuts node `i` off the backplane (etcd and its peers); it stays on
    /// its front network, where its agents still reach it.
    pub fn partition(&self, i: usize) {
        let node = &self.nodes[i];
        docker::docker(&[
            "network",
            "disconnect",
            &self.backplane,
            &node.container_name,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Puts node `i` back on the backplane.
    pub fn heal(&self, i: usize) {
        let node = &self.nodes[i];
        docker::docker(&["network", "connect", &self.backplane, &node.container_name])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Node `i`'s log (stdout, then stderr).
    pub fn node_log(&self, i: usize) -> String {
        logs(&self.nodes[i].container)
    }

    /// Every container's log, for a failed assertion's message.
    pub fn all_logs(&self) -> String {
        let tail = |text: String| -> String {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        };
        let mut parts = vec![format!(
            "--- etcd {}:\n{}",
            self.etcd_name,
            tail(logs(&self.etcd))
        )];
        for node in &self.nodes {
            parts.push(format!(
                "--- {} ({}, {}):\n{}",
                node.id,
                node.container_name,
                docker::health(&node.container_name),
                tail(logs(&node.container))
            ));
        }
        for agent in &self.agents {
            parts.push(format!(
                "--- agent {} ({}):\n{}",
                agent.container_name,
                docker::health(&agent.container_name),
                tail(logs(&agent.container))
            ));
        }
        parts.join("\n")
    }

    pub fn network_names(&self) -> Vec<String> {
        self.networks.iter().map(|n| n.name.clone()).collect()
    }
}

impl Drop for ClusterFleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The failure's evidence, before the containers go.
            println!("{}", self.all_logs());
        }
    }
}

struct NodeSettings<'a> {
    run_id: &'a str,
    id: String,
    container_name: String,
    backplane: &'a str,
    front: String,
    store: &'a str,
    home: &'a std::path::Path,
    user: Option<&'a str>,
}

/// Starts one hub node on the backplane (so etcd answers its first start:
/// a node that cannot reach etcd then exits), and connects it to its front
/// network.
fn start_node(node: NodeSettings<'_>) -> Result<HubNode, String> {
    let advertise = format!("https://{}:{HUB_PORT}", node.container_name);
    let request = GenericImage::new(HUB_IMAGE, IMAGE_TAG)
        .with_exposed_port(HUB_PORT.tcp())
        .with_wait_for(WaitFor::healthcheck())
        .with_network(node.backplane)
        .with_container_name(&node.container_name)
        .with_hostname(&node.container_name)
        .with_label(LABEL, node.run_id)
        .with_label(OWNER_LABEL, docker::owner())
        .with_env_var("RUST_LOG", "info")
        // Every node reads the one identity (certificate and key) from the
        // same home, as the loopback cluster's nodes do.
        .with_mount(Mount::bind_mount(
            node.home.to_string_lossy(),
            "/var/lib/tentacle-hub",
        ))
        .with_health_check(fast_probe("/usr/local/bin/tentacle-hub"))
        .with_cmd([
            "server",
            "--listen",
            "0.0.0.0:10943",
            "--store",
            node.store,
            "--node-id",
            &node.id,
            "--advertise",
            &advertise,
            "--presence-ttl",
            PRESENCE_TTL,
            "--pickup-timeout",
            PICKUP_TIMEOUT,
            "--heartbeat-interval",
            HEARTBEAT_INTERVAL,
            "--heartbeat-timeout",
            HEARTBEAT_TIMEOUT,
            "--drain-grace",
            DRAIN_GRACE,
        ])
        .with_host_config_modifier(|config| publish(config, Some(HUB_PORT)))
        .with_startup_timeout(STARTUP_TIMEOUT);
    let request = match node.user {
        Some(user) => request.with_user(user),
        None => request,
    };
    let container = request.start().map_err(|e| {
        format!(
            "starting {}: {}",
            node.id,
            container_error(&node.container_name, e)
        )
    })?;
    docker::docker(&["network", "connect", &node.front, &node.container_name])?;
    Ok(HubNode {
        id: node.id,
        container_name: node.container_name,
        front: node.front,
        container,
    })
}

/// One etcd member on the backplane, its client port published on
/// 127.0.0.1; returns once it serves.
fn start_etcd(
    run_id: &str,
    backplane: &str,
    name: &str,
) -> Result<Container<GenericImage>, String> {
    let client_url = format!("http://{name}:{ETCD_PORT}");
    GenericImage::new(ETCD_IMAGE, IMAGE_TAG)
        .with_exposed_port(ETCD_PORT.tcp())
        .with_wait_for(WaitFor::message_on_either_std(
            "ready to serve client requests",
        ))
        .with_network(backplane)
        .with_container_name(name)
        .with_hostname(name)
        .with_label(LABEL, run_id)
        .with_label(OWNER_LABEL, docker::owner())
        .with_cmd([
            "--name",
            "etcd",
            "--data-dir",
            "/var/lib/etcd/data",
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "etcd=http://127.0.0.1:2380",
            "--heartbeat-interval",
            "200",
            "--election-timeout",
            "2000",
        ])
        .with_host_config_modifier(|config| publish(config, Some(ETCD_PORT)))
        .with_startup_timeout(STARTUP_TIMEOUT)
        .start()
        .map_err(|e| container_error(name, e))
}

/// Runs `argv` in `container` (testcontainers' exec): its exit code and
/// output.
fn exec_in(container: &Container<GenericImage>, argv: &[&str]) -> Result<(i64, String), String> {
    use testcontainers::core::{CmdWaitFor, ExecCommand};
    let mut result = container
        .exec(ExecCommand::new(argv.iter().copied()).with_cmd_ready_condition(CmdWaitFor::exit()))
        .map_err(|e| format!("exec {argv:?}: {e}"))?;
    let mut output =
        String::from_utf8_lossy(&result.stdout_to_vec().unwrap_or_default()).into_owned();
    output.push_str(&String::from_utf8_lossy(
        &result.stderr_to_vec().unwrap_or_default(),
    ));
    let code = result
        .exit_code()
        .map_err(|e| format!("exec {argv:?}: {e}"))?
        .unwrap_or(-1);
    Ok((code, output))
}

fn logs(container: &Container<GenericImage>) -> String {
    let mut text =
        String::from_utf8_lossy(&container.stdout_to_vec().unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(
        &container.stderr_to_vec().unwrap_or_default(),
    ));
    text
}
