//! The few Docker actions testcontainers does not offer (create an
//! `--internal` network, connect and disconnect a running container, SIGKILL
//! a container, read its health), through the `docker` CLI, and bounded
//! command runs in general.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{LABEL, OWNER_LABEL};

/// Who owns what this process creates: `host:pid`, so a later run on this
/// host can tell a dead run's leftovers from a live run's containers.
pub(crate) fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    format!("{host}:{}", std::process::id())
}

/// Runs `command` to its end, killing it after `timeout`.
pub(crate) fn run_bounded(command: &mut Command, timeout: Duration) -> Result<Output, String> {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("{what}: {error}"))?;
    // Drain both pipes while waiting, so a chatty command cannot block on a
    // full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stdout.read_to_end(&mut buffer);
        buffer
    });
    let err = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stderr.read_to_end(&mut buffer);
        buffer
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not finish within {}",
                    humanize(timeout)
                ));
            }
            Err(error) => return Err(format!("{what}: {error}")),
        }
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

pub(crate) fn humanize(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// `docker ARGS`, bounded; `Err` with its stderr when it fails.
pub(crate) fn docker(args: &[&str]) -> Result<String, String> {
    let output = run_bounded(Command::new("docker").args(args), Duration::from_secs(60))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The engine's API version (`major.minor`), or why it cannot be reached.
pub(crate) fn engine_api_version() -> Result<(u32, u32), String> {
    let output = run_bounded(
        Command::new("docker").args(["version", "--format", "{{.Server.APIVersion}}"]),
        Duration::from_secs(20),
    )
    .map_err(|error| format!("the Docker engine cannot be reached: {error}"))?;
    let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || text.is_empty() {
        return Err(format!(
            "the Docker engine cannot be reached (`docker version` failed: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse_version(&text).ok_or_else(|| format!("`docker version` printed no API version: {text}"))
}

/// `1.41` → (1, 41).
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

pub(crate) fn image_exists(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image]).is_ok()
}

/// A Docker network this test created, removed when dropped (after the
/// containers on it, which are declared before it).
#[derive(Debug)]
pub struct Network {
    pub name: String,
}

impl Network {
    /// `docker network create`, labelled with the run so a sweep finds it.
    pub(crate) fn create(name: &str, run_id: &str, internal: bool) -> Result<Self, String> {
        let label = format!("{LABEL}={run_id}");
        let owner = format!("{OWNER_LABEL}={}", owner());
        let mut args = vec!["network", "create", "--label", &label, "--label", &owner];
        if internal {
            args.push("--internal");
        }
        args.push(name);
        docker(&args)?;
        Ok(Self {
            name: name.to_owned(),
        })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Err(error) = docker(&["network", "rm", &self.name]) {
            eprintln!(
                "containers: could not remove network {}: {error}",
                self.name
            );
        }
    }
}

/// Removes every container and network labelled with `run_id`; returns
/// what it found (nothing, when the guards did their job).
pub(crate) fn sweep(run_id: &str) -> Vec<String> {
    let filter = format!("label={LABEL}={run_id}");
    let mut removed = Vec::new();
    if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
        for id in ids.split_whitespace() {
            if docker(&["rm", "-f", "-v", id]).is_ok() {
                removed.push(format!("container {id}"));
            }
        }
    }
    if let Ok(ids) = docker(&["network", "ls", "-q", "--filter", &filter]) {
        for id in ids.split_whitespace() {
            if docker(&["network", "rm", id]).is_ok() {
                removed.push(format!("network {id}"));
            }
        }
    }
    removed
}

/// Removes the containers and networks of test processes on this host
/// that died without cleaning up (killed, or interrupted with Ctrl-C: no
/// destructor runs then); returns what it removed.
pub(crate) fn sweep_abandoned() -> Vec<String> {
    let (host, _) = owner()
        .rsplit_once(':')
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .unwrap_or_default();
    let dead = |owner: &str| -> bool {
        match owner.rsplit_once(':') {
            Some((h, pid)) if h == host => pid
                .parse::<i32>()
                .is_ok_and(|pid| !crate::process_alive(pid)),
            _ => false,
        }
    };
    let filter = format!("label={LABEL}");
    let format = format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    let mut removed = Vec::new();
    for (list, remove, kind) in [
        (vec!["ps", "-a"], vec!["rm", "-f", "-v"], "container"),
        (vec!["network", "ls"], vec!["network", "rm"], "network"),
    ] {
        let mut args = list.clone();
        args.extend(["--filter", &filter, "--format", &format]);
        let Ok(listed) = docker(&args) else { continue };
        for line in listed.lines() {
            let mut fields = line.split_whitespace();
            let (Some(id), Some(owner)) = (fields.next(), fields.next()) else {
                continue;
            };
            if dead(owner) {
                let mut args = remove.clone();
                args.push(id);
                if docker(&args).is_ok() {
                    removed.push(format!("{kind} {id} (of {owner})"));
                }
            }
        }
    }
    removed
}

/// The container's health as Docker reports it (`starting`, `healthy`,
/// `unhealthy`), or its state when it has stopped.
pub(crate) fn health(container: &str) -> String {
    docker(&[
        "inspect",
        "--format",
        "{{if .State.Running}}{{if .State.Health}}{{.State.Health.Status}}{{else}}running{{end}}{{else}}{{.State.Status}}{{end}}",
        container,
    ])
    .unwrap_or_else(|error| error)
}

/// Waits until Docker reports `container` healthy.
pub(crate) fn wait_healthy(container: &str, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let status = health(container);
        if status == "healthy" {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{container} is not healthy after {} (status: {status})",
                humanize(timeout)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The container's IPv4 address on `network`.
pub(crate) fn ip_on(container: &str, network: &str) -> Result<String, String> {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    docker(&["inspect", "--format", &format, container])
}
