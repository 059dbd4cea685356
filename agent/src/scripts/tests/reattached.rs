//! Scripts started by an earlier agent process and followed again after a
//! restart, with an executor that re-attaches the way detached scripts do
//! (the real host is covered end to end in `script_survival.rs`).

use std::sync::Mutex as StdMutex;

use tokio::sync::oneshot;

use super::*;

/// What [`Reattaching`] does for a workspace left running.
enum Left {
    /// The script ended while no agent ran.
    Ended(Outcome),
    /// Still running: ends with the code sent, or stops when told to.
    Running(oneshot::Receiver<i32>),
}

/// Runs new scripts as [`Scripted`] does and re-attaches to the ones
/// listed in `left`, by ticket.
#[derive(Debug, Default)]
struct Reattaching {
    left: StdMutex<HashMap<String, Left>>,
}

impl std::fmt::Debug for Left {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ended(_) => "Ended",
            Self::Running(_) => "Running",
        })
    }
}

impl Executor for Reattaching {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome> {
        Scripted.execute(job, output, stop)
    }

    fn detaches(&self) -> bool {
        true
    }

    fn reattach(
        &self,
        workspace: &Path,
        output: OutputSink,
        stop: CancellationToken,
    ) -> Option<BoxFuture<'static, Outcome>> {
        let ticket = workspace.file_name()?.to_str()?.to_owned();
        let left = self
            .left
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ticket)?;
        Some(match left {
            Left::Ended(outcome) => futures::future::ready(outcome).boxed(),
            Left::Running(exit) => async move {
                tokio::select! {
                    code = exit => {
                        // What the host wrote while it ran.
                        output.catch_up();
                        Outcome::Exited(code.unwrap_or(-1))
                    }
                    () = stop.cancelled() => Outcome::Stopped,
                }
            }
            .boxed(),
        })
    }
}

/// A workspace an earlier agent left with its script running, holding
/// `mutex` exclusively, with one line of output.
fn left_running(root: &Path, ticket: &str, mutex: &str) -> Workspace {
    let ws = Workspace::create(root, &Ticket::parse(ticket).expect("ticket")).expect("workspace");
    ws.write_state(&StateFile {
        ticket: ticket.into(),
        phase: Phase::Running,
        exit_code: 0,
        created_ms: log::now_ms(),
        completed_ms: None,
        mutex: Some(HeldMutex {
            name: mutex.into(),
            exclusive: true,
        }),
        deadline_ms: None,
    })
    .expect("state");
    log::ScriptLog::open(&ws.output_log())
        .expect("log")
        .append([(Stream::Stdout, "before the restart".into())])
        .expect("append");
    ws
}

fn reattaching(root: &Path, left: Vec<(&str, Left)>) -> Arc<Scripts> {
    let executor = Reattaching::default();
    executor.left.lock().expect("lock").extend(
        left.into_iter()
            .map(|(ticket, left)| (ticket.to_owned(), left)),
    );
    Scripts::new(ScriptSettings::new(root.to_owned()), Arc::new(executor))
}

#[tokio::test]
async fn a_reattached_script_holds_its_mutex_from_startup_and_reports_its_own_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = left_running(dir.path(), "old", "deploy");
    let (end, exit) = oneshot::channel();
    let scripts = reattaching(dir.path(), vec![("old", Left::Running(exit))]);
    assert_eq!(scripts.recover().expect("recover"), 1);
    let old = Ticket::parse("old").expect("ticket");
    assert_eq!(
        scripts.status(&old, 0, None).expect("status").phase,
        Phase::Running
    );

    // Taken before any new script could ask for it.
    scripts.start(request("new", "out ran")).expect("start");
    let mut deploy = request("deploy-new", "out ran");
    deploy.mutex_name = "deploy".into();
    scripts.start(deploy).expect("start");
    assert_eq!(
        wait_complete(&scripts, "new").await.exit_code,
        0,
        "another mutex is free"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiting = scripts
        .status(&Ticket::parse("deploy-new").expect("ticket"), 0, None)
        .expect("status");
    assert_eq!(waiting.phase, Phase::Pending);
    assert!(
        waiting.lines[0].text.contains("Waiting"),
        "{:?}",
        waiting.lines
    );

    // The host writes a line while the agent follows, then the script ends.
    let host_log = log::ScriptLog::open(&ws.output_log()).expect("host's log");
    host_log
        .append([(Stream::Stdout, "after the restart".into())])
        .expect("append");
    end.send(7).expect("still followed");
    let report = wait_complete(&scripts, "old").await;
    assert_eq!(report.exit_code, 7);
    assert_eq!(
        report
            .lines
            .iter()
            .map(|l| (l.seq, l.text.as_str()))
            .collect::<Vec<_>>(),
        [(1, "before the restart"), (2, "after the restart")]
    );
    let deploy_new = wait_complete(&scripts, "deploy-new").await;
    assert_eq!(deploy_new.exit_code, 0);
    assert_eq!(
        Workspace::open(dir.path().join("old"))
            .read_state()
            .expect("state")
            .exit_code,
        7
    );
}

#[tokio::test]
async fn a_script_that_ended_while_the_agent_was_down_is_complete_before_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    left_running(dir.path(), "ended", "m1");
    left_running(dir.path(), "lost", "m2");
    left_running(dir.path(), "untracked", "m3");
    let scripts = reattaching(
        dir.path(),
        vec![
            ("ended", Left::Ended(Outcome::Exited(5))),
            (
                "lost",
                Left::Ended(Outcome::Lost("gone without a record".into())),
            ),
        ],
    );
    assert_eq!(scripts.recover().expect("recover"), 3);
    let status = |name: &str| {
        scripts
            .status(&Ticket::parse(name).expect("ticket"), 0, None)
            .expect("status")
    };
    // No task had a chance to run: all three are settled by `recover`.
    let ended = status("ended");
    assert_eq!((ended.phase, ended.exit_code), (Phase::Complete, 5));
    assert_eq!(
        ended.lines.len(),
        1,
        "the script's own code needs no word from the agent"
    );
    let lost = status("lost");
    assert_eq!(
        (lost.phase, lost.exit_code),
        (Phase::Complete, exit_code::AGENT_RESTARTED)
    );
    assert_eq!(lost.lines[1].text, "gone without a record");
    let untracked = status("untracked");
    assert_eq!(
        (untracked.phase, untracked.exit_code),
        (Phase::Complete, exit_code::AGENT_RESTARTED)
    );
    // Their mutexes are free again.
    for mutex in ["m1", "m2", "m3"] {
        assert!(
            scripts
                .mutexes
                .try_acquire(mutex, IsolationLevel::Full)
                .is_some(),
            "{mutex}"
        );
    }
}

#[tokio::test]
async fn cancelling_a_reattached_script_stops_it_and_a_shutdown_leaves_it_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    left_running(dir.path(), "old", "deploy");
    let (_end, exit) = oneshot::channel();
    let scripts = reattaching(dir.path(), vec![("old", Left::Running(exit))]);
    scripts.recover().expect("recover");
    let old = Ticket::parse("old").expect("ticket");

    // A detached running script is left to the next agent process.
    assert_eq!(scripts.stop_for_shutdown(), 0);
    assert_eq!(scripts.active_attached(), 0);
    assert_eq!(scripts.active(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        scripts.status(&old, 0, None).expect("status").phase,
        Phase::Running
    );

    scripts.cancel(&old, 0).expect("cancel");
    let report = wait_complete(&scripts, "old").await;
    assert_eq!(report.exit_code, exit_code::CANCELED);
    assert!(
        report
            .lines
            .last()
            .is_some_and(|l| l.text.starts_with("Canceled")),
        "{:?}",
        report.lines
    );
}

#[tokio::test]
async fn the_execution_timeout_still_applies_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ws = left_running(dir.path(), "slow", "deploy");
    let mut state = ws.read_state().expect("state");
    state.deadline_ms = Some(log::now_ms() + 100);
    ws.write_state(&state).expect("state");
    let (_end, exit) = oneshot::channel();
    let scripts = reattaching(dir.path(), vec![("slow", Left::Running(exit))]);
    scripts.recover().expect("recover");
    let report = wait_complete(&scripts, "slow").await;
    assert_eq!(report.exit_code, exit_code::TIMED_OUT);
    assert!(
        report
            .lines
            .last()
            .is_some_and(|l| l.text.starts_with("Timed out")),
        "{:?}",
        report.lines
    );
}
