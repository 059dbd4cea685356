//! Full-isolation scripts on one mutex run one at a time; no-isolation
//! scripts run side by side.

use tentacle_proto::v1 as pb;
use tentacle_tests::{AgentProcess, bash, client_identity, run_to_end, texts};

/// Start and end of a script in nanoseconds since the epoch, as it printed
/// them.
fn interval(lines: &[pb::LogLine]) -> (u128, u128) {
    let out = texts(lines, pb::LogStream::Stdout);
    let stamp = |prefix: &str| {
        out.iter()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|n| n.trim().parse::<u128>().ok())
            .unwrap_or_else(|| panic!("no `{prefix}` line in {out:?}"))
    };
    (stamp("start "), stamp("end "))
}

async fn run_pair(isolation: pb::Isolation) -> ((u128, u128), (u128, u128)) {
    let me = client_identity();
    let agent = AgentProcess::start(&[me.thumbprint()], "");
    let client = agent.client(&me).await;
    let script = "echo \"start $(date +%s%N)\"; sleep 1; echo \"end $(date +%s%N)\"";
    let mut a = bash(script);
    let mut b = bash(script);
    for request in [&mut a, &mut b] {
        request.isolation = isolation as i32;
        request.mutex_name = "deploy".into();
    }
    let (first, second) = tokio::join!(run_to_end(&client, a), run_to_end(&client, b));
    assert_eq!((first.1, second.1), (0, 0));
    (interval(&first.0), interval(&second.0))
}

#[tokio::test(flavor = "multi_thread")]
async fn full_isolation_scripts_are_serialised() {
    let (a, b) = run_pair(pb::Isolation::Full).await;
    let overlap = a.0 < b.1 && b.0 < a.1;
    assert!(!overlap, "full-isolation scripts overlapped: {a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_isolation_scripts_overlap() {
    let (a, b) = run_pair(pb::Isolation::None).await;
    let overlap = a.0 < b.1 && b.0 < a.1;
    assert!(
        overlap,
        "no-isolation scripts ran one after the other: {a:?} {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mutex_timeout_gives_up_with_timed_out() {
    let me = client_identity();
    let agent = AgentProcess::start(&[me.thumbprint()], "");
    let client = agent.client(&me).await;
    let holder = bash("sleep 3");
    client
        .scripts()
        .start_script(holder.clone())
        .await
        .expect("start holder");
    // Give the holder a moment to take the mutex.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut waiter = bash("echo should-not-run");
    waiter.mutex_timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 500_000_000,
    });
    let (lines, code) = run_to_end(&client, waiter).await;
    assert_eq!(code, pb::ReservedExitCode::ExitCodeTimedOut as i32);
    assert!(texts(&lines, pb::LogStream::Stdout).is_empty());
    let agent_lines = texts(&lines, pb::LogStream::Agent);
    assert!(
        agent_lines.iter().any(|l| l.contains("Waiting")),
        "{agent_lines:?}"
    );
}
