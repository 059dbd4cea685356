//! A script whose agent died and whose host (the process that supervises a
//! detached script and records its end) was killed too is reported complete
//! with the "agent restarted" code once the agent is back. A script whose
//! host survives keeps running and reports its own code: see
//! `script_survival.rs`.

use std::time::Duration;

use tentacle_proto::v1 as pb;
use tentacle_tests::{
    AgentProcess, Fixture, Mode, bash, client_identity, in_both_modes, process_alive,
};

async fn a_script_interrupted_by_a_crash_reports_agent_restarted(mode: Mode) {
    let mut fixture = Fixture::start(mode, "").await;
    let request = bash("echo \"pgid $$\"; echo \"host $PPID\"; echo before; sleep 60");
    let ticket = request.ticket.clone();
    let client = fixture.reconnect().await;
    client.scripts().start_script(request).await.expect("start");
    let mut pgid = None;
    let mut host = None;
    for _ in 0..100 {
        let status = client
            .scripts()
            .get_status(pb::GetStatusRequest {
                ticket: ticket.clone(),
                ..Default::default()
            })
            .await
            .expect("status")
            .into_inner();
        pgid = status
            .logs
            .iter()
            .find_map(|l| l.text.strip_prefix("pgid ")?.parse::<i32>().ok());
        host = status
            .logs
            .iter()
            .find_map(|l| l.text.strip_prefix("host ")?.parse::<i32>().ok());
        if status.logs.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pgid = pgid.expect("script started");
    let host = host.expect("script started");
    drop(client);

    fixture.agent.kill();
    // The host first, so it cannot record the script's end.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
    // SIGKILL is delivered, not finished, when kill returns.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_alive(host) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!process_alive(host), "the host {host} survived SIGKILL");
    fixture.agent.spawn();

    let client = fixture.reconnect().await;
    let status = client
        .scripts()
        .get_status(pb::GetStatusRequest {
            ticket: ticket.clone(),
            ..Default::default()
        })
        .await
        .expect("status after restart")
        .into_inner();
    assert_eq!(status.state, pb::ScriptState::Complete as i32);
    assert_eq!(
        status.exit_code,
        pb::ReservedExitCode::ExitCodeAgentRestarted as i32
    );
    let texts: Vec<&str> = status.logs.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(
        texts[..3],
        [
            format!("pgid {pgid}").as_str(),
            format!("host {host}").as_str(),
            "before"
        ]
    );
    assert!(
        texts.last().is_some_and(|t| t.contains("restarted")),
        "{texts:?}"
    );
    let sequences: Vec<u64> = status.logs.iter().map(|l| l.sequence).collect();
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());

    // Starting the same ticket again must not run it a second time.
    let again = client.scripts().start_script(bash("echo nope")).await;
    assert!(again.is_ok());
    let repeat = pb::StartScriptRequest {
        ticket: ticket.clone(),
        script_body: "echo should-not-run".into(),
        ..Default::default()
    };
    let repeated = client
        .scripts()
        .start_script(repeat)
        .await
        .expect("repeat")
        .into_inner();
    assert_eq!(
        repeated.exit_code,
        pb::ReservedExitCode::ExitCodeAgentRestarted as i32
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_agent_cleanly() {
    let me = client_identity();
    let mut agent = AgentProcess::start(&[me.thumbprint()], "");
    agent
        .client(&me)
        .await
        .capabilities()
        .await
        .expect("serving");
    let status = agent
        .terminate(Duration::from_secs(20))
        .expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(agent.log_text().contains("received SIGTERM"));
}

in_both_modes!(
    a_script_interrupted_by_a_crash_reports_agent_restarted,
    super::a_script_interrupted_by_a_crash_reports_agent_restarted
);

/// A unary call to an agent that stops answering (frozen, not gone: its
/// connection stays open) gives up at the client's deadline rather than
/// waiting forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_to_a_frozen_agent_gives_up_at_its_deadline() {
    let me = client_identity();
    let agent = AgentProcess::start(&[me.thumbprint()], "");
    let client = agent
        .client(&me)
        .await
        .with_unary_timeout(Duration::from_secs(2));
    client.capabilities().await.expect("a first call");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), client.capabilities()).await;
    let waited = started.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");

    let error = result
        .expect("the call ends on its own deadline")
        .expect_err("a frozen agent cannot answer");
    assert!(
        error.to_string().to_lowercase().contains("deadline")
            || error.to_string().to_lowercase().contains("timeout"),
        "{error}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "gave up after {waited:?}"
    );
    // Thawed, the agent answers again.
    client.capabilities().await.expect("a call after SIGCONT");
}
