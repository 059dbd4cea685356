//! A `tentacle-hub server` process for the fleet rows: a fresh home with an
//! API key, two loopback ports (tunnels, metrics) that stay the same across
//! restarts, and the connected count read from its metrics endpoint.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::child::{Group, output};
use super::parse;
use crate::bench::local::{NotListening, free_port, wait_until_listening};
use crate::bench::processes::ProcessError;

/// How long a hub gets to listen after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the connected count is read.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// The gauge every connected polling agent counts in.
const CONNECTED: &str = "tentacle_hub_connected_agents";

/// A hub's home and the loopback ports it serves on.
#[derive(Debug)]
pub struct HubHome {
    binary: PathBuf,
    pub dir: PathBuf,
    pub thumbprint: String,
    pub api_key: String,
    pub port: u16,
    pub metrics_port: u16,
}

impl HubHome {
    /// A certificate and an API key in the new directory `dir`.
    pub fn create(binary: &Path, dir: &Path) -> Result<Self, ProcessError> {
        std::fs::create_dir_all(dir).map_err(|source| ProcessError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let run = |args: &[&str]| output(Command::new(binary).arg("--home").arg(dir).args(args));
        let thumbprint = run(&["new-certificate"])?;
        let api_key = run(&["server", "api-key", "create"])?;
        let port = free_loopback_port()?;
        let mut metrics_port = free_loopback_port()?;
        while metrics_port == port {
            metrics_port = free_loopback_port()?;
        }
        Ok(Self {
            binary: binary.to_owned(),
            dir: dir.to_owned(),
            thumbprint,
            api_key,
            port,
            metrics_port,
        })
    }

    /// Where agents and operators reach it.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `tentacle-hub --home HOME`, for a verb to follow.
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--home").arg(&self.dir);
        command
    }

    /// Starts `tentacle-hub server` (default settings) and returns once it
    /// accepts connections and its metrics answer; output goes to `log`.
    pub fn start(&self, log: &Path) -> Result<Hub, ProcessError> {
        let mut process = Group::spawn(
            self.command()
                .args(["server", "--listen"])
                .arg(format!("127.0.0.1:{}", self.port))
                .arg("--metrics-listen")
                .arg(format!("127.0.0.1:{}", self.metrics_port)),
            "tentacle-hub server",
            log,
        )?;
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let failed = |detail: String| ProcessError::Failed {
            command: "tentacle-hub server".to_owned(),
            detail,
        };
        match wait_until_listening(address, process.child_mut(), START_TIMEOUT) {
            Ok(()) => {}
            Err(NotListening::Exited(status)) => {
                return Err(failed(format!(
                    "exited with {status} before it listened: {}",
                    process.log_tail()
                )));
            }
            Err(NotListening::TimedOut) => {
                return Err(failed(format!(
                    "not listening on {address} after {START_TIMEOUT:?}"
                )));
            }
        }
        let listening_at = Instant::now();
        let hub = Hub {
            process,
            metrics_port: self.metrics_port,
            listening_at,
        };
        // The metrics endpoint is bound before the tunnel port, so this is
        // at most a moment.
        while hub.connected().is_none() {
            if listening_at.elapsed() > START_TIMEOUT {
                return Err(failed(format!(
                    "no {CONNECTED} at http://127.0.0.1:{}/metrics",
                    self.metrics_port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(hub)
    }
}

fn free_loopback_port() -> Result<u16, ProcessError> {
    free_port().map_err(|source| ProcessError::Io {
        what: "finding a free loopback port".to_owned(),
        source,
    })
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    pub process: Group,
    metrics_port: u16,
    /// When it was first seen accepting connections.
    pub listening_at: Instant,
}

/// How a wait for connected agents went.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    /// (seconds since the wait's start, connected), every [`POLL_EVERY`].
    pub samples: Vec<(f64, u64)>,
    /// Seconds until the target was reached, if it was.
    pub reached: Option<f64>,
    /// Why the wait ended early, if it did.
    pub ended: Option<String>,
    /// With [`Bounds::track_hub`]: the most files the hub held open, and
    /// its VmRSS (KiB) at the sample with the most connected.
    pub hub_files_peak: Option<usize>,
    pub hub_rss_at_most: Option<u64>,
}

impl Watch {
    /// The most connected at any sample.
    pub fn most(&self) -> u64 {
        self.samples.iter().map(|s| s.1).max().unwrap_or(0)
    }
}

/// When a wait gives up.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub timeout: Duration,
    /// Give up once the count has not risen for this long.
    pub stall: Option<Duration>,
    /// Also read the hub's open files and memory at every sample (a
    /// directory listing per agent-thousand: only where it is the point).
    pub track_hub: bool,
}

impl Hub {
    /// `tentacle_hub_connected_agents` now, if the endpoint answers.
    pub fn connected(&self) -> Option<u64> {
        let text = http_get(self.metrics_port, "/metrics")?;
        parse::metric(&text, CONNECTED).map(|value| value as u64)
    }

    /// Reads the connected count every [`POLL_EVERY`] from `from` until it
    /// reaches `target`, the bounds are hit, or the hub or one of `others`
    /// exits.
    pub fn watch(
        &mut self,
        others: &mut [&mut Group],
        target: u64,
        from: Instant,
        bounds: Bounds,
    ) -> Watch {
        let mut watch = Watch::default();
        let mut most = 0;
        let mut last_rise = Instant::now();
        loop {
            let round = Instant::now();
            if let Some(count) = self.connected() {
                let at = from.elapsed().as_secs_f64();
                watch.samples.push((at, count));
                if bounds.track_hub {
                    let files = self.process.open_files();
                    watch.hub_files_peak = watch.hub_files_peak.max(files);
                }
                if count > most {
                    most = count;
                    last_rise = round;
                    if bounds.track_hub {
                        watch.hub_rss_at_most = self.process.rss_kib();
                    }
                }
                if count >= target {
                    watch.reached = Some(at);
                    return watch;
                }
            }
            let exited = std::iter::once(&mut self.process)
                .chain(others.iter_mut().map(|o| &mut **o))
                .find_map(Group::why_exited);
            if let Some(why) = exited {
                watch.ended = Some(format!("{why} ({most} of {target} connected)"));
                return watch;
            }
            if from.elapsed() >= bounds.timeout {
                watch.ended = Some(format!(
                    "{most} of {target} connected after {:.0} s",
                    bounds.timeout.as_secs_f64()
                ));
                return watch;
            }
            if let Some(stall) = bounds.stall
                && last_rise.elapsed() >= stall
            {
                watch.ended = Some(format!(
                    "{most} of {target} connected, and no more for {:.0} s",
                    stall.as_secs_f64()
                ));
                return watch;
            }
            std::thread::sleep(POLL_EVERY.saturating_sub(round.elapsed()));
        }
    }
}

/// The body of `GET http://127.0.0.1:PORT/PATH` if it answers 200 within a
/// couple of seconds.
fn http_get(port: u16, path: &str) -> Option<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.") && head.split_whitespace().nth(1) == Some("200");
    ok.then(|| body.to_owned())
}
