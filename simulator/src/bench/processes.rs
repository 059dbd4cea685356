//! Tentacle as users run it, for the bench: a listening agent in a process
//! of its own, in a fresh home, and the `tentacle-hub` operator CLI in a new
//! process per call. The binaries are the ones beside this one (`cargo
//! build --release --bins` puts them there).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::local::{NotListening, free_port, wait_until_listening};

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
    }
}
