//! Sequential small calls through both modes, in one process: a listening
//! agent dialled directly, and a polling agent reached through a hub over
//! its tunnel. Prints per-mode latency and the polling/listening ratio.
//!
//! Run: `cargo bench -p tentacle-sim --bench small_calls` (CALLS=1000 by
//! default). Telemetry is set up as in the binaries, so the cost of the
//! tracing code with export off is included; set OTEL_EXPORTER_OTLP_ENDPOINT
//! to measure with export on.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tentacle_agent::config::{AgentConfig, Home, PollingServer};
use tentacle_agent::runtime::Agent;
use tentacle_agent::scripts::process::ProcessExecutor;
use tentacle_proto::Identity;
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_sim::client::AgentClient;
use tentacle_sim::hub::{AgentMode, Hub, HubSettings, TrustedAgent};
use tentacle_sim::target::Target;
use tokio_util::sync::CancellationToken;

fn agent_home(
    dir: &std::path::Path,
    name: &str,
    configure: impl FnOnce(&mut AgentConfig),
) -> (Home, AgentConfig, Identity) {
    let home = Home::new(dir.join(name));
    let identity = Identity::generate(name).expect("identity");
    let mut config = AgentConfig::default();
    config.listen.address = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.listen.port = 0;
    config.files.min_free_bytes = 0;
    configure(&mut config);
    home.save(&config).expect("config");
    identity
        .save(
            &home.resolve(&config.certificate.certificate),
            &home.resolve(&config.certificate.key),
        )
        .expect("identity");
    (home, config, identity)
}

fn summary(label: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let total: Duration = samples.iter().sum();
    let p50 = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!(
        "{label:<10} calls={} total={:.1}ms p50={:.1}us p99={:.1}us",
        samples.len(),
        total.as_secs_f64() * 1000.0,
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    p50
}

async fn measure(client: &AgentClient, calls: usize) -> Vec<Duration> {
    for _ in 0..50 {
        client.capabilities().await.expect("warm-up call");
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client.capabilities().await.expect("call");
        samples.push(started.elapsed());
    }
    samples
}

#[tokio::main]
async fn main() {
    // The binaries' own setup: logs at info, spans exported only when an
    // OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT).
    let _telemetry = tentacle_proto::telemetry::init(
        "tentacle-bench",
        None,
        tentacle_proto::telemetry::LogFormat::Text,
        "info,h2=warn,hyper=warn,tower=warn",
    )
    .expect("telemetry");
    let calls: usize = std::env::var("CALLS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().expect("tempdir");
    let control = Identity::generate("bench control plane").expect("identity");
    let stop = CancellationToken::new();

    // Listening agent.
    let (home, config, listening_identity) = agent_home(dir.path(), "listening", |c| {
        c.trust.thumbprints = vec![control.thumbprint()]
    });
    let agent = Agent::with_executor(home, config.clone(), Arc::new(ProcessExecutor::default()))
        .expect("agent");
    let listener = agent.bind().await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(agent.serve(Some(listener), stop.clone().cancelled_owned()));
    let direct = AgentClient::connect_listening(
        &ListeningAddress::new("127.0.0.1", port),
        listening_identity.thumbprint(),
        &control,
        &DialSettings::default(),
    )
    .await
    .expect("connect");

    // Hub and polling agent.
    let hub = Hub::new(control.clone(), HubSettings::default());
    let hub_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind hub");
    let hub_port = hub_listener.local_addr().expect("addr").port();
    tokio::spawn(
        hub.clone()
            .serve(hub_listener, stop.clone().cancelled_owned()),
    );
    let (home, config, polling_identity) = agent_home(dir.path(), "polling", |c| {
        c.listen.enabled = false;
        c.polling.enabled = true;
        c.polling.agent_id = "bench".into();
        c.polling.servers = vec![PollingServer {
            url: format!("https://127.0.0.1:{hub_port}"),
            thumbprint: control.thumbprint(),
        }];
    });
    hub.trust_agent(TrustedAgent {
        thumbprint: polling_identity.thumbprint(),
        name: "bench".into(),
        mode: AgentMode::Polling,
        address: None,
        roles: Vec::new(),
        environments: Vec::new(),
        previous_thumbprint: None,
        retire_previous_at: None,
    });
    let agent =
        Agent::with_executor(home, config, Arc::new(ProcessExecutor::default())).expect("agent");
    tokio::spawn(agent.serve(None, stop.clone().cancelled_owned()));
    let target: Target = "poll://bench".parse().expect("target");
    let polling = hub
        .client(&target, polling_identity.thumbprint())
        .await
        .expect("client");

    let listening_p50 = summary("listening", measure(&direct, calls).await);
    let polling_p50 = summary("polling", measure(&polling, calls).await);
    println!(
        "p50 ratio polling/listening = {:.2}",
        polling_p50.as_secs_f64() / listening_p50.as_secs_f64()
    );
    stop.cancel();
}
