//! Runs a script as a real child process in its own process group.
//!
//! With a host program configured ([`ProcessSettings::host_program`], the
//! real agent's own binary) the script runs detached under a script host
//! ([`super::host`], [`super::detached`]) and outlives the agent; without
//! one (tests, the in-process demo) the agent supervises it itself and it
//! ends with the agent. Both run [`supervise`].
//!
//! Cancelling kills the whole group (TERM, then KILL after a grace period),
//! which takes background children with it. After the script's main process
//! exits, output is drained for a bounded time only: a detached grandchild
//! that keeps stdout open must not keep the script from completing.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::executor::{Executor, Job, Outcome, OutputSink};
use super::log::Stream;

/// Limits for child processes.
#[derive(Debug, Clone)]
pub struct ProcessSettings {
    /// Between SIGTERM and SIGKILL when a script is stopped.
    pub kill_grace: Duration,
    /// How long to keep reading output after the main process exits.
    pub output_drain_timeout: Duration,
    /// Longer lines are split.
    pub max_line_bytes: usize,
    /// The program that hosts detached scripts (started as
    /// `PROGRAM script-host`); `None` runs scripts as the agent's own
    /// children, which end with it.
    pub host_program: Option<PathBuf>,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        Self {
            kill_grace: Duration::from_secs(5),
            output_drain_timeout: Duration::from_secs(2),
            max_line_bytes: 64 * 1024,
            host_program: None,
        }
    }
}

/// The executor that runs real processes.
#[derive(Debug, Clone, Default)]
pub struct ProcessExecutor {
    settings: ProcessSettings,
}

impl ProcessExecutor {
    pub fn new(settings: ProcessSettings) -> Self {
        Self { settings }
    }
}

impl Executor for ProcessExecutor {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome> {
        match &self.settings.host_program {
            Some(program) => {
                super::detached::start(program.clone(), job, output, stop, self.settings.clone())
                    .boxed()
            }
            None => supervise(job, output, stop, self.settings.clone()).boxed(),
        }
    }

    fn detaches(&self) -> bool {
        self.settings.host_program.is_some()
    }

    fn reattach(
        &self,
        workspace: &Path,
        output: OutputSink,
        stop: CancellationToken,
    ) -> Option<BoxFuture<'static, Outcome>> {
        super::detached::reattach(workspace, output, stop, self.settings.clone())
    }
}

/// Runs `job` as a child in its own process group until it exits or `stop`
/// fires, its output masked into `output`.
pub(crate) async fn supervise(
    job: Job,
    output: OutputSink,
    stop: CancellationToken,
    settings: ProcessSettings,
) -> Outcome {
    output.reserve_space(&job.workspace);
    let mut command = Command::new(&job.program);
    command
        .args(&job.program_args)
        .arg(&job.script_path)
        .args(&job.arguments)
        .current_dir(&job.workspace)
        .envs(job.environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so the whole tree can be signalled at once.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return Outcome::FailedToStart(format!(
                "could not start `{}`: {error}",
                job.program.display()
            ));
        }
    };
    let Some(pgid) = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
    else {
        return Outcome::FailedToStart(
            "the script process exited before it could be tracked".into(),
        );
    };

    let (lines_tx, lines_rx) = mpsc::channel(1024);
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(tokio::spawn(read_lines(
            stdout,
            Stream::Stdout,
            lines_tx.clone(),
            settings.max_line_bytes,
        )));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(tokio::spawn(read_lines(
            stderr,
            Stream::Stderr,
            lines_tx.clone(),
            settings.max_line_bytes,
        )));
    }
    drop(lines_tx);
    let writer = tokio::spawn(write_lines(lines_rx, output.clone()));

    let (status, stopped) = tokio::select! {
        status = child.wait() => (status, false),
        () = stop.cancelled() => (kill_group(pgid, &mut child, settings.kill_grace).await, true),
    };

    let drain = futures::future::join_all(readers.iter_mut());
    let drained = tokio::time::timeout(settings.output_drain_timeout, drain)
        .await
        .is_ok();
    if !drained {
        for reader in &readers {
            reader.abort();
        }
    }
    // Every sender is gone now, so the writer finishes after the last line.
    let _ = writer.await;
    if !drained {
        output.write([(
            Stream::Agent,
            format!(
                "The script exited but a background process still holds its output open; stopped reading output after {:?}.",
                settings.output_drain_timeout
            ),
        )]);
    }

    output.finish();

    match (stopped, status) {
        (true, _) => Outcome::Stopped,
        (false, Ok(status)) => Outcome::Exited(exit_code(status)),
        (false, Err(error)) => {
            Outcome::FailedToStart(format!("could not wait for the script: {error}"))
        }
    }
}

/// Shell convention: a process killed by signal N reports 128 + N.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Sends TERM to the group, KILL after `grace`, and waits until the main
/// process is reaped and no member of the group is left.
async fn kill_group(pgid: Pid, child: &mut Child, grace: Duration) -> std::io::Result<ExitStatus> {
    let _ = killpg(pgid, Signal::SIGTERM);
    let started = tokio::time::Instant::now();
    let mut killed = false;
    let mut status = None;
    loop {
        if status.is_none() {
            status = child.try_wait()?;
        }
        let group_alive = killpg(pgid, None).is_ok();
        if status.is_some() && !group_alive {
            break;
        }
        let waited = started.elapsed();
        if !killed && waited >= grace {
            let _ = killpg(pgid, Signal::SIGKILL);
            killed = true;
        }
        if waited >= grace + Duration::from_secs(10) {
            // Something in the group ignores SIGKILL (uninterruptible I/O);
            // stop waiting for it rather than hang the ticket.
            tracing::warn!(
                pgid = pgid.as_raw(),
                "processes of a stopped script are still alive"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match status {
        Some(status) => Ok(status),
        // A leader stuck in uninterruptible I/O: give it a last moment, then
        // report the script stopped rather than hang the ticket.
        None => match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the script's main process did not exit after SIGKILL",
            )),
        },
    }
}

/// Splits a pipe into lines (at most `max_line` bytes each) and forwards them.
async fn read_lines(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tx: mpsc::Sender<(Stream, String)>,
    max_line: usize,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let available = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(bytes) => bytes,
        };
        let room = max_line.saturating_sub(line.len()).max(1);
        let window = &available[..available.len().min(room)];
        let (take, complete) = match window.iter().position(|b| *b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (window.len(), line.len() + window.len() >= max_line),
        };
        line.extend_from_slice(&window[..take]);
        reader.consume(take);
        if complete && tx.send((stream, take_line(&mut line))).await.is_err() {
            return;
        }
    }
    if !line.is_empty() {
        let _ = tx.send((stream, take_line(&mut line))).await;
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    let text = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    text
}

/// Appends whatever lines are waiting as one batch.
async fn write_lines(mut rx: mpsc::Receiver<(Stream, String)>, output: OutputSink) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        output.write(batch.drain(..));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_long_lines_and_keeps_a_trailing_partial_line() {
        let input: &[u8] = b"abcdefgh\r\nxy\nlast";
        let (tx, mut rx) = mpsc::channel(16);
        read_lines(input, Stream::Stdout, tx, 4).await;
        let mut got = Vec::new();
        while let Some((_, text)) = rx.recv().await {
            got.push(text);
        }
        assert_eq!(got, ["abcd", "efgh", "", "xy", "last"]);
    }
}
