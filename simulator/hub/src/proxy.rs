//! Forwards operators' calls to the agent named in their metadata, so an
//! operator in another process reaches polling agents through this hub.
//!
//! In a cluster, a call for a polling agent is served here if this node
//! holds a tunnel from it; otherwise it is offered to the nodes presence
//! names (`crate::peers`), once: a forwarded call carries the hop marker and
//! is served only from the receiving node's own tunnels. A call for no
//! holder waits for the agent's tunnel here or for presence to name a
//! holder, whichever comes first. ARCHITECTURE.md, "Routing between nodes",
//! lists the rules and the tests that keep them.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tentacle_proto::Thumbprint;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::thumbprint::ParseThumbprintError;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::channel::{
    BoxError, CallError, PICKUP_TIMEOUT_HEADER, PickupTimeout, TARGET_HEADER,
    TARGET_THUMBPRINT_HEADER, grpc_timeout,
};
use crate::cluster::{Cluster, HOP_HEADER, NODE_HEADER, Node, NodeId, Presence};
use crate::errors::NoClientCertificate;
use crate::hub::{Hub, HubError};
use crate::peers::{Offered, Outgoing, PeerError, Peers};
use crate::registry::{PickError, Waited};
use crate::target::{AgentId, ParseTargetError, Target};

/// Why a call was not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    NoClientCertificate(#[from] NoClientCertificate),
    #[error(
        "thumbprint {0} may open tunnels but not send calls through this hub; use an operator's identity"
    )]
    NotOperator(Thumbprint),
    #[error("the hub forwards only tentacle.v1 calls, not {0}")]
    NotForwardable(String),
    #[error("name the agent in the `{TARGET_HEADER}` metadata")]
    NoTarget,
    #[error("`{TARGET_HEADER}`: {0}")]
    InvalidTarget(ParseTargetError),
    #[error("give the agent's thumbprint in the `{TARGET_THUMBPRINT_HEADER}` metadata")]
    NoThumbprint,
    #[error("`{TARGET_THUMBPRINT_HEADER}`: {0}")]
    InvalidThumbprint(ParseThumbprintError),
    #[error("`{PICKUP_TIMEOUT_HEADER}: {text}` is not a duration (e.g. `30s`): {reason}")]
    InvalidPickupTimeout { text: String, reason: String },
    #[error(transparent)]
    Channel(#[from] HubError),
    #[error("{target} is not reachable: {reason}")]
    Unreachable { target: Target, reason: String },
    #[error("the call to {target} failed: {reason}")]
    CallFailed { target: Target, reason: String },
    /// The forwarding node's presence named the wrong node for this address.
    #[error(
        "this call is for hub node {named} but reached node {node}: the cluster's presence was stale"
    )]
    NotThisNode { named: String, node: NodeId },
    /// A forwarded call for an agent with no tunnel to this node.
    #[error("hub node {node} holds no tunnel from agent {agent}: the cluster's presence was stale")]
    NotHeld { node: NodeId, agent: AgentId },
    /// No node took the call within its pickup timeout.
    #[error(transparent)]
    Pickup(CallError),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// The hub's fallback route: every call that is not `TunnelService`.
#[derive(Debug, Clone)]
pub struct Forwarder {
    hub: Arc<Hub>,
    /// Channels to the other nodes, if the hub is in a cluster.
    peers: Arc<Peers>,
}

impl Forwarder {
    pub fn new(hub: Arc<Hub>) -> Self {
        let peers = Peers::new(hub.identity().clone(), hub.settings().dial.clone());
        Self {
            hub,
            peers: Arc::new(peers),
        }
    }
}

impl Service<http::Request<axum::body::Body>> for Forwarder {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        let (hub, peers) = (self.hub.clone(), self.peers.clone());
        Box::pin(async move {
            Ok(forward(hub, &peers, request).await.unwrap_or_else(|error| {
                let status: Status = error.into();
                status.into_http()
            }))
        })
    }
}

fn header<'a>(request: &'a http::Request<axum::body::Body>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn forward(
    hub: Arc<Hub>,
    peers: &Peers,
    mut request: http::Request<axum::body::Body>,
) -> Result<http::Response<Body>, ForwardError> {
    let caller = request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.thumbprint)
        .ok_or(NoClientCertificate)?;
    if !hub.is_operator(&caller) {
        return Err(ForwardError::NotOperator(caller));
    }
    if !request.uri().path().starts_with("/tentacle.v1.") {
        return Err(ForwardError::NotForwardable(
            request.uri().path().to_owned(),
        ));
    }
    let cluster = hub.cluster().cloned();
    if let Some(cluster) = &cluster
        && let Some(named) = header(&request, NODE_HEADER)
        && named != cluster.node.id.as_str()
    {
        tentacle_proto::metrics::METRICS.forwarded_call("refused");
        return Err(ForwardError::NotThisNode {
            named: named.to_owned(),
            node: cluster.node.id.clone(),
        });
    }
    let hop = request.headers().contains_key(HOP_HEADER);
    let target: Target = header(&request, TARGET_HEADER)
        .ok_or(ForwardError::NoTarget)?
        .parse()
        .map_err(ForwardError::InvalidTarget)?;
    let thumbprint: Thumbprint = header(&request, TARGET_THUMBPRINT_HEADER)
        .ok_or(ForwardError::NoThumbprint)?
        .parse()
        .map_err(ForwardError::InvalidThumbprint)?;
    if let Some(text) = header(&request, PICKUP_TIMEOUT_HEADER) {
        let timeout =
            humantime::parse_duration(text).map_err(|e| ForwardError::InvalidPickupTimeout {
                text: text.to_owned(),
                reason: e.to_string(),
            })?;
        let timeout = timeout.min(pickup_limit(&hub));
        request.extensions_mut().insert(PickupTimeout(timeout));
    }
    let request = request.map(Body::new);
    match (&cluster, &target) {
        (Some(cluster), Target::Polling(agent)) if hop => {
            // Offered by another node: served from this node's tunnels or
            // refused at once, so that node tries the next holder; never
            // forwarded again, so stale presence cannot make a loop.
            if !hub.registry().serves_now(agent, &thumbprint) {
                tentacle_proto::metrics::METRICS.forwarded_call("refused");
                return Err(ForwardError::NotHeld {
                    node: cluster.node.id.clone(),
                    agent: agent.clone(),
                });
            }
            serve_here(&hub, &target, thumbprint, request).await
        }
        (Some(cluster), Target::Polling(agent)) => {
            across_cluster(&hub, peers, cluster, &target, agent, thumbprint, request).await
        }
        _ => serve_here(&hub, &target, thumbprint, request).await,
    }
}

/// Serves a call from this hub: a listening agent's pooled connection, or
/// a tunnel to this node, waiting for one up to the pickup timeout.
async fn serve_here(
    hub: &Hub,
    target: &Target,
    thumbprint: Thumbprint,
    mut request: http::Request<Body>,
) -> Result<http::Response<Body>, ForwardError> {
    // The agent sees the caller's metadata, not the hub's routing.
    for name in [
        TARGET_HEADER,
        TARGET_THUMBPRINT_HEADER,
        PICKUP_TIMEOUT_HEADER,
        HOP_HEADER,
        NODE_HEADER,
    ] {
        request.headers_mut().remove(name);
    }
    let target = target.clone();
    let mut channel = hub.channel(&target, thumbprint).await?;
    let reason = |e: BoxError| tentacle_proto::dial::describe_connect_error(&*e);
    let ready = channel
        .ready()
        .await
        .map_err(|e| ForwardError::Unreachable {
            target: target.clone(),
            reason: reason(e),
        })?;
    ready
        .call(request)
        .await
        .map_err(|e| ForwardError::CallFailed {
            target,
            reason: reason(e),
        })
}

/// How many times a waiting call follows presence to new holders before it
/// gives up: each round waits for presence to name other holders, so this
/// bounds the offers one call makes while presence keeps changing.
const MAX_ROUNDS: usize = 16;

/// A call for a polling agent on a hub in a cluster: served here if this
/// node holds a tunnel from the agent; else offered to each holder presence
/// names until one takes it; else (or once all refused) it waits, up to
/// the pickup timeout, for a tunnel here or for presence to name other
/// holders, whichever comes first.
async fn across_cluster(
    hub: &Hub,
    peers: &Peers,
    cluster: &Cluster,
    target: &Target,
    agent: &AgentId,
    thumbprint: Thumbprint,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, ForwardError> {
    let registry = hub.registry();
    if registry.serves_now(agent, &thumbprint) {
        return serve_here(hub, target, thumbprint, request).await;
    }
    let pickup = request
        .extensions()
        .get::<PickupTimeout>()
        .map_or(hub.settings().pickup_timeout, |p| p.0);
    let deadline = grpc_timeout(request.headers());
    let wait = deadline.map_or(pickup, |d| d.min(pickup));
    let start = Instant::now();
    let (until, deadline_at) = (start + wait, deadline.map(|d| start + d));
    let presence = &*cluster.presence;
    let this = &cluster.node.id;
    // Subscribed before the first read, so no change after it is missed.
    let mut changes = presence.changes();
    changes.borrow_and_update();
    let mut holders = others(presence.holders(agent), this);
    let mut call = Outgoing::new(request);
    for _ in 0..MAX_ROUNDS {
        for node in &holders {
            let now = Instant::now();
            call.set_budget(
                deadline_at.map(|d| d.saturating_duration_since(now)),
                until.saturating_duration_since(now),
            );
            match peers.offer(node, &call).await {
                Ok(Offered::Answered(response)) => {
                    tentacle_proto::metrics::METRICS.forwarded_call("answered");
                    return Ok(response);
                }
                Ok(Offered::Stale) => {
                    tentacle_proto::metrics::METRICS.forwarded_call("stale");
                    tracing::debug!(%agent, node = %node.id, "presence was stale; trying the next holder");
                }
                Err(PeerError::Unreachable { reason, .. }) => {
                    tentacle_proto::metrics::METRICS.forwarded_call("unreachable");
                    tracing::warn!(%agent, node = %node.id, %reason, "a hub node holding the agent is not reachable; trying the next holder");
                }
                Err(error @ PeerError::Spent { .. }) => return Err(error.into()),
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let named = named_holders(presence, agent, this, &mut changes, &holders);
        match registry.pick_or(agent, &thumbprint, left, named).await {
            Ok(Waited::Tunnel(_)) => {
                // The call picks again, at once: the local path is the one
                // a hub without a cluster takes.
                let Some(mut request) = call.into_request() else {
                    return Err(PeerError::Spent { node: this.clone() }.into());
                };
                let left = until.saturating_duration_since(Instant::now());
                request.extensions_mut().insert(PickupTimeout(left));
                return serve_here(hub, target, thumbprint, request).await;
            }
            Ok(Waited::Other(named)) => holders = named,
            Err(PickError::NotConnected { .. }) => {
                // Named by the whole wait, not by the rest the last round had.
                let waited = PickError::NotConnected {
                    agent: agent.to_string(),
                    waited: humantime::format_duration(wait).to_string(),
                };
                return Err(ForwardError::Pickup(CallError::no_tunnel(
                    waited, deadline, pickup,
                )));
            }
            Err(error) => {
                return Err(ForwardError::Pickup(CallError::no_tunnel(
                    error, deadline, pickup,
                )));
            }
        }
    }
    // Presence kept naming new holders and none took the call.
    let waited = Duration::from_millis(start.elapsed().as_millis().try_into().unwrap_or(u64::MAX));
    let waited = PickError::NotConnected {
        agent: agent.to_string(),
        waited: humantime::format_duration(waited).to_string(),
    };
    Err(ForwardError::Pickup(CallError::no_tunnel(
        waited, deadline, pickup,
    )))
}

/// The holders presence names that are not this node.
fn others(mut holders: Vec<Node>, this: &NodeId) -> Vec<Node> {
    holders.retain(|node| node.id != *this);
    holders
}

/// Waits for presence to name holders of `agent` other than `tried`. Each
/// turn waits for a change; the caller bounds the whole wait by the pickup
/// timeout.
async fn named_holders(
    presence: &dyn Presence,
    agent: &AgentId,
    this: &NodeId,
    changes: &mut watch::Receiver<u64>,
    tried: &[Node],
) -> Vec<Node> {
    loop {
        if changes.changed().await.is_err() {
            // Presence is gone: only a tunnel here can end the wait.
            return std::future::pending().await;
        }
        let holders = others(presence.holders(agent), this);
        if !holders.is_empty() && holders != tried {
            return holders;
        }
    }
}

/// The longest pickup timeout an operator's call may ask for: the
/// configured bound, or the hub's own default if that is longer.
fn pickup_limit(hub: &Hub) -> std::time::Duration {
    let settings = hub.settings();
    settings.max_pickup_timeout.max(settings.pickup_timeout)
}

#[cfg(test)]
mod tests;
