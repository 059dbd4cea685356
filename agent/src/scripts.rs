//! Script runs: the lifecycle of every ticket on this agent.
//!
//! [`Scripts`] owns the table of tickets. It makes each ticket's workspace,
//! waits for the isolation mutex, hands the job to an [`Executor`], enforces
//! the execution timeout and cancellation, records the result in the state
//! file, and serves the log back by sequence.
//!
//! With an executor that detaches ([`Executor::detaches`], the real agent's
//! [`process::ProcessExecutor`] with a script host), a running script
//! outlives the agent process: a stopping agent leaves it running, and
//! [`Scripts::recover`] re-attaches to it, mutex and deadline included,
//! before the next agent serves a call.
//!
//! Architecture Invariant: a ticket runs at most once per agent home. The
//! table entry is made under one lock before anything runs, and after a
//! restart every workspace on disk is loaded back before the first call is
//! served. Once a workspace is deleted (by `CompleteScript` or the cleaner)
//! the ticket's result moves to the [`tombstone`] record of completed
//! tickets first, so the ticket is still refused; that record is bounded by
//! count and age (see [`ScriptSettings::completed_tickets_max`]).

pub mod detached;
pub mod executor;
pub mod host;
pub mod isolation;
pub mod log;
mod log_space;
pub mod masking;
pub mod process;
mod ticket;
pub mod tombstone;
pub mod workspace;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use executor::{Executor, Job, Outcome, OutputSink};
pub use isolation::IsolationLevel;
pub use log::{LogRecord, ReadLimit, Stream};
pub use ticket::{InvalidTicket, Ticket};
use workspace::{HeldMutex, Phase, StateFile, Workspace};

use isolation::IsolationMutexes;
use masking::Masker;
use tombstone::{Completed, Tombstone};

/// Exit codes the agent reports itself; they live in the wire crate so
/// callers explain them the same way.
pub use tentacle_proto::exit_code;

/// Settings for script runs.
#[derive(Debug, Clone)]
pub struct ScriptSettings {
    /// Workspaces live here, one directory per ticket.
    pub work_root: PathBuf,
    /// Used when a request sets no mutex timeout.
    pub default_mutex_timeout: Duration,
    /// Complete workspaces older than this are deleted by the cleaner.
    pub workspace_max_age: Duration,
    /// How often the cleaner runs.
    pub cleanup_interval: Duration,
    /// Lines in one GetStatus reply when the caller asks for none in
    /// particular (`max_lines = 0`), and in one WatchScript batch.
    pub default_page_lines: usize,
    /// Upper bound on lines in one reply or stream message, whatever the
    /// caller asks for.
    pub max_page_lines: usize,
    /// Upper bound on the bytes of log text in one reply or stream message
    /// (one longer line still goes through whole). Keep it well under the
    /// callers' gRPC receive limit, which is 4 MiB in most clients.
    pub max_page_bytes: usize,
    /// Completed tickets whose workspace is gone that are still remembered,
    /// so a repeated StartScript for one is answered with its result rather
    /// than run again. The oldest are forgotten first. At the default, the
    /// record on disk (`<work_root>/.tentacle-completed-tickets`) holds at
    /// most 2 × 100,000 + 1,024 lines of at most 183 bytes (37 MB; 14 MB
    /// with 36-character tickets), half that just after a rewrite, and
    /// memory holds about 100 bytes plus twice the ticket per entry (17 MB
    /// with 36-character tickets). 0 remembers none: a ticket may then run
    /// again once its workspace is deleted.
    pub completed_tickets_max: usize,
    /// How long a completed ticket is remembered after its workspace is
    /// deleted; the whole window in which it is refused is its workspace's
    /// life plus this.
    pub completed_tickets_max_age: Duration,
}

impl ScriptSettings {
    pub fn new(work_root: PathBuf) -> Self {
        Self {
            work_root,
            default_mutex_timeout: Duration::from_secs(60 * 60),
            workspace_max_age: Duration::from_secs(24 * 60 * 60),
            cleanup_interval: Duration::from_secs(2 * 60 * 60),
            default_page_lines: 1000,
            max_page_lines: 10_000,
            max_page_bytes: 1024 * 1024,
            completed_tickets_max: 100_000,
            completed_tickets_max_age: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }

    /// The limit for one page of log when the caller asked for `requested`
    /// lines (`None` or 0: the default). A caller's number comes from the
    /// network, so it never raises the page past the configured maximum;
    /// the settings themselves are kept sane too, so a page always has room
    /// for at least one line.
    pub fn page_limit(&self, requested: Option<usize>) -> ReadLimit {
        let max_lines = self.max_page_lines.max(1);
        let default_lines = self.default_page_lines.clamp(1, max_lines);
        ReadLimit {
            max_lines: requested
                .filter(|&lines| lines > 0)
                .unwrap_or(default_lines)
                .min(max_lines),
            max_bytes: self.max_page_bytes.max(1),
        }
    }

    fn tombstone_bounds(&self) -> tombstone::Bounds {
        tombstone::Bounds {
            max_entries: self.completed_tickets_max,
            max_age: self.completed_tickets_max_age,
        }
    }
}

/// Which program runs the script body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interpreter {
    Bash,
    Sh,
    Pwsh,
    /// An absolute path to any interpreter.
    Custom(PathBuf),
}

/// An environment variable for the script.
#[derive(Debug, Clone)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
    pub sensitive: bool,
}

/// A request to run a script, already checked for shape.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub ticket: Ticket,
    pub body: String,
    pub interpreter: Interpreter,
    pub arguments: Vec<String>,
    pub environment: Vec<EnvVar>,
    pub files: Vec<(String, Vec<u8>)>,
    pub isolation: IsolationLevel,
    pub mutex_name: String,
    pub mutex_timeout: Option<Duration>,
    pub execution_timeout: Option<Duration>,
    pub sensitive_values: Vec<String>,
}

/// A request that cannot be run as given.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("script `{0}` is still {1}; cancel it or wait for it to complete first")]
    NotComplete(Ticket, &'static str),
    #[error("could not prepare the workspace for `{ticket}`: {source}")]
    Workspace { ticket: Ticket, source: io::Error },
    #[error("could not read the log of `{ticket}`: {source}")]
    Log { ticket: Ticket, source: io::Error },
}

/// What a caller sees of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub ticket: String,
    pub phase: Phase,
    pub exit_code: i32,
    pub lines: Vec<LogRecord>,
    pub last_sequence: u64,
    pub more: bool,
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Lines(Vec<LogRecord>),
    Phase(Phase),
    Result { exit_code: i32, last_sequence: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    phase: Phase,
    exit_code: i32,
}

/// One ticket.
#[derive(Debug)]
struct Run {
    ticket: Ticket,
    workspace: Workspace,
    log: log::ScriptLog,
    progress: watch::Sender<Progress>,
    stop: CancellationToken,
    /// Why `stop` fired; the first reason wins.
    stop_reason: OnceLock<i32>,
    created_ms: i64,
    completed_ms: Mutex<Option<i64>>,
    /// What a running script holds that must survive a restart.
    held: Mutex<Held>,
}

/// The mutex and deadline of a running script, kept in its state file.
#[derive(Debug, Clone, Default)]
struct Held {
    mutex: Option<HeldMutex>,
    deadline_ms: Option<i64>,
}

/// A script an earlier agent process started that is being followed again.
struct Resumed {
    execution: BoxFuture<'static, Outcome>,
    guard: Option<isolation::IsolationGuard>,
    deadline_ms: Option<i64>,
}

impl Run {
    fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    fn persist(&self) {
        let progress = self.progress();
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let state = StateFile {
            ticket: self.ticket.to_string(),
            phase: progress.phase,
            exit_code: progress.exit_code,
            created_ms: self.created_ms,
            completed_ms: *self
                .completed_ms
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            mutex: held.mutex,
            deadline_ms: held.deadline_ms,
        };
        if let Err(error) = self.workspace.write_state(&state) {
            tracing::error!(ticket = %self.ticket, %error, "could not write the script state file");
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.progress.send_modify(|p| p.phase = phase);
        self.persist();
    }

    fn agent_line(&self, text: impl Into<String>) {
        if let Err(error) = self.log.append([(Stream::Agent, text.into())]) {
            tracing::error!(ticket = %self.ticket, %error, "could not append to the script log");
        }
    }

    /// Records the result. The log is complete before the phase says so.
    fn finish(&self, exit_code: i32) {
        *self
            .completed_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(log::now_ms());
        self.progress.send_replace(Progress {
            phase: Phase::Complete,
            exit_code,
        });
        self.persist();
    }
}

/// Every script run on this agent.
#[derive(Debug)]
pub struct Scripts {
    settings: ScriptSettings,
    executor: Arc<dyn Executor>,
    mutexes: IsolationMutexes,
    runs: Mutex<HashMap<Ticket, Arc<Run>>>,
    /// Tickets whose workspace is gone. Looked up only after `runs`, and
    /// written before a run leaves `runs`, so every completed ticket is in
    /// at least one of them.
    tombstone: Arc<Tombstone>,
    /// Fired by [`Scripts::halt`].
    halted: CancellationToken,
}

impl Scripts {
    pub fn new(settings: ScriptSettings, executor: Arc<dyn Executor>) -> Arc<Self> {
        let tombstone = Arc::new(Tombstone::new(
            &settings.work_root,
            settings.tombstone_bounds(),
        ));
        Arc::new(Self {
            settings,
            executor,
            mutexes: IsolationMutexes::default(),
            runs: Mutex::new(HashMap::new()),
            tombstone,
            halted: CancellationToken::new(),
        })
    }

    /// Abandons every script without recording an outcome, exactly as if
    /// the agent process had been killed: nothing more is written, and the
    /// next [`Scripts`] over the same work root completes them with
    /// [`exit_code::AGENT_RESTARTED`] in [`Scripts::recover`]. A fault seam
    /// for the fleet simulator's crashes; a real agent never calls it.
    pub fn halt(&self) {
        self.halted.cancel();
    }

    pub fn settings(&self) -> &ScriptSettings {
        &self.settings
    }

    fn get(&self, ticket: &Ticket) -> Option<Arc<Run>> {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ticket)
            .cloned()
    }

    /// Scripts that are pending or running.
    pub fn active(&self) -> usize {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|r| r.progress().phase != Phase::Complete)
            .count()
    }

    /// Starts `request`, or returns the status of the ticket if it is known.
    pub fn start(self: &Arc<Self>, request: StartRequest) -> Result<StatusReport, ScriptError> {
        for (name, _) in &request.files {
            workspace::validate_file_name(name)
                .map_err(|error| ScriptError::InvalidRequest(error.to_string()))?;
        }
        if let Interpreter::Custom(path) = &request.interpreter
            && !path.is_absolute()
        {
            return Err(ScriptError::InvalidRequest(format!(
                "interpreter path `{}` must be absolute",
                path.display()
            )));
        }
        let run = {
            let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(existing) = runs.get(&request.ticket) {
                let existing = existing.clone();
                drop(runs);
                return self.report(&existing, 0, None);
            }
            // Still under the table's lock: a run leaves the table only
            // after its tombstone entry is written, so a ticket missing
            // from both has never run (within the record's bounds).
            if let Some(completed) = self.tombstone.lookup(&request.ticket, log::now_ms()) {
                drop(runs);
                tracing::info!(ticket = %request.ticket, exit_code = completed.exit_code, "script already completed; not running it again");
                return Ok(forgotten(&request.ticket, completed, 0));
            }
            let workspace =
                Workspace::create(&self.settings.work_root, &request.ticket).map_err(|source| {
                    ScriptError::Workspace {
                        ticket: request.ticket.clone(),
                        source,
                    }
                })?;
            let log = log::ScriptLog::open(&workspace.output_log()).map_err(|source| {
                let _ = workspace.delete();
                ScriptError::Workspace {
                    ticket: request.ticket.clone(),
                    source,
                }
            })?;
            let run = Arc::new(Run {
                ticket: request.ticket.clone(),
                workspace,
                log,
                progress: watch::Sender::new(Progress {
                    phase: Phase::Pending,
                    exit_code: 0,
                }),
                stop: CancellationToken::new(),
                stop_reason: OnceLock::new(),
                created_ms: log::now_ms(),
                completed_ms: Mutex::new(None),
                held: Mutex::new(Held::default()),
            });
            run.persist();
            runs.insert(request.ticket.clone(), run.clone());
            run
        };
        tracing::info!(ticket = %run.ticket, "script accepted");
        tracing::Span::current().record("ticket", run.ticket.as_str());
        // The script's own span: a child of the call that started it, open
        // until the script exits, and the parent of whatever the script runs.
        let span = tracing::info_span!(
            target: tentacle_proto::telemetry::TRACE_TARGET,
            "script",
            otel.name = "script",
            ticket = %run.ticket,
            exit_code = tracing::field::Empty,
        );
        tokio::spawn(tracing::Instrument::instrument(
            self.clone().execute(run.clone(), request),
            span,
        ));
        self.report(&run, 0, None)
    }

    async fn execute(self: Arc<Self>, run: Arc<Run>, request: StartRequest) {
        let metrics = &tentacle_proto::metrics::METRICS;
        metrics.scripts_running.inc();
        let exit_code = tokio::select! {
            exit_code = self.execute_inner(&run, request) => exit_code,
            () = self.halted.cancelled() => {
                metrics.scripts_running.dec();
                return;
            }
        };
        metrics.scripts_running.dec();
        run.finish(exit_code);
        tracing::Span::current().record("exit_code", exit_code);
        tracing::info!(ticket = %run.ticket, exit_code, "script complete");
    }

    async fn execute_inner(&self, run: &Run, request: StartRequest) -> i32 {
        let (program, program_args, extension) = match resolve_interpreter(&request.interpreter) {
            Ok(found) => found,
            Err(message) => {
                run.agent_line(message);
                return exit_code::FATAL;
            }
        };
        let script_path = run.workspace.script_path(extension);
        let written = std::fs::write(&script_path, request.body.as_bytes()).and_then(|()| {
            request
                .files
                .iter()
                .try_for_each(|(name, content)| run.workspace.write_file(name, content))
        });
        if let Err(error) = written {
            run.agent_line(format!(
                "Could not write the script into its workspace: {error}"
            ));
            return exit_code::FATAL;
        }

        let mutex_name = if request.mutex_name.is_empty() {
            "default"
        } else {
            request.mutex_name.as_str()
        };
        let _guard = match self.mutexes.try_acquire(mutex_name, request.isolation) {
            Some(guard) => guard,
            None => {
                let timeout = request
                    .mutex_timeout
                    .unwrap_or(self.settings.default_mutex_timeout);
                run.agent_line(format!(
                    "Waiting up to {} for the isolation mutex `{mutex_name}`, which another script holds.",
                    humantime::format_duration(timeout)
                ));
                tracing::info!(ticket = %run.ticket, mutex = mutex_name, "script queued for the isolation mutex");
                tokio::select! {
                    acquired = self.mutexes.acquire(mutex_name, request.isolation, timeout) => match acquired {
                        Ok(guard) => guard,
                        Err(error) => {
                            run.agent_line(format!("Gave up: {error}."));
                            return exit_code::TIMED_OUT;
                        }
                    },
                    () = run.stop.cancelled() => {
                        run.agent_line("Canceled while waiting for the isolation mutex.");
                        return *run.stop_reason.get().unwrap_or(&exit_code::CANCELED);
                    }
                }
            }
        };
        if run.stop.is_cancelled() {
            run.agent_line("Canceled before it started.");
            return *run.stop_reason.get().unwrap_or(&exit_code::CANCELED);
        }

        *run.held.lock().unwrap_or_else(PoisonError::into_inner) = Held {
            mutex: Some(HeldMutex {
                name: mutex_name.to_owned(),
                exclusive: request.isolation == IsolationLevel::Full,
            }),
            deadline_ms: request
                .execution_timeout
                .map(|limit| log::now_ms().saturating_add(millis(limit))),
        };
        run.set_phase(Phase::Running);
        let masker = Masker::new(
            request
                .environment
                .iter()
                .filter(|v| v.sensitive)
                .map(|v| v.value.as_str())
                .chain(request.sensitive_values.iter().map(String::as_str)),
        );
        let mut environment: Vec<(String, String)> = request
            .environment
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect();
        environment.push(("TENTACLE_TICKET".into(), run.ticket.to_string()));
        // Tools the script runs can join the trace as children of its span.
        if let Some((parent, state)) =
            tentacle_proto::telemetry::traceparent(&tracing::Span::current())
        {
            environment.push(("TRACEPARENT".into(), parent));
            if !state.is_empty() {
                environment.push(("TRACESTATE".into(), state));
            }
        }
        tracing::info!(ticket = %run.ticket, "script started");
        let job = Job {
            ticket: run.ticket.to_string(),
            workspace: run.workspace.dir().to_owned(),
            program,
            program_args,
            script_path,
            arguments: request.arguments.clone(),
            environment,
        };
        let output = OutputSink::new(run.log.clone(), masker);
        let execution = self.executor.execute(job, output, run.stop.clone());
        self.conclude(
            run,
            execution,
            request.execution_timeout,
            request.execution_timeout,
        )
        .await
    }

    /// Waits for `execution`, stopping it once `remaining` has passed, and
    /// turns its outcome into the exit code, with a line saying why for
    /// the codes the agent chose. `timeout` is the whole limit, for that
    /// line, when it is known.
    async fn conclude(
        &self,
        run: &Run,
        mut execution: BoxFuture<'static, Outcome>,
        remaining: Option<Duration>,
        timeout: Option<Duration>,
    ) -> i32 {
        let outcome = match remaining {
            None => execution.await,
            Some(limit) => tokio::select! {
                outcome = &mut execution => outcome,
                () = tokio::time::sleep(limit) => {
                    let _ = run.stop_reason.set(exit_code::TIMED_OUT);
                    run.stop.cancel();
                    execution.await
                }
            },
        };
        ended(run, outcome, timeout)
    }

    /// Follows a script an earlier agent process started until it ends.
    async fn resume(self: Arc<Self>, run: Arc<Run>, resumed: Resumed) {
        let metrics = &tentacle_proto::metrics::METRICS;
        metrics.scripts_running.inc();
        let _guard = resumed.guard;
        let remaining = resumed.deadline_ms.map(|deadline| {
            Duration::from_millis(u64::try_from(deadline - log::now_ms()).unwrap_or(0))
        });
        let exit_code = tokio::select! {
            exit_code = self.conclude(&run, resumed.execution, remaining, None) => exit_code,
            () = self.halted.cancelled() => {
                metrics.scripts_running.dec();
                return;
            }
        };
        metrics.scripts_running.dec();
        run.finish(exit_code);
        tracing::info!(ticket = %run.ticket, exit_code, "re-attached script complete");
    }

    /// Status and the log lines after `after`.
    pub fn status(
        &self,
        ticket: &Ticket,
        after: u64,
        max_lines: Option<usize>,
    ) -> Result<StatusReport, ScriptError> {
        match self.get(ticket) {
            Some(run) => self.report(&run, after, max_lines),
            None => Ok(self.not_in_table(ticket, after)),
        }
    }

    /// The status of a ticket that has no run in the table: its remembered
    /// result, or unknown.
    fn not_in_table(&self, ticket: &Ticket, after: u64) -> StatusReport {
        match self.tombstone.lookup(ticket, log::now_ms()) {
            Some(completed) => forgotten(ticket, completed, after),
            None => unknown(ticket, after),
        }
    }

    /// Stops the script; a complete script is left as it is.
    pub fn cancel(&self, ticket: &Ticket, after: u64) -> Result<StatusReport, ScriptError> {
        let Some(run) = self.get(ticket) else {
            return Ok(self.not_in_table(ticket, after));
        };
        if run.progress().phase != Phase::Complete {
            let _ = run.stop_reason.set(exit_code::CANCELED);
            run.stop.cancel();
            tracing::info!(ticket = %ticket, "script cancel requested");
        }
        self.report(&run, after, None)
    }

    /// Returns the final status and deletes the workspace. Repeating it
    /// returns the remembered result.
    pub async fn complete(&self, ticket: &Ticket, after: u64) -> Result<StatusReport, ScriptError> {
        let Some(run) = self.get(ticket) else {
            return Ok(self.not_in_table(ticket, after));
        };
        match run.progress().phase {
            Phase::Complete => {}
            Phase::Pending => return Err(ScriptError::NotComplete(ticket.clone(), "pending")),
            Phase::Running => return Err(ScriptError::NotComplete(ticket.clone(), "running")),
        }
        let report = self.report(&run, after, None)?;
        // Not forgotten (the record could not be written) leaves the
        // workspace in place; the caller still gets the final status, and
        // a repeated call or the cleaner tries again.
        let _forgotten = self.forget(&run).await;
        Ok(report)
    }

    /// Moves a complete run from the table and its workspace to the
    /// tombstone: the entry is synced first, then the run leaves the table,
    /// then the workspace is deleted. If the entry cannot be written the run
    /// and its workspace stay, so the ticket is still refused, and the next
    /// CompleteScript or cleaner pass tries again. Returns whether the run
    /// was forgotten.
    async fn forget(&self, run: &Arc<Run>) -> bool {
        if self.halted.is_cancelled() {
            // A halted agent writes nothing more, like a killed one.
            return false;
        }
        let progress = run.progress();
        let completed = Completed {
            exit_code: progress.exit_code,
            completed_ms: run
                .completed_ms
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .unwrap_or(run.created_ms),
            recorded_ms: log::now_ms(),
        };
        let tombstone = self.tombstone.clone();
        let ticket = run.ticket.clone();
        let recorded =
            tokio::task::spawn_blocking(move || tombstone.record(&ticket, completed)).await;
        if let Ok(Err(error)) | Err(error) = recorded.map_err(io::Error::other) {
            tracing::error!(ticket = %run.ticket, %error, path = %self.tombstone.path().display(), "could not record a completed ticket; keeping its workspace so it cannot run again");
            return false;
        }
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&run.ticket);
        let workspace = run.workspace.clone();
        let deleted = tokio::task::spawn_blocking(move || workspace.delete()).await;
        if let Ok(Err(error)) | Err(error) = deleted.map_err(io::Error::other) {
            // The entry stands; the next agent start deletes what is left.
            tracing::warn!(ticket = %run.ticket, %error, "could not delete a workspace");
        }
        true
    }

    fn report(
        &self,
        run: &Run,
        after: u64,
        max_lines: Option<usize>,
    ) -> Result<StatusReport, ScriptError> {
        // Read the phase before the log: if it says complete, the log the
        // caller gets is the whole log.
        let progress = run.progress();
        let limit = self.settings.page_limit(max_lines);
        let lines = run
            .log
            .read_after(after, limit)
            .map_err(|source| ScriptError::Log {
                ticket: run.ticket.clone(),
                source,
            })?;
        let last_sequence = lines.last().map_or(after, |l| l.seq);
        Ok(StatusReport {
            ticket: run.ticket.to_string(),
            phase: progress.phase,
            exit_code: progress.exit_code,
            more: run.log.last_sequence() > last_sequence,
            lines,
            last_sequence,
        })
    }

    /// Streams log lines after `after`, phase changes, and finally the result.
    /// The stream ends early if the receiver is dropped.
    pub fn watch(
        self: &Arc<Self>,
        ticket: &Ticket,
        after: u64,
    ) -> mpsc::Receiver<Result<WatchEvent, ScriptError>> {
        let (tx, rx) = mpsc::channel(4);
        let Some(run) = self.get(ticket) else {
            // A remembered ticket's log is gone with its workspace: only
            // the result remains.
            let report = self.not_in_table(ticket, after);
            let _ = tx.try_send(Ok(WatchEvent::Result {
                exit_code: report.exit_code,
                last_sequence: report.last_sequence,
            }));
            return rx;
        };
        let limit = self.settings.page_limit(None);
        tokio::spawn(async move {
            let mut log_changes = run.log.subscribe();
            let mut progress_changes = run.progress.subscribe();
            let mut cursor = after;
            let mut sent_phase = None;
            loop {
                log_changes.borrow_and_update();
                let progress = *progress_changes.borrow_and_update();
                let lines = match run.log.read_after(cursor, limit) {
                    Ok(lines) => lines,
                    Err(source) => {
                        let _ = tx
                            .send(Err(ScriptError::Log {
                                ticket: run.ticket.clone(),
                                source,
                            }))
                            .await;
                        return;
                    }
                };
                if let Some(last) = lines.last() {
                    cursor = last.seq;
                    if tx.send(Ok(WatchEvent::Lines(lines))).await.is_err() {
                        return;
                    }
                    continue;
                }
                if progress.phase == Phase::Complete {
                    let _ = tx
                        .send(Ok(WatchEvent::Result {
                            exit_code: progress.exit_code,
                            last_sequence: cursor,
                        }))
                        .await;
                    return;
                }
                if sent_phase != Some(progress.phase) {
                    sent_phase = Some(progress.phase);
                    if tx
                        .send(Ok(WatchEvent::Phase(progress.phase)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                tokio::select! {
                    _ = log_changes.changed() => {}
                    _ = progress_changes.changed() => {}
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }

    /// Loads the record of completed tickets and every workspace left on
    /// disk. A running script whose executor can follow it again (a
    /// detached script whose host still runs or recorded its end) is
    /// re-attached: it takes its isolation mutex again here, before the
    /// agent serves a call, and is followed to its real exit code. Scripts
    /// that were pending, or running and cannot be followed, are completed
    /// with [`exit_code::AGENT_RESTARTED`]. A workspace whose ticket is
    /// already in the record was being deleted when the agent stopped; its
    /// deletion is finished. Returns how many workspaces were loaded.
    ///
    /// A record that cannot be read does not stop the agent: the failure is
    /// logged, lines that do not parse are skipped, and what parses is kept.
    pub fn recover(self: &Arc<Self>) -> io::Result<usize> {
        let root = &self.settings.work_root;
        std::fs::create_dir_all(root)?;
        let now = log::now_ms();
        match self.tombstone.load(now) {
            Ok(loaded) if loaded.unreadable_lines > 0 => {
                tracing::warn!(path = %self.tombstone.path().display(), kept = loaded.kept, skipped = loaded.unreadable_lines, "skipped unreadable lines in the record of completed tickets");
            }
            Ok(loaded) => {
                tracing::debug!(kept = loaded.kept, "loaded the record of completed tickets");
            }
            Err(error) => {
                tracing::error!(path = %self.tombstone.path().display(), %error, "could not read the record of completed tickets; tickets in it may run again until it can be read");
            }
        }
        let mut loaded = 0;
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            let Some(ticket) = entry
                .file_name()
                .to_str()
                .and_then(|n| Ticket::parse(n).ok())
            else {
                continue;
            };
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if self.tombstone.lookup(&ticket, now).is_some() {
                tracing::info!(%ticket, "finishing the deletion of a completed workspace");
                if let Err(error) = Workspace::open(entry.path()).delete() {
                    tracing::warn!(%ticket, %error, "could not delete a workspace");
                }
                continue;
            }
            match self.recover_run(entry.path(), &ticket) {
                Ok((run, resumed)) => {
                    let run = Arc::new(run);
                    self.runs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(ticket, run.clone());
                    if let Some(resumed) = resumed {
                        tracing::info!(ticket = %run.ticket, "re-attached to a script started before the restart");
                        tokio::spawn(self.clone().resume(run, resumed));
                    }
                    loaded += 1;
                }
                Err(error) => {
                    tracing::warn!(%ticket, %error, "could not load a workspace left by an earlier run");
                }
            }
        }
        Ok(loaded)
    }

    /// Deletes complete workspaces older than the configured age. Returns how
    /// many were deleted.
    pub async fn clean_expired(&self) -> usize {
        let max_age_ms =
            i64::try_from(self.settings.workspace_max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = log::now_ms().saturating_sub(max_age_ms);
        let expired: Vec<Arc<Run>> = self
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|r| {
                r.progress().phase == Phase::Complete
                    && r.completed_ms
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .unwrap_or(r.created_ms)
                        <= cutoff
            })
            .cloned()
            .collect();
        let mut deleted = 0;
        for run in &expired {
            tracing::info!(ticket = %run.ticket, "deleting an expired workspace");
            if self.forget(run).await {
                deleted += 1;
            }
        }
        deleted
    }

    /// Runs [`Self::clean_expired`] every cleanup interval until `shutdown`.
    pub async fn run_cleaner(self: Arc<Self>, shutdown: CancellationToken) {
        let mut interval = tokio::time::interval(self.settings.cleanup_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => { self.clean_expired().await; }
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Stops what would not outlive the agent, for an agent that is going
    /// away: pending scripts, and running ones unless the executor detaches
    /// them (those keep running, and the next agent process re-attaches to
    /// them). Returns how many were stopped.
    pub fn stop_for_shutdown(&self) -> usize {
        let detaches = self.executor.detaches();
        let mut stopped = 0;
        for run in self
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let phase = run.progress().phase;
            let survives = detaches && phase == Phase::Running;
            if phase != Phase::Complete && !survives {
                run.stop.cancel();
                stopped += 1;
            }
        }
        stopped
    }

    /// Pending or running scripts that end with the agent (not detached
    /// running ones).
    pub fn active_attached(&self) -> usize {
        let detaches = self.executor.detaches();
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|r| {
                let phase = r.progress().phase;
                phase != Phase::Complete && !(detaches && phase == Phase::Running)
            })
            .count()
    }

    /// Stops every pending or running script, for an agent that is going away.
    pub fn stop_all(&self) {
        for run in self
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            run.stop.cancel();
        }
    }
}

impl Scripts {
    /// A workspace left by an earlier agent process, and what follows its
    /// script if it is still being run.
    fn recover_run(&self, dir: PathBuf, ticket: &Ticket) -> io::Result<(Run, Option<Resumed>)> {
        let workspace = Workspace::open(dir);
        let state = workspace.read_state().ok();
        let phase = state.as_ref().map_or(Phase::Pending, |s| s.phase);
        let followed = phase == Phase::Running && self.executor.detaches();
        let log = if followed {
            // Its host may be writing this very moment.
            log::ScriptLog::open_following(&workspace.output_log())?
        } else {
            log::ScriptLog::open(&workspace.output_log())?
        };
        let created_ms = state.as_ref().map_or_else(log::now_ms, |s| s.created_ms);
        let held = Held {
            mutex: state.as_ref().and_then(|s| s.mutex.clone()),
            deadline_ms: state.as_ref().and_then(|s| s.deadline_ms),
        };
        let run = Run {
            ticket: ticket.clone(),
            workspace,
            log,
            progress: watch::Sender::new(Progress {
                phase,
                exit_code: state.as_ref().map_or(0, |s| s.exit_code),
            }),
            stop: CancellationToken::new(),
            stop_reason: OnceLock::new(),
            created_ms,
            completed_ms: Mutex::new(state.as_ref().and_then(|s| s.completed_ms)),
            held: Mutex::new(held.clone()),
        };
        if phase == Phase::Complete {
            return Ok((run, None));
        }
        if followed {
            // Masking is the host's: it alone has the values. The agent's
            // own lines about this run hold none.
            let output = OutputSink::new(run.log.clone(), Masker::default());
            if let Some(mut execution) =
                self.executor
                    .reattach(run.workspace.dir(), output, run.stop.clone())
            {
                // Ended while no agent ran (or its host is gone): complete
                // before the first call is served.
                if let Some(outcome) = (&mut execution).now_or_never() {
                    let code = ended(&run, outcome, None);
                    run.finish(code);
                    tracing::info!(%ticket, exit_code = code, "a script ended while the agent was down");
                    return Ok((run, None));
                }
                let guard = held.mutex.as_ref().and_then(|mutex| {
                    let level = if mutex.exclusive {
                        IsolationLevel::Full
                    } else {
                        IsolationLevel::None
                    };
                    let guard = self.mutexes.try_acquire(&mutex.name, level);
                    if guard.is_none() {
                        tracing::warn!(%ticket, mutex = %mutex.name, "a re-attached script's isolation mutex is held by another re-attached script");
                    }
                    guard
                });
                return Ok((
                    run,
                    Some(Resumed {
                        execution,
                        guard,
                        deadline_ms: held.deadline_ms,
                    }),
                ));
            }
        }
        run.agent_line(
            "The agent restarted while this script was pending or running; its result is unknown.",
        );
        run.finish(exit_code::AGENT_RESTARTED);
        tracing::warn!(%ticket, "a script was interrupted by an agent restart");
        Ok((run, None))
    }
}

/// The exit code for `outcome`, with a line saying why for the codes the
/// agent chose. `timeout` is the whole limit, for that line, when known.
fn ended(run: &Run, outcome: Outcome, timeout: Option<Duration>) -> i32 {
    match outcome {
        Outcome::Exited(code) => code,
        Outcome::Stopped => {
            let code = *run.stop_reason.get().unwrap_or(&exit_code::CANCELED);
            if code == exit_code::TIMED_OUT {
                run.agent_line(match timeout {
                    Some(limit) => format!(
                        "Timed out after {}; the script and its child processes were killed.",
                        humantime::format_duration(limit)
                    ),
                    None => "Timed out; the script and its child processes were killed.".to_owned(),
                });
            } else {
                run.agent_line("Canceled; the script and its child processes were killed.");
            }
            code
        }
        Outcome::FailedToStart(message) => {
            run.agent_line(message);
            exit_code::FATAL
        }
        Outcome::Lost(message) => {
            run.agent_line(message);
            exit_code::AGENT_RESTARTED
        }
    }
}

/// Whole milliseconds, saturating.
fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A ticket whose workspace is gone: complete, with its exit code and no
/// lines.
fn forgotten(ticket: &Ticket, completed: Completed, after: u64) -> StatusReport {
    StatusReport {
        ticket: ticket.to_string(),
        phase: Phase::Complete,
        exit_code: completed.exit_code,
        lines: Vec::new(),
        last_sequence: after,
        more: false,
    }
}

fn unknown(ticket: &Ticket, after: u64) -> StatusReport {
    StatusReport {
        ticket: ticket.to_string(),
        phase: Phase::Complete,
        exit_code: exit_code::UNKNOWN_TICKET,
        lines: Vec::new(),
        last_sequence: after,
        more: false,
    }
}

/// The program, its leading arguments, and the script file's extension.
fn resolve_interpreter(
    interpreter: &Interpreter,
) -> Result<(PathBuf, Vec<String>, &'static str), String> {
    let (name, args, extension): (&str, Vec<String>, _) = match interpreter {
        Interpreter::Bash => ("bash", vec![], "sh"),
        Interpreter::Sh => ("sh", vec![], "sh"),
        Interpreter::Pwsh => (
            "pwsh",
            vec![
                "-NoLogo".into(),
                "-NoProfile".into(),
                "-NonInteractive".into(),
                "-File".into(),
            ],
            "ps1",
        ),
        Interpreter::Custom(path) => {
            return if path.is_file() {
                Ok((path.clone(), vec![], "script"))
            } else {
                Err(format!(
                    "The interpreter `{}` does not exist on this agent.",
                    path.display()
                ))
            };
        }
    };
    find_on_path(name)
        .map(|path| (path, args, extension))
        .ok_or_else(|| {
            format!("The interpreter `{name}` is not installed on this agent (not found on PATH).")
        })
}

/// The first executable called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
