//! Cancelling a script kills its whole process group, including a
//! background grandchild that keeps stdout open.

use std::time::{Duration, Instant};

use tentacle_proto::v1 as pb;
use tentacle_tests::{Fixture, Mode, bash, in_both_modes, process_alive};
use tokio_util::sync::CancellationToken;

async fn cancel_kills_a_grandchild_that_holds_stdout(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let client = &fixture.client;
    // The grandchild inherits stdout and outlives its parent's `wait` unless
    // the whole group is killed.
    let request = bash("sleep 300 & echo \"grandchild $!\"; wait");
    let ticket = request.ticket.clone();
    client.scripts().start_script(request).await.expect("start");

    let cancel = CancellationToken::new();
    let mut grandchild = None;
    let started = Instant::now();
    let end = client
        .follow(
            &ticket,
            0,
            |line| {
                if let Some(pid) = line.text.strip_prefix("grandchild ") {
                    grandchild = pid.trim().parse::<i32>().ok();
                    cancel.cancel();
                }
            },
            &cancel,
            &tentacle_hub::client::FollowSettings::default(),
        )
        .await
        .expect("follow to the end");
    assert_eq!(end.exit_code, pb::ReservedExitCode::ExitCodeCanceled as i32);
    assert!(started.elapsed() < Duration::from_secs(60));
    let pid = grandchild.expect("the script printed its grandchild's pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_alive(pid), "grandchild {pid} survived the cancel");
}

async fn a_script_survives_its_caller_disconnecting(mode: Mode) {
    let fixture = Fixture::start(mode, "").await;
    let request = bash("sleep 1; echo finished");
    let ticket = request.ticket.clone();
    {
        let client = fixture.reconnect().await;
        client.scripts().start_script(request).await.expect("start");
    }
    // A brand-new connection picks the script up later.
    let client = fixture.reconnect().await;
    let mut lines = Vec::new();
    let end = client
        .follow(
            &ticket,
            0,
            |l| lines.push(l.text.clone()),
            &CancellationToken::new(),
            &tentacle_hub::client::FollowSettings::default(),
        )
        .await
        .expect("follow");
    assert_eq!(end.exit_code, 0);
    assert_eq!(lines, ["finished"]);
}

in_both_modes!(
    cancel_kills_a_grandchild_that_holds_stdout,
    super::cancel_kills_a_grandchild_that_holds_stdout
);
in_both_modes!(
    a_script_survives_its_caller_disconnecting,
    super::a_script_survives_its_caller_disconnecting
);
