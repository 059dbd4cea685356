//! One etcd member for the rows across hub nodes: Debian's `/usr/bin/etcd`
//! as a child process on two free loopback ports, its data and log in a
//! temporary directory, killed (and the directory removed) when dropped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::local::{forget_group, track_group};

/// Where Debian's `etcd-server` puts the program.
pub const ETCD: &str = "/usr/bin/etcd";
/// The rows' reason when it is not there.
pub const NOT_INSTALLED: &str = "etcd not installed (apt-get install etcd-server)";

/// How long the member may take to elect itself and answer `/health`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the member did not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd exited with {status} before it was healthy; its log ends: {log}")]
    Exited { status: String, log: String },
    #[error("etcd was not healthy after {START_TIMEOUT:?}; its log ends: {log}")]
    TimedOut { log: String },
}

/// A running single-member etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client_port: u16,
    log: PathBuf,
    // Last: removed after the process is killed.
    _dir: tempfile::TempDir,
}

/// Whether the program is installed.
pub fn installed() -> bool {
    Path::new(ETCD).is_file()
}

impl Etcd {
    /// Starts a member with its data under a new directory in `parent` and
    /// waits until it is healthy (blocking).
    pub fn start(parent: &Path) -> Result<Self, EtcdError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| EtcdError::Io { what, source }
        };
        let dir = tempfile::Builder::new()
            .prefix("etcd-")
            .tempdir_in(parent)
            .map_err(io("making etcd's directory"))?;
        // Both bound at once, so they differ.
        let listeners = [0; 2].map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)));
        let mut ports = Vec::with_capacity(2);
        for listener in listeners {
            let port = listener
                .and_then(|l| l.local_addr())
                .map_err(io("finding a free loopback port"))?
                .port();
            ports.push(port);
        }
        let (client_port, peer_port) = (ports[0], ports[1]);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(io("creating etcd's log"))?;
        let mut command = Command::new(ETCD);
        // etcd reads ETCD_* variables as flags: one in the bench's
        // environment would change this member or clash with a flag.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|n| n.starts_with("ETCD")) {
                command.env_remove(name);
            }
        }
        command
            .process_group(0)
            .args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args([
                "--initial-cluster-token",
                &format!("tentacle-bench-{}", uuid::Uuid::new_v4().simple()),
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("etcd's log"))?)
            .stderr(log);
        let child = command.spawn().map_err(io("starting /usr/bin/etcd"))?;
        track_group(child.id());
        let mut etcd = Self {
            child,
            client_port,
            log: log_path,
            _dir: dir,
        };
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    /// `127.0.0.1:PORT`, as the hub's etcd settings take it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn wait_healthy(&mut self) -> Result<(), EtcdError> {
        let started = Instant::now();
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        while !healthy(address) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EtcdError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(EtcdError::TimedOut {
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

/// Whether `GET /health` says the member has a leader.
fn healthy(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut reply);
    String::from_utf8_lossy(&reply).contains(r#""health":"true""#)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        forget_group(self.child.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_starts_answers_and_is_gone_when_dropped() {
        if !installed() {
            eprintln!("SKIPPED: {NOT_INSTALLED}");
            return;
        }
        let parent = tempfile::tempdir().expect("tempdir");
        let etcd = Etcd::start(parent.path()).expect("etcd starts");
        let address: SocketAddr = etcd.endpoint().parse().expect("an address");
        assert!(healthy(address));
        drop(etcd);
        assert!(!healthy(address), "killed with its owner");
        let left = std::fs::read_dir(parent.path()).expect("dir").count();
        assert_eq!(left, 0, "its directory went with it");
    }

    #[test]
    fn nothing_listening_is_not_healthy() {
        let port = super::super::local::free_port().expect("a port");
        assert!(!healthy(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
    }
}
