//! The seam between the script lifecycle and whatever actually runs a
//! script. The agent runs real processes ([`super::process`]); the simulator
//! plugs in a model that only pretends to.

use std::fmt::Debug;
use std::path::PathBuf;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::log::{ScriptLog, Stream};
use super::masking::Masker;

/// Everything needed to run one script.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The script exited by itself with this code.
    Exited(i32),
    /// The script was stopped because `stop` fired.
    Stopped,
    /// The script never started.
    FailedToStart(String),
}

/// Where a running script's output goes: masked, then appended to its log.
#[derive(Debug, Clone)]
pub struct OutputSink {
    log: ScriptLog,
    masker: Masker,
}

impl OutputSink {
    pub fn new(log: ScriptLog, masker: Masker) -> Self {
        Self { log, masker }
    }

    pub fn write(&self, lines: impl IntoIterator<Item = (Stream, String)>) {
        let masked = lines
            .into_iter()
            .map(|(stream, text)| (stream, self.masker.mask(text)));
        if let Err(error) = self.log.append(masked) {
            // Nothing better to do than say so: the script keeps running.
            tracing::error!(%error, path = %self.log.path().display(), "could not append script output");
        }
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
}
