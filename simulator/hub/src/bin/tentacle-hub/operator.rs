//! What the operator verbs share: reaching the hub, and the registered
//! agents behind it, each with a client routed through the hub.

use anyhow::bail;
use tentacle_hub::args::HubArgs;
use tentacle_hub::channel::{AgentChannel, HubRouted};
use tentacle_hub::client::AgentClient;
use tentacle_hub::home::HubHome;
use tentacle_hub::target::Target;
use tentacle_proto::dial::{self, DialSettings};
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::fleet_service_client::FleetServiceClient;
use tentacle_proto::{Thumbprint, TrustStore};

/// One registered agent and a client for it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub target: String,
    pub client: AgentClient,
}

/// The agents with `role` and `environment` (empty matches all).
pub async fn fleet(
    home: &HubHome,
    hub: &HubArgs,
    role: &str,
    environment: &str,
) -> anyhow::Result<Vec<Member>> {
    let identity = home.identity()?;
    let hub_thumbprint = hub.endpoint.thumbprint_or(&identity);
    let tls = tentacle_proto::tls::client_config(&identity, TrustStore::new([hub_thumbprint]))?;
    let channel = dial::channel(&hub.endpoint.hub, tls, &DialSettings::default()).await?;
    let listed = FleetServiceClient::new(channel.clone())
        .list_agents(pb::ListAgentsRequest {
            role: role.to_owned(),
            environment: environment.to_owned(),
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the hub refused to list its agents: {}",
                dial::describe_status(&status)
            )
        })?
        .into_inner();
    if listed.agents.is_empty() {
        bail!("no registered agent has role `{role}` and environment `{environment}`");
    }
    let mut members = Vec::new();
    for agent in listed.agents {
        let target: Target = agent.target.parse()?;
        let thumbprint: Thumbprint = agent.thumbprint.parse()?;
        let routed = HubRouted::new(channel.clone(), &target, thumbprint, hub.pickup_timeout)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        members.push(Member {
            name: agent.name,
            target: agent.target,
            client: AgentClient::new(AgentChannel::ViaHub(routed)),
        });
    }
    Ok(members)
}
