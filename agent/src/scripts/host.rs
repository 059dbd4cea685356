//! The script host: a small process that runs one script detached from the
//! agent, so the script survives the agent's restart.
//!
//! The agent starts it as `tentacle script-host` (its own binary again, so
//! it works in images without a shell) and hands it a [`HostSpec`] on its
//! stdin, never in argv, the environment or a file, because the spec holds
//! the sensitive values. The host leaves the agent's session (`setsid`),
//! runs the script in a process group of its own, and writes the script's
//! output to the workspace log exactly as the agent would: masked,
//! sequenced, timestamped ([`super::process::supervise`] over an
//! [`OutputSink`]). The secrets exist only in its memory, so no unmasked
//! line reaches the disk, whether or not an agent is watching. When the
//! script ends the host writes the [`ExitRecord`] (temp file, fsync,
//! rename) and exits.
//!
//! Its stdout is a pipe to the agent that started it: one byte after every
//! batch of lines wakes the agent at once instead of at its next poll. An
//! agent that died leaves the pipe without a reader; the host keeps going.
//!
//! Signals: SIGUSR1 cancels the script (its group gets TERM, then KILL
//! after the grace). SIGTERM, SIGINT and SIGHUP are caught and ignored:
//! when a whole service is stopped the script gets those signals itself, and
//! the host stays to record how it ended.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::executor::{Job, Outcome, OutputSink};
use super::log::{self, ScriptLog};
use super::masking::Masker;
use super::process::{ProcessSettings, supervise};
use super::workspace::Workspace;

/// The hidden subcommand of `tentacle` that runs a host.
pub const SUBCOMMAND: &str = "script-host";

/// Everything the host needs, read from its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostSpec {
    pub job: Job,
    /// Values masked in every line.
    pub sensitive_values: Vec<String>,
    pub kill_grace_ms: u64,
    pub output_drain_timeout_ms: u64,
    pub max_line_bytes: usize,
}

/// How the script ended, written by the host when it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub outcome: Outcome,
    pub ended_ms: i64,
}

/// Which process is a workspace's host, written by the agent that started
/// it before the host gets its spec. The start time and boot id tell the
/// host from a later process that reuses its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_ticks: u64,
    pub boot_id: String,
}

impl HostRecord {
    /// The record of the live process `pid`.
    pub fn of(pid: i32) -> io::Result<Self> {
        let (_, start_ticks) = proc_stat(pid)?;
        Ok(Self {
            pid,
            start_ticks,
            boot_id: boot_id(),
        })
    }

    /// Whether the process this record names is still running (not a
    /// zombie, not a newer process with the same pid).
    pub fn is_running(&self) -> bool {
        if self.boot_id != boot_id() {
            return false;
        }
        match proc_stat(self.pid) {
            Ok((state, ticks)) => ticks == self.start_ticks && !matches!(state, 'Z' | 'X' | 'x'),
            Err(_) => false,
        }
    }
}

/// The state letter and start time of `pid` from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> io::Result<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after it start past its last `)`.
    let rest = text
        .rfind(')')
        .map(|at| &text[at + 1..])
        .ok_or_else(|| io::Error::other("unexpected /proc stat format"))?;
    let mut fields = rest.split_whitespace();
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| io::Error::other("no state in /proc stat"))?;
    // Field 3 is the state; the start time is field 22.
    let start = fields
        .nth(22 - 4)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("no start time in /proc stat"))?;
    Ok((state, start))
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// Reads a JSON record; `None` if the file is missing or unreadable.
pub fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Replaces `path` with `value` through a synced temporary file and a
/// rename, so a reader sees the old file or the whole new one.
pub fn write_record<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("record path has no file name"))?;
    let temp: PathBuf = path.with_file_name(format!(".{name}.tmp"));
    {
        let mut file = File::create(&temp)?;
        file.write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
        file.sync_all()?;
    }
    fs::rename(&temp, path)
}

/// `tentacle script-host`: reads the spec from stdin, runs the script,
/// records how it ended. Exits 0 once the record is written, 2 if the
/// spec never arrived whole (the agent stopped while handing it over;
/// nothing ran), 1 if the record could not be written.
pub fn main() -> ExitCode {
    // Out of the agent's session and process group: a signal to the
    // agent's group (Ctrl-C in a terminal, a group kill) does not reach
    // the host or its script. It fails only for a group leader, which the
    // agent never makes the host.
    let _ = nix::unistd::setsid();
    let mut input = Vec::new();
    if io::stdin().read_to_end(&mut input).is_err() {
        return ExitCode::from(2);
    }
    let Ok(spec) = serde_json::from_slice::<HostSpec>(&input) else {
        return ExitCode::from(2);
    };
    drop(input);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(_) => return ExitCode::FAILURE,
    };
    let workspace = Workspace::open(spec.job.workspace.clone());
    let ended = runtime.block_on(host(spec, &workspace));
    let record = ExitRecord {
        outcome: ended,
        ended_ms: log::now_ms(),
    };
    match write_record(&workspace.exit_record(), &record) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

async fn host(spec: HostSpec, workspace: &Workspace) -> Outcome {
    let log = match ScriptLog::open(&workspace.output_log()) {
        Ok(log) => log,
        Err(error) => {
            return Outcome::FailedToStart(format!("could not open the script's log: {error}"));
        }
    };
    let poke = agent_pipe();
    let output = OutputSink::new(log, Masker::new(&spec.sensitive_values)).on_append(move || {
        if let Some(pipe) = &poke {
            // Non-blocking: a full pipe already says there is news, and a
            // pipe without a reader (the agent is gone) is no reason to stop.
            let _ = (&*pipe).write(&[1]);
        }
    });
    let stop = CancellationToken::new();
    let mut cancel = match signal(SignalKind::user_defined1()) {
        Ok(cancel) => cancel,
        Err(error) => {
            return Outcome::FailedToStart(format!("could not watch for cancellation: {error}"));
        }
    };
    let ignored: Vec<_> = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ]
    .into_iter()
    .filter_map(|kind| signal(kind).ok())
    .collect();
    let settings = ProcessSettings {
        kill_grace: Duration::from_millis(spec.kill_grace_ms),
        output_drain_timeout: Duration::from_millis(spec.output_drain_timeout_ms),
        max_line_bytes: spec.max_line_bytes,
        host_program: None,
    };
    let canceller = stop.clone();
    tokio::spawn(async move {
        cancel.recv().await;
        canceller.cancel();
    });
    let outcome = supervise(spec.job, output, stop, settings).await;
    drop(ignored);
    outcome
}

/// The pipe to the agent on stdout, made non-blocking.
fn agent_pipe() -> Option<File> {
    let fd = io::stdout().as_fd().try_clone_to_owned().ok()?;
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).ok()?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).ok()?;
    Some(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_this_process_and_not_a_dead_or_reused_pid() {
        let me = HostRecord::of(std::process::id() as i32).expect("own stat");
        assert!(me.is_running());
        let reused = HostRecord {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert!(
            !reused.is_running(),
            "another start time is another process"
        );
        let rebooted = HostRecord {
            boot_id: "another boot".into(),
            ..me.clone()
        };
        assert!(!rebooted.is_running());

        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        let record = HostRecord::of(pid).ok();
        child.wait().expect("reap");
        if let Some(record) = record {
            assert!(!record.is_running(), "an exited process");
        }
    }

    #[test]
    fn records_are_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tentacle-exit.json");
        assert!(read_record::<ExitRecord>(&path).is_none());
        let record = ExitRecord {
            outcome: Outcome::Exited(7),
            ended_ms: 5,
        };
        write_record(&path, &record).expect("write");
        assert_eq!(read_record::<ExitRecord>(&path), Some(record));
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["tentacle-exit.json"], "no temporary file left");
    }
}
