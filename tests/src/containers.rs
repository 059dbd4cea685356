//! The container tests' harness: the images built once per test process
//! from this run's binaries, a private Docker network per test with a hub
//! container and agent containers that register with an API key as the
//! README tells users, and cleanup of every container and network, also
//! when a test fails.
//!
//! Black-box: only the images, their environment variables and the
//! `tentacle-hub` CLI on the host are used, so these tests keep passing
//! when the tunnel's internals change.
//!
//! Lifecycle (create with network, environment, mounts, ports and health
//! check; wait until healthy; stop, start, pause, unpause; remove) goes
//! through testcontainers' `SyncRunner`. testcontainers-rs has no reaper
//! (Ryuk is the Java/Go libraries'), so nothing is pulled for one; it pulls
//! an image only when creating a container answers 404, and every image is
//! checked to exist locally before a test starts. Each `Container` removes
//! its container (with its anonymous volumes) when dropped; the networks are
//! this harness's own and removed after their containers; and everything
//! carries a label with the test's run id, so a final sweep removes whatever
//! a killed process left behind. The few actions testcontainers lacks
//! (`--internal` networks, network connect/disconnect, SIGKILL, health
//! status) use the `docker` CLI.
//!
//! Rules: when the Docker engine cannot be reached or the images cannot be
//! built, a test fails under `CI=true` and otherwise prints
//! `skipped: <test>: <why>` and passes.

mod api_adapter;
pub mod cluster;
mod docker;
mod images;
mod running;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use testcontainers::bollard::models::{HostConfig, PortBinding};
use testcontainers::core::{IntoContainerPort, Mount, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, Healthcheck, ImageExt};

pub use docker::Network;
use docker::{humanize, run_bounded};
pub use running::Running;

/// The tag the suite builds and runs its images under.
pub const IMAGE_TAG: &str = "test";
pub const AGENT_IMAGE: &str = "tentacle-agent";
pub const HUB_IMAGE: &str = "tentacle-hub";
pub const SIM_IMAGE: &str = "tentacle-sim";
pub const PROXY_IMAGE: &str = "tentacle-test-proxy";
/// One etcd member, for the hub cluster's scenarios (`cluster`).
pub const ETCD_IMAGE: &str = "tentacle-test-etcd";
const IMAGES: [&str; 5] = [AGENT_IMAGE, HUB_IMAGE, SIM_IMAGE, PROXY_IMAGE, ETCD_IMAGE];

/// The label every container and network of a test carries (value: the
/// test's run id).
pub(crate) const LABEL: &str = "org.tentacle.test-run";
/// Which process (`host:pid`) made a container or network.
pub(crate) const OWNER_LABEL: &str = "org.tentacle.test-owner";
/// Set in a scenario's child process (see `api_adapter`): its run id.
pub(crate) const CHILD_ENV: &str = "TENTACLE_CONTAINER_TEST_RUN";

pub const HUB_PORT: u16 = 10943;
pub const AGENT_PORT: u16 = 10933;
pub const PROXY_PORT: u16 = 8888;

/// Test settings: seconds, not the production minutes.
pub const HEARTBEAT_INTERVAL: &str = "1s";
pub const HEARTBEAT_TIMEOUT: &str = "4s";
pub const RECONNECT_INITIAL: &str = "200ms";
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);
pub const PICKUP_TIMEOUT: &str = "15s";
pub const DRAIN_GRACE: &str = "2s";
/// Creating a container and waiting until its health check passes.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The image's user (deploy/docker): the hub's bind-mounted home is handed
/// to it.
const IMAGE_UID: u32 = 10001;

/// Writes a progress line straight to stderr: libtest captures `print!`
/// and `eprint!`, not writes to the stream itself, so these show in every
/// run, passing or not.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "containers: {line}");
}

/// One container scenario: its libtest name and run id (the label value,
/// and the prefix of its containers' and networks' names).
#[derive(Debug)]
pub struct Scenario {
    pub test: String,
    pub run_id: String,
}

impl Scenario {
    /// Names of this test's containers and networks start with it.
    pub fn prefix(&self) -> String {
        format!("tt-{}", &self.run_id[..10])
    }
}

/// Runs a scenario: checks for Docker and the images (skip or fail, see
/// the module's rules), prints its name at its start and end, and removes
/// whatever it left. Use it through a `#[test]` named `name` in `module`
/// (pass `module_path!()`).
pub fn run_scenario(module: &str, name: &str, body: impl FnOnce(&Scenario)) {
    // module_path!() starts with the crate (the test binary); libtest's
    // names do not.
    let test = match module.split_once("::") {
        Some((_, rest)) => format!("{rest}::{name}"),
        None => name.to_owned(),
    };
    if let Ok(run_id) = std::env::var(CHILD_ENV) {
        // The parent process checked Docker, built the images, and sweeps.
        let scenario = Scenario { test, run_id };
        let _report = Report::start(&scenario.test);
        body(&scenario);
        return;
    }
    // Scenarios are heavy and timed: one at a time per process, beside
    // whatever other tests run.
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let engine = match docker::engine_api_version() {
        Ok(version) => version,
        Err(why) => return skip_or_fail(&test, &why),
    };
    static ABANDONED: std::sync::Once = std::sync::Once::new();
    ABANDONED.call_once(|| {
        let removed = docker::sweep_abandoned();
        if !removed.is_empty() {
            say(&format!(
                "removed what earlier test processes left behind: {}",
                removed.join(", ")
            ));
        }
    });
    if let Err(why) = images::ensure() {
        return skip_or_fail(&test, &format!("the images cannot be built: {why}"));
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let _sweep = Sweep(run_id.clone());
    let wanted = api_adapter::client_version();
    if engine >= wanted {
        let _report = Report::start(&test);
        body(&Scenario { test, run_id });
    } else {
        say(&format!(
            "{test}: the engine serves Docker API {}.{}, testcontainers asks for {}.{}: \
             running the scenario in a child process through an API-version adapter",
            engine.0, engine.1, wanted.0, wanted.1
        ));
        api_adapter::run_in_child(&test, &run_id, engine);
    }
}

fn failed(test: &str, what: &str, error: String) -> ! {
    panic!("{test}: {what}: {error}")
}

fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {why}; with CI=true the container tests must run, so this fails");
    }
    let _ = writeln!(std::io::stderr(), "skipped: {test}: {why}");
}

/// Prints a scenario's start, and its end with its duration.
struct Report {
    test: String,
    started: Instant,
}

impl Report {
    fn start(test: &str) -> Self {
        say(&format!("scenario {test}: start"));
        Self {
            test: test.to_owned(),
            started: Instant::now(),
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            "FAILED after"
        } else {
            "passed in"
        };
        say(&format!(
            "scenario {}: {outcome} {}",
            self.test,
            humanize(self.started.elapsed())
        ));
    }
}

/// Removes whatever still carries the run's label.
struct Sweep(String);

impl Drop for Sweep {
    fn drop(&mut self) {
        let left = docker::sweep(&self.0);
        if !left.is_empty() {
            say(&format!(
                "swept what run {} left behind: {}",
                self.0,
                left.join(", ")
            ));
        }
    }
}

/// How an agent container reaches the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentMode {
    Polling,
    Listening,
    /// Polling, on an `--internal` network whose only way out is the
    /// proxy container (`HTTPS_PROXY`).
    PollingBehindProxy,
}

/// An agent to start: its name (agent id, role and host name) and mode.
#[derive(Debug, Clone, Copy)]
pub struct AgentSpec {
    pub name: &'static str,
    pub mode: AgentMode,
}

impl AgentSpec {
    pub const fn polling(name: &'static str) -> Self {
        Self {
            name,
            mode: AgentMode::Polling,
        }
    }

    pub const fn listening(name: &'static str) -> Self {
        Self {
            name,
            mode: AgentMode::Listening,
        }
    }

    pub const fn behind_proxy(name: &'static str) -> Self {
        Self {
            name,
            mode: AgentMode::PollingBehindProxy,
        }
    }
}

/// The topology the issue asks for: two polling agents and a listening one.
pub const STANDARD_FLEET: [AgentSpec; 3] = [
    AgentSpec::polling("poll-a"),
    AgentSpec::polling("poll-b"),
    AgentSpec::listening("listen-c"),
];

/// One agent container.
#[derive(Debug)]
pub struct Agent {
    pub spec: AgentSpec,
    /// The Docker container (and host) name.
    pub container_name: String,
    /// The network it is on.
    pub network: String,
    container: Container<GenericImage>,
}

/// One agent's line in `tentacle-hub health --json`.
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub name: String,
    pub reachable: bool,
    pub error: Option<String>,
}

/// A hub container and its agents on this test's networks.
#[derive(Debug)]
pub struct Fleet {
    // Fields drop in this order: containers before the networks they are
    // on, and the hub's home after the hub.
    agents: Vec<Agent>,
    proxy: Option<Container<GenericImage>>,
    hub: Container<GenericImage>,
    networks: Vec<Network>,
    /// The hub's home on the host, bind-mounted into the hub container:
    /// the host's `tentacle-hub` shares its identity and is an operator.
    pub home: tempfile::TempDir,
    pub hub_name: String,
    pub hub_thumbprint: String,
    pub proxy_name: String,
    thumbprints: Mutex<HashMap<String, String>>,
}

impl Fleet {
    /// Hub, two polling agents and a listening one, all reachable.
    pub fn standard(scenario: &Scenario) -> Self {
        Self::start(scenario, &STANDARD_FLEET)
    }

    /// Starts the hub and `agents` (and the proxy, when one is behind it)
    /// and waits until every agent answers through the hub.
    pub fn start(scenario: &Scenario, agents: &[AgentSpec]) -> Self {
        let started = Instant::now();
        let prefix = scenario.prefix();
        let run_id = scenario.run_id.as_str();
        let test = scenario.test.as_str();

        let mut networks = vec![
            Network::create(&format!("{prefix}-net"), run_id, false)
                .unwrap_or_else(|e| failed(test, "creating the network", e)),
        ];
        let proxied = agents
            .iter()
            .any(|a| a.mode == AgentMode::PollingBehindProxy);
        if proxied {
            networks.push(
                Network::create(&format!("{prefix}-edge"), run_id, true)
                    .unwrap_or_else(|e| failed(test, "creating the internal network", e)),
            );
        }
        let net = networks[0].name.clone();
        let edge = networks.get(1).map(|n| n.name.clone());

        // The hub's identity is made on the host first, so the agents can
        // be given its thumbprint.
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
        let api_key = format!("tt-api-key-{}", uuid::Uuid::new_v4().simple());

        let hub_name = format!("{prefix}-hub");
        let hub = {
            let request = GenericImage::new(HUB_IMAGE, IMAGE_TAG)
                .with_exposed_port(HUB_PORT.tcp())
                .with_wait_for(WaitFor::healthcheck())
                .with_network(&net)
                .with_container_name(&hub_name)
                .with_hostname(&hub_name)
                .with_label(LABEL, run_id)
                .with_label(OWNER_LABEL, docker::owner())
                .with_env_var("RUST_LOG", "info")
                .with_env_var("TENTACLE_HUB_API_KEY", &api_key)
                .with_mount(Mount::bind_mount(
                    home.path().to_string_lossy(),
                    "/var/lib/tentacle-hub",
                ))
                .with_health_check(fast_probe("/usr/local/bin/tentacle-hub"))
                .with_cmd([
                    "server",
                    "--listen",
                    "0.0.0.0:10943",
                    "--from-env",
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
            let request = match &user {
                Some(user) => request.with_user(user),
                None => request,
            };
            request.start().unwrap_or_else(|e| {
                failed(
                    test,
                    "starting the hub container",
                    container_error(&hub_name, e),
                )
            })
        };

        let proxy_name = format!("{prefix}-proxy");
        let proxy = edge.as_ref().map(|edge| {
            let proxy = GenericImage::new(PROXY_IMAGE, IMAGE_TAG)
                .with_wait_for(WaitFor::message_on_either_std("Accepting connections"))
                .with_network(&net)
                .with_container_name(&proxy_name)
                .with_hostname(&proxy_name)
                .with_label(LABEL, run_id)
                .with_label(OWNER_LABEL, docker::owner())
                .with_host_config_modifier(|config| publish(config, None))
                .with_startup_timeout(STARTUP_TIMEOUT)
                .start()
                .unwrap_or_else(|e| {
                    failed(
                        test,
                        "starting the proxy container",
                        container_error(&proxy_name, e),
                    )
                });
            // testcontainers starts a container on one network; the proxy
            // is the internal network's only way out.
            docker::docker(&["network", "connect", edge, &proxy_name]).unwrap_or_else(|e| {
                failed(test, "connecting the proxy to the internal network", e)
            });
            proxy
        });

        let settings = AgentSettings {
            run_id,
            prefix: &prefix,
            net: &net,
            edge: edge.as_deref(),
            hub_name: &hub_name,
            hub_thumbprint: &hub_thumbprint,
            api_key: &api_key,
            proxy_name: &proxy_name,
        };
        // Agents start side by side; each waits for its own health check.
        let started_agents: Vec<Result<Agent, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = agents
                .iter()
                .map(|spec| scope.spawn(|| start_agent(&settings, *spec)))
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
            proxy,
            hub,
            networks,
            home,
            hub_name,
            hub_thumbprint,
            proxy_name,
            thumbprints: Mutex::default(),
        };
        let mut errors = Vec::new();
        for agent in started_agents {
            match agent {
                Ok(agent) => fleet.agents.push(agent),
                Err(error) => errors.push(error),
            }
        }
        assert!(
            errors.is_empty(),
            "{}: starting agents: {}",
            scenario.test,
            errors.join("; ")
        );
        let names: Vec<&str> = agents.iter().map(|a| a.name).collect();
        let waited = fleet
            .wait_reachable(&names, Duration::from_secs(60))
            .unwrap_or_else(|e| failed(test, "waiting for the agents", e));
        say(&format!(
            "{}: hub and {} agent(s) up in {} (all reachable {} after their containers were healthy)",
            scenario.test,
            names.len(),
            humanize(started.elapsed()),
            humanize(waited)
        ));
        fleet
    }

    /// The hub's address on the host (its port mapping changes when the
    /// hub container restarts).
    pub fn hub_url(&self) -> String {
        let port = self
            .hub
            .get_host_port_ipv4(HUB_PORT)
            .expect("the hub's port is published on 127.0.0.1");
        format!("https://127.0.0.1:{port}")
    }

    /// Runs the host's `tentacle-hub --home HOME ARGS`, bounded.
    pub fn hub_cli(&self, args: &[&str]) -> Output {
        hub_cli_in(self.home.path(), args, Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("tentacle-hub {args:?}: {e}"))
    }

    /// `tentacle-hub deploy ARGS --hub URL`.
    pub fn deploy(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.deploy_command(args), Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("tentacle-hub deploy {args:?}: {e}"))
    }

    /// `tentacle-hub deploy ARGS --hub URL` as a command to spawn: the way
    /// to reach a listening agent, which only the hub can resolve by name.
    pub fn deploy_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(crate::bin("tentacle-hub"));
        command
            .arg("--home")
            .arg(self.home.path())
            .arg("deploy")
            .args(args)
            .args(["--hub", &self.hub_url()]);
        command
    }

    /// The registered agent's certificate thumbprint, from the hub's
    /// registry (`tentacle-hub server trust list`).
    pub fn thumbprint(&self, agent: &str) -> String {
        if let Some(known) = self.thumbprints.lock().expect("thumbprints").get(agent) {
            return known.clone();
        }
        let out = self.hub_cli(&["server", "trust", "list"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let thumbprint = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&agent))
            .and_then(|f| f.first().map(|t| (*t).to_owned()))
            .unwrap_or_else(|| panic!("{agent} is not in the hub's registry:\n{text}"));
        self.thumbprints
            .lock()
            .expect("thumbprints")
            .insert(agent.to_owned(), thumbprint.clone());
        thumbprint
    }

    /// `tentacle-hub exec` on a polling agent, through the hub, as a
    /// command to run or spawn.
    pub fn exec_command(&self, agent: &str, script: &str, extra: &[&str]) -> Command {
        let thumbprint = self.thumbprint(agent);
        let mut command = Command::new(crate::bin("tentacle-hub"));
        command
            .arg("--home")
            .arg(self.home.path())
            .args(["exec", "--target", &format!("poll://{agent}")])
            .args(["--thumbprint", &thumbprint, "--hub", &self.hub_url()])
            .args(["--script", script])
            .args(extra);
        command
    }

    /// Runs `exec` to its end (bounded).
    pub fn exec(&self, agent: &str, script: &str, extra: &[&str]) -> Output {
        run_bounded(
            &mut self.exec_command(agent, script, extra),
            Duration::from_secs(180),
        )
        .unwrap_or_else(|e| panic!("exec on {agent}: {e}"))
    }

    /// `tentacle-hub health --json` for `role` (all when empty).
    pub fn health(&self, role: &str, timeout: Duration) -> Result<Vec<HealthReport>, String> {
        let url = self.hub_url();
        let timeout_text = format!("{}ms", timeout.as_millis());
        let mut args = vec![
            "health",
            "--json",
            "--timeout",
            timeout_text.as_str(),
            "--hub",
            url.as_str(),
        ];
        if !role.is_empty() {
            args.extend(["--role", role]);
        }
        let out = hub_cli_in(self.home.path(), &args, timeout + Duration::from_secs(30))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed: serde_json::Value = serde_json::from_str(&stdout).map_err(|_| {
            format!(
                "health printed no JSON ({}): {}{}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(parsed
            .as_array()
            .map(|reports| {
                reports
                    .iter()
                    .map(|r| HealthReport {
                        name: r["name"].as_str().unwrap_or_default().to_owned(),
                        reachable: r["reachable"].as_bool().unwrap_or(false),
                        error: r["error"].as_str().map(str::to_owned),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until `names` all answer through the hub; returns how long
    /// that took.
    pub fn wait_reachable(&self, names: &[&str], timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let health = self.health("", Duration::from_secs(2));
            let missing: Vec<&str> = match &health {
                Ok(reports) => names
                    .iter()
                    .copied()
                    .filter(|n| !reports.iter().any(|r| r.name == *n && r.reachable))
                    .collect(),
                Err(_) => names.to_vec(),
            };
            if missing.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "{missing:?} not reachable through the hub after {}; last health: {health:?}",
                    humanize(timeout)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn agent(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.spec.name == name)
            .unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// Takes the agent's container off its network (`docker network
    /// disconnect`): the host vanishes from the network.
    pub fn disconnect(&self, name: &str) {
        let agent = self.agent(name);
        docker::docker(&[
            "network",
            "disconnect",
            &agent.network,
            &agent.container_name,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Puts it back (`docker network connect`).
    pub fn connect(&self, name: &str) {
        let agent = self.agent(name);
        docker::docker(&["network", "connect", &agent.network, &agent.container_name])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGKILLs the container (`docker kill`): its processes, scripts
    /// included, die with no chance to clean up.
    pub fn kill(&self, name: &str) {
        let agent = self.agent(name);
        docker::docker(&["kill", &agent.container_name]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts a stopped or killed agent container again (same container,
    /// same home volume) and waits until it is healthy.
    pub fn start_again(&self, name: &str) -> Duration {
        let agent = self.agent(name);
        let started = Instant::now();
        agent
            .container
            .start()
            .unwrap_or_else(|e| panic!("starting {name} again: {e}"));
        docker::wait_healthy(&agent.container_name, STARTUP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        started.elapsed()
    }

    /// Freezes every process of the container (`docker pause`).
    pub fn pause(&self, name: &str) {
        // testcontainers 0.27.3's blocking `Container::pause` is declared
        // `async` although it blocks on its own runtime inside; driving it
        // with a plain executor (outside any runtime) is what works.
        futures::executor::block_on(self.agent(name).container.pause())
            .unwrap_or_else(|e| panic!("pausing {name}: {e}"));
    }

    pub fn unpause(&self, name: &str) {
        futures::executor::block_on(self.agent(name).container.unpause())
            .unwrap_or_else(|e| panic!("unpausing {name}: {e}"));
    }

    /// Stops the hub container (SIGTERM: it drains), leaves it stopped for
    /// `down_for`, and starts it again; returns once it is healthy, with the
    /// moment it was started again.
    pub fn restart_hub(&self, down_for: Duration) -> Instant {
        self.hub
            .stop_with_timeout(Some(10))
            .unwrap_or_else(|e| panic!("stopping the hub: {e}"));
        std::thread::sleep(down_for);
        self.hub
            .start()
            .unwrap_or_else(|e| panic!("starting the hub again: {e}"));
        let started = Instant::now();
        docker::wait_healthy(&self.hub_name, STARTUP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        started
    }

    /// Runs `argv` in the agent's container (testcontainers' exec);
    /// returns its exit code and output.
    pub fn exec_in(&self, name: &str, argv: &[&str]) -> (i64, String) {
        use testcontainers::core::{CmdWaitFor, ExecCommand};
        let mut result = self
            .agent(name)
            .container
            .exec(
                ExecCommand::new(argv.iter().copied()).with_cmd_ready_condition(CmdWaitFor::exit()),
            )
            .unwrap_or_else(|e| panic!("exec in {name}: {e}"));
        let mut output =
            String::from_utf8_lossy(&result.stdout_to_vec().unwrap_or_default()).into_owned();
        output.push_str(&String::from_utf8_lossy(
            &result.stderr_to_vec().unwrap_or_default(),
        ));
        let code = result
            .exit_code()
            .unwrap_or_else(|e| panic!("exec in {name}: {e}"))
            .unwrap_or(-1);
        (code, output)
    }

    /// A container's log (stdout, then stderr).
    pub fn logs(&self, container: &Container<GenericImage>) -> String {
        let mut text =
            String::from_utf8_lossy(&container.stdout_to_vec().unwrap_or_default()).into_owned();
        text.push_str(&String::from_utf8_lossy(
            &container.stderr_to_vec().unwrap_or_default(),
        ));
        text
    }

    pub fn proxy_logs(&self) -> String {
        self.proxy
            .as_ref()
            .map(|p| self.logs(p))
            .unwrap_or_default()
    }

    pub fn hub_logs(&self) -> String {
        self.logs(&self.hub)
    }

    pub fn agent_logs(&self, name: &str) -> String {
        self.logs(&self.agent(name).container)
    }

    /// The hub container's address on the agents' network.
    pub fn hub_ip(&self) -> String {
        docker::ip_on(&self.hub_name, &self.networks[0].name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn network_names(&self) -> Vec<String> {
        self.networks.iter().map(|n| n.name.clone()).collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // The failure's evidence, before the containers go.
        let tail = |text: String| -> String {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        };
        println!(
            "--- hub {} ({}):\n{}",
            self.hub_name,
            docker::health(&self.hub_name),
            tail(self.logs(&self.hub))
        );
        if let Some(proxy) = &self.proxy {
            println!("--- proxy {}:\n{}", self.proxy_name, tail(self.logs(proxy)));
        }
        for agent in &self.agents {
            println!(
                "--- agent {} ({}):\n{}",
                agent.container_name,
                docker::health(&agent.container_name),
                tail(self.logs(&agent.container))
            );
        }
    }
}

struct AgentSettings<'a> {
    run_id: &'a str,
    prefix: &'a str,
    net: &'a str,
    edge: Option<&'a str>,
    hub_name: &'a str,
    hub_thumbprint: &'a str,
    api_key: &'a str,
    proxy_name: &'a str,
}

/// Starts one agent container configured only by environment variables,
/// as the README tells users: it registers itself with the API key on its
/// first start.
fn start_agent(settings: &AgentSettings<'_>, spec: AgentSpec) -> Result<Agent, String> {
    let container_name = format!("{}-{}", settings.prefix, spec.name);
    let network = match spec.mode {
        AgentMode::PollingBehindProxy => settings.edge.ok_or("no internal network")?,
        _ => settings.net,
    };
    let mut env: Vec<(&str, String)> = vec![
        ("RUST_LOG", "info".into()),
        ("TENTACLE_NAME", spec.name.into()),
        (
            "TENTACLE_SERVER",
            format!("https://{}:{HUB_PORT}", settings.hub_name),
        ),
        ("TENTACLE_SERVER_THUMBPRINT", settings.hub_thumbprint.into()),
        ("TENTACLE_API_KEY", settings.api_key.into()),
        // Every agent is in `app`, and alone in a role of its own name.
        ("TENTACLE_ROLES", format!("app,{}", spec.name)),
        ("TENTACLE_ENVIRONMENTS", "test".into()),
        ("TENTACLE_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL.into()),
        ("TENTACLE_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT.into()),
        ("TENTACLE_RECONNECT_INITIAL", RECONNECT_INITIAL.into()),
        (
            "TENTACLE_RECONNECT_MAX",
            format!("{}ms", RECONNECT_MAX.as_millis()),
        ),
    ];
    match spec.mode {
        AgentMode::Listening => env.extend([
            ("TENTACLE_MODE", "listening".into()),
            ("TENTACLE_PORT", AGENT_PORT.to_string()),
            ("TENTACLE_PUBLIC_HOSTNAME", container_name.clone()),
            ("TENTACLE_TRUST", settings.hub_thumbprint.into()),
        ]),
        AgentMode::Polling => env.push(("TENTACLE_MODE", "polling".into())),
        AgentMode::PollingBehindProxy => env.extend([
            ("TENTACLE_MODE", "polling".into()),
            (
                "HTTPS_PROXY",
                format!("http://{}:{PROXY_PORT}", settings.proxy_name),
            ),
        ]),
    }
    let mut request = GenericImage::new(AGENT_IMAGE, IMAGE_TAG)
        .with_wait_for(WaitFor::healthcheck())
        .with_network(network)
        .with_container_name(&container_name)
        .with_hostname(&container_name)
        .with_label(LABEL, settings.run_id)
        .with_label(OWNER_LABEL, docker::owner())
        .with_health_check(fast_probe("/usr/local/bin/tentacle"))
        .with_host_config_modifier(|config| publish(config, None))
        .with_startup_timeout(STARTUP_TIMEOUT);
    for (name, value) in env {
        request = request.with_env_var(name, value);
    }
    let container = request.start().map_err(|e| {
        format!(
            "starting {}: {}",
            spec.name,
            container_error(&container_name, e)
        )
    })?;
    Ok(Agent {
        spec,
        container_name,
        network: network.to_owned(),
        container,
    })
}

/// The image's own probe, checked every half second instead of every 10 s
/// so that waiting for health takes the time the process needs.
fn fast_probe(binary: &str) -> Healthcheck {
    Healthcheck::cmd([binary, "probe"])
        .with_interval(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(3))
        .with_retries(3)
        .with_start_period(Duration::from_secs(30))
}

/// Publishes `port` on 127.0.0.1 only (a free host port), or nothing:
/// testcontainers would otherwise publish every exposed port on all
/// interfaces.
fn publish(config: &mut HostConfig, port: Option<u16>) {
    config.publish_all_ports = Some(false);
    config.port_bindings = Some(
        port.map(|port| {
            HashMap::from([(
                format!("{port}/tcp"),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                }]),
            )])
        })
        .unwrap_or_default(),
    );
}

/// A start error, with the container's log when it still exists.
fn container_error(name: &str, error: testcontainers::TestcontainersError) -> String {
    let logs = Command::new("docker")
        .args(["logs", "--tail", "40", name])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    format!("{error}\n{logs}")
}

fn hub_cli_in(home: &Path, args: &[&str], timeout: Duration) -> Result<Output, String> {
    run_bounded(
        Command::new(crate::bin("tentacle-hub"))
            .arg("--home")
            .arg(home)
            .args(args),
        timeout,
    )
}

/// The hub container runs as the image's user (10001) on a home made on the
/// host. As root, the home is handed to that user, so the image runs as
/// shipped; the host's root CLI still reads it. Otherwise the container
/// runs as the host's user instead (the image works under any uid), since
/// an unprivileged host user cannot chown, and loosening the key's mode
/// would be the wrong fix. Returns the `--user` to run the hub with, if any.
fn hand_home_to_the_image_user(home: &Path) -> Option<String> {
    if nix::unistd::geteuid().is_root() {
        let chown = |path: &Path| {
            std::os::unix::fs::chown(path, Some(IMAGE_UID), Some(IMAGE_UID))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        };
        chown(home);
        for entry in std::fs::read_dir(home).expect("the hub home").flatten() {
            chown(&entry.path());
        }
        None
    } else {
        Some(format!(
            "{}:{}",
            nix::unistd::getuid(),
            nix::unistd::getgid()
        ))
    }
}
