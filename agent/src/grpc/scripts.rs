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
        // 0 asks for the default page; any number is capped by the
        // settings in `Scripts`, however large a client makes it.
        let max_lines = Some(usize::try_from(request.max_lines).unwrap_or(usize::MAX));
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

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use futures::future::BoxFuture;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::scripts::{Executor, Job, Outcome, OutputSink, ScriptSettings};

    /// Writes as many stdout lines as the script body says.
    #[derive(Debug)]
    struct Lines;

    impl Executor for Lines {
        fn execute(
            &self,
            job: Job,
            output: OutputSink,
            _stop: CancellationToken,
        ) -> BoxFuture<'static, Outcome> {
            async move {
                let body = std::fs::read_to_string(&job.script_path).unwrap_or_default();
                let count: u64 = body.trim().parse().unwrap_or(0);
                output.write((1..=count).map(|i| (Stream::Stdout, format!("line {i}"))));
                Outcome::Exited(0)
            }
            .boxed()
        }
    }

    fn get_status(ticket: &str, max_lines: u32) -> Request<pb::GetStatusRequest> {
        Request::new(pb::GetStatusRequest {
            ticket: ticket.into(),
            after_sequence: 0,
            max_lines,
        })
    }

    #[tokio::test]
    async fn a_huge_page_request_gets_at_most_the_configured_maximum() {
        tokio::time::pause();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = ScriptSettings::new(dir.path().to_owned());
        settings.default_page_lines = 3;
        settings.max_page_lines = 5;
        let api = ScriptApi::new(Scripts::new(settings, Arc::new(Lines)));
        api.start_script(Request::new(pb::StartScriptRequest {
            ticket: "many".into(),
            script_body: "12".into(),
            interpreter: pb::Interpreter::Sh as i32,
            ..Default::default()
        }))
        .await
        .expect("start");
        for _ in 0..100 {
            let status = api
                .get_status(get_status("many", 0))
                .await
                .expect("status")
                .into_inner();
            if status.state == pb::ScriptState::Complete as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let huge = api
            .get_status(get_status("many", u32::MAX))
            .await
            .expect("status")
            .into_inner();
        assert_eq!(huge.state, pb::ScriptState::Complete as i32);
        assert_eq!(huge.logs.len(), 5, "capped at max_page_lines");
        assert_eq!(huge.last_sequence, 5);
        assert!(huge.more_logs);

        let default = api
            .get_status(get_status("many", 0))
            .await
            .expect("status")
            .into_inner();
        assert_eq!(default.logs.len(), 3, "0 means the default page");

        let small = api
            .get_status(get_status("many", 2))
            .await
            .expect("status")
            .into_inner();
        assert_eq!(small.logs.len(), 2, "smaller requests are honoured");
    }
}
