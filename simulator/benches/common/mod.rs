//! What both benchmarks share: a listening agent dialled directly over
//! pinned mTLS, and a polling agent reached through an in-process hub over
//! its tunnel, all in this process with real TLS on loopback.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tentacle_agent::config::{AgentConfig, Home, PollingServer};
use tentacle_agent::runtime::Agent;
use tentacle_agent::scripts::process::ProcessExecutor;
use tentacle_hub::client::AgentClient;
use tentacle_hub::target::Target;
use tentacle_hub::{AgentMode, Hub, HubSettings, TrustedAgent};
use tentacle_proto::Identity;
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tokio_util::sync::CancellationToken;

/// Both agents, and a client for each.
pub struct Pair {
    pub listening: AgentClient,
    pub polling: AgentClient,
    /// The files roots of the listening and the polling agent. Each bench
    /// compiles this module on its own, and not every bench reads these.
    #[allow(dead_code)]
    pub listening_files: PathBuf,
    #[allow(dead_code)]
    pub polling_files: PathBuf,
    pub stop: CancellationToken,
    _dir: tempfile::TempDir,
}

fn agent_home(
    dir: &Path,
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

/// Starts both agents and the hub, and connects to each agent.
pub async fn start() -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = Identity::generate("bench control plane").expect("identity");
    let stop = CancellationToken::new();

    let (home, config, listening_identity) = agent_home(dir.path(), "listening", |c| {
        c.trust.thumbprints = vec![control.thumbprint()]
    });
    let listening_files = home.resolve(&config.files.root);
    let agent = Agent::with_executor(home, config.clone(), Arc::new(ProcessExecutor::default()))
        .expect("agent");
    let listener = agent.bind().await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(agent.serve(Some(listener), stop.clone().cancelled_owned()));
    let listening = AgentClient::connect_listening(
        &ListeningAddress::new("127.0.0.1", port),
        listening_identity.thumbprint(),
        &control,
        &DialSettings::default(),
    )
    .await
    .expect("connect");

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
    let polling_files = home.resolve(&config.files.root);
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
    Pair {
        listening,
        polling,
        listening_files,
        polling_files,
        stop,
        _dir: dir,
    }
}

/// The binaries' own telemetry setup: logs at info, spans exported only
/// when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT).
pub fn telemetry() -> impl Drop {
    tentacle_proto::telemetry::init(
        "tentacle-bench",
        None,
        tentacle_proto::telemetry::LogFormat::Text,
        "info,h2=warn,hyper=warn,tower=warn",
    )
    .expect("telemetry")
}

/// A number from the environment, or `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
