//! OpenSSH as the peer: an `sshd` on a loopback port with key
//! authentication only, in a directory of its own, started and stopped by
//! the bench. Nothing outside that directory is read or changed, except
//! `/run/sshd`, which sshd insists on when it runs as root.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::local::{NotListening, free_port, wait_until_listening};

/// Where Debian's `openssh-server` puts the daemon.
const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the SSH rows cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "{SSHD} is missing: install OpenSSH with `sudo apt-get install openssh-server openssh-client` to measure the SSH rows"
    )]
    NoSshd,
    #[error("`{0}` is missing: install it with `sudo apt-get install openssh-client`")]
    NoClient(&'static str),
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SshError {
    let what = what.into();
    move |source| SshError::Io { what, source }
}

/// A running sshd and the client settings that reach it.
#[derive(Debug)]
pub struct Sshd {
    dir: PathBuf,
    address: SocketAddr,
    child: Child,
    master: Option<PathBuf>,
}

impl Sshd {
    /// Makes host and user keys in `dir` and starts sshd on a free loopback
    /// port.
    pub fn start(dir: &Path) -> Result<Self, SshError> {
        if !Path::new(SSHD).is_file() {
            return Err(SshError::NoSshd);
        }
        for tool in ["ssh", "scp", "ssh-keygen"] {
            if which(tool).is_none() {
                return Err(SshError::NoClient(tool));
            }
        }
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        for key in ["host_key", "id"] {
            let path = dir.join(key);
            if !path.exists() {
                run(Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&path))?;
            }
        }
        std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))
            .map_err(io("writing authorized_keys"))?;
        if nix::unistd::geteuid().is_root() {
            std::fs::create_dir_all("/run/sshd").map_err(io("creating /run/sshd"))?;
        }
        let port = free_port().map_err(io("finding a free loopback port"))?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {keys}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPidFile {pid}\nPermitRootLogin prohibit-password\n\
                 MaxStartups 100:30:200\nMaxSessions 100\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n",
                host = dir.join("host_key").display(),
                keys = dir.join("authorized_keys").display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )
        .map_err(io("writing sshd_config"))?;
        let child = Command::new(SSHD)
            // Its own process group, like every ssh below: the daemonized
            // ControlMaster and sshd come and go without touching the
            // caller's group and its job control.
            .process_group(0)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).map_err(io("sshd.log"))?)
            .spawn()
            .map_err(io(format!("starting {SSHD}")))?;
        super::local::track_group(child.id());
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut sshd = Self {
            dir: dir.to_owned(),
            address,
            child,
            master: None,
        };
        match wait_until_listening(address, &mut sshd.child, START_TIMEOUT) {
            Ok(()) => {}
            Err(NotListening::Exited(status)) => {
                let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
                return Err(SshError::Failed {
                    what: format!("{SSHD} ({status})"),
                    detail: log.trim().to_owned(),
                });
            }
            Err(NotListening::TimedOut) => {
                return Err(SshError::Failed {
                    what: SSHD.to_owned(),
                    detail: format!("not listening on {address} after {START_TIMEOUT:?}"),
                });
            }
        }
        // One login proves the keys work before anything is timed.
        sshd.exec("true", false)?;
        Ok(sshd)
    }

    fn common(&self, command: &mut Command, port_flag: &str) {
        command
            .process_group(0)
            .arg("-i")
            .arg(self.dir.join("id"))
            .args([port_flag, &self.address.port().to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .stdin(Stdio::null());
    }

    /// Opens a ControlMaster connection that later `exec(.., true)` calls
    /// share.
    pub fn open_master(&mut self) -> Result<(), SshError> {
        let socket = self.dir.join("master.sock");
        let mut command = Command::new("ssh");
        self.common(&mut command, "-p");
        command.args(["-M", "-S"]).arg(&socket).args([
            "-o",
            "ControlPersist=yes",
            "-f",
            "-N",
            "127.0.0.1",
        ]);
        run(&mut command)?;
        self.master = Some(socket);
        Ok(())
    }

    /// `ssh 127.0.0.1 COMMAND`, through the master connection when `shared`.
    pub fn exec(&self, remote: &str, shared: bool) -> Result<String, SshError> {
        let mut command = Command::new("ssh");
        self.common(&mut command, "-p");
        if shared {
            let socket = self.master.as_ref().ok_or_else(|| SshError::Failed {
                what: "ssh".to_owned(),
                detail: "no ControlMaster connection is open".to_owned(),
            })?;
            command.arg("-S").arg(socket);
        }
        command.args(["127.0.0.1", remote]);
        run(&mut command)
    }

    /// `scp FROM 127.0.0.1:TO`.
    pub fn upload(&self, from: &Path, to: &Path) -> Result<(), SshError> {
        let mut command = Command::new("scp");
        self.common(&mut command, "-P");
        command
            .arg("-q")
            .arg(from)
            .arg(format!("127.0.0.1:{}", to.display()));
        run(&mut command).map(drop)
    }

    /// `scp 127.0.0.1:FROM TO`.
    pub fn download(&self, from: &Path, to: &Path) -> Result<(), SshError> {
        let mut command = Command::new("scp");
        self.common(&mut command, "-P");
        command
            .arg("-q")
            .arg(format!("127.0.0.1:{}", from.display()))
            .arg(to);
        run(&mut command).map(drop)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(socket) = &self.master {
            let mut command = Command::new("ssh");
            self.common(&mut command, "-p");
            command
                .arg("-S")
                .arg(socket)
                .args(["-O", "exit", "127.0.0.1"]);
            let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        super::local::forget_group(self.child.id());
    }
}

/// Runs `command` to the end; its stdout, or its stderr as the error.
fn run(command: &mut Command) -> Result<String, SshError> {
    let what = format!("{:?}", command.get_program());
    let output = command.output().map_err(io(what.clone()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(SshError::Failed {
            what: format!("{what} ({})", output.status),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}
