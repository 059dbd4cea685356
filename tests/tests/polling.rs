//! Polling mode: the agent dials the hub and serves its calls through a
//! reverse tunnel.

use tentacle_proto::v1 as pb;
use tentacle_tests::{Fixture, Mode, bash, run_to_end, texts};

#[tokio::test(flavor = "multi_thread")]
async fn a_polling_agent_runs_scripts_through_its_tunnel() {
    let fixture = Fixture::start(Mode::Polling, "").await;
    let caps = fixture
        .client
        .capabilities()
        .await
        .expect("capabilities through the tunnel");
    assert!(
        caps.services
            .iter()
            .any(|s| s.name == "tentacle.v1.ScriptService")
    );
    let (lines, code) = run_to_end(&fixture.client, bash("echo through the tunnel; exit 5")).await;
    assert_eq!(code, 5);
    assert_eq!(texts(&lines, pb::LogStream::Stdout), ["through the tunnel"]);
}
