//! `tentacle.v1.TunnelService`: where polling agents open their tunnels.

use std::sync::Arc;

use tentacle_proto::Thumbprint;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::tunnel::{self, Outbound, OutboundFrames, SessionSignals, TunnelCaller};
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::v1::tunnel_service_server::TunnelService;
use tentacle_proto::v1::{TunnelFrame, TunnelHello, TunnelWelcome};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::errors::NoClientCertificate;
use crate::hub::Hub;
use crate::registry::Tunnel;
use crate::target::AgentId;

/// The tunnel service.
#[derive(Debug, Clone)]
pub struct TunnelApi {
    hub: Arc<Hub>,
}

impl TunnelApi {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

/// Why a tunnel was refused.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    NoClientCertificate(#[from] NoClientCertificate),
    #[error("the hub is shutting down; reconnect later")]
    Closing,
    #[error(
        "this hub node is cut off from etcd and from most of its peers, so it takes no tunnels; connect to another node of the cluster"
    )]
    Fenced,
    #[error("no hello within the tunnel setup timeout; send a hello frame first")]
    NoHello,
    /// The agent's side of the stream failed; its status is passed on.
    #[error("the tunnel stream failed: {}", .0.message())]
    Stream(#[from] Status),
    #[error("the first tunnel frame must be a hello")]
    NotHello,
    #[error(
        "the agent speaks tunnel protocol {agent}, this hub speaks {hub}; upgrade the agent or the hub so that both match"
    )]
    Protocol { agent: u32, hub: u32 },
    #[error("agent id `{0}` is not valid: use 1-128 letters, digits, `-`, `_` or `.`")]
    InvalidAgentId(String),
    #[error(
        "this hub does not trust thumbprint {0}; register the agent with `tentacle register-with`, or add it with `tentacle-hub server trust add`"
    )]
    Untrusted(Thumbprint),
    #[error(
        "thumbprint {thumbprint} is registered as `{registered}`, not `{asked}`; open tunnels as `{registered}`, or register again under the new name"
    )]
    WrongAgentId {
        thumbprint: Thumbprint,
        asked: String,
        registered: String,
    },
    #[error(
        "`{name}` is registered as a listening agent, which the hub dials; register it as a polling agent to open tunnels"
    )]
    NotPolling { name: String },
    #[error("the tunnel closed during setup")]
    ClosedDuringSetup,
}

/// Whether `thumbprint` may open tunnels as `agent_id`, and if not, why.
fn authorise(hub: &Hub, thumbprint: &Thumbprint, agent_id: &AgentId) -> Result<(), TunnelError> {
    if hub.allows_tunnel(thumbprint, agent_id.as_str()) {
        return Ok(());
    }
    let agents = hub.agents();
    match agents.iter().find(|a| a.has_thumbprint(thumbprint)) {
        None => Err(TunnelError::Untrusted(*thumbprint)),
        Some(agent) if agent.name != agent_id.as_str() => Err(TunnelError::WrongAgentId {
            thumbprint: *thumbprint,
            asked: agent_id.to_string(),
            registered: agent.name.clone(),
        }),
        // Its name, so it is not polling.
        Some(agent) => Err(TunnelError::NotPolling {
            name: agent.name.clone(),
        }),
    }
}

type FrameStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<TunnelFrame, Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl TunnelService for TunnelApi {
    type OpenStream = FrameStream;

    async fn open(
        &self,
        request: Request<Streaming<TunnelFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        Ok(Response::new(self.accept(request).await?))
    }
}

impl TunnelApi {
    /// Checks a new tunnel's hello, welcomes it, and starts its session.
    async fn accept(
        &self,
        request: Request<Streaming<TunnelFrame>>,
    ) -> Result<FrameStream, TunnelError> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or(NoClientCertificate)?;
        if self.hub.registry().is_closing() {
            return Err(TunnelError::Closing);
        }
        if self.hub.is_fenced() {
            return Err(TunnelError::Fenced);
        }
        let mut incoming = request.into_inner();
        let first =
            tokio::time::timeout(self.hub.settings().tunnel_setup_timeout, incoming.message())
                .await
                .map_err(|_| TunnelError::NoHello)??;
        let hello = match first {
            Some(TunnelFrame {
                kind: Some(Kind::Hello(hello)),
            }) => hello,
            _ => return Err(TunnelError::NotHello),
        };
        if hello.protocol != tunnel::PROTOCOL {
            return Err(TunnelError::Protocol {
                agent: hello.protocol,
                hub: tunnel::PROTOCOL,
            });
        }
        let agent_id = AgentId::parse(&hello.agent_id)
            .map_err(|_| TunnelError::InvalidAgentId(hello.agent_id.clone()))?;
        // An agent that registered on another node a moment ago may be here
        // before that node's write reached this one's view.
        if matches!(
            authorise(&self.hub, &peer.thumbprint, &agent_id),
            Err(TunnelError::Untrusted(_))
        ) {
            self.hub.refresh_unknown(&peer.thumbprint).await;
        }
        authorise(&self.hub, &peer.thumbprint, &agent_id).inspect_err(|error| {
            tracing::warn!(agent = %agent_id, thumbprint = %peer.thumbprint, %error, "refused a tunnel");
        })?;

        let (outbound, frames) = tunnel::outbound();
        let welcome = Kind::Welcome(TunnelWelcome {
            hub_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: tunnel::PROTOCOL,
        });
        if !outbound.ordered(welcome).await {
            return Err(TunnelError::ClosedDuringSetup);
        }
        // This handler must return before any frame flows, so the session
        // runs in a task of its own.
        // A root span of its own: a tunnel outlives the call that opened it.
        let span = tracing::info_span!(
            target: tentacle_proto::telemetry::TRACE_TARGET,
            parent: None,
            "tunnel",
            otel.name = "tunnel session",
            agent.id = %agent_id,
            peer.thumbprint = %peer.thumbprint.short(),
        );
        // The reply stream ends with the session, not with the last frame
        // sender: a caller still holding a call on this tunnel must not keep
        // the agent's connection open after the hub has closed the tunnel.
        let ended = CancellationToken::new();
        tokio::spawn(tracing::Instrument::instrument(
            run_tunnel(
                self.hub.clone(),
                peer,
                agent_id,
                hello,
                incoming,
                outbound,
                ended.clone().drop_guard(),
            ),
            span,
        ));
        Ok(Box::pin(frames_until(frames, ended)))
    }
}

/// The frames queued for the agent, ending once `ended` fires and the
/// frames already queued (a drain notice among them) are sent.
fn frames_until(
    frames: OutboundFrames,
    ended: CancellationToken,
) -> impl tokio_stream::Stream<Item = Result<TunnelFrame, Status>> + Send + 'static {
    futures::stream::unfold((frames, ended), |(mut frames, ended)| async move {
        use futures::StreamExt;
        let frame = tokio::select! {
            biased;
            frame = frames.next() => frame,
            () = ended.cancelled() => {
                // No more senders may add to the queue; what is in it still goes.
                frames.close();
                frames.next().await
            }
        };
        frame.map(|frame| (Ok(frame), (frames, ended)))
    })
}

/// Acknowledges the agent's drain of `tunnel`, then closes it once no call
/// on it waits for an answer; each step waits at most `bound`, after which
/// the tunnel is left to the agent.
async fn close_when_answered(tunnel: &Tunnel, bound: std::time::Duration) {
    if !tunnel.caller.acknowledge_drain(bound).await {
        return;
    }
    let answered = async {
        while tunnel.caller.calls() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(bound, answered).await.is_ok() {
        tunnel.stop.cancel();
    } else {
        tracing::warn!(agent = %tunnel.agent_id, ?bound, "calls on a drained tunnel still run after the drain grace; the agent closes it");
    }
}

async fn run_tunnel(
    hub: Arc<Hub>,
    peer: PeerInfo,
    agent_id: AgentId,
    hello: TunnelHello,
    incoming: Streaming<TunnelFrame>,
    outbound: Outbound,
    // Dropped when this function returns, however it returns: that ends
    // the reply stream.
    _ended: tokio_util::sync::DropGuard,
) {
    let index = hello.tunnel_index;
    let stop = CancellationToken::new();
    let signals = SessionSignals::default();
    let caller = TunnelCaller::new(outbound.clone(), hello.max_concurrent_calls);
    let tunnel = Arc::new(Tunnel::new(
        agent_id.clone(),
        peer.thumbprint,
        caller.clone(),
        outbound.clone(),
        stop.clone(),
    ));
    hub.registry().add(tunnel.clone());
    // An agent that drains this tunnel (it is replacing it) gets no new calls
    // on it; the calls already picked for it start, the agent hears that no
    // more will (`drain_ack`), the calls running finish, and the hub closes
    // the tunnel once it has read every answer: only this end knows when the
    // last frame it waits for has arrived.
    tokio::spawn({
        let tunnel = tunnel.clone();
        let drained = signals.drained.clone();
        let bound = hub.settings().drain_grace;
        async move {
            tokio::select! {
                () = drained.cancelled() => {
                    tracing::info!(agent = %tunnel.agent_id, "the agent is draining a tunnel");
                    tunnel.start_draining();
                    tokio::select! {
                        () = close_when_answered(&tunnel, bound) => {}
                        () = tunnel.stop.cancelled() => {}
                    }
                }
                () = tunnel.stop.cancelled() => {}
            }
        }
    });
    tracing::info!(agent = %agent_id, tunnel = index, thumbprint = %peer.thumbprint.short(), "tunnel open");
    let end = tunnel::run_session(
        incoming,
        outbound,
        Arc::new(caller.clone()),
        hub.settings().heartbeat.clone(),
        signals,
        stop.clone(),
    )
    .await;
    caller.close();
    hub.registry().remove(&tunnel);
    tunnel.stop.cancel();
    tracing::info!(agent = %agent_id, tunnel = index, ?end, "tunnel closed");
}

#[cfg(test)]
mod tests;
