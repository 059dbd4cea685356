//! Script output through the real agent: sequences, streams, resumable
//! watches, paging, idempotent starts, masking and workspace cleanup.

use std::collections::BTreeSet;
use std::process::Command;

use tentacle_proto::v1 as pb;
use tentacle_tests::{AgentProcess, Fixture, Mode, bash, bin, in_both_modes, run_to_end, texts};
use tonic::Code;

async fn output_arrives_in_order_with_dense_sequences(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let (lines, exit_code) = run_to_end(
        client,
        bash("for i in $(seq 1 300); do echo \"out $i\"; done; echo 'to stderr' >&2; exit 7"),
    )
    .await;
    assert_eq!(exit_code, 7);
    let sequences: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
    assert_eq!(sequences, (1..=lines.len() as u64).collect::<Vec<_>>());
    let stdout = texts(&lines, pb::LogStream::Stdout);
    assert_eq!(
        stdout,
        (1..=300).map(|i| format!("out {i}")).collect::<Vec<_>>()
    );
    assert_eq!(texts(&lines, pb::LogStream::Stderr), ["to stderr"]);
    assert!(lines.iter().all(|l| l.time.is_some()));
}

async fn a_watch_resumes_after_a_dropped_stream_without_loss_or_repeats(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let request = bash("for i in $(seq 1 60); do echo \"line $i\"; sleep 0.01; done");
    let ticket = request.ticket.clone();
    client.scripts().start_script(request).await.expect("start");

    // Read part of the output, then drop the stream mid-script.
    let mut seen: Vec<pb::LogLine> = Vec::new();
    {
        let mut stream = client
            .scripts()
            .watch_script(pb::WatchScriptRequest {
                ticket: ticket.clone(),
                after_sequence: 0,
            })
            .await
            .expect("watch")
            .into_inner();
        while seen.len() < 10 {
            let event = stream.message().await.expect("event").expect("not ended");
            if let Some(pb::watch_script_event::Event::Logs(batch)) = event.event {
                seen.extend(batch.lines);
            }
        }
    }
    let resume_from = seen.last().expect("some lines").sequence;
    let end = client
        .follow(
            &ticket,
            resume_from,
            |line| seen.push(line.clone()),
            &tokio_util::sync::CancellationToken::new(),
            &tentacle_hub::client::FollowSettings::default(),
        )
        .await
        .expect("follow");
    assert_eq!(end.exit_code, 0);
    let sequences: Vec<u64> = seen.iter().map(|l| l.sequence).collect();
    assert_eq!(
        sequences,
        (1..=60).collect::<Vec<u64>>(),
        "no line lost, none twice"
    );

    // Pull-style paging gives exactly the same lines.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let status = client
            .scripts()
            .get_status(pb::GetStatusRequest {
                ticket: ticket.clone(),
                after_sequence: after,
                max_lines: 7,
            })
            .await
            .expect("status")
            .into_inner();
        assert!(status.logs.len() <= 7);
        paged.extend(status.logs.iter().map(|l| l.sequence));
        after = status.last_sequence;
        if !status.more_logs {
            assert_eq!(status.state, pb::ScriptState::Complete as i32);
            break;
        }
    }
    assert_eq!(paged, sequences);
}

async fn a_repeated_start_never_runs_the_script_twice(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let marker = agent.home().join("runs.txt");
    let request = bash(&format!("echo ran >> {}; sleep 0.3", marker.display()));
    let first = client
        .scripts()
        .start_script(request.clone())
        .await
        .expect("start")
        .into_inner();
    let second = client
        .scripts()
        .start_script(request.clone())
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(first.ticket, second.ticket);
    let (_, exit_code) = run_to_end(client, request.clone()).await;
    assert_eq!(exit_code, 0);
    assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "ran\n");
}

async fn sensitive_values_are_masked_and_complete_deletes_the_workspace(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let (agent, client) = (&fixture.agent, &fixture.client);
    let mut request = bash("echo \"password is $DB_PASSWORD\"; echo \"token $1\"; sleep 0.2");
    request.environment.push(pb::EnvironmentVariable {
        name: "DB_PASSWORD".into(),
        value: "hunter2".into(),
        sensitive: true,
    });
    request.arguments.push("abc123".into());
    request.sensitive_values.push("abc123".into());
    let ticket = request.ticket.clone();
    client.scripts().start_script(request).await.expect("start");
    let early = client
        .scripts()
        .complete_script(pb::CompleteScriptRequest {
            ticket: ticket.clone(),
            after_sequence: 0,
        })
        .await
        .expect_err("still running");
    assert_eq!(early.code(), Code::FailedPrecondition);

    let mut lines = Vec::new();
    client
        .follow(
            &ticket,
            0,
            |l| lines.push(l.text.clone()),
            &tokio_util::sync::CancellationToken::new(),
            &tentacle_hub::client::FollowSettings::default(),
        )
        .await
        .expect("follow");
    assert_eq!(lines, ["password is ********", "token ********"]);
    let log = std::fs::read_to_string(
        agent
            .home()
            .join("work")
            .join(&ticket)
            .join("tentacle-output.log"),
    )
    .expect("output log on disk");
    assert!(!log.contains("hunter2") && !log.contains("abc123"), "{log}");

    client.complete_script(&ticket).await.expect("complete");
    assert!(!agent.home().join("work").join(&ticket).exists());
    let gone = client
        .scripts()
        .get_status(pb::GetStatusRequest {
            ticket,
            ..Default::default()
        })
        .await
        .expect("status")
        .into_inner();
    // The agent remembers the completed ticket, so a repeat reports the
    // run's result instead of running it again.
    assert_eq!(
        (gone.state, gone.exit_code, gone.logs.len()),
        (pb::ScriptState::Complete as i32, 0, 0)
    );
}

async fn bad_requests_get_invalid_argument(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let mut bad_ticket = bash("true");
    bad_ticket.ticket = "../escape".into();
    let err = client
        .scripts()
        .start_script(bad_ticket)
        .await
        .expect_err("bad ticket");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("ticket"), "{}", err.message());
    let mut bad_file = bash("true");
    bad_file.files.push(pb::ScriptFile {
        name: "../x".into(),
        content: vec![],
    });
    let err = client
        .scripts()
        .start_script(bad_file)
        .await
        .expect_err("bad file");
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn extra_files_arguments_and_timeouts_reach_the_script(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let mut request = bash("cat app.conf; echo \"args: $*\"");
    request.files.push(pb::ScriptFile {
        name: "app.conf".into(),
        content: b"setting=1\n".to_vec(),
    });
    request.arguments = vec!["one".into(), "two words".into()];
    let (lines, code) = run_to_end(client, request).await;
    assert_eq!(code, 0);
    assert_eq!(
        texts(&lines, pb::LogStream::Stdout),
        ["setting=1", "args: one two words"]
    );

    let mut slow = bash("echo started; sleep 30");
    slow.execution_timeout = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let (lines, code) = run_to_end(client, slow).await;
    assert_eq!(code, pb::ReservedExitCode::ExitCodeTimedOut as i32);
    assert!(
        texts(&lines, pb::LogStream::Agent)
            .iter()
            .any(|t| t.contains("Timed out"))
    );
}

#[test]
fn tentacle_hub_exec_prints_output_and_exits_with_the_script_code() {
    let sim_home = tempfile::tempdir().expect("tempdir");
    let sim = |args: &[&str]| {
        Command::new(bin("tentacle-hub"))
            .arg("--home")
            .arg(sim_home.path())
            .args(args)
            .output()
            .expect("run tentacle-hub")
    };
    let created = sim(&["new-certificate"]);
    assert!(created.status.success());
    let sim_thumbprint = String::from_utf8_lossy(&created.stdout)
        .trim()
        .parse()
        .expect("thumbprint");
    let agent = AgentProcess::start(&[sim_thumbprint], "");
    let target = format!("https://{}", agent.address.expect("listening"));
    let thumbprint = agent.thumbprint.to_string();
    let out = sim(&[
        "exec",
        "--target",
        &target,
        "--thumbprint",
        &thumbprint,
        "--script",
        "echo hello; exit 3",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing is left on the agent afterwards but the record of completed
    // tickets.
    let left: BTreeSet<_> = std::fs::read_dir(agent.home().join("work"))
        .expect("work dir")
        .filter_map(|e| e.ok())
        .collect::<Vec<_>>()
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        BTreeSet::from([".tentacle-completed-tickets".to_owned()]),
        "{left:?}"
    );

    let refused = sim(&[
        "exec",
        "--target",
        &target,
        "--thumbprint",
        &"0".repeat(64),
        "--script",
        "true",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

in_both_modes!(
    output_arrives_in_order_with_dense_sequences,
    super::output_arrives_in_order_with_dense_sequences
);

in_both_modes!(
    a_watch_resumes_after_a_dropped_stream_without_loss_or_repeats,
    super::a_watch_resumes_after_a_dropped_stream_without_loss_or_repeats
);

in_both_modes!(
    a_repeated_start_never_runs_the_script_twice,
    super::a_repeated_start_never_runs_the_script_twice
);

in_both_modes!(
    sensitive_values_are_masked_and_complete_deletes_the_workspace,
    super::sensitive_values_are_masked_and_complete_deletes_the_workspace
);

in_both_modes!(
    bad_requests_get_invalid_argument,
    super::bad_requests_get_invalid_argument
);

in_both_modes!(
    extra_files_arguments_and_timeouts_reach_the_script,
    super::extra_files_arguments_and_timeouts_reach_the_script
);
