//! `tentacle rotate-certificate` on running agents, polling and listening,
//! with calls running through the hub the whole time: none fails, the hub
//! trusts both certificates during the overlap, and retires the old one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tentacle_hub::client::AgentClient;
use tentacle_hub::target::Target;
use tentacle_proto::Thumbprint;
use tentacle_tests::{
    AgentProcess, FAST_POLLING, HubFixture, bash, client_identity, free_port, metric, run_to_end,
    tentacle_output,
};
use tokio_util::sync::CancellationToken;

/// Calls `client` until `stop`: capabilities and a short script, alternately.
fn keep_calling(
    client: AgentClient,
    stop: CancellationToken,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut errors = Vec::new();
        let mut i = 0u64;
        while !stop.is_cancelled() {
            i += 1;
            let result = if i.is_multiple_of(2) {
                client
                    .capabilities()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                let mut request = bash("echo ok");
                request.isolation = tentacle_proto::v1::Isolation::None as i32;
                let (lines, code) = run_to_end(&client, request).await;
                if code == 0 && lines.iter().any(|l| l.text == "ok") {
                    Ok(())
                } else {
                    Err(format!("script ended with {code}"))
                }
            };
            match result {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    errors.push(error);
                }
            }
        }
        errors
    })
}

fn current_thumbprint(agent: &AgentProcess) -> Thumbprint {
    let out = tentacle_output(agent.home(), &["show-thumbprint"]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("thumbprint")
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_certificates_fails_no_call() {
    let home = tempfile::tempdir().expect("tempdir");
    let (hub, key) = HubFixture::start_registering(client_identity(), home.path()).await;
    let hub_url = hub.url();
    let hub_thumbprint = hub.thumbprint().to_string();

    let register = |agent: &AgentProcess, name: &str, extra: &[&str]| {
        let mut args = vec![
            "register-with",
            "--server",
            &hub_url,
            "--server-thumbprint",
            &hub_thumbprint,
            "--name",
            name,
            "--api-key",
            &key,
        ];
        args.extend_from_slice(extra);
        let out = tentacle_output(agent.home(), &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut poller = AgentProcess::prepare(&[], FAST_POLLING);
    register(&poller, "rot-poll", &["--mode", "polling"]);
    poller.spawn();
    let port = free_port();
    let mut listener = AgentProcess::prepare(&[], &format!("[listen]\nport = {port}\n"));
    let port_text = port.to_string();
    register(
        &listener,
        "rot-listen",
        &[
            "--mode",
            "listening",
            "--public-hostname",
            "127.0.0.1",
            "--port",
            &port_text,
        ],
    );
    listener.spawn();

    let old_poller = poller.thumbprint;
    let old_listener = listener.thumbprint;
    let poll_target: Target = "poll://rot-poll".parse().expect("target");
    let listen_target: Target = format!("https://127.0.0.1:{port}").parse().expect("target");
    // Clients made before the rotation, pinning the old thumbprints.
    let clients = [
        hub.hub
            .client(&poll_target, old_poller)
            .await
            .expect("client"),
        hub.hub
            .client(&listen_target, old_listener)
            .await
            .expect("client"),
    ];
    let stop = CancellationToken::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = clients
        .iter()
        .flat_map(|c| [c.clone(), c.clone()])
        .map(|c| keep_calling(c, stop.clone(), ok.clone(), failed.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    for agent in [&poller, &listener] {
        let out = tentacle_output(agent.home(), &["rotate-certificate", "--overlap", "8s"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for agent in [&poller, &listener] {
        assert!(
            agent.wait_for_log("switched to a new certificate", Duration::from_secs(10)),
            "{}",
            agent.log_text()
        );
    }
    assert!(
        poller.wait_for_log(
            "the tunnel with the old certificate is closed",
            Duration::from_secs(30)
        ),
        "{}",
        poller.log_text()
    );
    let new_poller = current_thumbprint(&poller);
    let new_listener = current_thumbprint(&listener);
    assert_ne!(new_poller, old_poller);
    assert_ne!(new_listener, old_listener);
    // Keep calling for a while on the new certificates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let mut errors = Vec::new();
    for caller in callers {
        errors.extend(caller.await.expect("caller"));
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("calls during the rotation: {ok} succeeded, {failed} failed");
    assert_eq!(failed, 0, "calls failed during the rotation: {errors:?}");
    assert!(ok >= 20, "only {ok} calls ran during the rotation");

    // The polling agent now serves through a tunnel with its new certificate.
    let tunnels = hub.hub.registry().tunnels();
    assert!(
        tunnels
            .iter()
            .any(|t| t.thumbprint == new_poller && !t.is_draining())
    );
    assert!(
        tunnels.iter().all(|t| t.thumbprint != old_poller),
        "the old tunnel is gone"
    );
    let agents = hub.hub.agents();
    let entry = agents
        .iter()
        .find(|a| a.name == "rot-poll")
        .expect("registered");
    assert_eq!(
        (entry.thumbprint, entry.previous_thumbprint),
        (new_poller, Some(old_poller))
    );

    // Once the overlap passes, the hub retires the old thumbprints by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    while hub
        .hub
        .agents()
        .iter()
        .any(|a| a.previous_thumbprint.is_some())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let agents = hub.hub.agents();
    assert!(
        agents.iter().all(|a| a.previous_thumbprint.is_none()),
        "{agents:?}"
    );
    let fresh = hub
        .hub
        .client(&poll_target, new_poller)
        .await
        .expect("client");
    fresh
        .capabilities()
        .await
        .expect("a call with the new thumbprint");
    let stale = hub
        .hub
        .client(&poll_target, old_poller)
        .await
        .expect("client");
    let mut request = tonic::Request::new(tentacle_proto::v1::GetCapabilitiesRequest {});
    request
        .extensions_mut()
        .insert(tentacle_hub::channel::PickupTimeout(Duration::from_millis(
            300,
        )));
    let refused = tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient::new(
        stale.channel().clone(),
    )
    .get_capabilities(request)
    .await;
    assert!(
        refused.is_err(),
        "the retired thumbprint no longer reaches the agent"
    );
    let stored = std::fs::read_to_string(home.path().join("agents.toml")).expect("registry");
    assert!(
        stored.contains(&new_poller.to_string()) && !stored.contains(&old_poller.to_string()),
        "{stored}"
    );
    // Both rotations and both retirements were counted by this process's hub.
    let metrics = tentacle_proto::metrics::METRICS.encode();
    for outcome in ["announced", "retired"] {
        let sample = format!("tentacle_hub_certificate_rotations_total{{outcome=\"{outcome}\"}}");
        assert!(
            metric(&metrics, &sample).is_some_and(|n| n >= 2.0),
            "{sample} in {metrics}"
        );
    }
}
