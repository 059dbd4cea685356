//! `tentacle.v1.ScriptService` over [`Scripts`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::v1 as pb;
use tentacle_proto::v1::script_service_server::ScriptService;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::scripts::workspace::Phase;
use crate::scripts::{
    EnvVar, Interpreter, IsolationLevel, LogRecord, Scripts, StartRequest, StatusReport, Stream,
    Ticket, WatchEvent,
};

/// The script service; cheap to clone.
#[derive(Debug, Clone)]
pub struct ScriptApi {
    scripts: Arc<Scripts>,
}

impl ScriptApi {
    pub fn new(scripts: Arc<Scripts>) -> Self {
        Self { scripts }
    }
}

type WatchStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchScriptEvent, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl ScriptService for ScriptApi {
    async fn start_script(
        &self,
        request: Request<pb::StartScriptRequest>,
    ) -> Result<Response<pb::ScriptStatus>, Status> {
        let request = start_request(request.into_inner())?;
        let report = self.scripts.start(request)?;
        Ok(Response::new(status(report)))
    }

    type WatchScriptStream = WatchStream;

    async fn watch_script(
        &self,
        request: Request<pb::WatchScriptRequest>,
    ) -> Result<Response<Self::WatchScriptStream>, Status> {
        let request = request.into_inner();
        let ticket = Ticket::parse(&request.ticket)?;
        let events = self.scripts.watch(&ticket, request.after_sequence);
        let stream =
            ReceiverStream::new(events).map(|event| event.map(watch_event).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ScriptStatus>, Status> {
        let request = request.into_inner();
        let ticket = Ticket::parse(&request.ticket)?;
        let max_lines = (request.max_lines > 0).then_some(request.max_lines as usize);
        let report = self
            .scripts
            .status(&ticket, request.after_sequence, max_lines)?;
        Ok(Response::new(status(report)))
    }

    async fn cancel_script(
        &self,
        request: Request<pb::CancelScriptRequest>,
    ) -> Result<Response<pb::ScriptStatus>, Status> {
        let request = request.into_inner();
        let ticket = Ticket::parse(&request.ticket)?;
        let report = self.scripts.cancel(&ticket, request.after_sequence)?;
        Ok(Response::new(status(report)))
    }

    async fn complete_script(
        &self,
        request: Request<pb::CompleteScriptRequest>,
    ) -> Result<Response<pb::ScriptStatus>, Status> {
        let request = request.into_inner();
        let ticket = Ticket::parse(&request.ticket)?;
        let report = self
            .scripts
            .complete(&ticket, request.after_sequence)
            .await?;
        Ok(Response::new(status(report)))
    }
}

fn start_request(request: pb::StartScriptRequest) -> Result<StartRequest, Status> {
    let ticket = Ticket::parse(&request.ticket)?;
    let interpreter = match pb::Interpreter::try_from(request.interpreter) {
        Ok(pb::Interpreter::Unspecified | pb::Interpreter::Bash) => Interpreter::Bash,
        Ok(pb::Interpreter::Sh) => Interpreter::Sh,
        Ok(pb::Interpreter::Pwsh) => Interpreter::Pwsh,
        Ok(pb::Interpreter::Custom) => {
            if request.interpreter_path.is_empty() {
                return Err(Status::invalid_argument(
                    "interpreter is INTERPRETER_CUSTOM but interpreter_path is empty: give the interpreter's absolute path",
                ));
            }
            Interpreter::Custom(PathBuf::from(&request.interpreter_path))
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown interpreter {}: use bash, sh, pwsh or custom",
                request.interpreter
            )));
        }
    };
    let isolation = match pb::Isolation::try_from(request.isolation) {
        Ok(pb::Isolation::Unspecified | pb::Isolation::Full) => IsolationLevel::Full,
        Ok(pb::Isolation::None) => IsolationLevel::None,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown isolation {}: use full or none",
                request.isolation
            )));
        }
    };
    for variable in &request.environment {
        if variable.name.is_empty() || variable.name.contains(['=', '\0']) {
            return Err(Status::invalid_argument(format!(
                "environment variable name `{}` is not valid: it must be non-empty without `=`",
                variable.name
            )));
        }
    }
    Ok(StartRequest {
        ticket,
        body: request.script_body,
        interpreter,
        arguments: request.arguments,
        environment: request
            .environment
            .into_iter()
            .map(|v| EnvVar {
                name: v.name,
                value: v.value,
                sensitive: v.sensitive,
            })
            .collect(),
        files: request
            .files
            .into_iter()
            .map(|f| (f.name, f.content))
            .collect(),
        isolation,
        mutex_name: request.mutex_name,
        mutex_timeout: duration(request.mutex_timeout, "mutex_timeout")?,
        execution_timeout: duration(request.execution_timeout, "execution_timeout")?,
        sensitive_values: request.sensitive_values,
    })
}

fn duration(value: Option<prost_types::Duration>, field: &str) -> Result<Option<Duration>, Status> {
    value
        .map(|d| {
            Duration::try_from(d).map_err(|_| {
                Status::invalid_argument(format!("{field} must be a non-negative duration"))
            })
        })
        .transpose()
}

fn phase(phase: Phase) -> pb::ScriptState {
    match phase {
        Phase::Pending => pb::ScriptState::Pending,
        Phase::Running => pb::ScriptState::Running,
        Phase::Complete => pb::ScriptState::Complete,
    }
}

fn line(record: LogRecord) -> pb::LogLine {
    pb::LogLine {
        sequence: record.seq,
        stream: match record.stream {
            Stream::Stdout => pb::LogStream::Stdout,
            Stream::Stderr => pb::LogStream::Stderr,
            Stream::Agent => pb::LogStream::Agent,
        } as i32,
        time: Some(prost_types::Timestamp {
            seconds: record.time_ms.div_euclid(1000),
            nanos: i32::try_from(record.time_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
        }),
        text: record.text,
    }
}

fn status(report: StatusReport) -> pb::ScriptStatus {
    pb::ScriptStatus {
        ticket: report.ticket,
        state: phase(report.phase) as i32,
        exit_code: report.exit_code,
        logs: report.lines.into_iter().map(line).collect(),
        last_sequence: report.last_sequence,
        more_logs: report.more,
    }
}

fn watch_event(event: WatchEvent) -> pb::WatchScriptEvent {
    use pb::watch_script_event::Event;
    let event = match event {
        WatchEvent::Lines(lines) => Event::Logs(pb::LogBatch {
            lines: lines.into_iter().map(line).collect(),
        }),
        WatchEvent::Phase(p) => Event::State(phase(p) as i32),
        WatchEvent::Result {
            exit_code,
            last_sequence,
        } => Event::Result(pb::ScriptResult {
            exit_code,
            last_sequence,
        }),
    };
    pb::WatchScriptEvent { event: Some(event) }
}
