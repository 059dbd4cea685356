use std::time::Duration;

use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
use tentacle_proto::v1::{GetCapabilitiesRequest, TunnelFrame};
use tonic::Code;

use crate::hub::{AgentMode, HubSettings};
use crate::target::Target;
use crate::testing::{
    agent_id, connect, hub_routes, memory_hub, open_tunnel, open_tunnel_with, polling, thumbprint,
};

/// The whole exchange over in-memory connections: hello, welcome, then the
/// tunnel carries the hub's calls to the agent.
#[tokio::test]
async fn a_trusted_agent_is_welcomed_and_then_reached_through_its_tunnel() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    let channel = connect(hub_routes(&hub), print).await;
    let tunnel = open_tunnel(channel, "web-01").await.expect("welcomed");
    assert_eq!(tunnel.welcome.hub_version, env!("CARGO_PKG_VERSION"));

    let target = Target::Polling(agent_id("web-01"));
    let mut client =
        CapabilitiesServiceClient::new(hub.channel(&target, print).await.expect("channel"));
    let answer = client
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .expect("the call reaches the agent")
        .into_inner();
    assert_eq!(answer.agent_version, "web-01");
    assert_eq!(hub.registry().connected_agents(), 1);

    // Closed from the agent's side, the tunnel leaves the registry.
    tunnel.close();
    let gone = async {
        while hub.registry().connected_agents() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("the tunnel is forgotten");
}

/// An agent replacing its tunnel drains it: the hub acknowledges that no
/// call will start on it any more, and then closes it itself.
#[tokio::test]
async fn a_tunnel_its_agent_drains_is_acknowledged_and_then_closed_by_the_hub() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    let channel = connect(hub_routes(&hub), print).await;
    let tunnel = open_tunnel(channel, "web-01").await.expect("welcomed");
    let drain = tentacle_proto::v1::tunnel_frame::Kind::Drain(tentacle_proto::v1::TunnelDrain {
        reason: "replaced".into(),
    });
    assert!(tunnel.outbound.ordered(drain).await);
    tokio::time::timeout(
        Duration::from_secs(10),
        tunnel.signals.drain_acknowledged.cancelled(),
    )
    .await
    .expect("the hub acknowledges the drain");
    let closed = async {
        while hub.registry().connected_agents() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the hub closes the drained tunnel with no call on it");
    drop(tunnel);
}

/// An agent of another tunnel protocol (one that still sends an inner
/// HTTP/2 connection's bytes) is told what to upgrade, not left hanging.
#[tokio::test]
async fn a_hello_of_another_protocol_is_refused_with_what_to_upgrade() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    let channel = connect(hub_routes(&hub), print).await;
    let mut old = crate::testing::hello("web-01");
    if let Some(tentacle_proto::v1::tunnel_frame::Kind::Hello(hello)) = &mut old.kind {
        hello.protocol = 0;
    }
    let status = open_tunnel_with(channel, old).await.expect_err("refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("tunnel protocol 0, this hub speaks 2"),
        "{status:?}"
    );
    assert_eq!(hub.registry().connected_agents(), 0);
}

#[tokio::test]
async fn an_agent_id_that_is_not_its_thumbprints_is_refused() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    hub.trust_agent(polling("web-02", thumbprint("web-02")));
    let channel = connect(hub_routes(&hub), print).await;
    let status = open_tunnel(channel, "web-02").await.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("registered as `web-01`, not `web-02`"),
        "{status:?}"
    );
    assert!(hub.registry().tunnels().is_empty());
}

#[tokio::test]
async fn an_untrusted_agent_is_refused() {
    let hub = memory_hub(HubSettings::default());
    let stranger = thumbprint("stranger");
    let channel = connect(hub_routes(&hub), stranger).await;
    let status = open_tunnel(channel, "web-01").await.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&stranger.to_string())
            && status.message().contains("tentacle-hub server trust add"),
        "{status:?}"
    );
    assert!(hub.registry().tunnels().is_empty());
}

#[tokio::test]
async fn a_listening_agent_may_not_open_tunnels() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    let mut listening = polling("web-01", print);
    listening.mode = AgentMode::Listening;
    listening.address = Some("https://10.0.0.7:10933".into());
    hub.trust_agent(listening);
    let channel = connect(hub_routes(&hub), print).await;
    let status = open_tunnel(channel, "web-01").await.expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("listening"), "{status:?}");
}

#[tokio::test]
async fn a_tunnel_must_start_with_a_valid_hello() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    let not_hello = TunnelFrame { kind: None };
    let status = open_tunnel_with(connect(hub_routes(&hub), print).await, not_hello)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = open_tunnel(connect(hub_routes(&hub), print).await, "web 01")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("`web 01`"), "{status:?}");
}

#[tokio::test]
async fn a_closing_hub_refuses_tunnels_with_a_status_worth_retrying() {
    let hub = memory_hub(HubSettings::default());
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    hub.registry().close();
    let status = open_tunnel(connect(hub_routes(&hub), print).await, "web-01")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// A hello is read under the tunnel setup timeout, so a connection that
/// says nothing does not hold a handler.
#[tokio::test]
async fn a_silent_tunnel_times_out() {
    use tentacle_proto::v1::tunnel_service_client::TunnelServiceClient;
    let hub = memory_hub(HubSettings {
        tunnel_setup_timeout: Duration::from_millis(200),
        ..HubSettings::default()
    });
    let print = thumbprint("web-01");
    hub.trust_agent(polling("web-01", print));
    let (_silent, frames) = tokio::sync::mpsc::channel::<TunnelFrame>(1);
    let status = TunnelServiceClient::new(connect(hub_routes(&hub), print).await)
        .open(tokio_stream::wrappers::ReceiverStream::new(frames))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}
