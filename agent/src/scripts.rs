//! Script runs: the lifecycle of every ticket on this agent.
//!
//! [`Scripts`] owns the table of tickets. It makes each ticket's workspace,
//! waits for the isolation mutex, hands the job to an [`Executor`], enforces
//! the execution timeout and cancellation, records the result in the state
//! file, and serves the log back by sequence.
//!
//! Architecture Invariant: a ticket runs at most once per agent home. The
//! table entry is made under one lock before anything runs, and after a
//! restart every workspace on disk is loaded back before the first call is
//! served.

pub mod executor;
pub mod isolation;
pub mod log;
pub mod masking;
pub mod process;
mod ticket;
pub mod workspace;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use executor::{Executor, Job, Outcome, OutputSink};
pub use isolation::IsolationLevel;
pub use log::{LogRecord, ReadLimit, Stream};
use tentacle_proto::v1::ReservedExitCode;
pub use ticket::{InvalidTicket, Ticket};
use workspace::{Phase, StateFile, Workspace};

use isolation::IsolationMutexes;
use masking::Masker;

/// Exit codes the agent reports itself; see `ReservedExitCode` in the proto.
pub mod exit_code {
    use super::ReservedExitCode;
    pub const FATAL: i32 = ReservedExitCode::ExitCodeFatal as i32;
    pub const CANCELED: i32 = ReservedExitCode::ExitCodeCanceled as i32;
    pub const TIMED_OUT: i32 = ReservedExitCode::ExitCodeTimedOut as i32;
    pub const UNKNOWN_TICKET: i32 = ReservedExitCode::ExitCodeUnknownTicket as i32;
    pub const AGENT_RESTARTED: i32 = ReservedExitCode::ExitCodeAgentRestarted as i32;
}

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
    /// Lines in one GetStatus reply when the caller asks for no limit.
    pub default_page_lines: usize,
    /// Upper bound on lines in one reply or stream message.
    pub max_page_lines: usize,
    /// Upper bound on the bytes of log text in one reply or stream message.
    pub max_page_bytes: usize,
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
}

impl Run {
    fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    fn persist(&self) {
        let progress = self.progress();
        let state = StateFile {
            ticket: self.ticket.to_string(),
            phase: progress.phase,
            exit_code: progress.exit_code,
            created_ms: self.created_ms,
            completed_ms: *self
                .completed_ms
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
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
    /// Fired by [`Scripts::halt`].
    halted: CancellationToken,
}

impl Scripts {
    pub fn new(settings: ScriptSettings, executor: Arc<dyn Executor>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            executor,
            mutexes: IsolationMutexes::default(),
            runs: Mutex::new(HashMap::new()),
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
            workspace::validate_file_name(name).map_err(ScriptError::InvalidRequest)?;
        }
        if let Interpreter::Custom(path) = &request.interpreter
            && !path.is_absolute()
        {
            return Err(ScriptError::InvalidRequest(format!(
                "interpreter path `{}` must be absolute",
                path.display()
            )));
        }
        let run =
            {
                let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(existing) = runs.get(&request.ticket) {
                    let existing = existing.clone();
                    drop(runs);
                    return self.report(&existing, 0, None);
                }
                let workspace = Workspace::create(&self.settings.work_root, &request.ticket)
                    .map_err(|source| ScriptError::Workspace {
                        ticket: request.ticket.clone(),
                        source,
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
        let mut execution = self.executor.execute(job, output, run.stop.clone());
        let outcome = match request.execution_timeout {
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
        match outcome {
            Outcome::Exited(code) => code,
            Outcome::Stopped => {
                let code = *run.stop_reason.get().unwrap_or(&exit_code::CANCELED);
                if code == exit_code::TIMED_OUT {
                    run.agent_line(format!(
                        "Timed out after {}; the script and its child processes were killed.",
                        humantime::format_duration(request.execution_timeout.unwrap_or_default())
                    ));
                } else {
                    run.agent_line("Canceled; the script and its child processes were killed.");
                }
                code
            }
            Outcome::FailedToStart(message) => {
                run.agent_line(message);
                exit_code::FATAL
            }
        }
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
            None => Ok(unknown(ticket, after)),
        }
    }

    /// Stops the script; a complete script is left as it is.
    pub fn cancel(&self, ticket: &Ticket, after: u64) -> Result<StatusReport, ScriptError> {
        let Some(run) = self.get(ticket) else {
            return Ok(unknown(ticket, after));
        };
        if run.progress().phase != Phase::Complete {
            let _ = run.stop_reason.set(exit_code::CANCELED);
            run.stop.cancel();
            tracing::info!(ticket = %ticket, "script cancel requested");
        }
        self.report(&run, after, None)
    }

    /// Returns the final status and deletes the workspace.
    pub async fn complete(&self, ticket: &Ticket, after: u64) -> Result<StatusReport, ScriptError> {
        let Some(run) = self.get(ticket) else {
            return Ok(unknown(ticket, after));
        };
        match run.progress().phase {
            Phase::Complete => {}
            Phase::Pending => return Err(ScriptError::NotComplete(ticket.clone(), "pending")),
            Phase::Running => return Err(ScriptError::NotComplete(ticket.clone(), "running")),
        }
        let report = self.report(&run, after, None)?;
        self.forget(&run).await;
        Ok(report)
    }

    async fn forget(&self, run: &Arc<Run>) {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&run.ticket);
        let workspace = run.workspace.clone();
        let deleted = tokio::task::spawn_blocking(move || workspace.delete()).await;
        if let Ok(Err(error)) | Err(error) = deleted.map_err(io::Error::other) {
            tracing::warn!(ticket = %run.ticket, %error, "could not delete a workspace");
        }
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
        let limit = ReadLimit {
            max_lines: max_lines
                .unwrap_or(self.settings.default_page_lines)
                .clamp(1, self.settings.max_page_lines),
            max_bytes: self.settings.max_page_bytes,
        };
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
            let _ = tx.try_send(Ok(WatchEvent::Result {
                exit_code: exit_code::UNKNOWN_TICKET,
                last_sequence: after,
            }));
            return rx;
        };
        let limit = ReadLimit {
            max_lines: self.settings.default_page_lines,
            max_bytes: self.settings.max_page_bytes,
        };
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

    /// Loads every workspace left on disk. Scripts that were pending or
    /// running when the previous agent process stopped are completed with
    /// [`exit_code::AGENT_RESTARTED`]. Returns how many workspaces were loaded.
    pub fn recover(&self) -> io::Result<usize> {
        let root = &self.settings.work_root;
        std::fs::create_dir_all(root)?;
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
            match recover_run(entry.path(), &ticket) {
                Ok(run) => {
                    self.runs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(ticket, Arc::new(run));
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
        for run in &expired {
            tracing::info!(ticket = %run.ticket, "deleting an expired workspace");
            self.forget(run).await;
        }
        expired.len()
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

fn recover_run(dir: PathBuf, ticket: &Ticket) -> io::Result<Run> {
    let workspace = Workspace::open(dir);
    let log = log::ScriptLog::open(&workspace.output_log())?;
    let state = workspace.read_state().ok();
    let created_ms = state.as_ref().map_or_else(log::now_ms, |s| s.created_ms);
    let run = Run {
        ticket: ticket.clone(),
        workspace,
        log,
        progress: watch::Sender::new(Progress {
            phase: state.as_ref().map_or(Phase::Pending, |s| s.phase),
            exit_code: state.as_ref().map_or(0, |s| s.exit_code),
        }),
        stop: CancellationToken::new(),
        stop_reason: OnceLock::new(),
        created_ms,
        completed_ms: Mutex::new(state.as_ref().and_then(|s| s.completed_ms)),
    };
    if run.progress().phase != Phase::Complete {
        run.agent_line(
            "The agent restarted while this script was pending or running; its result is unknown.",
        );
        run.finish(exit_code::AGENT_RESTARTED);
        tracing::warn!(%ticket, "a script was interrupted by an agent restart");
    }
    Ok(run)
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
