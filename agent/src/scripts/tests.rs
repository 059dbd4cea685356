//! The script lifecycle with a scripted executor: fast, no processes.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;

/// Interprets the script body line by line: `out TEXT`, `err TEXT`,
/// `sleep MS`, `exit CODE`. Stops when told to.
#[derive(Debug)]
struct Scripted;

impl Executor for Scripted {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome> {
        async move {
            let body = std::fs::read_to_string(&job.script_path).unwrap_or_default();
            for line in body.lines() {
                let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
                match verb {
                    "out" => output.write([(Stream::Stdout, rest.to_owned())]),
                    "err" => output.write([(Stream::Stderr, rest.to_owned())]),
                    "sleep" => {
                        let ms = rest.parse().unwrap_or(0);
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                            () = stop.cancelled() => return Outcome::Stopped,
                        }
                    }
                    "exit" => return Outcome::Exited(rest.parse().unwrap_or(0)),
                    _ => {}
                }
            }
            Outcome::Exited(0)
        }
        .boxed()
    }
}

fn scripts(root: &Path) -> Arc<Scripts> {
    Scripts::new(ScriptSettings::new(root.to_owned()), Arc::new(Scripted))
}

fn request(ticket: &str, body: &str) -> StartRequest {
    StartRequest {
        ticket: Ticket::parse(ticket).expect("ticket"),
        body: body.to_owned(),
        interpreter: Interpreter::Sh,
        arguments: vec![],
        environment: vec![],
        files: vec![],
        isolation: IsolationLevel::Full,
        mutex_name: String::new(),
        mutex_timeout: None,
        execution_timeout: None,
        sensitive_values: vec![],
    }
}

async fn wait_complete(scripts: &Scripts, ticket: &str) -> StatusReport {
    let ticket = Ticket::parse(ticket).expect("ticket");
    for _ in 0..500 {
        let report = scripts.status(&ticket, 0, None).expect("status");
        if report.phase == Phase::Complete {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{ticket} never completed");
}

#[tokio::test]
async fn runs_once_per_ticket_and_records_the_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = scripts(dir.path());
    let first = scripts
        .start(request("t", "out a\nerr b\nexit 4"))
        .expect("start");
    assert_eq!(first.phase, Phase::Pending);
    let report = wait_complete(&scripts, "t").await;
    assert_eq!(report.exit_code, 4);
    assert_eq!(
        report.lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    // Same ticket, different body: nothing new runs.
    let again = scripts.start(request("t", "out twice")).expect("repeat");
    assert_eq!(again.exit_code, 4);
    assert_eq!(again.lines.len(), 2);
    let state = Workspace::open(dir.path().join("t"))
        .read_state()
        .expect("state file");
    assert_eq!((state.phase, state.exit_code), (Phase::Complete, 4));
}

#[tokio::test]
async fn watch_sends_lines_then_the_result_and_resumes_by_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = scripts(dir.path());
    scripts
        .start(request("w", "out 1\nsleep 50\nout 2\nout 3\nexit 0"))
        .expect("start");
    let ticket = Ticket::parse("w").expect("ticket");
    let mut events = scripts.watch(&ticket, 1);
    let mut seqs = Vec::new();
    let mut result = None;
    while let Some(event) = events.recv().await {
        match event.expect("event") {
            WatchEvent::Lines(lines) => seqs.extend(lines.iter().map(|l| l.seq)),
            WatchEvent::Phase(_) => {}
            WatchEvent::Result {
                exit_code,
                last_sequence,
            } => result = Some((exit_code, last_sequence)),
        }
    }
    assert_eq!(seqs, [2, 3]);
    assert_eq!(result, Some((0, 3)));
}

#[tokio::test]
async fn cancel_while_waiting_for_the_mutex_never_runs_the_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = scripts(dir.path());
    scripts
        .start(request("holder", "sleep 10000"))
        .expect("start");
    tokio::time::sleep(Duration::from_millis(50)).await;
    scripts.start(request("waiter", "out ran")).expect("start");
    let waiter = Ticket::parse("waiter").expect("ticket");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        scripts.status(&waiter, 0, None).expect("status").phase,
        Phase::Pending
    );
    scripts.cancel(&waiter, 0).expect("cancel");
    let report = wait_complete(&scripts, "waiter").await;
    assert_eq!(report.exit_code, exit_code::CANCELED);
    assert!(report.lines.iter().all(|l| l.stream == Stream::Agent));
    scripts
        .cancel(&Ticket::parse("holder").expect("ticket"), 0)
        .expect("cancel");
    assert_eq!(
        wait_complete(&scripts, "holder").await.exit_code,
        exit_code::CANCELED
    );
}

#[tokio::test]
async fn recovery_completes_interrupted_scripts_and_the_cleaner_expires_old_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let ws =
            Workspace::create(dir.path(), &Ticket::parse("interrupted").expect("t")).expect("ws");
        ws.write_state(&StateFile {
            ticket: "interrupted".into(),
            phase: Phase::Running,
            exit_code: 0,
            created_ms: 1,
            completed_ms: None,
            mutex: None,
            deadline_ms: None,
        })
        .expect("state");
        log::ScriptLog::open(&ws.output_log())
            .expect("log")
            .append([(Stream::Stdout, "half way".into())])
            .expect("append");
    }
    let mut settings = ScriptSettings::new(dir.path().to_owned());
    settings.workspace_max_age = Duration::from_secs(3600);
    let scripts = Scripts::new(settings, Arc::new(Scripted));
    assert_eq!(scripts.recover().expect("recover"), 1);
    let ticket = Ticket::parse("interrupted").expect("ticket");
    let report = scripts.status(&ticket, 0, None).expect("status");
    assert_eq!(
        (report.phase, report.exit_code),
        (Phase::Complete, exit_code::AGENT_RESTARTED)
    );
    assert_eq!(report.lines[0].text, "half way");
    assert_eq!(report.lines.len(), 2);

    // Completed just now: younger than the maximum age, so it stays.
    assert_eq!(scripts.clean_expired().await, 0);
    let mut settings = ScriptSettings::new(dir.path().to_owned());
    settings.workspace_max_age = Duration::ZERO;
    let eager = Scripts::new(settings, Arc::new(Scripted));
    eager.recover().expect("recover");
    assert_eq!(eager.clean_expired().await, 1);
    assert!(!dir.path().join("interrupted").exists());
}

#[tokio::test]
async fn unknown_tickets_report_the_reserved_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = scripts(dir.path());
    let ticket = Ticket::parse("nobody").expect("ticket");
    let report = scripts.status(&ticket, 5, None).expect("status");
    assert_eq!(
        (report.exit_code, report.last_sequence),
        (exit_code::UNKNOWN_TICKET, 5)
    );
    assert_eq!(
        scripts.cancel(&ticket, 0).expect("cancel").exit_code,
        exit_code::UNKNOWN_TICKET
    );
}

mod completed;
mod reattached;
