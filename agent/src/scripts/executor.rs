//! The seam between the script lifecycle and whatever actually runs a
//! script. The agent runs real processes ([`super::process`]); the simulator
//! plugs in a model that only pretends to.

use std::fmt::{self, Debug};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::log::{ScriptLog, Stream};
use super::log_space::LogSpace;
use super::masking::Masker;

/// Everything needed to run one script. It travels to a detached script's
/// host through a pipe, never through a file: the environment may hold
/// sensitive values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub ticket: String,
    pub workspace: PathBuf,
    /// The interpreter to start.
    pub program: PathBuf,
    /// Arguments for the interpreter that go before the script path.
    pub program_args: Vec<String>,
    pub script_path: PathBuf,
    /// The script's own arguments, after the script path.
    pub arguments: Vec<String>,
    /// Added to the agent's environment.
    pub environment: Vec<(String, String)>,
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The script exited by itself with this code.
    Exited(i32),
    /// The script was stopped because `stop` fired.
    Stopped,
    /// The script never started.
    FailedToStart(String),
    /// The script was started by an earlier agent process, and what
    /// supervised it is gone without recording how it ended.
    Lost(String),
}

/// Where a running script's output goes: masked, then appended to its log.
#[derive(Clone)]
pub struct OutputSink {
    log: ScriptLog,
    masker: Masker,
    /// Called after every append (a detached script's host pokes the agent
    /// with it).
    appended: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Whether the log can still be written (a full disk).
    space: Arc<LogSpace>,
}

impl Debug for OutputSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputSink")
            .field("log", &self.log.path())
            .finish_non_exhaustive()
    }
}

impl OutputSink {
    pub fn new(log: ScriptLog, masker: Masker) -> Self {
        Self {
            log,
            masker,
            appended: None,
            space: Arc::default(),
        }
    }

    /// Calls `appended` after every batch written.
    pub fn on_append(mut self, appended: impl Fn() + Send + Sync + 'static) -> Self {
        self.appended = Some(Arc::new(appended));
        self
    }

    pub fn write(&self, lines: impl IntoIterator<Item = (Stream, String)>) {
        if self.space.is_failed() {
            self.space.drop_lines(lines.into_iter().count() as u64);
            return;
        }
        let masked: Vec<_> = lines
            .into_iter()
            .map(|(stream, text)| (stream, self.masker.mask(text)))
            .collect();
        let count = masked.len() as u64;
        if let Err(error) = self.log.append(masked) {
            // The script keeps running; the caller is told in the log, in
            // the room the reserve kept.
            tracing::error!(%error, path = %self.log.path().display(), "could not append script output");
            if let Some(notice) = self.space.fail(&error, count) {
                self.append_notice(notice);
            }
        }
        if let Some(appended) = &self.appended {
            appended();
        }
    }

    /// Keeps room in `workspace` for the notices a full disk calls for.
    pub fn reserve_space(&self, workspace: &Path) {
        self.space.reserve_in(workspace);
    }

    /// Says how much output was lost, if any, and frees the reserve; called
    /// once the script's output has ended.
    pub fn finish(&self) {
        if let Some(notice) = self.space.finish() {
            self.append_notice(notice);
        }
    }

    fn append_notice(&self, notice: String) {
        if let Err(error) = self.log.append([(Stream::Agent, notice)]) {
            tracing::error!(%error, path = %self.log.path().display(), "could not write a notice to the script's log");
        }
        if let Some(appended) = &self.appended {
            appended();
        }
    }

    /// Indexes and publishes lines another process (a detached script's
    /// host) appended to the log file.
    pub fn catch_up(&self) {
        if let Err(error) = self.log.catch_up() {
            tracing::warn!(%error, path = %self.log.path().display(), "could not read new script output");
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        self.log.path()
    }

    /// The masker, for a host process that masks on the agent's behalf.
    pub(crate) fn masker(&self) -> &Masker {
        &self.masker
    }
}

/// Runs scripts. Implementations must return once `stop` fires and the
/// script is gone, and must have written all output before returning.
pub trait Executor: Send + Sync + Debug + 'static {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome>;

    /// Whether scripts outlive the agent process: then an agent that stops
    /// leaves them running, and the next one re-attaches to them.
    fn detaches(&self) -> bool {
        false
    }

    /// Follows a script an earlier agent process started in `workspace`,
    /// as [`Executor::execute`] would have. `None` when nothing of it can be
    /// followed; the script is then reported as interrupted by the restart.
    fn reattach(
        &self,
        workspace: &Path,
        output: OutputSink,
        stop: CancellationToken,
    ) -> Option<BoxFuture<'static, Outcome>> {
        let _ = (workspace, output, stop);
        None
    }
}
