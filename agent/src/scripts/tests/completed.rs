//! Completed tickets stay refused after their workspace is gone: after
//! CompleteScript, after the cleaner, and after a restart, within the
//! tombstone's bounds.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::scripts::tombstone::FILE_NAME;

/// [`Scripted`], counting how often it is asked to run anything.
#[derive(Debug, Default)]
struct Counting {
    runs: AtomicUsize,
}

impl Counting {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

impl Executor for Counting {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Scripted.execute(job, output, stop)
    }
}

fn counted(settings: ScriptSettings) -> (Arc<Scripts>, Arc<Counting>) {
    let executor = Arc::new(Counting::default());
    let scripts = Scripts::new(settings, executor.clone());
    (scripts, executor)
}

fn ticket(name: &str) -> Ticket {
    Ticket::parse(name).expect("ticket")
}

/// Runs `name` to completion with exit code `code` and CompleteScripts it.
async fn run_and_complete(scripts: &Arc<Scripts>, name: &str, code: i32) {
    scripts
        .start(request(name, &format!("out hello\nexit {code}")))
        .expect("start");
    assert_eq!(wait_complete(scripts, name).await.exit_code, code);
    let done = scripts.complete(&ticket(name), 0).await.expect("complete");
    assert_eq!((done.phase, done.exit_code), (Phase::Complete, code));
    assert_eq!(done.lines.len(), 1, "the final status still has the log");
}

/// A repeated start of `name` is answered from the tombstone: complete,
/// `code`, no lines, and nothing runs or is created.
async fn assert_refused(
    scripts: &Arc<Scripts>,
    executor: &Counting,
    name: &str,
    code: i32,
    root: &Path,
) {
    let runs_before = executor.runs();
    let again = scripts
        .start(request(name, "out again\nexit 0"))
        .expect("repeat");
    assert_eq!(
        (again.phase, again.exit_code, again.lines.len(), again.more),
        (Phase::Complete, code, 0, false)
    );
    // Give anything that was wrongly spawned the chance to run.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(executor.runs(), runs_before, "{name} ran again");
    assert_eq!(scripts.active(), 0);
    assert!(!root.join(name).exists(), "no new workspace for {name}");
}

#[tokio::test]
async fn a_ticket_is_not_run_again_after_complete_script() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let (scripts, executor) = counted(ScriptSettings::new(dir.path().to_owned()));
    run_and_complete(&scripts, "once", 7).await;
    assert_eq!(executor.runs(), 1);
    assert!(!dir.path().join("once").exists(), "workspace deleted");
    assert_refused(&scripts, &executor, "once", 7, dir.path()).await;
}

#[tokio::test]
async fn a_ticket_is_not_run_again_after_the_cleaner_deleted_its_workspace() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = ScriptSettings::new(dir.path().to_owned());
    settings.workspace_max_age = Duration::ZERO;
    let (scripts, executor) = counted(settings);
    scripts.start(request("old", "exit 3")).expect("start");
    wait_complete(&scripts, "old").await;
    assert_eq!(scripts.clean_expired().await, 1);
    assert!(!dir.path().join("old").exists(), "workspace deleted");
    assert_refused(&scripts, &executor, "old", 3, dir.path()).await;
    assert_eq!(executor.runs(), 1);
}

#[tokio::test]
async fn a_restarted_agent_still_refuses_a_completed_ticket() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (scripts, _) = counted(ScriptSettings::new(dir.path().to_owned()));
        scripts.recover().expect("recover");
        run_and_complete(&scripts, "before-restart", 5).await;
    }
    let (restarted, executor) = counted(ScriptSettings::new(dir.path().to_owned()));
    assert_eq!(
        restarted.recover().expect("recover"),
        0,
        "no workspaces left"
    );
    assert_refused(&restarted, &executor, "before-restart", 5, dir.path()).await;
    assert_eq!(executor.runs(), 0);
    // New tickets still run.
    restarted.start(request("new", "exit 0")).expect("start");
    assert_eq!(wait_complete(&restarted, "new").await.exit_code, 0);
    assert_eq!(executor.runs(), 1);
}

#[tokio::test]
async fn status_watch_cancel_and_complete_of_a_forgotten_ticket_report_its_result() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let (scripts, _) = counted(ScriptSettings::new(dir.path().to_owned()));
    run_and_complete(&scripts, "gone", 9).await;
    let gone = ticket("gone");

    let status = scripts.status(&gone, 3, Some(100)).expect("status");
    assert_eq!(
        status,
        StatusReport {
            ticket: "gone".into(),
            phase: Phase::Complete,
            exit_code: 9,
            lines: vec![],
            last_sequence: 3,
            more: false,
        }
    );

    let mut events = scripts.watch(&gone, 0);
    let mut seen = Vec::new();
    while let Some(event) = events.recv().await {
        seen.push(event.expect("event"));
    }
    assert_eq!(
        seen,
        [WatchEvent::Result {
            exit_code: 9,
            last_sequence: 0
        }]
    );

    let canceled = scripts.cancel(&gone, 0).expect("cancel");
    assert_eq!(
        (canceled.phase, canceled.exit_code, canceled.lines.len()),
        (Phase::Complete, 9, 0)
    );
    let completed = scripts.complete(&gone, 0).await.expect("complete again");
    assert_eq!(
        (completed.phase, completed.exit_code, completed.lines.len()),
        (Phase::Complete, 9, 0)
    );
    // Still refused after all that.
    assert_eq!(
        scripts
            .start(request("gone", "exit 0"))
            .expect("start")
            .exit_code,
        9
    );
}

#[tokio::test]
async fn the_oldest_completed_tickets_are_forgotten_past_the_count() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = ScriptSettings::new(dir.path().to_owned());
    settings.completed_tickets_max = 2;
    let (scripts, executor) = counted(settings);
    for (name, code) in [("first", 1), ("second", 2), ("third", 3)] {
        run_and_complete(&scripts, name, code).await;
    }
    assert_refused(&scripts, &executor, "second", 2, dir.path()).await;
    assert_refused(&scripts, &executor, "third", 3, dir.path()).await;
    // The oldest is past the bound: the agent knows nothing of it now.
    assert_eq!(
        scripts
            .status(&ticket("first"), 0, None)
            .expect("status")
            .exit_code,
        exit_code::UNKNOWN_TICKET
    );
    scripts.start(request("first", "exit 0")).expect("start");
    assert_eq!(wait_complete(&scripts, "first").await.exit_code, 0);
    assert_eq!(executor.runs(), 4);
}

#[tokio::test]
async fn completed_tickets_older_than_the_age_are_dropped_at_startup() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let now = log::now_ms();
    let day = 24 * 60 * 60 * 1000;
    std::fs::write(
        dir.path().join(FILE_NAME),
        format!(
            "ancient 4 {old} {old}\nrecent 6 {young} {young}\n",
            old = now - 8 * day,
            young = now - day
        ),
    )
    .expect("write the record");
    let mut settings = ScriptSettings::new(dir.path().to_owned());
    settings.completed_tickets_max_age = Duration::from_secs(7 * 24 * 60 * 60);
    let (scripts, executor) = counted(settings);
    scripts.recover().expect("recover");
    assert_refused(&scripts, &executor, "recent", 6, dir.path()).await;
    assert_eq!(
        scripts
            .status(&ticket("ancient"), 0, None)
            .expect("status")
            .exit_code,
        exit_code::UNKNOWN_TICKET
    );
    // The rewrite at startup kept only what is still in force.
    let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).expect("read");
    assert!(
        !text.contains("ancient") && text.contains("recent"),
        "{text}"
    );
}

#[tokio::test]
async fn a_garbage_record_does_not_stop_the_agent_and_what_parses_is_kept() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let now = log::now_ms();
    let mut garbage = b"\x00\xff\xfe\x01 binary junk\nnot an entry\n".to_vec();
    garbage.extend_from_slice(format!("kept 2 {now} {now}\n").as_bytes());
    garbage.extend_from_slice(b"torn 3 17000000");
    std::fs::write(dir.path().join(FILE_NAME), garbage).expect("write the record");
    let (scripts, executor) = counted(ScriptSettings::new(dir.path().to_owned()));
    assert_eq!(scripts.recover().expect("recover despite garbage"), 0);
    assert_refused(&scripts, &executor, "kept", 2, dir.path()).await;
    // The agent works as usual, and records on a clean line.
    run_and_complete(&scripts, "after", 0).await;
    let (restarted, executor) = counted(ScriptSettings::new(dir.path().to_owned()));
    restarted.recover().expect("recover");
    assert_refused(&restarted, &executor, "kept", 2, dir.path()).await;
    assert_refused(&restarted, &executor, "after", 0, dir.path()).await;
}

#[tokio::test]
async fn an_unreadable_record_keeps_workspaces_rather_than_forget_tickets() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    // A directory where the record goes: it can be neither read nor
    // written.
    std::fs::create_dir(dir.path().join(FILE_NAME)).expect("block the record");
    let (scripts, executor) = counted(ScriptSettings::new(dir.path().to_owned()));
    scripts.recover().expect("the agent still starts");
    scripts
        .start(request("kept", "out x\nexit 4"))
        .expect("start");
    wait_complete(&scripts, "kept").await;
    let done = scripts
        .complete(&ticket("kept"), 0)
        .await
        .expect("complete");
    assert_eq!((done.phase, done.exit_code), (Phase::Complete, 4));
    // Not recorded, so not deleted: the workspace still refuses the ticket.
    assert!(dir.path().join("kept").exists());
    let again = scripts.start(request("kept", "exit 0")).expect("repeat");
    assert_eq!((again.exit_code, again.lines.len()), (4, 1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(executor.runs(), 1);
}

#[tokio::test]
async fn a_deletion_cut_short_by_a_crash_is_finished_at_startup() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let now = log::now_ms();
    // The entry was written, then the agent died before deleting the
    // workspace.
    let ws = Workspace::create(dir.path(), &ticket("half")).expect("workspace");
    ws.write_state(&StateFile {
        ticket: "half".into(),
        phase: Phase::Complete,
        exit_code: 8,
        created_ms: now - 10,
        completed_ms: Some(now - 5),
        mutex: None,
        deadline_ms: None,
    })
    .expect("state");
    std::fs::write(
        dir.path().join(FILE_NAME),
        format!("half 8 {} {now}\n", now - 5),
    )
    .expect("record");
    let (scripts, executor) = counted(ScriptSettings::new(dir.path().to_owned()));
    assert_eq!(scripts.recover().expect("recover"), 0);
    assert!(!dir.path().join("half").exists());
    assert_refused(&scripts, &executor, "half", 8, dir.path()).await;
}

#[tokio::test]
async fn a_caller_asking_for_an_absurd_page_gets_the_configured_maximum() {
    tokio::time::pause();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = ScriptSettings::new(dir.path().to_owned());
    settings.default_page_lines = 2;
    settings.max_page_lines = 4;
    let (scripts, _) = counted(settings);
    let body: String = (1..=10).map(|i| format!("out {i}\n")).collect();
    scripts.start(request("pages", &body)).expect("start");
    wait_complete(&scripts, "pages").await;
    let pages = ticket("pages");
    let huge = scripts.status(&pages, 0, Some(usize::MAX)).expect("status");
    assert_eq!(huge.lines.len(), 4);
    assert!(huge.more);
    assert_eq!(
        scripts
            .status(&pages, 0, Some(0))
            .expect("status")
            .lines
            .len(),
        2,
        "0 means the default"
    );
    assert_eq!(
        scripts.status(&pages, 0, None).expect("status").lines.len(),
        2
    );
    // Watch batches use the default page and still deliver everything.
    let mut events = scripts.watch(&pages, 0);
    let mut batches = Vec::new();
    while let Some(event) = events.recv().await {
        if let WatchEvent::Lines(lines) = event.expect("event") {
            batches.push(lines.len());
        }
    }
    assert_eq!(batches, [2, 2, 2, 2, 2]);
}

#[test]
fn page_limits_stay_sane_whatever_the_settings_say() {
    let mut settings = ScriptSettings::new(PathBuf::new());
    settings.default_page_lines = 50_000;
    settings.max_page_lines = 100;
    settings.max_page_bytes = 0;
    let limit = settings.page_limit(None);
    assert_eq!((limit.max_lines, limit.max_bytes), (100, 1));
    assert_eq!(settings.page_limit(Some(usize::MAX)).max_lines, 100);
    settings.max_page_lines = 0;
    assert_eq!(settings.page_limit(Some(10)).max_lines, 1);
}
