//! Pinned mutual TLS against the real agent: only trusted thumbprints get
//! in, and trust changes apply to a running agent without a restart.

use std::time::Duration;

use tentacle_hub::client::AgentClient;
use tentacle_proto::dial::DialSettings;
use tentacle_proto::v1 as pb;
use tentacle_tests::{AgentProcess, client_identity, tentacle};

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_client_works_and_an_untrusted_one_is_refused() {
    let trusted = client_identity();
    let stranger = client_identity();
    let agent = AgentProcess::start(&[trusted.thumbprint()], "");

    let caps = agent
        .client(&trusted)
        .await
        .capabilities()
        .await
        .expect("trusted call");
    assert_eq!(caps.os, std::env::consts::OS);
    assert!(
        caps.services
            .iter()
            .any(|s| s.name == "tentacle.v1.ScriptService")
    );

    // TLS 1.3 rejects a client certificate after the client's side of the
    // handshake; the dialer waits for the server's first bytes, so the
    // refusal shows at connect time, every time, with the same advice.
    for attempt in 0..20 {
        let error = AgentClient::connect_listening(
            &agent.target(),
            agent.thumbprint,
            &stranger,
            &DialSettings::default(),
        )
        .await
        .expect_err("an untrusted client must be refused when it connects")
        .to_string();
        assert!(
            error.contains("the peer refused our certificate")
                || error.contains("does not trust our thumbprint"),
            "attempt {attempt}: {error}"
        );
    }
    assert!(
        agent.wait_for_log(&stranger.thumbprint().to_string(), Duration::from_secs(5)),
        "the agent logs the refused thumbprint; log:\n{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_refuses_an_agent_with_another_thumbprint() {
    let me = client_identity();
    let agent = AgentProcess::start(&[me.thumbprint()], "");
    let impostor = client_identity().thumbprint();
    let result =
        AgentClient::connect_listening(&agent.target(), impostor, &me, &DialSettings::default())
            .await;
    assert!(
        result.is_err(),
        "the agent's certificate does not match the pinned thumbprint"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_changes_apply_without_a_restart() {
    let first = client_identity();
    let second = client_identity();
    let agent = AgentProcess::start(&[first.thumbprint()], "");
    let pid = agent.pid();

    let first_client = agent.client(&first).await;
    first_client.capabilities().await.expect("first is trusted");

    // Trust the second client: new connections from it now work.
    let second_tp = second.thumbprint().to_string();
    tentacle(agent.home(), &["configure", "--trust", &second_tp]);
    let mut second_ok = false;
    for _ in 0..50 {
        if let Ok(client) = AgentClient::connect_listening(
            &agent.target(),
            agent.thumbprint,
            &second,
            &DialSettings::default(),
        )
        .await
            && client.capabilities().await.is_ok()
        {
            second_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        second_ok,
        "the second client became trusted; log:\n{}",
        agent.log_text()
    );

    // Remove the first: its open connection is closed, and it cannot return.
    let first_tp = first.thumbprint().to_string();
    tentacle(agent.home(), &["configure", "--remove-trust", &first_tp]);
    assert!(
        agent.wait_for_log("no longer trusted", Duration::from_secs(10)),
        "the open connection was closed; log:\n{}",
        agent.log_text()
    );
    let mut refused = false;
    for _ in 0..50 {
        if first_client.capabilities().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "calls on the revoked client's connection fail");
    let reconnect = AgentClient::connect_listening(
        &agent.target(),
        agent.thumbprint,
        &first,
        &DialSettings::default(),
    )
    .await;
    if let Ok(client) = reconnect {
        let status = client
            .scripts()
            .get_status(pb::GetStatusRequest::default())
            .await;
        assert!(
            status.is_err(),
            "a new connection from the removed thumbprint is refused"
        );
    }
    assert_eq!(agent.pid(), pid, "the agent was never restarted");
}
