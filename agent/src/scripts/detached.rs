//! The agent's side of a detached script: starting its host, following its
//! log, and picking it up again after a restart.
//!
//! Starting: the host process is spawned (`PROGRAM script-host`), its
//! [`HostRecord`] written to the workspace, and only then its spec sent on
//! its stdin. An agent that dies before the record is written leaves a host
//! that never gets a whole spec, so it runs nothing.
//!
//! Following: the host writes the log itself; the agent indexes what was
//! appended ([`OutputSink::catch_up`]) whenever the host pokes it through
//! its stdout pipe, and at every poll, and returns the outcome from the
//! [`ExitRecord`] once it is there. The log is caught up after the record
//! is read, so it is whole before the run is reported complete.
//!
//! Re-attaching: the same loop, with the host known by its record instead
//! of as a child. A host that is gone without an exit record is reported
//! [`Outcome::Lost`].
//!
//! Cancelling: SIGUSR1 to the host, which kills the script's process group
//! (TERM, then KILL after the grace) and records [`Outcome::Stopped`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

use super::executor::{Job, Outcome, OutputSink};
use super::host::{self, ExitRecord, HostRecord, HostSpec};
use super::process::ProcessSettings;
use super::workspace::Workspace;

/// How often the log and the exit record are looked at when no poke came.
const POLL: Duration = Duration::from_millis(100);
/// How long past the kill grace a cancelled host may take to record the
/// end before the agent stops waiting for it.
const CANCEL_SLACK: Duration = Duration::from_secs(15);

const LOST_ADOPTED: &str = "The agent restarted while this script ran, and the process that supervised it is gone without recording how it ended; its result is unknown.";

/// Starts `job` under a new host and follows it to its end.
pub(super) async fn start(
    program: PathBuf,
    mut job: Job,
    output: OutputSink,
    stop: CancellationToken,
    settings: ProcessSettings,
) -> Outcome {
    // The host runs in the workspace; paths it gets must not depend on
    // the agent's working directory.
    for path in [&mut job.workspace, &mut job.script_path] {
        if let Ok(absolute) = std::path::absolute(&*path) {
            *path = absolute;
        }
    }
    let workspace = Workspace::open(job.workspace.clone());
    let spec = HostSpec {
        job,
        sensitive_values: output.masker().values().to_vec(),
        kill_grace_ms: millis(settings.kill_grace),
        output_drain_timeout_ms: millis(settings.output_drain_timeout),
        max_line_bytes: settings.max_line_bytes,
    };
    let mut command = Command::new(&program);
    command
        .arg0("tentacle")
        .arg(host::SUBCOMMAND)
        .current_dir(workspace.dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return Outcome::FailedToStart(format!(
                "could not start the script host `{}`: {error}",
                program.display()
            ));
        }
    };
    let recorded = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| io::Error::other("the script host exited at once"))
        .and_then(HostRecord::of)
        .and_then(|record| host::write_record(&workspace.host_record(), &record).map(|()| record));
    let record = match recorded {
        Ok(record) => record,
        Err(error) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Outcome::FailedToStart(format!(
                "could not record the script host in the workspace: {error}"
            ));
        }
    };
    let handed_over = match serde_json::to_vec(&spec) {
        Ok(bytes) => match child.stdin.take() {
            Some(mut stdin) => {
                let written = stdin.write_all(&bytes).await;
                drop(stdin);
                written
            }
            None => Err(io::Error::other("no pipe to the script host")),
        },
        Err(error) => Err(io::Error::other(error)),
    };
    drop(spec);
    if let Err(error) = handed_over {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Outcome::FailedToStart(format!("could not hand the script to its host: {error}"));
    }
    let pokes = child.stdout.take();
    follow(
        Host::Child(child, record),
        pokes,
        &workspace,
        output,
        stop,
        settings.kill_grace,
    )
    .await
}

/// Follows a script an earlier agent started in `dir`; `None` if it never
/// got to run under a host (no host record and no exit record).
pub(super) fn reattach(
    dir: &Path,
    output: OutputSink,
    stop: CancellationToken,
    settings: ProcessSettings,
) -> Option<BoxFuture<'static, Outcome>> {
    let workspace = Workspace::open(dir.to_owned());
    if let Some(ended) = host::read_record::<ExitRecord>(&workspace.exit_record()) {
        output.catch_up();
        return Some(futures::future::ready(ended.outcome).boxed());
    }
    let record: HostRecord = host::read_record(&workspace.host_record())?;
    if !record.is_running() {
        // It may have recorded the end just before exiting.
        let outcome =
            ended(&workspace, &output).unwrap_or_else(|| Outcome::Lost(LOST_ADOPTED.into()));
        return Some(futures::future::ready(outcome).boxed());
    }
    Some(
        async move {
            follow(
                Host::Adopted(record),
                None,
                &workspace,
                output,
                stop,
                settings.kill_grace,
            )
            .await
        }
        .boxed(),
    )
}

/// A host as the agent knows it.
enum Host {
    /// Started by this agent process.
    Child(Child, HostRecord),
    /// Started by an earlier one.
    Adopted(HostRecord),
}

impl Host {
    fn is_running(&mut self) -> bool {
        match self {
            Self::Child(child, _) => matches!(child.try_wait(), Ok(None)),
            Self::Adopted(record) => record.is_running(),
        }
    }

    fn cancel(&mut self) {
        let record = match self {
            Self::Child(_, record) | Self::Adopted(record) => record,
        };
        // Checked first, so a reused pid is never signalled.
        if record.is_running() {
            let _ = kill(Pid::from_raw(record.pid), Signal::SIGUSR1);
        }
    }
}

async fn follow(
    mut host: Host,
    mut pokes: Option<ChildStdout>,
    workspace: &Workspace,
    output: OutputSink,
    stop: CancellationToken,
    kill_grace: Duration,
) -> Outcome {
    let mut cancel_deadline = None;
    let mut buf = [0u8; 256];
    loop {
        let mut look = true;
        tokio::select! {
            read = async { pokes.as_mut().expect("guarded").read(&mut buf).await }, if pokes.is_some() => {
                // Zero bytes: the host closed its end, so it is exiting.
                look = !matches!(read, Ok(n) if n > 0);
                if look {
                    pokes = None;
                }
            }
            () = tokio::time::sleep(POLL) => {}
            () = stop.cancelled(), if cancel_deadline.is_none() => {
                host.cancel();
                cancel_deadline = Some(tokio::time::Instant::now() + kill_grace + CANCEL_SLACK);
            }
        }
        output.catch_up();
        if !look {
            continue;
        }
        if let Some(ended) = ended(workspace, &output) {
            reap(&mut host).await;
            return ended;
        }
        if !host.is_running() {
            // It may have written the record just before exiting.
            if let Some(ended) = ended(workspace, &output) {
                reap(&mut host).await;
                return ended;
            }
            if cancel_deadline.is_some() {
                // Cancelled before it could catch the signal: nothing of
                // the script is left to stop.
                return Outcome::Stopped;
            }
            return Outcome::Lost(match host {
                Host::Child(..) => "The process that supervised this script was killed before it recorded how the script ended; its result is unknown.",
                Host::Adopted(_) => LOST_ADOPTED,
            }.into());
        }
        if cancel_deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
            tracing::warn!(
                workspace = %workspace.dir().display(),
                "a cancelled script's host did not record its end; no longer waiting for it"
            );
            return Outcome::Stopped;
        }
    }
}

fn ended(workspace: &Workspace, output: &OutputSink) -> Option<Outcome> {
    let record = host::read_record::<ExitRecord>(&workspace.exit_record())?;
    output.catch_up();
    Some(record.outcome)
}

async fn reap(host: &mut Host) {
    if let Host::Child(child, _) = host {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
}

/// Cancels every detached script still running under `work_root`, for an
/// agent being uninstalled. Returns how many were told to stop; waits at
/// most `wait` for their hosts to record the end.
pub fn cancel_all_in(work_root: &Path, wait: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return 0;
    };
    let mut cancelled = Vec::new();
    for entry in entries.flatten() {
        let workspace = Workspace::open(entry.path());
        if workspace.exit_record().exists() {
            continue;
        }
        if let Some(record) = host::read_record::<HostRecord>(&workspace.host_record())
            && record.is_running()
        {
            let _ = kill(Pid::from_raw(record.pid), Signal::SIGUSR1);
            cancelled.push(record);
        }
    }
    let started = std::time::Instant::now();
    while cancelled.iter().any(HostRecord::is_running) && started.elapsed() < wait {
        std::thread::sleep(Duration::from_millis(50));
    }
    cancelled.len()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uninstall_cancels_live_hosts_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let workspace = |name: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).expect("workspace");
            Workspace::open(dir)
        };
        // A stand-in host: SIGUSR1 ends `sleep`, as it makes a host cancel.
        let mut live = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let live_record = HostRecord::of(live.id() as i32).expect("record");
        host::write_record(&workspace("live").host_record(), &live_record).expect("write");
        // Ended: its record names a process that must not be signalled.
        let mut ended = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let ended_ws = workspace("ended");
        let ended_record = HostRecord::of(ended.id() as i32).expect("record");
        host::write_record(&ended_ws.host_record(), &ended_record).expect("write");
        host::write_record(
            &ended_ws.exit_record(),
            &ExitRecord {
                outcome: Outcome::Exited(0),
                ended_ms: 1,
            },
        )
        .expect("write");
        // A reused pid: another start time.
        let reused = HostRecord {
            start_ticks: ended_record.start_ticks + 1,
            ..ended_record.clone()
        };
        host::write_record(&workspace("reused").host_record(), &reused).expect("write");

        assert_eq!(cancel_all_in(root.path(), Duration::from_secs(5)), 1);
        let status = live.wait().expect("reap");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(Signal::SIGUSR1 as i32)
        );
        assert!(ended_record.is_running(), "left alone");
        let _ = ended.kill();
        let _ = ended.wait();
    }
}
