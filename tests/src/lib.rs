//! Helpers for the end-to-end tests: start the real `tentacle` binary in a
//! temporary home, and make clients with their own identities.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the
//! README's test command does that.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_proto::{Identity, Thumbprint};
use tentacle_sim::client::AgentClient;

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
    pub address: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    /// Creates an instance that trusts `trusted`, with `extra` settings
    /// appended to tentacle.toml, and starts it on a free loopback port.
    pub fn start(trusted: &[Thumbprint], extra_config: &str) -> Self {
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
            let mut text = std::fs::read_to_string(&path).expect("config");
            text = merge_toml(&text, extra_config);
            std::fs::write(&path, text).expect("write config");
        }
        let mut agent = Self {
            home,
            thumbprint,
            address: "127.0.0.1:0".parse().expect("addr"),
            child: None,
            log: Arc::default(),
        };
        agent.spawn();
        agent
    }

    /// Starts the process again in the same home (after [`Self::kill`]).
    pub fn spawn(&mut self) {
        let mut child = Command::new(bin("tentacle"))
            .arg("--home")
            .arg(self.home.path())
            .arg("run")
            .env("RUST_LOG", "info")
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
                    let _ = tx.send(address);
                }
                log.lock().expect("log").push(line);
            }
        });
        self.child = Some(child);
        self.address = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("agent did not start listening; log:\n{}", self.log_text()));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    pub fn target(&self) -> ListeningAddress {
        ListeningAddress::new(self.address.ip().to_string(), self.address.port())
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
            &tentacle_sim::client::FollowSettings::default(),
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
    fn finds_the_listening_address() {
        let line = "2026-11-24T05:30:00Z  INFO tentacle_agent::runtime: listening address=127.0.0.1:4321 thumbprint=ab";
        assert_eq!(listening_address(line), "127.0.0.1:4321".parse().ok());
    }
}
