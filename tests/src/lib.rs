//! Helpers for the end-to-end tests: start the real `tentacle` binary in a
//! temporary home, and make clients with their own identities.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the
//! README's test command does that.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_proto::{Identity, Thumbprint};

pub mod cluster;
pub mod containers;
pub mod etcd;
pub mod fault_proxy;
pub mod registering;

/// The path of a workspace binary next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// Runs `tentacle` with `--home` and returns its stdout; panics with its
/// stderr on failure.
pub fn tentacle(home: &Path, args: &[&str]) -> String {
    let output = Command::new(bin("tentacle"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("run tentacle");
    assert!(
        output.status.success(),
        "tentacle {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A running `tentacle run` process in its own temporary home.
#[derive(Debug)]
pub struct AgentProcess {
    pub home: tempfile::TempDir,
    pub thumbprint: Thumbprint,
    /// Where it listens, when listening is enabled.
    pub address: Option<SocketAddr>,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    /// Extra global options before `run`, e.g. `--metrics-listen`.
    pub run_args: Vec<String>,
}

impl AgentProcess {
    /// Creates an instance that trusts `trusted`, with `extra` settings
    /// merged into tentacle.toml, and starts it on a free loopback port.
    pub fn start(trusted: &[Thumbprint], extra_config: &str) -> Self {
        let mut agent = Self::prepare(trusted, extra_config);
        agent.spawn();
        agent
    }

    /// Creates the instance without starting it.
    pub fn prepare(trusted: &[Thumbprint], extra_config: &str) -> Self {
        let home = tempfile::tempdir().expect("tempdir");
        tentacle(home.path(), &["create-instance"]);
        let thumbprint: Thumbprint = tentacle(home.path(), &["new-certificate"])
            .trim()
            .parse()
            .expect("new-certificate prints the thumbprint");
        let mut args = vec!["configure", "--listen-address", "127.0.0.1", "--port", "0"];
        let trusted: Vec<String> = trusted.iter().map(ToString::to_string).collect();
        for t in &trusted {
            args.extend(["--trust", t.as_str()]);
        }
        tentacle(home.path(), &args);
        if !extra_config.is_empty() {
            let path = home.path().join("tentacle.toml");
            let text = std::fs::read_to_string(&path).expect("config");
            std::fs::write(&path, merge_toml(&text, extra_config)).expect("write config");
        }
        Self {
            home,
            thumbprint,
            address: None,
            child: None,
            log: Arc::default(),
            env: Vec::new(),
            run_args: Vec::new(),
        }
    }

    /// Creates an instance that polls the hub at `hub_url` (pinning
    /// `hub_thumbprint`) and reconnects quickly, without starting it.
    pub fn prepare_polling(hub_url: &str, hub_thumbprint: &str) -> Self {
        let agent = Self::prepare(&[], FAST_POLLING);
        tentacle(
            agent.home(),
            &[
                "configure",
                "--mode",
                "polling",
                "--server",
                hub_url,
                "--server-thumbprint",
                hub_thumbprint,
            ],
        );
        agent
    }

    /// Merges more settings into tentacle.toml.
    pub fn configure(&self, extra_config: &str) {
        let path = self.home.path().join("tentacle.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, merge_toml(&text, extra_config)).expect("write config");
    }

    /// The agent id hubs address this instance by.
    pub fn agent_id(&self) -> String {
        let text = std::fs::read_to_string(self.home.path().join("tentacle.toml")).expect("config");
        let config: toml::Table = text.parse().expect("toml");
        config
            .get("polling")
            .and_then(|p| p.get("agent_id"))
            .and_then(|v| v.as_str())
            .expect("create-instance sets an agent id")
            .to_owned()
    }

    /// Starts the process (again, after [`Self::kill`]) and waits until it
    /// listens or, in polling-only mode, until a tunnel is open.
    pub fn spawn(&mut self) {
        let started = self.spawn_no_wait();
        let polling_only = !self.listens();
        self.address = loop {
            let event = started
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| {
                    panic!("agent did not start serving; log:\n{}", self.log_text())
                });
            if event.is_some() || polling_only {
                break event;
            }
        };
    }

    /// Starts the process without waiting for it to serve. The receiver
    /// gets the listening address, or `None` for each tunnel opened.
    pub fn spawn_no_wait(&mut self) -> std::sync::mpsc::Receiver<Option<SocketAddr>> {
        let mut child = Command::new(bin("tentacle"))
            .arg("--home")
            .arg(self.home.path())
            .args(&self.run_args)
            .arg("run")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tentacle run");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = listening_address(&line) {
                    let _ = tx.send(Some(address));
                } else if line.contains("tunnel open") {
                    let _ = tx.send(None);
                }
                log.lock().expect("log").push(line);
            }
        });
        self.child = Some(child);
        rx
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    fn listens(&self) -> bool {
        let text =
            std::fs::read_to_string(self.home.path().join("tentacle.toml")).unwrap_or_default();
        let config: toml::Table = text.parse().unwrap_or_default();
        config
            .get("listen")
            .and_then(|l| l.get("enabled"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
    }

    pub fn target(&self) -> ListeningAddress {
        let address = self.address.expect("the agent listens");
        ListeningAddress::new(address.ip().to_string(), address.port())
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Everything the agent wrote to stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Connects a client with `identity`.
    pub async fn client(&self, identity: &Identity) -> AgentClient {
        AgentClient::connect_listening(
            &self.target(),
            self.thumbprint,
            identity,
            &DialSettings::default(),
        )
        .await
        .expect("connect to the agent")
    }

    /// SIGKILLs the agent (no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).ok()?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pulls `ADDR` out of the agent's `listening address=ADDR` log line.
fn listening_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening") {
        return None;
    }
    let rest = &line[line.find("address=")? + "address=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Overlays the keys of `extra` on `base`, table by table.
fn merge_toml(base: &str, extra: &str) -> String {
    fn overlay(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(existing)), toml::Value::Table(more)) => {
                    overlay(existing, more)
                }
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut merged: toml::Table = base.parse().expect("base config is TOML");
    overlay(&mut merged, extra.parse().expect("extra config is TOML"));
    merged.to_string()
}

/// A fresh client identity.
pub fn client_identity() -> Identity {
    Identity::generate("Tentacle test client").expect("generate identity")
}

/// Whether a process with this pid still exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// A start request for a bash script under a fresh ticket.
pub fn bash(script: &str) -> tentacle_proto::v1::StartScriptRequest {
    tentacle_proto::v1::StartScriptRequest {
        ticket: format!("t-{}", uuid::Uuid::new_v4().simple()),
        script_body: script.to_owned(),
        ..Default::default()
    }
}

/// Runs a script to its end and returns every line and the exit code.
pub async fn run_to_end(
    client: &AgentClient,
    request: tentacle_proto::v1::StartScriptRequest,
) -> (Vec<tentacle_proto::v1::LogLine>, i32) {
    let mut lines = Vec::new();
    let end = client
        .run_script(
            request,
            |line| lines.push(line.clone()),
            &tokio_util::sync::CancellationToken::new(),
            &tentacle_hub::client::FollowSettings::default(),
        )
        .await
        .expect("script runs to its end");
    (lines, end.exit_code)
}

/// The text of the lines from one stream.
pub fn texts(
    lines: &[tentacle_proto::v1::LogLine],
    stream: tentacle_proto::v1::LogStream,
) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.stream == stream as i32)
        .map(|l| l.text.clone())
        .collect()
}

/// A `tentacle-hub` home with its own certificate.
#[derive(Debug)]
pub struct HubHome(pub tempfile::TempDir, pub Vec<(String, String)>);

impl HubHome {
    pub fn new() -> Self {
        let home = Self(tempfile::tempdir().expect("tempdir"), Vec::new());
        assert!(home.run(&["new-certificate"]).status.success());
        home
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_binary("tentacle-hub", args)
    }

    /// Runs `tentacle-sim` with this home (the fleet and scenario verbs
    /// take their operator identity and default hub thumbprint from it).
    pub fn run_sim(&self, args: &[&str]) -> Output {
        self.run_binary("tentacle-sim", args)
    }

    fn run_binary(&self, name: &str, args: &[&str]) -> Output {
        Command::new(bin(name))
            .arg("--home")
            .arg(self.0.path())
            .args(args)
            .envs(self.1.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap_or_else(|error| panic!("run {name}: {error}"))
    }

    /// `server trust add` for a polling agent under its agent id.
    pub fn trust_polling(&self, agent: &AgentProcess) {
        let thumbprint = agent.thumbprint.to_string();
        let name = agent.agent_id();
        stdout_of(&self.run(&[
            "server",
            "trust",
            "add",
            "--thumbprint",
            &thumbprint,
            "--name",
            &name,
            "--mode",
            "polling",
        ]));
    }

    pub fn thumbprint(&self) -> String {
        String::from_utf8_lossy(&self.run(&["show-thumbprint"]).stdout)
            .trim()
            .to_owned()
    }

    /// Starts `tentacle-hub server` and returns it with its address.
    pub fn serve(&self) -> (Child, SocketAddr) {
        self.serve_on("127.0.0.1:0")
    }

    /// Starts `tentacle-hub server --listen ADDR`.
    pub fn serve_on(&self, listen: &str) -> (Child, SocketAddr) {
        let mut child = Command::new(bin("tentacle-hub"))
            .arg("--home")
            .arg(self.0.path())
            .args(["server", "--listen", listen])
            .envs(self.1.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the hub");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("hub listening")
                    && let Some(rest) = line.split("address=").nth(1)
                    && let Some(address) =
                        rest.split_whitespace().next().and_then(|a| a.parse().ok())
                {
                    let _ = tx.send(address);
                }
            }
        });
        let address = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the hub started");
        (child, address)
    }
}

impl Default for HubHome {
    fn default() -> Self {
        Self::new()
    }
}

/// The local (source) addresses of established TCP connections to `port`
/// on this machine, from /proc/net/tcp{,6}: one entry per connection.
pub fn established_sources_to(port: u16) -> Vec<std::net::IpAddr> {
    let needle = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st: 01 is ESTABLISHED.
            if fields.len() <= 3 || !fields[2].ends_with(&needle) || fields[3] != "01" {
                return None;
            }
            proc_net_address(fields[1].split(':').next()?)
        })
        .collect()
}

/// An address as /proc/net/tcp prints it: 32-bit words in host (little
/// endian) order, as hex.
fn proc_net_address(hex: &str) -> Option<std::net::IpAddr> {
    let words: Vec<u32> = hex
        .as_bytes()
        .chunks(8)
        .map(|w| u32::from_str_radix(std::str::from_utf8(w).ok()?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()),
        16 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            Some(std::net::Ipv6Addr::from(octets).into())
        }
        _ => None,
    }
}

/// The trimmed stdout of a command that must succeed.
pub fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The body of `GET http://127.0.0.1:PORT/PATH`, if it answers 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200");
    ok.then(|| body.to_owned())
}

/// The value of one sample line (`name{labels} value`) in Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(sample) && line[sample.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Runs `tentacle --home HOME ARGS` and returns its output, pass or fail.
pub fn tentacle_output(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("tentacle"))
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .expect("run tentacle")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A hub process and registered, running agents: (name, role, listening).
pub fn start_fleet(
    sim: &HubHome,
    specs: &[(&str, &str, bool)],
) -> (std::process::Child, String, Vec<AgentProcess>) {
    let (hub, address) = sim.serve();
    let hub_url = format!("https://{address}");
    let hub_thumbprint = sim.thumbprint();
    let key = stdout_of(&sim.run(&["server", "api-key", "create"]));

    let register = |agent: &AgentProcess, name: &str, role: &str, mode: &str, port: Option<u16>| {
        let port = port.map(|p| p.to_string()).unwrap_or_default();
        let mut args = vec![
            "register-with",
            "--server",
            &hub_url,
            "--server-thumbprint",
            &hub_thumbprint,
            "--name",
            name,
            "--role",
            role,
            "--environment",
            "prod",
            "--mode",
            mode,
            "--api-key",
            &key,
        ];
        if !port.is_empty() {
            args.extend(["--public-hostname", "127.0.0.1", "--port", &port]);
        }
        let out = tentacle_output(agent.home(), &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut agents = Vec::new();
    for &(name, role, listening) in specs {
        let port = listening.then(free_port);
        let extra = port
            .map(|p| format!("[listen]\nport = {p}\n"))
            .unwrap_or_else(|| FAST_POLLING.to_owned());
        let mut agent = AgentProcess::prepare(&[], &extra);
        register(
            &agent,
            name,
            role,
            if listening { "listening" } else { "polling" },
            port,
        );
        agent.spawn();
        agents.push(agent);
    }
    (hub, hub_url, agents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_keys_into_existing_tables() {
        let merged: toml::Table =
            merge_toml("[a]\nx = 1\n[b]\ny = 2\n", "[b]\ny = 3\n[c]\nw = 4\n")
                .parse()
                .expect("toml");
        let expected: toml::Table = "[a]\nx = 1\n[b]\ny = 3\n[c]\nw = 4\n"
            .parse()
            .expect("toml");
        assert_eq!(merged, expected);
    }

    #[test]
    fn decodes_proc_net_addresses() {
        assert_eq!(
            proc_net_address("0300007F"),
            Some("127.0.0.3".parse().expect("ip"))
        );
        assert_eq!(
            proc_net_address("00000000000000000000000001000000"),
            Some("::1".parse().expect("ip"))
        );
        assert_eq!(proc_net_address("zz"), None);
    }

    #[test]
    fn finds_the_listening_address() {
        let line = "2026-11-24T05:30:00Z  INFO tentacle_agent::runtime: listening address=127.0.0.1:4321 thumbprint=ab";
        assert_eq!(listening_address(line), "127.0.0.1:4321".parse().ok());
    }
}

/// A hub running in this test process on a free loopback port.
#[derive(Debug)]
pub struct HubFixture {
    pub hub: Arc<tentacle_hub::Hub>,
    pub address: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Polling settings that make tests reconnect quickly.
pub const FAST_POLLING: &str = "[polling]\nreconnect_initial = \"100ms\"\nreconnect_max = \"1s\"\n";

impl HubFixture {
    /// Starts a hub with `identity` (its thumbprint is what agents pin).
    pub async fn start(identity: Identity) -> Self {
        Self::start_with(
            identity,
            tentacle_hub::HubSettings::default(),
            "127.0.0.1:0",
        )
        .await
    }

    pub async fn start_with(
        identity: Identity,
        settings: tentacle_hub::HubSettings,
        bind: &str,
    ) -> Self {
        Self::serve(tentacle_hub::Hub::new(identity, settings), bind).await
    }

    /// A hub that keeps its registry in `home` and takes registrations;
    /// returns it with an API key for `register-with`.
    pub async fn start_registering(identity: Identity, home: &Path) -> (Self, String) {
        Self::start_registering_with(identity, home, Default::default()).await
    }

    /// [`Self::start_registering`] with `settings`.
    pub async fn start_registering_with(
        identity: Identity,
        home: &Path,
        settings: tentacle_hub::HubSettings,
    ) -> (Self, String) {
        let store = tentacle_hub::HubStore::in_dir(home);
        let key = store
            .credentials
            .create(tentacle_hub::credentials::CredentialKind::ApiKey, None)
            .expect("api key");
        let hub = tentacle_hub::Hub::with_store(identity, settings, store).expect("hub");
        (Self::serve(hub, "127.0.0.1:0").await, key)
    }

    async fn serve(hub: Arc<tentacle_hub::Hub>, bind: &str) -> Self {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .expect("bind the hub");
        let address = listener.local_addr().expect("hub address");
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let hub = hub.clone();
            let stop = stop.clone();
            async move {
                hub.serve(listener, stop.cancelled_owned())
                    .await
                    .expect("hub serves");
            }
        });
        Self {
            hub,
            address,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    pub fn thumbprint(&self) -> Thumbprint {
        self.hub.identity().thumbprint()
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Shuts the hub down gracefully (drain) and waits for it.
    pub async fn shutdown(&mut self) {
        self.begin_shutdown();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Makes a polling agent instance for this hub, trusted by it, and
    /// starts it once its first tunnel is open.
    pub fn polling_agent(&self, extra_config: &str) -> AgentProcess {
        let mut agent = self.prepare_polling_agent(extra_config);
        self.trust(&agent);
        agent.spawn();
        agent
    }

    /// Makes a polling agent instance for this hub without trusting or
    /// starting it.
    pub fn prepare_polling_agent(&self, extra_config: &str) -> AgentProcess {
        let agent = AgentProcess::prepare_polling(&self.url(), &self.thumbprint().to_string());
        if !extra_config.is_empty() {
            agent.configure(extra_config);
        }
        agent
    }

    /// Trusts `agent` as a polling agent under its agent id.
    pub fn trust(&self, agent: &AgentProcess) {
        self.hub.trust_agent(tentacle_hub::TrustedAgent {
            thumbprint: agent.thumbprint,
            name: agent.agent_id(),
            mode: tentacle_hub::AgentMode::Polling,
            address: None,
            roles: Vec::new(),
            environments: Vec::new(),
            previous_thumbprint: None,
            retire_previous_at: None,
        });
    }

    /// A client for a polling agent of this hub.
    pub async fn client(&self, agent: &AgentProcess) -> AgentClient {
        let target: tentacle_hub::target::Target = format!("poll://{}", agent.agent_id())
            .parse()
            .expect("target");
        self.hub
            .client(&target, agent.thumbprint)
            .await
            .expect("hub client")
    }
}

impl Drop for HubFixture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How the test reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Listening,
    Polling,
}

/// A real agent process and a client for it, in either mode.
#[derive(Debug)]
pub struct Fixture {
    pub agent: AgentProcess,
    pub hub: Option<HubFixture>,
    pub client: AgentClient,
    /// The client's identity (in polling mode, also the hub's).
    pub me: Identity,
}

impl Fixture {
    pub async fn start(mode: Mode, extra_config: &str) -> Self {
        let me = client_identity();
        match mode {
            Mode::Listening => {
                let agent = AgentProcess::start(&[me.thumbprint()], extra_config);
                let client = agent.client(&me).await;
                Self {
                    agent,
                    hub: None,
                    client,
                    me,
                }
            }
            Mode::Polling => {
                let hub = HubFixture::start(me.clone()).await;
                let agent = hub.polling_agent(extra_config);
                let client = hub.client(&agent).await;
                Self {
                    agent,
                    hub: Some(hub),
                    client,
                    me,
                }
            }
        }
    }

    /// A second, independent client for the same agent.
    pub async fn reconnect(&self) -> AgentClient {
        match &self.hub {
            None => self.agent.client(&self.me).await,
            Some(hub) => hub.client(&self.agent).await,
        }
    }
}

/// Declares one `#[tokio::test]` per mode that runs `$body(mode)`.
#[macro_export]
macro_rules! in_both_modes {
    ($name:ident, $body:path) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn listening() {
                $body($crate::Mode::Listening).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn polling() {
                $body($crate::Mode::Polling).await;
            }
        }
    };
}
