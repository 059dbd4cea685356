//! Row 13: a real agent's footprint: the idle RSS of a listening `tentacle
//! run`, and the size of its stripped binary.
//!
//! The agent is started here rather than through
//! [`crate::bench::processes::ListeningAgent`], which neither shows its pid
//! nor takes its binaries from `$TENTACLE_BENCH_BIN_DIR`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::child::{Group, output};
use super::{Rows, failed};
use crate::bench::MB;
use crate::bench::local::{NotListening, free_port, wait_until_listening};
use crate::bench::processes::ProcessError;

pub const ROWS: [&str; 2] = ["agent-idle-rss", "agent-binary"];

const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Memory is read this long after the agent's first call.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

pub fn rows(rows: &mut Rows, dir: &Path) {
    if rows.wants("agent-idle-rss") {
        match idle_rss_kib(rows, &dir.join("agent")) {
            Ok(kib) => rows.measured(
                "agent-idle-rss",
                format!(
                    "{} ({kib} KiB)",
                    super::describe("agent-idle-rss", rows.agents)
                ),
                kib as f64 * 1024.0 / MB,
            ),
            Err(error) => rows.skip(&["agent-idle-rss"], &error.to_string()),
        }
    }
    if rows.wants("agent-binary") {
        match stripped_size(rows, dir) {
            Ok((before, after)) => rows.measured(
                "agent-binary",
                format!(
                    "{} ({:.1} MB before)",
                    super::describe("agent-binary", rows.agents),
                    before as f64 / MB
                ),
                after as f64 / MB,
            ),
            Err(error) => rows.skip(&["agent-binary"], &error.to_string()),
        }
    }
}

/// A listening agent in a fresh home under `dir`, trusted by a fresh
/// operator, after one `exec`: its VmRSS in KiB.
fn idle_rss_kib(rows: &Rows, dir: &Path) -> Result<u64, ProcessError> {
    let tentacle = rows.binary("tentacle")?;
    let hub = rows.binary("tentacle-hub")?;
    let agent_home = dir.join("home");
    let operator_home = dir.join("operator");
    let operator = output(
        Command::new(&hub)
            .arg("--home")
            .arg(&operator_home)
            .arg("new-certificate"),
    )?;
    let agent = |args: &[&str]| {
        output(
            Command::new(&tentacle)
                .arg("--home")
                .arg(&agent_home)
                .args(args),
        )
    };
    agent(&["create-instance"])?;
    let thumbprint = agent(&["new-certificate"])?;
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
    let mut process = Group::spawn(
        Command::new(&tentacle)
            .arg("--home")
            .arg(&agent_home)
            .arg("run"),
        "tentacle run",
        &dir.join("agent.log"),
    )?;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match wait_until_listening(address, process.child_mut(), START_TIMEOUT) {
        Ok(()) => {}
        Err(NotListening::Exited(status)) => {
            return Err(failed(
                "tentacle run",
                format!(
                    "exited with {status} before it listened: {}",
                    process.log_tail()
                ),
            ));
        }
        Err(NotListening::TimedOut) => {
            return Err(failed(
                "tentacle run",
                format!("not listening on {address} after {START_TIMEOUT:?}"),
            ));
        }
    }
    // One call, so the figure is of an agent that has served, as in use.
    output(
        Command::new(&hub)
            .arg("--home")
            .arg(&operator_home)
            .args(["exec", "--target", &format!("https://{address}")])
            .args(["--thumbprint", &thumbprint, "--script", "true"]),
    )?;
    std::thread::sleep(IDLE_SETTLE);
    process
        .rss_kib()
        .ok_or_else(|| failed("tentacle run", "no VmRSS in /proc".to_owned()))
}

/// The `tentacle` binary's size, and that of a stripped copy in `dir`.
fn stripped_size(rows: &Rows, dir: &Path) -> Result<(u64, u64), ProcessError> {
    let tentacle = rows.binary("tentacle")?;
    let copy = dir.join("tentacle-stripped");
    let size = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|source| ProcessError::Io {
                what: format!("reading the size of {}", path.display()),
                source,
            })
    };
    let before = size(&tentacle)?;
    let out = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(&tentacle)
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => failed(
                "strip",
                "`strip` is missing: install binutils (`sudo apt-get install binutils`)".to_owned(),
            ),
            _ => ProcessError::Io {
                what: "running strip".to_owned(),
                source,
            },
        })?;
    if !out.status.success() {
        return Err(failed(
            "strip",
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let after = size(&copy)?;
    let _ = std::fs::remove_file(&copy);
    Ok((before, after))
}
