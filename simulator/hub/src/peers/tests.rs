//! Hubs in one process, each serving on a 127.0.0.1 listener, sharing one
//! identity and a [`StaticPresence`]; agents' tunnels are in-memory ones
//! registered with one node. Calls go in through another node.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body::Body as _;
use sha2::{Digest, Sha256};
use tentacle_proto::tunnel::{self, OutboundFrames, ServerSettings};
use tentacle_proto::v1::GetCapabilitiesRequest;
use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
use tentacle_proto::v1::capabilities_service_server::CapabilitiesServiceServer;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Code;
use tonic::service::Routes;

use super::*;
use crate::channel::{
    AgentChannel, HubRouted, TARGET_HEADER, TARGET_THUMBPRINT_HEADER, grpc_timeout,
};
use crate::cluster::Cluster;
use crate::hub::{Hub, HubSettings};
use crate::registry::Tunnel;
use crate::target::Target;
use crate::testing::{FakeAgent, StaticPresence, agent_id, identity, memory_hub, thumbprint};

const WATCH: &str = "/tentacle.v1.ScriptService/WatchScript";
const START: &str = "/tentacle.v1.ScriptService/StartScript";
const UPLOAD: &str = "/tentacle.v1.FileService/UploadFile";
const DOWNLOAD: &str = "/tentacle.v1.FileService/DownloadFile";

/// Bytes a large transfer moves, in [`CHUNK`]s.
const LARGE: usize = 64 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// How long any one step may take before the test fails as hung; never a
/// bound on speed.
const HUNG: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(HUNG, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after {HUNG:?}"))
}

/// One hub node serving on 127.0.0.1 until dropped.
struct TestNode {
    hub: Arc<Hub>,
    node: Node,
    _serving: DropGuard,
}

async fn start_node(id: &str, presence: &Arc<StaticPresence>, settings: HubSettings) -> TestNode {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let node = Node {
        id: id.parse().expect("node id"),
        address: ListeningAddress::new("127.0.0.1", port),
    };
    let hub = memory_hub(settings);
    hub.join_cluster(Cluster {
        node: node.clone(),
        presence: presence.seen_by(&node.id),
    })
    .expect("joins once");
    let stop = CancellationToken::new();
    tokio::spawn(hub.clone().serve(listener, stop.clone().cancelled_owned()));
    TestNode {
        hub,
        node,
        _serving: stop.drop_guard(),
    }
}

/// Nodes `a` and `b` (and more), sharing one presence.
async fn cluster(ids: &[&str], settings: HubSettings) -> (Arc<StaticPresence>, Vec<TestNode>) {
    let presence = StaticPresence::new();
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(start_node(id, &presence, settings.clone()).await);
    }
    (presence, nodes)
}

/// A node id and address where no hub listens.
fn dead_node(id: &str) -> Node {
    // Bound and dropped: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    Node {
        id: id.parse().expect("node id"),
        address: ListeningAddress::new("127.0.0.1", port),
    }
}

/// What the test agent saw and did.
struct AgentState {
    /// Each call's path and metadata, in order.
    seen: watch::Sender<Vec<(String, http::HeaderMap)>>,
    /// Responses dropped before they ended: calls cancelled at the agent.
    cancelled: watch::Sender<usize>,
    /// Upload bytes received so far.
    received: watch::Sender<u64>,
    /// The lines the next `WatchScript` sends, as the test feeds them.
    lines: Mutex<Option<mpsc::Receiver<Bytes>>>,
    /// Opened by the test once the first download chunk reached it.
    gate: Notify,
}

/// An agent serving `GetCapabilities` (its name), and raw streams at the
/// other paths, recording what it sees.
#[derive(Clone)]
struct Agent(Arc<AgentState>);

impl Agent {
    fn new() -> Self {
        Self(Arc::new(AgentState {
            seen: watch::Sender::new(Vec::new()),
            cancelled: watch::Sender::new(0),
            received: watch::Sender::new(0),
            lines: Mutex::new(None),
            gate: Notify::new(),
        }))
    }

    fn feed_lines(&self) -> mpsc::Sender<Bytes> {
        let (tx, rx) = mpsc::channel(4);
        *self.0.lines.lock().expect("lines") = Some(rx);
        tx
    }

    fn seen(&self) -> Vec<(String, http::HeaderMap)> {
        self.0.seen.borrow().clone()
    }

    async fn wait_cancelled(&self, count: usize) {
        let mut cancelled = self.0.cancelled.subscribe();
        within(
            "the agent sees the cancel",
            cancelled.wait_for(|n| *n >= count),
        )
        .await
        .expect("agent state");
    }

    async fn wait_calls(&self, count: usize) {
        let mut seen = self.0.seen.subscribe();
        within(
            "the call reaches the agent",
            seen.wait_for(|s| s.len() >= count),
        )
        .await
        .expect("agent state");
    }

    /// Serves the agent's calls through a tunnel to `hub`, until dropped.
    fn attach(&self, hub: &Hub, name: &str) -> Attached {
        let routes = Routes::from(
            Routes::new(CapabilitiesServiceServer::new(FakeAgent(name.into())))
                .into_axum_router()
                .fallback_service(self.clone()),
        );
        let settings = ServerSettings {
            max_concurrent_calls: 64,
            side: "agent",
        };
        let (caller, _server, stop) = tunnel::memory::connect(routes, settings);
        let (outbound, frames) = tunnel::outbound();
        let tunnel = Tunnel::new(
            agent_id(name),
            thumbprint(name),
            caller,
            outbound,
            stop.clone(),
        );
        hub.registry().add(Arc::new(tunnel));
        Attached {
            _frames: frames,
            _stop: stop.drop_guard(),
        }
    }
}

/// An agent's tunnel, open until dropped.
struct Attached {
    _frames: OutboundFrames,
    _stop: DropGuard,
}

/// Counts a cancelled call when dropped unfinished.
struct Cancelled(Option<Arc<AgentState>>);

impl Cancelled {
    fn finished(&mut self) {
        self.0 = None;
    }
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.cancelled.send_modify(|n| *n += 1);
        }
    }
}

/// A body fed frame by frame from a channel.
struct Frames {
    frames: mpsc::Receiver<Result<http_body::Frame<Bytes>, Status>>,
    /// Keeps a body that never ends open.
    _open: Option<mpsc::Sender<Result<http_body::Frame<Bytes>, Status>>>,
    cancelled: Cancelled,
}

impl Frames {
    fn new(
        state: Option<Arc<AgentState>>,
    ) -> (mpsc::Sender<Result<http_body::Frame<Bytes>, Status>>, Self) {
        let (tx, rx) = mpsc::channel(4);
        let body = Self {
            frames: rx,
            _open: None,
            cancelled: Cancelled(state),
        };
        (tx, body)
    }
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = this.frames.poll_recv(cx);
        if let Poll::Ready(None) = polled {
            this.cancelled.finished();
        }
        polled
    }
}

fn grpc_ok() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers
}

fn chunk(index: usize) -> Bytes {
    Bytes::from(vec![u8::try_from(index % 251).expect("byte"); CHUNK])
}

impl Service<http::Request<axum::body::Body>> for Agent {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        let state = self.0.clone();
        let path = request.uri().path().to_owned();
        state
            .seen
            .send_modify(|seen| seen.push((path.clone(), request.headers().clone())));
        Box::pin(async move {
            let body = match path.as_str() {
                WATCH => {
                    let (tx, mut body) = Frames::new(Some(state.clone()));
                    let lines = state.lines.lock().expect("lines").take();
                    match lines {
                        Some(mut lines) => {
                            tokio::spawn(async move {
                                while let Some(line) = lines.recv().await {
                                    if tx.send(Ok(http_body::Frame::data(line))).await.is_err() {
                                        return;
                                    }
                                }
                                let _ = tx.send(Ok(http_body::Frame::trailers(grpc_ok()))).await;
                            });
                        }
                        // No lines: a stream that never ends.
                        None => body._open = Some(tx),
                    }
                    Body::new(body)
                }
                DOWNLOAD => {
                    let (tx, body) = Frames::new(Some(state.clone()));
                    tokio::spawn(async move {
                        for index in 0..LARGE / CHUNK {
                            if tx
                                .send(Ok(http_body::Frame::data(chunk(index))))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            if index == 0 {
                                // The rest only once the caller holds the
                                // first chunk: nothing between buffers it all.
                                state.gate.notified().await;
                            }
                        }
                        let _ = tx.send(Ok(http_body::Frame::trailers(grpc_ok()))).await;
                    });
                    Body::new(body)
                }
                UPLOAD => {
                    let mut body = Body::new(request.into_body());
                    let mut hash = Sha256::new();
                    let mut count = 0u64;
                    while let Some(frame) = next_frame(&mut body).await {
                        let Ok(frame) = frame else {
                            return Ok(Status::aborted("the upload broke").into_http());
                        };
                        if let Some(data) = frame.data_ref() {
                            hash.update(data);
                            count += u64::try_from(data.len()).expect("length");
                            state.received.send_replace(count);
                        }
                    }
                    let answer = format!("{count} {}", hex::encode(hash.finalize()));
                    let (tx, body) = Frames::new(None);
                    tokio::spawn(async move {
                        let _ = tx.send(Ok(http_body::Frame::data(answer.into()))).await;
                        let _ = tx.send(Ok(http_body::Frame::trailers(grpc_ok()))).await;
                    });
                    Body::new(body)
                }
                START => {
                    // Never answers; the guard counts the cancel.
                    let _cancelled = Cancelled(Some(state.clone()));
                    std::future::pending::<()>().await;
                    Body::empty()
                }
                _ => return Ok(Status::unimplemented(path).into_http()),
            };
            Ok(http::Response::new(body))
        })
    }
}

async fn next_frame(body: &mut Body) -> Option<Result<http_body::Frame<Bytes>, Status>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

/// An operator's connection to `node`, with the identity every node shares
/// (the hub's own thumbprint is an operator).
async fn operator(node: &Node) -> Channel {
    let identity = identity();
    let trust = TrustStore::new([identity.thumbprint()]);
    let tls = tentacle_proto::tls::client_config(&identity, trust).expect("tls");
    dial::channel(&node.address, tls, &DialSettings::default())
        .await
        .expect("the operator reaches the node")
}

/// A raw call to agent `name` at `path`.
fn call_for(name: &str, path: &str, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!("http://tentacle{path}").parse().expect("uri");
    let headers = request.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    headers.insert(
        TARGET_HEADER,
        HeaderValue::from_str(&format!("poll://{name}")).expect("header"),
    );
    headers.insert(
        TARGET_THUMBPRINT_HEADER,
        HeaderValue::from_str(&thumbprint(name).to_string()).expect("header"),
    );
    request
}

async fn send(channel: &Channel, request: http::Request<Body>) -> http::Response<Body> {
    let mut channel = channel.clone();
    let ready = channel.ready().await.expect("ready");
    within("the response", ready.call(request))
        .await
        .expect("a response")
}

/// A response's bytes and final status.
async fn finish(response: http::Response<Body>) -> (Vec<u8>, Status) {
    if let Some(status) = Status::from_header_map(response.headers()) {
        return (Vec::new(), status);
    }
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = within("the body", next_frame(&mut body)).await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(status) => return (bytes, status),
        };
        match frame.into_data() {
            Ok(data) => bytes.extend_from_slice(&data),
            Err(frame) => {
                let trailers = frame.into_trailers().expect("trailers");
                let status = Status::from_header_map(&trailers).expect("a status");
                return (bytes, status);
            }
        }
    }
    panic!("the body ended without a status");
}

fn metric(outcome: &str) -> bool {
    let sample = format!("tentacle_hub_forwarded_calls_total{{outcome=\"{outcome}\"}}");
    tentacle_proto::metrics::METRICS.encode().contains(&sample)
}

/// The typed client for agent `name` through `channel`, as operators use.
fn capabilities(channel: Channel, name: &str) -> CapabilitiesServiceClient<AgentChannel> {
    let target: Target = format!("poll://{name}").parse().expect("target");
    let routed = HubRouted::new(channel, &target, thumbprint(name), None).expect("routed");
    CapabilitiesServiceClient::new(AgentChannel::ViaHub(routed))
}

#[tokio::test]
async fn a_unary_call_through_one_node_reaches_an_agent_on_another() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let answer = within(
        "the call",
        capabilities(operator(&b.node).await, "web-01").get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .expect("the call reaches the agent through b")
    .into_inner();
    assert_eq!(answer.agent_version, "web-01");
    assert_eq!(b.hub.registry().connected_agents(), 0, "b holds no tunnel");
    assert!(metric("answered"));
}

/// The receiving node's HTTP/2 closes a connection that brings it more
/// than a hundred empty DATA frames in its life; a forwarded call must not
/// bring one each, or every node-to-node connection would die after a
/// hundred calls.
#[tokio::test]
async fn hundreds_of_calls_share_one_connection_between_nodes() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let mut client = capabilities(operator(&b.node).await, "web-01");
    for call in 0..300 {
        within(
            "the call",
            client.get_capabilities(GetCapabilitiesRequest {}),
        )
        .await
        .unwrap_or_else(|status| panic!("call {call} failed: {status:?}"));
    }
}

#[tokio::test]
async fn a_server_stream_through_a_node_arrives_line_by_line() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let lines = agent.feed_lines();
    let response = send(
        &operator(&b.node).await,
        call_for("web-01", WATCH, Body::empty()),
    )
    .await;
    let mut body = response.into_body();
    for line in ["first line\n", "second line\n", "third line\n"] {
        // Each line is sent only after the one before reached the caller:
        // a hop that held the stream back would hang here.
        lines
            .send(Bytes::from_static(line.as_bytes()))
            .await
            .expect("feed");
        let mut got = Vec::new();
        while got.len() < line.len() {
            let frame = within("a line", next_frame(&mut body))
                .await
                .expect("more of the stream")
                .expect("data");
            got.extend_from_slice(&frame.into_data().expect("data"));
        }
        assert_eq!(got, line.as_bytes());
    }
    drop(lines);
    let (rest, status) = finish(http::Response::new(body)).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

/// 64 MiB go up through b; the agent holds the first MiB before the caller
/// sends the rest, so b cannot be holding the upload whole.
#[tokio::test]
async fn an_upload_streams_through_a_node_without_being_held_whole() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let (tx, body) = Frames::new(None);
    let operator = operator(&b.node).await;
    let call =
        tokio::spawn(
            async move { send(&operator, call_for("web-01", UPLOAD, Body::new(body))).await },
        );
    let mut hash = Sha256::new();
    let first = (1024 * 1024) / CHUNK;
    for index in 0..LARGE / CHUNK {
        if index == first {
            let mut received = agent.0.received.subscribe();
            within(
                "the first MiB at the agent",
                received.wait_for(|n| *n >= u64::try_from(first * CHUNK).expect("size")),
            )
            .await
            .expect("agent state");
        }
        let data = chunk(index);
        hash.update(&data);
        tx.send(Ok(http_body::Frame::data(data)))
            .await
            .expect("send");
    }
    drop(tx);
    let response = within("the upload's answer", call).await.expect("task");
    let (answer, status) = finish(response).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(
        String::from_utf8(answer).expect("text"),
        format!("{LARGE} {}", hex::encode(hash.finalize()))
    );
}

/// 64 MiB come down through b; the agent sends more than its first chunk
/// only once that chunk reached the caller.
#[tokio::test]
async fn a_download_streams_through_a_node_without_being_held_whole() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let response = send(
        &operator(&b.node).await,
        call_for("web-01", DOWNLOAD, Body::empty()),
    )
    .await;
    let mut body = response.into_body();
    let (mut hash, mut count, mut opened) = (Sha256::new(), 0usize, false);
    let status = loop {
        let frame = within("the download", next_frame(&mut body))
            .await
            .expect("a status at the end")
            .expect("the download streams");
        match frame.into_data() {
            Ok(data) => {
                hash.update(&data);
                count += data.len();
                if !opened {
                    opened = true;
                    agent.0.gate.notify_one();
                }
            }
            Err(frame) => {
                let trailers = frame.into_trailers().expect("trailers");
                break Status::from_header_map(&trailers).expect("status");
            }
        }
    };
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(count, LARGE);
    let mut expected = Sha256::new();
    for index in 0..LARGE / CHUNK {
        expected.update(chunk(index));
    }
    assert_eq!(hash.finalize(), expected.finalize());
}

#[tokio::test]
async fn dropping_the_caller_cancels_the_call_at_the_agent() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let operator = operator(&b.node).await;

    // Mid-stream: the caller lets go of a stream it was reading.
    let lines = agent.feed_lines();
    let response = send(&operator, call_for("web-01", WATCH, Body::empty())).await;
    let mut body = response.into_body();
    lines
        .send(Bytes::from_static(b"running\n"))
        .await
        .expect("feed");
    within("a line", next_frame(&mut body))
        .await
        .expect("a frame")
        .expect("data");
    drop(body);
    agent.wait_cancelled(1).await;

    // Before any answer: the caller gives up on a call the agent holds.
    let call = tokio::spawn({
        let operator = operator.clone();
        async move { send(&operator, call_for("web-01", START, Body::empty())).await }
    });
    agent.wait_calls(2).await;
    call.abort();
    agent.wait_cancelled(2).await;
    drop(lines);
}

#[tokio::test]
async fn a_call_for_another_node_is_refused_as_stale() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let a = &nodes[0];
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let mut request = call_for("web-01", WATCH, Body::empty());
    request
        .headers_mut()
        .insert(NODE_HEADER, HeaderValue::from_static("b"));
    request
        .headers_mut()
        .insert(HOP_HEADER, HeaderValue::from_static("1"));
    let response = send(&operator(&a.node).await, request).await;
    assert!(response.headers().contains_key(STALE_PRESENCE_HEADER));
    let (_, status) = finish(response).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("is for hub node b but reached node a: the cluster's presence was stale"),
        "{status:?}"
    );
    assert!(agent.seen().is_empty(), "the agent saw nothing");
    assert!(metric("refused"));
}

/// A hop reached b although the agent's tunnel is on a: b serves hops from
/// its own tunnels only, so it refuses at once instead of passing the call
/// on, even though presence names a.
#[tokio::test]
async fn a_hop_is_served_only_from_the_nodes_own_tunnels() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let mut request = call_for("web-01", WATCH, Body::empty());
    request
        .headers_mut()
        .insert(HOP_HEADER, HeaderValue::from_static("1"));
    let response = send(&operator(&b.node).await, request).await;
    assert!(response.headers().contains_key(STALE_PRESENCE_HEADER));
    let (_, status) = finish(response).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("hub node b holds no tunnel from agent web-01"),
        "{status:?}"
    );
    assert!(agent.seen().is_empty(), "not forwarded to a");

    // With a tunnel of its own, b serves the hop.
    let here = Agent::new();
    let _here = here.attach(&b.hub, "web-01");
    let lines = here.feed_lines();
    drop(lines);
    let mut request = call_for("web-01", WATCH, Body::empty());
    request
        .headers_mut()
        .insert(HOP_HEADER, HeaderValue::from_static("1"));
    let (_, status) = finish(send(&operator(&b.node).await, request).await).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(here.seen().len(), 1);
    assert!(agent.seen().is_empty());
}

/// Local first: a node holding a tunnel from the agent serves the call
/// itself, whatever presence says of other nodes.
#[tokio::test]
async fn a_node_with_a_tunnel_serves_the_call_itself() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (there, here) = (Agent::new(), Agent::new());
    let _there = there.attach(&a.hub, "web-01");
    let _here = here.attach(&b.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    drop(here.feed_lines());
    let request = call_for("web-01", WATCH, Body::empty());
    let (_, status) = finish(send(&operator(&b.node).await, request).await).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    assert_eq!(here.seen().len(), 1, "served by b's own tunnel");
    assert!(there.seen().is_empty(), "not forwarded to a");
}

/// Presence names a node where nothing listens and a node without the
/// agent before the one that holds it: the call still reaches the agent.
#[tokio::test]
async fn stale_presence_still_reaches_the_agent() {
    let (presence, nodes) = cluster(&["a", "b", "c"], HubSettings::default()).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    let gone = dead_node("gone");
    presence.set("web-01", &[&gone, &c.node, &a.node]);
    let answer = within(
        "the call",
        capabilities(operator(&b.node).await, "web-01").get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .expect("the call reaches the agent")
    .into_inner();
    assert_eq!(answer.agent_version, "web-01");
    assert!(metric("stale") && metric("unreachable"));

    // A node whose address another node took refuses by node id.
    let moved = Node {
        id: "moved".parse().expect("node id"),
        address: c.node.address.clone(),
    };
    presence.set("web-01", &[&moved, &a.node]);
    let answer = within(
        "the call",
        capabilities(operator(&b.node).await, "web-01").get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .expect("the call reaches the agent")
    .into_inner();
    assert_eq!(answer.agent_version, "web-01");
}

/// A call for an agent connected nowhere waits; the agent connects to a
/// and presence says so, and the call is served there. Presence is read
/// when the call arrives and again when it changes, not polled.
#[tokio::test]
async fn a_call_for_an_agent_connected_nowhere_waits_for_presence() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let mut reads = presence.reads();
    let operator = operator(&b.node).await;
    let call = tokio::spawn({
        let operator = operator.clone();
        async move {
            capabilities(operator, "web-01")
                .get_capabilities(GetCapabilitiesRequest {})
                .await
        }
    });
    within("b asks presence", reads.wait_for(|n| *n >= 1))
        .await
        .expect("presence");
    // Long enough that a node polling presence would have read it again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!call.is_finished(), "the call waits");
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let answer = within("the call", call)
        .await
        .expect("task")
        .expect("served once the agent connected")
        .into_inner();
    assert_eq!(answer.agent_version, "web-01");
    assert_eq!(*reads.borrow(), 2, "read on arrival and on the one change");
}

/// A waiting call is served by a tunnel that arrives at its own node, with
/// no presence change.
#[tokio::test]
async fn a_waiting_call_is_served_by_a_tunnel_that_arrives_here() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let b = &nodes[1];
    let agent = Agent::new();
    let mut reads = presence.reads();
    let call = tokio::spawn({
        let operator = operator(&b.node).await;
        async move {
            capabilities(operator, "web-01")
                .get_capabilities(GetCapabilitiesRequest {})
                .await
        }
    });
    within("b asks presence", reads.wait_for(|n| *n >= 1))
        .await
        .expect("presence");
    let _tunnel = agent.attach(&b.hub, "web-01");
    let answer = within("the call", call)
        .await
        .expect("task")
        .expect("served by the tunnel here")
        .into_inner();
    assert_eq!(answer.agent_version, "web-01");
}

/// Nobody holds the agent and nobody gets it: the call fails after its
/// pickup timeout, as on a hub without a cluster.
#[tokio::test]
async fn a_call_for_an_agent_nobody_holds_fails_after_the_pickup_timeout() {
    let settings = HubSettings {
        pickup_timeout: Duration::from_millis(300),
        ..HubSettings::default()
    };
    let (_presence, nodes) = cluster(&["a", "b"], settings).await;
    let status = within(
        "the refusal",
        capabilities(operator(&nodes[1].node).await, "web-01")
            .get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .expect_err("nobody holds the agent");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("agent web-01 did not connect within 300ms"),
        "{status:?}"
    );
}

/// The caller's deadline goes with the call to the node holding the agent
/// (what is left of it), and ends a stream the agent is still serving.
#[tokio::test]
async fn the_deadline_survives_the_hop() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    let mut request = call_for("web-01", WATCH, Body::empty());
    request
        .headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("1S"));
    let (_, status) = finish(send(&operator(&b.node).await, request).await).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let seen = agent.seen();
    let deadline = grpc_timeout(&seen[0].1).expect("the agent sees a deadline");
    assert!(
        deadline > Duration::ZERO && deadline <= Duration::from_secs(1),
        "{deadline:?}"
    );
    agent.wait_cancelled(1).await;
}

/// Trace context and the caller's own metadata reach the agent unchanged;
/// the hubs' routing metadata does not.
#[tokio::test]
async fn trace_context_and_metadata_reach_the_agent_unchanged() {
    let (presence, nodes) = cluster(&["a", "b"], HubSettings::default()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let agent = Agent::new();
    let _tunnel = agent.attach(&a.hub, "web-01");
    presence.set("web-01", &[&a.node]);
    drop(agent.feed_lines());
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = call_for("web-01", WATCH, Body::empty());
    let headers = request.headers_mut();
    headers.insert("traceparent", HeaderValue::from_static(TRACEPARENT));
    headers.insert("tracestate", HeaderValue::from_static("vendor=tentacle"));
    headers.insert("x-ticket", HeaderValue::from_static("T-42"));
    let (_, status) = finish(send(&operator(&b.node).await, request).await).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let seen = agent.seen();
    let (path, headers) = &seen[0];
    assert_eq!(path, WATCH);
    assert_eq!(headers["traceparent"], TRACEPARENT);
    assert_eq!(headers["tracestate"], "vendor=tentacle");
    assert_eq!(headers["x-ticket"], "T-42");
    for routing in [
        HOP_HEADER,
        NODE_HEADER,
        TARGET_HEADER,
        TARGET_THUMBPRINT_HEADER,
        PICKUP_TIMEOUT_HEADER,
    ] {
        assert!(
            !headers.contains_key(routing),
            "{routing} reached the agent"
        );
    }
}

#[test]
fn grpc_timeouts_are_written_in_the_finest_unit_that_fits() {
    for (left, text) in [
        (Duration::from_nanos(1500), "1500n"),
        (Duration::from_millis(250), "250000u"),
        (Duration::from_secs(5), "5000000u"),
        (Duration::from_secs(1000), "1000000m"),
        (Duration::from_secs(200_000), "200000S"),
        (Duration::from_secs(10_000_000_000), "2777777H"),
    ] {
        let value = grpc_timeout_value(left);
        assert_eq!(value, text, "{left:?}");
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value);
        let parsed = grpc_timeout(&headers).expect("parses");
        assert!(parsed <= left, "{left:?} became {parsed:?}");
    }
}

/// A body fed by the test, and what one attempt at it yields.
async fn drain(body: AttemptBody) -> Vec<Bytes> {
    let mut body = Body::new(body);
    let mut out = Vec::new();
    while let Some(frame) = next_frame(&mut body).await {
        out.push(frame.expect("data").into_data().expect("data"));
    }
    out
}

#[tokio::test]
async fn a_body_is_replayed_from_its_start_until_a_node_answers() {
    let (tx, body) = Frames::new(None);
    let replay = Replay::new(Body::new(body));
    for part in ["one", "two"] {
        tx.send(Ok(http_body::Frame::data(Bytes::from(part))))
            .await
            .expect("send");
    }
    drop(tx);
    let first = drain(replay.attempt().expect("first")).await;
    let second = drain(replay.attempt().expect("again")).await;
    assert_eq!(first, second);
    assert_eq!(first, [Bytes::from("one"), Bytes::from("two")]);
    replay.commit();
    assert!(replay.attempt().is_none(), "answered: no more attempts");
}

#[tokio::test]
async fn a_body_longer_than_the_replay_limit_is_not_kept() {
    let (tx, body) = Frames::new(None);
    let replay = Replay::new(Body::new(body));
    tokio::spawn(async move {
        for _ in 0..=REPLAY_LIMIT / CHUNK {
            if tx.send(Ok(http_body::Frame::data(chunk(0)))).await.is_err() {
                return;
            }
        }
    });
    let frames = drain(replay.attempt().expect("first")).await;
    assert_eq!(frames.len(), REPLAY_LIMIT / CHUNK + 1);
    assert!(replay.attempt().is_none(), "spent: it cannot start over");
    assert_eq!(replay.state().kept_bytes, 0, "nothing is kept");
}

/// An attempt that a newer one superseded ends, even one waiting for the
/// caller's next bytes, so its stream to the refusing node closes.
#[tokio::test]
async fn a_superseded_attempt_ends() {
    let (tx, body) = Frames::new(None);
    let replay = Replay::new(Body::new(body));
    let old = tokio::spawn(drain(replay.attempt().expect("first")));
    // Until the old attempt waits for bytes that are not sent yet.
    let mut waits = false;
    for _ in 0..1000 {
        if replay.state().waiting.is_some() {
            waits = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(waits, "the first attempt waits for the caller's bytes");
    let new = replay.attempt().expect("second");
    assert!(
        within("the old attempt ends", old)
            .await
            .expect("task")
            .is_empty()
    );
    tx.send(Ok(http_body::Frame::data(Bytes::from("x"))))
        .await
        .expect("send");
    drop(tx);
    assert_eq!(drain(new).await, [Bytes::from("x")]);
}
