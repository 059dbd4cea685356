//! Full-isolation scripts on one mutex run one at a time; no-isolation
//! scripts run side by side.

use tentacle_proto::v1 as pb;
use tentacle_tests::{Fixture, Mode, bash, in_both_modes, run_to_end, texts};

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

async fn run_pair(mode: Mode, isolation: pb::Isolation) -> ((u128, u128), (u128, u128)) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    let script = "echo \"start $(date +%s%N)\"; sleep 1; echo \"end $(date +%s%N)\"";
    let mut a = bash(script);
    let mut b = bash(script);
    for request in [&mut a, &mut b] {
        request.isolation = isolation as i32;
        request.mutex_name = "deploy".into();
    }
    let (first, second) = tokio::join!(run_to_end(client, a), run_to_end(client, b));
    assert_eq!((first.1, second.1), (0, 0));
    (interval(&first.0), interval(&second.0))
}

async fn full_isolation_scripts_are_serialised(mode: Mode) {
    let (a, b) = run_pair(mode, pb::Isolation::Full).await;
    let overlap = a.0 < b.1 && b.0 < a.1;
    assert!(!overlap, "full-isolation scripts overlapped: {a:?} {b:?}");
}

async fn no_isolation_scripts_overlap(mode: Mode) {
    let (a, b) = run_pair(mode, pb::Isolation::None).await;
    let overlap = a.0 < b.1 && b.0 < a.1;
    assert!(
        overlap,
        "no-isolation scripts ran one after the other: {a:?} {b:?}"
    );
}

async fn the_mutex_timeout_gives_up_with_timed_out(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
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
    let (lines, code) = run_to_end(client, waiter).await;
    assert_eq!(code, pb::ReservedExitCode::ExitCodeTimedOut as i32);
    assert!(texts(&lines, pb::LogStream::Stdout).is_empty());
    let agent_lines = texts(&lines, pb::LogStream::Agent);
    assert!(
        agent_lines.iter().any(|l| l.contains("Waiting")),
        "{agent_lines:?}"
    );
}

in_both_modes!(
    the_mutex_timeout_gives_up_with_timed_out,
    super::the_mutex_timeout_gives_up_with_timed_out
);
in_both_modes!(
    full_isolation_scripts_are_serialised,
    super::full_isolation_scripts_are_serialised
);
in_both_modes!(
    no_isolation_scripts_overlap,
    super::no_isolation_scripts_overlap
);
