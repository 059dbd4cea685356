//! Polling mode: the agent dials the hub and serves its calls through a
//! reverse tunnel. These cover what only polling has: multiplexing on one
//! connection, pickup, reconnection, and trust in both directions.

use std::time::{Duration, Instant};

use tentacle_hub::channel::PickupTimeout;
use tentacle_hub::target::Target;
use tentacle_proto::v1 as pb;
use tentacle_tests::{Fixture, HubFixture, Mode, bash, client_identity, run_to_end, texts};
use tonic::Code;

/// Established TCP connections to `port`.
fn established_connections_to(port: u16) -> usize {
    tentacle_tests::established_sources_to(port).len()
}

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

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_calls_share_one_connection() {
    let fixture = Fixture::start(Mode::Polling, "").await;
    let hub_port = fixture.hub.as_ref().expect("hub").address.port();
    let mut calls = Vec::new();
    for i in 0..100 {
        let client = fixture.client.clone();
        calls.push(tokio::spawn(async move {
            if i % 2 == 0 {
                client.capabilities().await.map(|_| 0)
            } else {
                let mut request = bash(&format!("sleep 0.2; echo call {i}"));
                request.isolation = pb::Isolation::None as i32;
                let (lines, code) = run_to_end(&client, request).await;
                assert_eq!(texts(&lines, pb::LogStream::Stdout), [format!("call {i}")]);
                Ok(code)
            }
        }));
    }
    // While they are in flight, the agent has exactly one connection open.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        established_connections_to(hub_port),
        1,
        "one tunnel, one TCP connection"
    );
    for call in calls {
        assert_eq!(call.await.expect("task").expect("call"), 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn small_calls_keep_completing_during_a_large_upload() {
    let fixture = Fixture::start(Mode::Polling, "[files]\nmin_free_bytes = 0\n").await;
    let local = tempfile::tempdir().expect("tempdir");
    let source = local.path().join("big.bin");
    {
        let file = std::fs::File::create(&source).expect("create");
        file.set_len(256 * 1024 * 1024).expect("size");
    }
    let uploader = fixture.client.clone();
    let upload_source = source.clone();
    let upload =
        tokio::spawn(async move { uploader.upload(&upload_source, "big.bin", 256 * 1024).await });
    // Wait until the upload is really streaming.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::new();
    while !upload.is_finished() && latencies.len() < 2000 {
        let started = Instant::now();
        fixture.client.capabilities().await.expect("small call");
        latencies.push(started.elapsed());
    }
    let stored = upload.await.expect("task").expect("upload");
    assert_eq!(stored.size, 256 * 1024 * 1024);
    assert!(
        latencies.len() >= 5,
        "only {} small calls overlapped the upload",
        latencies.len()
    );
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    eprintln!(
        "{} small calls during a 256 MiB upload: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        p50,
        p99,
        latencies[latencies.len() - 1]
    );
    assert!(
        p99 < Duration::from_secs(1),
        "p99 {p99:?}: small calls stalled behind the upload"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_queued_before_the_agent_connects_is_picked_up() {
    let hub = HubFixture::start(client_identity()).await;
    let mut agent = hub.prepare_polling_agent("");
    hub.trust(&agent);
    let client = hub.client(&agent).await;
    let queued = tokio::spawn(async move { client.capabilities().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!queued.is_finished(), "the call waits for the agent");
    agent.spawn();
    let caps = tokio::time::timeout(Duration::from_secs(20), queued)
        .await
        .expect("picked up")
        .expect("task")
        .expect("call");
    assert_eq!(caps.os, std::env::consts::OS);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pickup_timeout_fails_with_unavailable_naming_the_agent() {
    let hub = HubFixture::start(client_identity()).await;
    let target: Target = "poll://never-connects".parse().expect("target");
    let client = hub
        .hub
        .client(&target, client_identity().thumbprint())
        .await
        .expect("client");
    let mut request = tonic::Request::new(pb::GetCapabilitiesRequest {});
    request
        .extensions_mut()
        .insert(PickupTimeout(Duration::from_millis(300)));
    let started = Instant::now();
    let status = tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient::new(
        client.channel().clone(),
    )
    .get_capabilities(request)
    .await
    .expect_err("nobody picks it up");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("never-connects"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_hub_restart_the_agent_reconnects() {
    let identity = client_identity();
    let mut hub = HubFixture::start(identity.clone()).await;
    let address = hub.address;
    let agent = hub.polling_agent("");
    hub.client(&agent)
        .await
        .capabilities()
        .await
        .expect("first call");

    hub.shutdown().await;
    assert!(
        agent.wait_for_log("draining", Duration::from_secs(10)),
        "the agent heard the drain; log:\n{}",
        agent.log_text()
    );
    let hub = HubFixture::start_with(identity, Default::default(), &address.to_string()).await;
    hub.trust(&agent);
    let caps = tokio::time::timeout(
        Duration::from_secs(30),
        hub.client(&agent).await.capabilities(),
    )
    .await
    .expect("the agent came back")
    .expect("call after the restart");
    assert_eq!(caps.os, std::env::consts::OS);
}

/// A tunnel that arrives while the hub drains is refused: accepted, it
/// would miss the drain and hold its agent on a hub that is going away.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_hub_refuses_new_tunnels_and_leaves_no_connection_behind() {
    let settings = tentacle_hub::HubSettings {
        drain_grace: Duration::from_secs(4),
        ..Default::default()
    };
    let mut hub = HubFixture::start_with(client_identity(), settings, "127.0.0.1:0").await;
    let port = hub.address.port();
    let busy = hub.polling_agent("");
    let client = hub.client(&busy).await;
    // A watch on a long script is a call in flight, so the drain lasts its
    // whole grace period.
    let request = bash("sleep 30");
    let ticket = request.ticket.clone();
    client
        .scripts()
        .start_script(request)
        .await
        .expect("start the long script");
    let _watch = client
        .scripts()
        .watch_script(pb::WatchScriptRequest {
            ticket,
            after_sequence: 0,
        })
        .await
        .expect("watch the long script");

    let mut late = hub.prepare_polling_agent(tentacle_tests::FAST_POLLING);
    hub.trust(&late);
    hub.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hub.hub.registry().is_closing() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(hub.hub.registry().is_closing(), "the drain began");
    let _events = late.spawn_no_wait();
    assert!(
        late.wait_for_log("shutting down", Duration::from_secs(10)),
        "the late agent was told the hub is going away; log:\n{}",
        late.log_text()
    );
    assert!(
        !late.log_text().contains("tunnel open"),
        "no tunnel was accepted during the drain; log:\n{}",
        late.log_text()
    );

    tokio::time::timeout(Duration::from_secs(20), hub.shutdown())
        .await
        .expect("the hub stops after its drain");
    let deadline = Instant::now() + Duration::from_secs(5);
    while established_connections_to(port) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        established_connections_to(port),
        0,
        "every connection to the stopped hub is closed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_refuses_an_untrusted_agent() {
    let hub = HubFixture::start(client_identity()).await;
    let mut agent = hub.prepare_polling_agent("");
    // Not trusted: the handshake itself fails.
    let _events = agent.spawn_no_wait();
    assert!(
        agent.wait_for_log("tunnel attempt failed", Duration::from_secs(10)),
        "log:\n{}",
        agent.log_text()
    );
    assert!(!agent.log_text().contains("tunnel open"));
    assert_eq!(hub.hub.registry().connected_agents(), 0);

    // Trusted at the TLS layer, but under another agent id: refused too,
    // with the name the hub knows it by.
    hub.hub.trust_agent(tentacle_hub::TrustedAgent {
        thumbprint: agent.thumbprint,
        name: "someone-else".into(),
        mode: tentacle_hub::AgentMode::Polling,
        address: None,
        roles: Vec::new(),
        environments: Vec::new(),
        previous_thumbprint: None,
        retire_previous_at: None,
    });
    assert!(
        agent.wait_for_log("is registered as `someone-else`", Duration::from_secs(10)),
        "log:\n{}",
        agent.log_text()
    );
    assert_eq!(hub.hub.registry().connected_agents(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_a_hub_with_the_wrong_thumbprint() {
    let real = HubFixture::start(client_identity()).await;
    let mut agent = real.prepare_polling_agent("");
    real.trust(&agent);
    // Point the agent at the hub, but pin someone else's thumbprint.
    let impostor = client_identity().thumbprint().to_string();
    tentacle_tests::tentacle(
        agent.home(),
        &[
            "configure",
            "--server",
            &real.url(),
            "--server-thumbprint",
            &impostor,
        ],
    );
    let _events = agent.spawn_no_wait();
    assert!(
        agent.wait_for_log(
            "does not match the pinned thumbprint",
            Duration::from_secs(10)
        ),
        "log:\n{}",
        agent.log_text()
    );
    assert_eq!(real.hub.registry().connected_agents(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_several_tunnels_spreads_calls_over_them() {
    let hub = HubFixture::start(client_identity()).await;
    let agent = hub.polling_agent("[polling]\ntunnels = 3\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while hub.hub.registry().tunnels().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tunnels = hub.hub.registry().tunnels();
    assert_eq!(tunnels.len(), 3, "log:\n{}", agent.log_text());
    assert_eq!(established_connections_to(hub.address.port()), 3);
    let client = hub.client(&agent).await;
    let mut calls = Vec::new();
    for _ in 0..9 {
        let client = client.clone();
        let mut request = bash("sleep 1");
        request.isolation = pb::Isolation::None as i32;
        calls.push(tokio::spawn(
            async move { run_to_end(&client, request).await.1 },
        ));
    }
    // While the scripts run, each tunnel carries some of the watch streams.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = tunnels.iter().filter(|t| t.in_flight() > 0).count();
    assert_eq!(
        busy,
        3,
        "in flight per tunnel: {:?}",
        tunnels.iter().map(|t| t.in_flight()).collect::<Vec<_>>()
    );
    for call in calls {
        assert_eq!(call.await.expect("task"), 0);
    }
}
