//! The Prometheus endpoints of the agent and the hub report what happened.

use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;
use tentacle_proto::dial::DialSettings;
use tentacle_tests::{
    AgentProcess, HubHome, bash, client_identity, free_port, http_get, metric, run_to_end,
    stdout_of,
};

/// Waits until `sample` is at least `wanted`; returns the whole exposition.
fn wait_for_metric(port: u16, sample: &str, wanted: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = http_get(port, "/metrics").unwrap_or_default();
        if metric(&text, sample).is_some_and(|value| value >= wanted) {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{sample} never reached {wanted}:\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_counts_bytes_scripts_and_refused_handshakes() {
    let me = client_identity();
    let port = free_port();
    let mut agent = AgentProcess::prepare(&[me.thumbprint()], "[files]\nmin_free_bytes = 0\n");
    agent.run_args = vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")];
    agent.spawn();
    let client = agent.client(&me).await;

    let local = tempfile::tempdir().expect("tempdir");
    let source = local.path().join("data.bin");
    std::fs::write(&source, vec![7u8; 1000]).expect("write");
    client
        .upload(&source, "data.bin", 4096)
        .await
        .expect("upload");
    client
        .download("data.bin", &local.path().join("back.bin"), false)
        .await
        .expect("download");
    let (_, code) = run_to_end(&client, bash("echo hi")).await;
    assert_eq!(code, 0);
    let stranger = client_identity();
    if let Ok(refused) = AgentClient::connect_listening(
        &agent.target(),
        agent.thumbprint,
        &stranger,
        &DialSettings::default(),
    )
    .await
    {
        let _ = refused.capabilities().await;
    }

    // The client may redial once, so at least one refusal is counted.
    let text = wait_for_metric(
        port,
        "tentacle_tls_handshake_failures_total{reason=\"untrusted_certificate\"}",
        1.0,
    );
    assert_eq!(
        metric(&text, "tentacle_agent_file_bytes_total{direction=\"in\"}"),
        Some(1000.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tentacle_agent_file_bytes_total{direction=\"out\"}"),
        Some(1000.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tentacle_agent_scripts_running"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tentacle_agent_tunnels_open"),
        Some(0.0),
        "{text}"
    );
}

#[test]
fn the_hub_reports_connected_agents_and_pickup_latency() {
    let sim = HubHome::new();
    let metrics_port = free_port();
    let hub_port = free_port();
    // serve_on does not take extra options; start the hub by hand.
    let mut hub = std::process::Command::new(tentacle_tests::bin("tentacle-hub"))
        .arg("--home")
        .arg(sim.0.path())
        .args([
            "server",
            "--listen",
            &format!("127.0.0.1:{hub_port}"),
            "--metrics-listen",
        ])
        .arg(format!("127.0.0.1:{metrics_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the hub");
    let hub_url = format!("https://127.0.0.1:{hub_port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(metrics_port, "/metrics").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut agent = AgentProcess::prepare_polling(&hub_url, &sim.thumbprint());
    let thumbprint = agent.thumbprint.to_string();
    let id = agent.agent_id();
    sim.trust_polling(&agent);
    agent.spawn();
    wait_for_metric(metrics_port, "tentacle_hub_connected_agents", 1.0);
    let target = format!("poll://{id}");
    stdout_of(&sim.run(&[
        "exec",
        "--target",
        &target,
        "--thumbprint",
        &thumbprint,
        "--hub",
        &hub_url,
        "--script",
        "true",
    ]));
    let text = http_get(metrics_port, "/metrics").expect("metrics");
    let picked =
        metric(&text, "tentacle_hub_pickup_latency_seconds_count").expect("a pickup histogram");
    assert!(
        picked >= 3.0,
        "start, watch and complete were picked up: {text}"
    );
    assert_eq!(
        metric(&text, "tentacle_hub_queued_calls"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tentacle_hub_tunnels_open"),
        Some(1.0),
        "{text}"
    );
    let _ = hub.kill();
    let _ = hub.wait();
}
