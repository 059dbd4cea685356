//! Scripts outlive the agent process: a script started before the agent
//! was killed (or stopped) keeps running under its host, and the next agent
//! re-attaches to it: every line once, in order, masked, the real exit
//! code, its isolation mutex held, and cancellation still kills its tree.

use std::path::Path;
use std::time::{Duration, Instant};

use tentacle_hub::client::{AgentClient, FollowSettings};
use tentacle_proto::v1 as pb;
use tentacle_tests::{Fixture, Mode, bash, in_both_modes, process_alive, run_to_end, texts};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "s3cr3t-Vx9q-42";
const TOKEN: &str = "tok-7f3e2d1c";

/// Waits until the script has printed a stdout line starting with `prefix`
/// and returns that line.
async fn wait_for_line(client: &AgentClient, ticket: &str, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .scripts()
            .get_status(pb::GetStatusRequest {
                ticket: ticket.to_owned(),
                ..Default::default()
            })
            .await
            .expect("status")
            .into_inner();
        if let Some(line) = status.logs.iter().find(|l| l.text.starts_with(prefix)) {
            return line.text.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no `{prefix}` line yet: {:?}",
            status.logs
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Follows `ticket` from the start to its end.
async fn follow_all(client: &AgentClient, ticket: &str) -> (Vec<pb::LogLine>, i32) {
    let mut lines = Vec::new();
    let end = client
        .follow(
            ticket,
            0,
            |line| lines.push(line.clone()),
            &CancellationToken::new(),
            &FollowSettings::default(),
        )
        .await
        .expect("follow to the end");
    (lines, end.exit_code)
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

async fn a_script_keeps_running_through_an_agent_crash(mode: Mode) {
    let mut fixture = Fixture::start(mode, "").await;
    let mut request = bash(
        "for i in $(seq 1 30); do echo \"line $i $SECRET $1\"; sleep 0.1; done; echo done >&2; exit 7",
    );
    request.environment.push(pb::EnvironmentVariable {
        name: "SECRET".into(),
        value: SECRET.into(),
        sensitive: true,
    });
    request.arguments.push(TOKEN.into());
    request.sensitive_values.push(TOKEN.into());
    let ticket = request.ticket.clone();
    let client = fixture.reconnect().await;
    client.scripts().start_script(request).await.expect("start");
    wait_for_line(&client, &ticket, "line 3 ").await;
    drop(client);

    fixture.agent.kill();
    // Lines keep coming while no agent runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    fixture.agent.spawn();

    let client = fixture.reconnect().await;
    let (lines, exit_code) = follow_all(&client, &ticket).await;
    assert_eq!(
        exit_code, 7,
        "the script's own exit code, not agent restarted"
    );
    let expected: Vec<String> = (1..=30)
        .map(|i| format!("line {i} ******** ********"))
        .collect();
    assert_eq!(texts(&lines, pb::LogStream::Stdout), expected);
    assert_eq!(texts(&lines, pb::LogStream::Stderr), ["done"]);
    assert!(
        texts(&lines, pb::LogStream::Agent).is_empty(),
        "{:?}",
        texts(&lines, pb::LogStream::Agent)
    );
    let sequences: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
    assert_eq!(
        sequences,
        (1..=31).collect::<Vec<u64>>(),
        "once each, in order"
    );
    let stamps: Vec<(i64, i32)> = lines
        .iter()
        .map(|l| {
            let time = l.time.as_ref().expect("every line is timestamped");
            (time.seconds, time.nanos)
        })
        .collect();
    assert!(stamps.is_sorted(), "timestamps in order: {stamps:?}");
    // Lines printed while no agent ran are stamped when printed, not when
    // the next agent found them: the script prints one every 100 ms.
    let spread =
        |a: (i64, i32), b: (i64, i32)| (b.0 - a.0) * 1000 + i64::from(b.1 - a.1) / 1_000_000;
    assert!(
        stamps
            .windows(2)
            .take(29)
            .all(|w| spread(w[0], w[1]) < 1000),
        "no gap of the agent's downtime between lines: {stamps:?}"
    );

    let status = client
        .scripts()
        .get_status(pb::GetStatusRequest {
            ticket: ticket.clone(),
            ..Default::default()
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        (status.state, status.exit_code),
        (pb::ScriptState::Complete as i32, 7)
    );
    for secret in [SECRET, TOKEN] {
        let leaked = files_containing(fixture.agent.home(), secret.as_bytes());
        assert!(leaked.is_empty(), "`{secret}` on disk in {leaked:?}");
    }
}

async fn a_graceful_stop_leaves_a_running_script_to_the_next_agent(mode: Mode) {
    let mut fixture = Fixture::start(mode, "").await;
    let request = bash("echo started; sleep 2; echo finished; exit 3");
    let ticket = request.ticket.clone();
    let client = fixture.reconnect().await;
    client.scripts().start_script(request).await.expect("start");
    wait_for_line(&client, &ticket, "started").await;
    drop(client);

    let stopped = Instant::now();
    let status = fixture
        .agent
        .terminate(Duration::from_secs(20))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "the agent did not wait for the script: {:?}",
        stopped.elapsed()
    );
    fixture.agent.spawn();

    let client = fixture.reconnect().await;
    let (lines, exit_code) = follow_all(&client, &ticket).await;
    assert_eq!(exit_code, 3);
    assert_eq!(
        texts(&lines, pb::LogStream::Stdout),
        ["started", "finished"]
    );
}

async fn a_reattached_script_keeps_its_isolation_mutex(mode: Mode) {
    let mut fixture = Fixture::start(mode, "").await;
    let stamp = "echo \"start $(date +%s%N)\"";
    let mut holder = bash(&format!("{stamp}; sleep 3; echo \"end $(date +%s%N)\""));
    holder.isolation = pb::Isolation::Full as i32;
    holder.mutex_name = "deploy".into();
    let holder_ticket = holder.ticket.clone();
    let client = fixture.reconnect().await;
    client.scripts().start_script(holder).await.expect("start");
    wait_for_line(&client, &holder_ticket, "start ").await;
    drop(client);

    fixture.agent.kill();
    fixture.agent.spawn();

    let client = fixture.reconnect().await;
    let mut waiter = bash(stamp);
    waiter.isolation = pb::Isolation::Full as i32;
    waiter.mutex_name = "deploy".into();
    let ((holder_lines, holder_code), (waiter_lines, waiter_code)) = tokio::join!(
        follow_all(&client, &holder_ticket),
        run_to_end(&client, waiter)
    );
    assert_eq!((holder_code, waiter_code), (0, 0));
    let stamp_of = |lines: &[pb::LogLine], prefix: &str| -> u128 {
        texts(lines, pb::LogStream::Stdout)
            .iter()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` line"))
    };
    let held_until = stamp_of(&holder_lines, "end ");
    let waiter_start = stamp_of(&waiter_lines, "start ");
    assert!(
        waiter_start > held_until,
        "the new script started at {waiter_start}, before the re-attached one released the mutex at {held_until}"
    );
    let agent_lines = texts(&waiter_lines, pb::LogStream::Agent);
    assert!(
        agent_lines.iter().any(|l| l.contains("Waiting")),
        "{agent_lines:?}"
    );
}

async fn cancel_after_a_restart_kills_the_whole_tree(mode: Mode) {
    let mut fixture = Fixture::start(mode, "").await;
    let request = bash("sleep 300 & echo \"grandchild $!\"; wait");
    let ticket = request.ticket.clone();
    let client = fixture.reconnect().await;
    client.scripts().start_script(request).await.expect("start");
    let line = wait_for_line(&client, &ticket, "grandchild ").await;
    let grandchild: i32 = line["grandchild ".len()..].trim().parse().expect("pid");
    drop(client);

    fixture.agent.kill();
    fixture.agent.spawn();
    assert!(process_alive(grandchild), "the script survived the restart");

    let client = fixture.reconnect().await;
    client
        .scripts()
        .cancel_script(pb::CancelScriptRequest {
            ticket: ticket.clone(),
            ..Default::default()
        })
        .await
        .expect("cancel");
    let (lines, exit_code) = follow_all(&client, &ticket).await;
    assert_eq!(exit_code, pb::ReservedExitCode::ExitCodeCanceled as i32);
    let agent_lines = texts(&lines, pb::LogStream::Agent);
    assert!(
        agent_lines.iter().any(|l| l.contains("Canceled")),
        "{agent_lines:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(grandchild) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !process_alive(grandchild),
        "grandchild {grandchild} survived the cancel"
    );
}

in_both_modes!(
    a_script_keeps_running_through_an_agent_crash,
    super::a_script_keeps_running_through_an_agent_crash
);
in_both_modes!(
    a_graceful_stop_leaves_a_running_script_to_the_next_agent,
    super::a_graceful_stop_leaves_a_running_script_to_the_next_agent
);
in_both_modes!(
    a_reattached_script_keeps_its_isolation_mutex,
    super::a_reattached_script_keeps_its_isolation_mutex
);
in_both_modes!(
    cancel_after_a_restart_kills_the_whole_tree,
    super::cancel_after_a_restart_kills_the_whole_tree
);
