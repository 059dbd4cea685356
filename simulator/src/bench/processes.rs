//! Tentacle as users run it, for the bench: a listening agent in a process
//! of its own, in a fresh home, and the `tentacle-hub` operator CLI in a new
//! process per call. The binaries are the ones beside this one (`cargo
//! build --release --bins` puts them there).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::local::{NotListening, forget_group, free_port, track_group, wait_until_listening};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a Tentacle row cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "{0} is missing beside tentacle-sim; build every binary with `cargo build --release --bins`"
    )]
    Missing(PathBuf),
    #[error("`{command}` failed: {detail}")]
    Failed { command: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The directory of the running executable, where its sibling binaries are.
pub fn binaries_dir() -> Result<PathBuf, ProcessError> {
    let exe = std::env::current_exe().map_err(|source| ProcessError::Io {
        what: "finding tentacle-sim's own path".to_owned(),
        source,
    })?;
    Ok(exe.parent().map(Path::to_owned).unwrap_or_default())
}

fn binary(dir: &Path, name: &str) -> Result<PathBuf, ProcessError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ProcessError::Missing(path))
    }
}

fn output(command: &mut Command) -> Result<String, ProcessError> {
    let shown = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProcessError::Io {
            what: shown.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ProcessError::Failed {
            command: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A listening agent process and an operator home that trusts it.
#[derive(Debug)]
pub struct ListeningAgent {
    hub: PathBuf,
    operator_home: PathBuf,
    target: String,
    thumbprint: String,
    child: Child,
}

impl ListeningAgent {
    /// Makes both homes under `dir` and starts `tentacle run`.
    pub fn start(dir: &Path) -> Result<Self, ProcessError> {
        let binaries = binaries_dir()?;
        let tentacle = binary(&binaries, "tentacle")?;
        let hub = binary(&binaries, "tentacle-hub")?;
        let agent_home = dir.join("agent");
        let operator_home = dir.join("operator");
        let operator = output(
            Command::new(&hub)
                .arg("--home")
                .arg(&operator_home)
                .arg("new-certificate"),
        )?
        .trim()
        .to_owned();
        let agent = |args: &[&str]| {
            output(
                Command::new(&tentacle)
                    .arg("--home")
                    .arg(&agent_home)
                    .args(args),
            )
        };
        agent(&["create-instance"])?;
        let thumbprint = agent(&["new-certificate"])?.trim().to_owned();
        let port = free_port().map_err(|source| ProcessError::Io {
            what: "finding a free loopback port".to_owned(),
            source,
        })?;
        agent(&[
            "configure",
            "--listen-address",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--trust",
            &operator,
        ])?;
        let child = Command::new(&tentacle)
            .process_group(0)
            .arg("--home")
            .arg(&agent_home)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ProcessError::Io {
                what: format!("starting {}", tentacle.display()),
                source,
            })?;
        track_group(child.id());
        let mut started = Self {
            hub,
            operator_home,
            target: format!("https://127.0.0.1:{port}"),
            thumbprint,
            child,
        };
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match wait_until_listening(address, &mut started.child, START_TIMEOUT) {
            Ok(()) => {}
            Err(NotListening::Exited(status)) => {
                return Err(ProcessError::Failed {
                    command: "tentacle run".to_owned(),
                    detail: format!("exited with {status} before it listened"),
                });
            }
            Err(NotListening::TimedOut) => {
                return Err(ProcessError::Failed {
                    command: "tentacle run".to_owned(),
                    detail: format!("not listening on {address} after {START_TIMEOUT:?}"),
                });
            }
        }
        // The first call proves the trust both ways before anything is timed.
        started.exec("true")?;
        Ok(started)
    }

    /// The operator home the agent trusts: its identity is the bench's
    /// caller, and the hub's when the bench hosts one.
    pub fn operator_home(&self) -> &Path {
        &self.operator_home
    }

    /// `https://127.0.0.1:PORT`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The agent's certificate thumbprint.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The agent process's id, for reading its memory.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `tentacle-hub exec --script SCRIPT` against the agent: a new process
    /// and a new connection. Returns the script's output.
    pub fn exec(&self, script: &str) -> Result<String, ProcessError> {
        output(
            Command::new(&self.hub)
                .arg("--home")
                .arg(&self.operator_home)
                .args(["exec", "--target", &self.target, "--thumbprint"])
                .arg(&self.thumbprint)
                .args(["--script", script]),
        )
    }
}

impl Drop for ListeningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget_group(self.child.id());
    }
}

/// A polling agent process in a fresh home, dialling the hub at `hub_url`.
/// The hub must trust it ([`PollingAgent::agent_id`], [`PollingAgent::thumbprint`])
/// before the agent's tunnel is accepted.
#[derive(Debug)]
pub struct PollingAgent {
    home: PathBuf,
    agent_id: String,
    thumbprint: String,
    child: Option<Child>,
}

impl PollingAgent {
    /// Makes the home under `dir` without starting the agent.
    pub fn prepare(dir: &Path, hub_url: &str, hub_thumbprint: &str) -> Result<Self, ProcessError> {
        let tentacle = binary(&binaries_dir()?, "tentacle")?;
        let home = dir.to_owned();
        let agent =
            |args: &[&str]| output(Command::new(&tentacle).arg("--home").arg(&home).args(args));
        agent(&["create-instance"])?;
        let thumbprint = agent(&["new-certificate"])?.trim().to_owned();
        agent(&[
            "configure",
            "--mode",
            "polling",
            "--server",
            hub_url,
            "--server-thumbprint",
            hub_thumbprint,
        ])?;
        let agent_id = read_agent_id(&home.join("tentacle.toml"))?;
        Ok(Self {
            home,
            agent_id,
            thumbprint,
            child: None,
        })
    }

    /// Starts `tentacle run`; the tunnel opens once the hub trusts it.
    pub fn start(&mut self) -> Result<(), ProcessError> {
        let tentacle = binary(&binaries_dir()?, "tentacle")?;
        let child = Command::new(&tentacle)
            .process_group(0)
            .arg("--home")
            .arg(&self.home)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ProcessError::Io {
                what: format!("starting {}", tentacle.display()),
                source,
            })?;
        track_group(child.id());
        self.child = Some(child);
        Ok(())
    }

    /// The id it opens tunnels as (`poll://ID`).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }
}

impl Drop for PollingAgent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
            forget_group(child.id());
        }
    }
}

fn read_agent_id(config: &Path) -> Result<String, ProcessError> {
    let text = std::fs::read_to_string(config).map_err(|source| ProcessError::Io {
        what: format!("reading {}", config.display()),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|error| ProcessError::Failed {
        command: format!("reading {}", config.display()),
        detail: format!("{error}"),
    })?;
    table
        .get("polling")
        .and_then(|polling| polling.get("agent_id"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ProcessError::Failed {
            command: format!("reading {}", config.display()),
            detail: "no [polling] agent_id; `tentacle create-instance` sets one".to_owned(),
        })
}

/// `tentacle-hub server` in a process of its own, from `home` (whose
/// identity is also the bench's operator), trusting one polling agent.
#[derive(Debug)]
pub struct HubProcess {
    url: String,
    child: Child,
}

impl HubProcess {
    /// Starts it on loopback `port` (the agent was prepared with that URL).
    pub fn start_on(home: &Path, agent: &PollingAgent, port: u16) -> Result<Self, ProcessError> {
        let hub = binary(&binaries_dir()?, "tentacle-hub")?;
        output(
            Command::new(&hub)
                .arg("--home")
                .arg(home)
                .args(["server", "trust", "add", "--thumbprint"])
                .arg(agent.thumbprint())
                .args(["--name", agent.agent_id(), "--mode", "polling"]),
        )?;
        let child = Command::new(&hub)
            .process_group(0)
            .arg("--home")
            .arg(home)
            .args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ProcessError::Io {
                what: format!("starting {}", hub.display()),
                source,
            })?;
        track_group(child.id());
        let mut started = Self {
            url: format!("https://127.0.0.1:{port}"),
            child,
        };
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match wait_until_listening(address, &mut started.child, START_TIMEOUT) {
            Ok(()) => Ok(started),
            Err(NotListening::Exited(status)) => Err(ProcessError::Failed {
                command: "tentacle-hub server".to_owned(),
                detail: format!("exited with {status} before it listened"),
            }),
            Err(NotListening::TimedOut) => Err(ProcessError::Failed {
                command: "tentacle-hub server".to_owned(),
                detail: format!("not listening on {address} after {START_TIMEOUT:?}"),
            }),
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget_group(self.child.id());
    }
}
