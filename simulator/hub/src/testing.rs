//! What the hub's unit tests share: agents and hubs to test with, requests
//! that carry a peer the way the accept loop's connections do, in-memory
//! connections to the hub's services, a fake agent to reach through
//! tunnels, and presence for a cluster of hubs in one process. No process,
//! socket or certificate file is involved.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::tunnel::{
    self, HeartbeatSettings, OutboundFrames, ServerSettings, SessionSignals, TunnelCaller,
    TunnelServer,
};
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_server::{
    CapabilitiesService, CapabilitiesServiceServer,
};
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::v1::tunnel_service_client::TunnelServiceClient;
use tentacle_proto::v1::{TunnelFrame, TunnelHello, TunnelWelcome};
use tentacle_proto::{Identity, Thumbprint};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::cluster::{Node, NodeId, Presence};
use crate::hub::{AgentMode, Hub, HubSettings, HubStore, TrustedAgent};
use crate::registry::Tunnel;
use crate::target::AgentId;

/// A stand-in thumbprint, the same for the same seed.
pub fn thumbprint(seed: &str) -> Thumbprint {
    Thumbprint::of_der(seed.as_bytes())
}

/// A polling agent registered as `name` with `thumbprint`.
pub fn polling(name: &str, thumbprint: Thumbprint) -> TrustedAgent {
    TrustedAgent {
        thumbprint,
        name: name.into(),
        mode: AgentMode::Polling,
        address: None,
        roles: Vec::new(),
        environments: Vec::new(),
        previous_thumbprint: None,
        retire_previous_at: None,
    }
}

pub fn agent_id(name: &str) -> AgentId {
    AgentId::parse(name).expect("agent id")
}

/// The hub's identity; generated once, since every hub may share it.
pub fn identity() -> Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY
        .get_or_init(|| Identity::generate("tentacle-hub-test").expect("identity"))
        .clone()
}

/// A hub that keeps its registry in memory and takes no registrations.
pub fn memory_hub(settings: HubSettings) -> Arc<Hub> {
    Hub::new(identity(), settings)
}

/// A hub with its store in a new temporary directory, which lives as long
/// as the returned guard.
pub fn stored_hub(settings: HubSettings) -> (Arc<Hub>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = Hub::with_store(identity(), settings, HubStore::in_dir(dir.path())).expect("hub");
    (hub, dir)
}

/// The channel binding [`peer`] gives every in-memory connection.
pub const CHANNEL_BINDING: tentacle_proto::rotation::ChannelBinding = [42; 32];

/// What the accept loop attaches to a connection from `thumbprint`.
pub fn peer(thumbprint: Thumbprint) -> PeerInfo {
    PeerInfo {
        thumbprint,
        remote_addr: Some(([10, 0, 0, 7], 40000).into()),
        channel_binding: Some(CHANNEL_BINDING),
    }
}

/// `message` as a call from `thumbprint`, as a service sees it.
pub fn request<T>(message: T, thumbprint: Thumbprint) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(peer(thumbprint));
    request
}

/// One end of an in-memory connection, carrying its peer the way
/// `tentacle_proto::incoming::PeerStream` does, so tonic puts the
/// [`PeerInfo`] into every request's extensions.
struct PeerIo {
    io: DuplexStream,
    peer: PeerInfo,
}

impl Connected for PeerIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves `routes` on one in-memory connection from `thumbprint`; returns
/// the client's end.
pub async fn connect(routes: Routes, thumbprint: Thumbprint) -> Channel {
    let (client, server) = tokio::io::duplex(1 << 20);
    let incoming = tokio_stream::once(Ok::<_, io::Error>(PeerIo {
        io: server,
        peer: peer(thumbprint),
    }))
    // A stream that ended would stop the server.
    .chain(tokio_stream::pending());
    tokio::spawn(
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming(incoming),
    );
    let mut once = Some(client);
    Endpoint::from_static("http://in-memory")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = once.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| io::Error::other("the in-memory connection is used"))
            }
        }))
        .await
        .expect("in-memory connection")
}

/// The services `Hub::serve` serves, routed the same way.
pub fn hub_routes(hub: &Arc<Hub>) -> Routes {
    hub.routes()
}

/// An agent that answers `GetCapabilities` with its name as its version,
/// so a test sees which agent a call reached.
#[derive(Debug, Clone)]
pub struct FakeAgent(pub String);

#[tonic::async_trait]
impl CapabilitiesService for FakeAgent {
    async fn get_capabilities(
        &self,
        _request: tonic::Request<pb::GetCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::Capabilities>, tonic::Status> {
        Ok(tonic::Response::new(pb::Capabilities {
            agent_version: self.0.clone(),
            ..Default::default()
        }))
    }

    async fn get_health(
        &self,
        _request: tonic::Request<pb::GetHealthRequest>,
    ) -> Result<tonic::Response<pb::AgentHealth>, tonic::Status> {
        Ok(tonic::Response::new(pb::AgentHealth::default()))
    }
}

/// How a fake agent serves its tunnel's calls.
const FAKE_AGENT_SETTINGS: ServerSettings = ServerSettings {
    max_concurrent_calls: 64,
    side: "agent",
};

/// A tunnel from `name` whose calls reach a [`FakeAgent`] in memory, and
/// the queue of the frames the hub sends it outside calls (drains).
pub async fn fake_tunnel(name: &str, thumbprint: Thumbprint) -> (Arc<Tunnel>, OutboundFrames) {
    let routes = Routes::new(CapabilitiesServiceServer::new(FakeAgent(name.into())));
    let (caller, _server, stop) = tunnel::memory::connect(routes, FAKE_AGENT_SETTINGS);
    // The fake agent lives as long as the tunnel.
    let tunnel = tunnel_over(name, thumbprint, caller);
    let guard = stop.clone();
    let watched = tunnel.0.stop.clone();
    tokio::spawn(async move {
        watched.cancelled().await;
        guard.cancel();
    });
    tunnel
}

/// A tunnel from `name` whose calls go nowhere; registry tests only pick
/// it.
pub fn idle_tunnel(name: &str, thumbprint: Thumbprint) -> (Arc<Tunnel>, OutboundFrames) {
    let (outbound, _unread) = tunnel::outbound();
    tunnel_over(name, thumbprint, TunnelCaller::new(outbound, 0))
}

fn tunnel_over(
    name: &str,
    thumbprint: Thumbprint,
    caller: TunnelCaller,
) -> (Arc<Tunnel>, OutboundFrames) {
    let (outbound, frames) = tunnel::outbound();
    let tunnel = Tunnel::new(
        agent_id(name),
        thumbprint,
        caller,
        outbound,
        CancellationToken::new(),
    );
    (Arc::new(tunnel), frames)
}

/// The agent's side of a tunnel, open until dropped.
#[derive(Debug)]
pub struct AgentTunnel {
    pub welcome: TunnelWelcome,
    /// The agent's frames to the hub.
    pub outbound: tunnel::Outbound,
    /// What the agent's session hears from the hub.
    pub signals: SessionSignals,
    stop: tokio_util::sync::DropGuard,
}

impl AgentTunnel {
    /// Closes the tunnel from the agent's side.
    pub fn close(self) {
        drop(self.stop);
    }
}

/// Opens a tunnel to the hub at the far end of `hub` as agent `name`, the
/// way a polling agent does, and serves a [`FakeAgent`] inside it.
pub async fn open_tunnel(hub: Channel, name: &str) -> Result<AgentTunnel, tonic::Status> {
    open_tunnel_with(hub, hello(name)).await
}

pub fn hello(name: &str) -> TunnelFrame {
    TunnelFrame {
        kind: Some(Kind::Hello(TunnelHello {
            agent_id: name.into(),
            agent_version: "test".into(),
            tunnel_index: 0,
            protocol: tunnel::PROTOCOL,
            max_concurrent_calls: 64,
        })),
    }
}

/// [`open_tunnel`], sending `first` as the first frame.
pub async fn open_tunnel_with(
    hub: Channel,
    first: TunnelFrame,
) -> Result<AgentTunnel, tonic::Status> {
    let name = match &first.kind {
        Some(Kind::Hello(hello)) => hello.agent_id.clone(),
        _ => String::new(),
    };
    let (outbound, frames) = tunnel::outbound();
    outbound.ordered.send(first).await.expect("queue the hello");
    let mut incoming = TunnelServiceClient::new(hub)
        .max_decoding_message_size(tunnel::MAX_FRAME)
        .open(frames)
        .await?
        .into_inner();
    let welcome = loop {
        match incoming.message().await? {
            Some(TunnelFrame {
                kind: Some(Kind::Welcome(welcome)),
            }) => break welcome,
            // The hub's first heartbeat may overtake its welcome.
            Some(TunnelFrame {
                kind: Some(Kind::Ping(_) | Kind::Pong(_)),
            }) => {}
            other => panic!("expected a welcome, got {other:?}"),
        }
    };
    let stop = CancellationToken::new();
    let routes = Routes::new(CapabilitiesServiceServer::new(FakeAgent(name)));
    let server = TunnelServer::new(routes, outbound.clone(), None, FAKE_AGENT_SETTINGS);
    let signals = SessionSignals::default();
    tokio::spawn(tunnel::run_session(
        incoming,
        outbound.clone(),
        Arc::new(server),
        HeartbeatSettings::default(),
        signals.clone(),
        stop.clone(),
    ));
    Ok(AgentTunnel {
        welcome,
        outbound,
        signals,
        stop: stop.drop_guard(),
    })
}

/// Presence shared by the hubs of a test cluster: which nodes hold which
/// agents is whatever the test last said, and every change wakes waiters.
#[derive(Debug)]
pub struct StaticPresence {
    holders: std::sync::Mutex<std::collections::HashMap<AgentId, Vec<Node>>>,
    changes: tokio::sync::watch::Sender<u64>,
    /// How many times a node asked who holds an agent: a node that polled
    /// presence would ask again and again.
    reads: tokio::sync::watch::Sender<usize>,
}

impl StaticPresence {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            holders: std::sync::Mutex::default(),
            changes: tokio::sync::watch::Sender::new(0),
            reads: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Says `holders` hold tunnels from agent `name`, best first.
    pub fn set(&self, name: &str, holders: &[&Node]) {
        self.holders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                agent_id(name),
                holders.iter().map(|n| (*n).clone()).collect(),
            );
        self.changes.send_modify(|n| *n += 1);
    }

    /// How many times nodes asked who holds an agent, so far and from now.
    pub fn reads(&self) -> tokio::sync::watch::Receiver<usize> {
        self.reads.subscribe()
    }

    /// Presence as node `this` sees it: every holder but itself.
    pub fn seen_by(self: &Arc<Self>, this: &NodeId) -> Arc<dyn Presence> {
        Arc::new(SeenBy {
            shared: self.clone(),
            this: this.clone(),
        })
    }
}

#[derive(Debug)]
struct SeenBy {
    shared: Arc<StaticPresence>,
    this: NodeId,
}

impl Presence for SeenBy {
    fn holders(&self, agent: &AgentId) -> Vec<Node> {
        self.shared.reads.send_modify(|n| *n += 1);
        let holders = self
            .shared
            .holders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        holders
            .get(agent)
            .into_iter()
            .flatten()
            .filter(|node| node.id != self.this)
            .cloned()
            .collect()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}
