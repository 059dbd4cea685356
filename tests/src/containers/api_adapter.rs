//! testcontainers 0.27.3 talks to Docker through bollard 0.20, which asks for
//! Engine API 1.52 on every request and never negotiates; an engine that
//! tops out at an older version (Debian 12's docker.io 20.10 serves 1.41)
//! answers every such request with 400 "client version 1.52 is too new".
//! testcontainers reads the engine's address only from `DOCKER_HOST` when
//! it first connects, and the workspace forbids the `unsafe` that setting
//! an environment variable in a running process now takes.
//!
//! So, when the engine is older, a scenario runs in a child process of this
//! test binary (`<test> --exact`) whose `DOCKER_HOST` is a Unix socket served
//! here: each connection's request line is rewritten from `/v1.52/` to the
//! engine's version and then passed through byte for byte. The engine
//! ignores the request fields it does not know, and every field these tests
//! use exists in 1.41. With an engine of 1.52 or later none of this runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::CHILD_ENV;

/// The Engine API version bollard (under testcontainers) asks for.
pub fn client_version() -> (u32, u32) {
    let version = testcontainers::bollard::API_DEFAULT_VERSION;
    (
        u32::try_from(version.major_version).unwrap_or(u32::MAX),
        u32::try_from(version.minor_version).unwrap_or(u32::MAX),
    )
}

/// Where the real engine is.
#[derive(Debug, Clone)]
enum Upstream {
    Unix(PathBuf),
    Tcp(String),
}

impl Upstream {
    fn from_env() -> Result<Self, String> {
        match std::env::var("DOCKER_HOST") {
            Err(_) => Ok(Self::Unix("/var/run/docker.sock".into())),
            Ok(host) if host.is_empty() => Ok(Self::Unix("/var/run/docker.sock".into())),
            Ok(host) => {
                if let Some(path) = host.strip_prefix("unix://") {
                    Ok(Self::Unix(path.into()))
                } else if let Some(address) = host.strip_prefix("tcp://") {
                    if std::env::var_os("DOCKER_TLS_VERIFY").is_some() {
                        return Err(format!(
                            "DOCKER_HOST={host} with TLS is not supported by the API adapter"
                        ));
                    }
                    Ok(Self::Tcp(address.to_owned()))
                } else {
                    Err(format!("DOCKER_HOST={host} is not unix:// or tcp://"))
                }
            }
        }
    }

    fn connect(&self) -> std::io::Result<Stream> {
        match self {
            Self::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Self::Tcp(address) => TcpStream::connect(address).map(Stream::Tcp),
        }
    }
}

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Self> {
        match self {
            Self::Unix(s) => s.try_clone().map(Self::Unix),
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

/// A running adapter; stops and removes its socket when dropped.
#[derive(Debug)]
struct Adapter {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
}

impl Adapter {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    fn start(engine: (u32, u32)) -> Result<Self, String> {
        let upstream = Upstream::from_env()?;
        let dir = tempfile::Builder::new()
            .prefix("tentacle-docker-api.")
            .tempdir()
            .map_err(|error| format!("a directory for the API adapter's socket: {error}"))?;
        let listener = UnixListener::bind(dir.path().join("docker.sock"))
            .map_err(|error| format!("binding the API adapter's socket: {error}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let _ = relay(client, &upstream, engine);
                });
            }
        });
        Ok(Self { dir, stop })
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(self.socket());
    }
}

/// One connection: rewrite the request head, then pass bytes both ways.
fn relay(client: UnixStream, upstream: &Upstream, engine: (u32, u32)) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let end = line == "\r\n" || line == "\n";
        lines.push(line);
        if end {
            break;
        }
        if lines.len() > 200 {
            return Err(std::io::Error::other("request head too long"));
        }
    }
    let head = rewrite_head(&lines, engine);
    let mut server = upstream.connect()?;
    server.write_all(head.as_bytes())?;
    // Whatever of the body the reader already buffered.
    server.write_all(reader.buffer())?;
    let mut to_server = server.try_clone()?;
    let mut from_client = Stream::Unix(client.try_clone()?);
    let done = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_server);
        to_server.shutdown();
        from_client.shutdown();
    });
    let mut to_client = Stream::Unix(client);
    let _ = std::io::copy(&mut server, &mut to_client);
    server.shutdown();
    to_client.shutdown();
    let _ = done.join();
    Ok(())
}

/// The request head with its version lowered to the engine's and, unless
/// it upgrades the connection (exec, attach), `Connection: close`, so that
/// every request has a connection (and a rewrite) of its own.
fn rewrite_head(lines: &[String], engine: (u32, u32)) -> String {
    let mut out = String::new();
    let upgrade = lines
        .iter()
        .skip(1)
        .any(|l| l.to_ascii_lowercase().starts_with("upgrade:"));
    for (index, line) in lines.iter().enumerate() {
        if index == 0 {
            out.push_str(&rewrite_request_line(line, engine));
        } else if line == "\r\n" || line == "\n" {
            if !upgrade {
                out.push_str("Connection: close\r\n");
            }
            out.push_str(line);
        } else if !upgrade && line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        } else {
            out.push_str(line);
        }
    }
    out
}

/// `POST /v1.52/containers/create HTTP/1.1` → `POST /v1.41/…` when the
/// engine's version is lower than the one asked for.
fn rewrite_request_line(line: &str, engine: (u32, u32)) -> String {
    let mut parts = line.splitn(3, ' ');
    let (Some(method), Some(target), Some(rest)) = (parts.next(), parts.next(), parts.next())
    else {
        return line.to_owned();
    };
    let Some(versioned) = target.strip_prefix("/v") else {
        return line.to_owned();
    };
    let Some((version, path)) = versioned.split_once('/') else {
        return line.to_owned();
    };
    match super::docker::parse_version(version) {
        Some(asked) if asked > engine => {
            format!("{method} /v{}.{}/{path} {rest}", engine.0, engine.1)
        }
        _ => line.to_owned(),
    }
}

/// How long one scenario may run in its child process.
const CHILD_TIMEOUT: Duration = Duration::from_secs(8 * 60);

/// Runs the test `test` (its libtest name) in a child process of this test
/// binary, through an adapter for an engine that speaks `engine`; panics
/// when it fails. Its stdout goes through this test's (captured) output,
/// its stderr straight to ours.
pub(crate) fn run_in_child(test: &str, run_id: &str, engine: (u32, u32)) {
    let adapter = Adapter::start(engine).unwrap_or_else(|error| panic!("{test}: {error}"));
    let exe = std::env::current_exe().expect("the test executable");
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, run_id)
        .env(
            "DOCKER_HOST",
            format!("unix://{}", adapter.socket().display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|error| panic!("{test}: starting its child process: {error}"));
    let stdout = child.stdout.take().expect("piped stdout");
    // Spawned threads share the test's output capture.
    let echo = std::thread::spawn(move || {
        let mut ran = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            ran |= line.starts_with("test result: ok. 1 passed");
            println!("{line}");
        }
        ran
    });
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let passed = echo.join().unwrap_or(false);
    drop(adapter);
    match status {
        None => panic!(
            "{test}: its child process did not finish within {}s and was killed",
            CHILD_TIMEOUT.as_secs()
        ),
        Some(status) if status.success() && passed => {}
        Some(status) if status.success() => {
            panic!("{test}: its child process ran no test named {test} (its output is above)")
        }
        Some(status) => {
            panic!("{test}: failed in its child process ({status}); its output is above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_the_version_of_the_request_line() {
        assert_eq!(
            rewrite_request_line("POST /v1.52/containers/create?name=a HTTP/1.1\r\n", (1, 41)),
            "POST /v1.41/containers/create?name=a HTTP/1.1\r\n"
        );
        assert_eq!(
            rewrite_request_line("GET /v1.40/version HTTP/1.1\r\n", (1, 41)),
            "GET /v1.40/version HTTP/1.1\r\n"
        );
        assert_eq!(
            rewrite_request_line("GET /_ping HTTP/1.1\r\n", (1, 41)),
            "GET /_ping HTTP/1.1\r\n"
        );
    }

    #[test]
    fn closes_each_connection_unless_it_upgrades() {
        let head: Vec<String> = [
            "GET /v1.52/info HTTP/1.1\r\n",
            "Host: d\r\n",
            "connection: keep-alive\r\n",
            "\r\n",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(
            rewrite_head(&head, (1, 41)),
            "GET /v1.41/info HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        );
        let upgrade: Vec<String> = [
            "POST /v1.52/exec/x/start HTTP/1.1\r\n",
            "Connection: Upgrade\r\n",
            "Upgrade: tcp\r\n",
            "\r\n",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(
            rewrite_head(&upgrade, (1, 41)),
            "POST /v1.41/exec/x/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n"
        );
    }
}
