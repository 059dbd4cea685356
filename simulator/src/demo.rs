//! A first look without any setup: a real listening agent with fresh
//! certificates in a temporary home, and one script run through it over
//! pinned mutual TLS.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tentacle_agent::config::{AgentConfig, Home};
use tentacle_agent::runtime::{Agent, AgentError};
use tentacle_agent::scripts::process::ProcessExecutor;
use tentacle_proto::Identity;
use tentacle_proto::dial::{DialSettings, ListeningAddress};
use tentacle_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use tentacle_hub::client::{AgentClient, ClientError, FollowSettings, print_line};

/// The script the demo runs when none is given.
pub const DEFAULT_SCRIPT: &str = r#"echo "Hello from Tentacle on $(uname -sm)"
echo "This script ran under ticket $TENTACLE_TICKET in $(pwd)"
for step in 1 2 3; do echo "step $step of 3"; done
echo "and this line went to stderr" >&2
exit 0
"#;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("could not prepare a temporary home: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Identity(#[from] tentacle_proto::identity::IdentityError),
    #[error(transparent)]
    Config(#[from] tentacle_agent::config::ConfigError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Runs `script` on a fresh in-process agent and prints its output. Returns
/// the script's exit code.
pub async fn run(script: &str) -> Result<i32, DemoError> {
    let temp = tempfile::tempdir()?;
    let home = Home::new(temp.path().join("agent"));
    let client_identity = Identity::generate("Tentacle demo control plane")?;
    let agent_identity = Identity::generate("Tentacle demo agent")?;
    let mut config = AgentConfig::default();
    config.listen.address = IpAddr::V4(Ipv4Addr::LOCALHOST);
    config.listen.port = 0;
    config.trust.thumbprints = vec![client_identity.thumbprint()];
    home.save(&config)?;
    agent_identity.save(
        &home.resolve(&config.certificate.certificate),
        &home.resolve(&config.certificate.key),
    )?;
    let agent = Agent::with_executor(
        home,
        config.clone(),
        Arc::new(ProcessExecutor::new(config.process_settings())),
    )?;
    let listener = agent.bind().await?;
    let port = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(agent.serve(Some(listener), stop.clone().cancelled_owned()));

    println!(
        "Started a listening agent on 127.0.0.1:{port} in {}",
        temp.path().display()
    );
    println!("  agent thumbprint:  {}", agent_identity.thumbprint());
    println!("  client thumbprint: {}", client_identity.thumbprint());
    println!("Running a script through it over pinned mutual TLS:");
    println!();

    let address = ListeningAddress::new("127.0.0.1", port);
    let client = AgentClient::connect_listening(
        &address,
        agent_identity.thumbprint(),
        &client_identity,
        &DialSettings::default(),
    )
    .await?;
    let ticket = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let request = pb::StartScriptRequest {
        ticket: ticket.clone(),
        script_body: script.to_owned(),
        ..Default::default()
    };
    let end = client
        .run_script(
            request,
            print_line,
            &CancellationToken::new(),
            &FollowSettings::default(),
        )
        .await?;
    client.complete_script(&ticket).await?;
    println!();
    println!("Script finished with exit code {}.", end.exit_code);
    stop.cancel();
    let _ = serving.await;
    Ok(end.exit_code)
}
