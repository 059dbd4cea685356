//! `tentacle.v1.TunnelService`: where polling agents open their tunnels.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tentacle_proto::Thumbprint;
use tentacle_proto::http2::Http2Settings;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::tunnel::{self, SessionSignals};
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::v1::tunnel_service_server::TunnelService;
use tentacle_proto::v1::{TunnelFrame, TunnelWelcome};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};
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
    #[error("no hello within the tunnel setup timeout; send a hello frame first")]
    NoHello,
    /// The agent's side of the stream failed; its status is passed on.
    #[error("the tunnel stream failed: {}", .0.message())]
    Stream(#[from] Status),
    #[error("the first tunnel frame must be a hello")]
    NotHello,
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
        let agent_id = AgentId::parse(&hello.agent_id)
            .map_err(|_| TunnelError::InvalidAgentId(hello.agent_id.clone()))?;
        authorise(&self.hub, &peer.thumbprint, &agent_id).inspect_err(|error| {
            tracing::warn!(agent = %agent_id, thumbprint = %peer.thumbprint, %error, "refused a tunnel");
        })?;

        let (outgoing, outgoing_rx) = mpsc::channel(tunnel::PIPE_CHUNKS);
        let welcome = TunnelFrame {
            kind: Some(Kind::Welcome(TunnelWelcome {
                hub_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
        };
        outgoing
            .send(welcome)
            .await
            .map_err(|_| TunnelError::ClosedDuringSetup)?;
        // The session must pump bytes before the inner handshake can finish,
        // and this handler must return before any frame flows: both happen in
        // a task of their own.
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
                hello.tunnel_index,
                incoming,
                outgoing,
                ended.clone().drop_guard(),
            ),
            span,
        ));
        Ok(Box::pin(frames_until(outgoing_rx, ended)))
    }
}

/// The frames queued for the agent, ending once `ended` fires and the
/// frames already queued (a drain notice among them) are sent.
fn frames_until(
    frames: mpsc::Receiver<TunnelFrame>,
    ended: CancellationToken,
) -> impl tokio_stream::Stream<Item = Result<TunnelFrame, Status>> + Send + 'static {
    futures::stream::unfold((frames, ended), |(mut frames, ended)| async move {
        let frame = tokio::select! {
            biased;
            frame = frames.recv() => frame,
            () = ended.cancelled() => {
                // No more senders may add to the queue; what is in it still goes.
                frames.close();
                frames.recv().await
            }
        };
        frame.map(|frame| (Ok(frame), (frames, ended)))
    })
}

async fn run_tunnel(
    hub: Arc<Hub>,
    peer: PeerInfo,
    agent_id: AgentId,
    index: u32,
    incoming: Streaming<TunnelFrame>,
    outgoing: mpsc::Sender<TunnelFrame>,
    // Dropped when this function returns, however it returns: that ends
    // the reply stream.
    _ended: tokio_util::sync::DropGuard,
) {
    let (io, ends) = tunnel::pipe(Some(peer.clone()));
    let stop = CancellationToken::new();
    let signals = SessionSignals::default();
    let session = tokio::spawn(tunnel::run_session(
        incoming,
        outgoing.clone(),
        ends,
        hub.settings().heartbeat.clone(),
        signals.clone(),
        stop.clone(),
    ));
    let mut once = Some(io);
    // The session's heartbeats keep the tunnel alive, so the inner
    // connection does not ping; clients have always advertised HTTP/2's own
    // 16 KiB frames.
    let endpoint = Http2Settings {
        max_frame_bytes: None,
        ..Http2Settings::for_tunnels(&hub.settings().heartbeat).without_keepalive()
    }
    .apply_to_endpoint(Endpoint::from_static("http://tentacle-agent"));
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let io = once.take();
        async move {
            io.map(TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the tunnel's inner connection is gone"))
        }
    }));
    let channel = match tokio::time::timeout(hub.settings().tunnel_setup_timeout, connect).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(error)) => {
            tracing::warn!(agent = %agent_id, %error, "could not start a tunnel's inner connection");
            stop.cancel();
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %agent_id, "a tunnel's inner connection did not start in time");
            stop.cancel();
            return;
        }
    };
    let tunnel = Arc::new(Tunnel::new(
        agent_id.clone(),
        peer.thumbprint,
        channel,
        outgoing,
        stop.clone(),
    ));
    hub.registry().add(tunnel.clone());
    // An agent that drains this tunnel (it is replacing it) gets no new calls
    // on it; the calls already running finish.
    tokio::spawn({
        let tunnel = tunnel.clone();
        async move {
            tokio::select! {
                () = signals.drained.cancelled() => {
                    tracing::info!(agent = %tunnel.agent_id, "the agent is draining a tunnel");
                    tunnel.start_draining();
                }
                () = tunnel.stop.cancelled() => {}
            }
        }
    });
    tracing::info!(agent = %agent_id, tunnel = index, thumbprint = %peer.thumbprint.short(), "tunnel open");
    let end = session.await;
    hub.registry().remove(&tunnel);
    tunnel.stop.cancel();
    tracing::info!(agent = %agent_id, tunnel = index, ?end, "tunnel closed");
}

#[cfg(test)]
mod tests;
