use std::time::Duration;

use tentacle_proto::v1::GetCapabilitiesRequest;
use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
use tonic::Code;

use super::*;
use crate::channel::{AgentChannel, HubRouted};
use crate::hub::HubSettings;
use crate::testing::{connect, fake_tunnel, hub_routes, memory_hub, peer, thumbprint};

const CAPABILITIES: &str = "/tentacle.v1.CapabilitiesService/GetCapabilities";

/// A forwarded call as it reaches the fallback route: from `caller`, with
/// `headers`.
fn call_from(
    caller: Option<Thumbprint>,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<axum::body::Body> {
    let mut request = http::Request::builder().method("POST").uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request.body(axum::body::Body::empty()).expect("request");
    if let Some(caller) = caller {
        request.extensions_mut().insert(peer(caller));
    }
    request
}

/// The channels to other nodes a hub's forwarder has.
fn peers_of(hub: &Hub) -> Peers {
    Peers::new(hub.identity().clone(), hub.settings().dial.clone())
}

async fn refusal(hub: &Arc<Hub>, request: http::Request<axum::body::Body>) -> Status {
    match forward(hub.clone(), &peers_of(hub), request).await {
        Ok(response) => panic!("forwarded: {response:?}"),
        Err(error) => error.into(),
    }
}

/// The status a forwarded call ended with, read from its response.
fn status_of(response: &http::Response<Body>) -> Status {
    Status::from_header_map(response.headers()).expect("a trailers-only status")
}

#[tokio::test]
async fn only_operators_may_forward_calls() {
    let hub = memory_hub(HubSettings::default());
    let agent = thumbprint("web-01");
    hub.trust_agent(crate::testing::polling("web-01", agent));
    let target = [
        (TARGET_HEADER, "poll://web-01"),
        (TARGET_THUMBPRINT_HEADER, &*agent.to_string()),
    ];
    let status = refusal(&hub, call_from(Some(agent), CAPABILITIES, &target)).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&agent.to_string()), "{status:?}");
    let status = refusal(&hub, call_from(None, CAPABILITIES, &target)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // The hub's own identity is an operator; other services are not
    // forwarded.
    let operator = hub.identity().thumbprint();
    let status = refusal(
        &hub,
        call_from(Some(operator), "/grpc.health.v1.Health/Check", &target),
    )
    .await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

#[tokio::test]
async fn the_target_metadata_must_name_an_agent_and_its_thumbprint() {
    let hub = memory_hub(HubSettings::default());
    let operator = Some(hub.identity().thumbprint());
    let agent = thumbprint("web-01").to_string();
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[(TARGET_THUMBPRINT_HEADER, &agent)], TARGET_HEADER),
        (
            &[
                (TARGET_HEADER, "ftp://web-01"),
                (TARGET_THUMBPRINT_HEADER, &agent),
            ],
            "ftp://web-01",
        ),
        (
            &[(TARGET_HEADER, "poll://web-01")],
            TARGET_THUMBPRINT_HEADER,
        ),
        (
            &[
                (TARGET_HEADER, "poll://web-01"),
                (TARGET_THUMBPRINT_HEADER, "abc"),
            ],
            TARGET_THUMBPRINT_HEADER,
        ),
        (
            &[
                (TARGET_HEADER, "poll://web-01"),
                (TARGET_THUMBPRINT_HEADER, &agent),
                (PICKUP_TIMEOUT_HEADER, "soon"),
            ],
            "soon",
        ),
        (
            &[
                (TARGET_HEADER, "poll://web 01"),
                (TARGET_THUMBPRINT_HEADER, &agent),
            ],
            TARGET_HEADER,
        ),
    ];
    for (headers, named) in cases {
        let status = refusal(&hub, call_from(operator, CAPABILITIES, headers)).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{headers:?}: {status:?}"
        );
        assert!(status.message().contains(named), "{headers:?}: {status:?}");
    }
}

/// An operator in another process reaches the agent its metadata names,
/// through the hub's services over an in-memory connection.
#[tokio::test]
async fn a_call_is_routed_to_the_agent_its_metadata_names() {
    let hub = memory_hub(HubSettings::default());
    for name in ["web-01", "web-02"] {
        let (tunnel, _frames) = fake_tunnel(name, thumbprint(name)).await;
        hub.registry().add(tunnel);
    }
    let operator = connect(hub_routes(&hub), hub.identity().thumbprint()).await;
    for name in ["web-02", "web-01"] {
        let target: Target = format!("poll://{name}").parse().expect("target");
        let routed =
            HubRouted::new(operator.clone(), &target, thumbprint(name), None).expect("routed");
        let answer = CapabilitiesServiceClient::new(AgentChannel::ViaHub(routed))
            .get_capabilities(GetCapabilitiesRequest {})
            .await
            .expect("forwarded")
            .into_inner();
        assert_eq!(answer.agent_version, name, "reached {name}");
    }
    // The agent's thumbprint is checked: another agent's does not reach it.
    let target: Target = "poll://web-01".parse().expect("target");
    let routed = HubRouted::new(operator, &target, thumbprint("web-02"), None).expect("routed");
    let status = CapabilitiesServiceClient::new(AgentChannel::ViaHub(routed))
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

/// An operator's pickup timeout is honoured up to `max_pickup_timeout`.
#[tokio::test(start_paused = true)]
async fn an_operators_pickup_timeout_is_clamped() {
    let hub = memory_hub(HubSettings {
        pickup_timeout: Duration::from_secs(5),
        max_pickup_timeout: Duration::from_secs(60),
        ..HubSettings::default()
    });
    let operator = Some(hub.identity().thumbprint());
    let absent = thumbprint("absent").to_string();
    for (asked, waited) in [
        ("10s", Duration::from_secs(10)),
        ("1000h", Duration::from_secs(60)),
    ] {
        let headers = [
            (TARGET_HEADER, "poll://absent"),
            (TARGET_THUMBPRINT_HEADER, &*absent),
            (PICKUP_TIMEOUT_HEADER, asked),
        ];
        let start = tokio::time::Instant::now();
        let response = forward(
            hub.clone(),
            &peers_of(&hub),
            call_from(operator, CAPABILITIES, &headers),
        )
        .await
        .expect("answered with a status");
        assert_eq!(start.elapsed(), waited, "{asked}");
        let status = status_of(&response);
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("absent did not connect within"),
            "{status:?}"
        );
    }
    // A bound below the hub's own default does not shorten the default.
    let hub = memory_hub(HubSettings {
        pickup_timeout: Duration::from_secs(5),
        max_pickup_timeout: Duration::from_secs(1),
        ..HubSettings::default()
    });
    assert_eq!(pickup_limit(&hub), Duration::from_secs(5));
}

/// A listening agent that cannot be dialled is worth retrying later.
#[tokio::test]
async fn an_unreachable_listening_agent_is_unavailable() {
    let hub = memory_hub(HubSettings {
        dial: tentacle_proto::dial::DialSettings {
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        ..HubSettings::default()
    });
    // Bound and dropped: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let headers = [
        (TARGET_HEADER, &*format!("https://127.0.0.1:{port}")),
        (
            TARGET_THUMBPRINT_HEADER,
            &*thumbprint("listening").to_string(),
        ),
    ];
    let status = refusal(
        &hub,
        call_from(Some(hub.identity().thumbprint()), CAPABILITIES, &headers),
    )
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
