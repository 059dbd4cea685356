//! Node-to-node forwarding in a hub cluster: one channel per peer node,
//! and one operator's call offered to one of them, its body streaming both
//! ways under HTTP/2 flow control.
//!
//! Every node has the same identity (the one agents pin), so a peer is
//! dialled over pinned mTLS with that identity as its client certificate
//! and its thumbprint as the only one trusted. The certificate cannot tell
//! nodes apart, so each offered call names the node it is meant for
//! ([`NODE_HEADER`]) and is marked as a hop ([`HOP_HEADER`]): the receiver
//! serves it from its own tunnels only, never forwards it again, and
//! refuses it with the stale-presence status (marked by
//! [`STALE_PRESENCE_HEADER`]) if it is not the node named.
//!
//! A node that refuses a call as stale, or cannot be reached, has taken
//! none of it, so the call may be offered to the next holder. For that the
//! request's first bytes are kept, up to [`REPLAY_LIMIT`], until a node
//! answers; a call that sent more before being refused fails instead
//! (`UNAVAILABLE`, which callers retry). Nothing more of a body is ever
//! held: a forwarded upload or log stream passes through frame by frame.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::{Identity, TrustStore};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use crate::channel::{ConnectionBody, PICKUP_TIMEOUT_HEADER};
use crate::cluster::{HOP_HEADER, NODE_HEADER, Node, NodeId};

/// The metadata a node puts on its refusal of a call meant for another
/// node, or of a hop for an agent it holds no tunnel from: the forwarder
/// tells this refusal from an agent's own `FAILED_PRECONDITION` by it.
pub const STALE_PRESENCE_HEADER: &str = "tentacle-presence-stale";

/// How many bytes of a request body are kept so it can be offered to
/// another node after one refused it. Unary calls fit; an upload that a
/// stale node drew more from fails and is retried by its caller.
pub const REPLAY_LIMIT: usize = 256 * 1024;

/// Why a call could not be offered to a node.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Nothing reached the node: the call may go to another one.
    #[error("hub node {node} is not reachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    /// A node that refused the call, or failed, drew more of its body than
    /// is kept, so no other node can be given the whole of it.
    #[error(
        "the call could not be offered to hub node {node}: an earlier node took more than {REPLAY_LIMIT} bytes of its body before refusing it; retry the call"
    )]
    Spent { node: NodeId },
}

/// What a node made of an offered call.
#[derive(Debug)]
pub enum Offered {
    /// The node took the call; its response streams from it.
    Answered(http::Response<Body>),
    /// The node holds no tunnel from the agent (or is not the node named):
    /// presence was stale.
    Stale,
}

/// Channels to the other nodes of this hub's cluster, one per node id.
#[derive(Debug)]
pub struct Peers {
    identity: Identity,
    dial: DialSettings,
    channels: Mutex<HashMap<NodeId, (ListeningAddress, Channel)>>,
}

impl Peers {
    /// Peers dialled as `identity`, the identity every node shares, under
    /// `dial` (the hub's own dial settings): a node that presence still
    /// names but that drops packets costs a call up to its connect timeout
    /// before the next holder is tried; a refused connection costs nothing.
    pub fn new(identity: Identity, dial: DialSettings) -> Self {
        Self {
            identity,
            dial,
            channels: Mutex::default(),
        }
    }

    /// The channel to `node`, dialled on first use and again when the
    /// node's address changed.
    async fn channel(&self, node: &Node) -> Result<Channel, PeerError> {
        if let Some((address, channel)) = self.channels().get(&node.id)
            && *address == node.address
        {
            return Ok(channel.clone());
        }
        let unreachable = |reason: String| PeerError::Unreachable {
            node: node.id.clone(),
            reason,
        };
        // Every node shares the hub's certificate: a peer is one that
        // proves it holds its key.
        let trust = TrustStore::new([self.identity.thumbprint()]);
        let tls = tentacle_proto::tls::client_config(&self.identity, trust)
            .map_err(|e| unreachable(e.to_string()))?;
        let channel = dial::channel(&node.address, tls, &self.dial)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut channels = self.channels();
        // Two calls may have dialled at once; the first channel stays.
        match channels.get(&node.id) {
            Some((address, kept)) if *address == node.address => Ok(kept.clone()),
            _ => {
                channels.insert(node.id.clone(), (node.address.clone(), channel.clone()));
                Ok(channel)
            }
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, (ListeningAddress, Channel)>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offers `call` to `node`: the node either answers it (its response
    /// streams back), refuses it as stale, or is not reached.
    pub async fn offer(&self, node: &Node, call: &Outgoing) -> Result<Offered, PeerError> {
        let mut channel = self.channel(node).await?;
        let request = call.request_for(&node.id).ok_or_else(|| PeerError::Spent {
            node: node.id.clone(),
        })?;
        let unreachable = |error: Box<dyn std::error::Error + Send + Sync>| {
            // A node that went away is dialled afresh next time.
            self.channels().remove(&node.id);
            PeerError::Unreachable {
                node: node.id.clone(),
                reason: dial::describe_connect_error(&*error),
            }
        };
        let ready = channel.ready().await.map_err(|e| unreachable(e.into()))?;
        let response = ready
            .call(request)
            .await
            .map_err(|e| unreachable(e.into()))?;
        if is_stale(&response) {
            return Ok(Offered::Stale);
        }
        call.body.commit();
        // A stream the node breaks is `UNAVAILABLE`, as a broken tunnel is.
        Ok(Offered::Answered(
            response.map(|body| Body::new(ConnectionBody::new(body, None))),
        ))
    }
}

/// `left` as a `grpc-timeout` value: at most 8 digits, in the finest unit
/// that fits.
pub fn grpc_timeout_value(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let units: [(u128, &str); 6] = [
        (left.as_nanos(), "n"),
        (left.as_micros(), "u"),
        (left.as_millis(), "m"),
        (u128::from(left.as_secs()), "S"),
        (u128::from(left.as_secs() / 60), "M"),
        (u128::from(left.as_secs() / 3600), "H"),
    ];
    let (value, unit) = units
        .into_iter()
        .find(|(value, _)| *value <= MAX)
        .unwrap_or((MAX, "H"));
    HeaderValue::from_str(&format!("{value}{unit}")).unwrap_or(HeaderValue::from_static("1n"))
}

/// Whether a response is a node's stale-presence refusal.
fn is_stale(response: &http::Response<Body>) -> bool {
    response.headers().contains_key(STALE_PRESENCE_HEADER)
        && Status::from_header_map(response.headers())
            .is_some_and(|s| s.code() == tonic::Code::FailedPrecondition)
}

/// An operator's call on its way to another node: its head, and its body
/// with the first bytes kept until a node answers.
#[derive(Debug)]
pub struct Outgoing {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
    body: Replay,
}

impl Outgoing {
    /// `request` as it arrived, every header kept (target, deadline, trace
    /// context and the caller's own metadata); its extensions stay here.
    pub fn new(request: http::Request<Body>) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
            body: Replay::new(body),
        }
    }

    /// The headers the next offer sends, for the forwarder to bring the
    /// deadline and pickup timeout up to date.
    pub fn headers_mut(&mut self) -> &mut HeaderMap {
        &mut self.headers
    }

    /// Brings the call's `grpc-timeout` and pickup timeout up to what is
    /// left of them, so the wait before an offer counts against both.
    pub fn set_budget(&mut self, deadline: Option<Duration>, pickup: Duration) {
        if let Some(left) = deadline {
            self.headers
                .insert("grpc-timeout", grpc_timeout_value(left));
        }
        let pickup = Duration::from_millis(pickup.as_millis().try_into().unwrap_or(u64::MAX))
            .max(Duration::from_millis(1));
        if let Ok(value) = HeaderValue::from_str(&humantime::format_duration(pickup).to_string()) {
            self.headers.insert(PICKUP_TIMEOUT_HEADER, value);
        }
    }

    /// The call as a request to serve here, a tunnel having arrived while
    /// it waited; `None` if a node that refused it drew too much of its body.
    pub fn into_request(self) -> Option<http::Request<Body>> {
        let request = self.request()?;
        self.body.commit();
        Some(request)
    }

    /// The request with its body from the start, or `None` if its body
    /// can no longer be sent whole.
    fn request(&self) -> Option<http::Request<Body>> {
        let body = self.body.attempt()?;
        let mut request = http::Request::new(Body::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }

    /// The request for one offer to `node`, or `None` if its body can no
    /// longer be sent whole.
    fn request_for(&self, node: &NodeId) -> Option<http::Request<Body>> {
        let mut request = self.request()?;
        let headers = request.headers_mut();
        headers.insert(HOP_HEADER, HeaderValue::from_static("1"));
        // A node id is ASCII letters, digits, `-`, `_` and `.`.
        if let Ok(value) = HeaderValue::from_str(node.as_str()) {
            headers.insert(NODE_HEADER, value);
        }
        Some(request)
    }
}

/// A frame kept for replay.
#[derive(Debug, Clone)]
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> http_body::Frame<Bytes> {
        match self {
            Self::Data(data) => http_body::Frame::data(data.clone()),
            Self::Trailers(trailers) => http_body::Frame::trailers(trailers.clone()),
        }
    }
}

/// A request body that can be sent again from its start, as long as no
/// more than [`REPLAY_LIMIT`] bytes of it were drawn and no node answered.
#[derive(Clone)]
struct Replay(Arc<Mutex<ReplayState>>);

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("Replay")
            .field("kept_bytes", &state.kept_bytes)
            .field("spent", &state.spent)
            .field("attempt", &state.attempt)
            .finish_non_exhaustive()
    }
}

struct ReplayState {
    /// The caller's body; `None` once it ended.
    inner: Option<Body>,
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// How many kept frames the newest attempt has been given.
    position: usize,
    /// No attempt may start over: a frame was given out unkept, or a node
    /// answered.
    spent: bool,
    /// The newest attempt; older ones are given nothing more.
    attempt: u64,
    /// The task of the attempt waiting on the caller's body: woken when a
    /// newer attempt supersedes it, so its stream ends instead of hanging.
    waiting: Option<Waker>,
}

impl ReplayState {
    fn keep(&mut self, frame: &http_body::Frame<Bytes>) {
        if self.spent {
            return;
        }
        let (kept, size) = if let Some(data) = frame.data_ref() {
            (Kept::Data(data.clone()), data.len())
        } else if let Some(trailers) = frame.trailers_ref() {
            (Kept::Trailers(trailers.clone()), 0)
        } else {
            // A frame kind unknown to this version cannot be replayed.
            self.spend();
            return;
        };
        if self.kept_bytes + size > REPLAY_LIMIT {
            self.spend();
            return;
        }
        self.kept.push(kept);
        self.kept_bytes += size;
        self.position += 1;
    }

    fn spend(&mut self) {
        self.spent = true;
        self.drop_replayed();
    }

    /// Once nothing can start over, frames the newest attempt has been
    /// given are not needed any more.
    fn drop_replayed(&mut self) {
        if self.spent && self.position >= self.kept.len() {
            self.kept = Vec::new();
            self.kept_bytes = 0;
            self.position = 0;
        }
    }
}

impl Replay {
    fn new(body: Body) -> Self {
        Self(Arc::new(Mutex::new(ReplayState {
            inner: Some(body),
            kept: Vec::new(),
            kept_bytes: 0,
            position: 0,
            spent: false,
            attempt: 0,
            waiting: None,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The body for one more attempt, from the start; `None` once spent.
    fn attempt(&self) -> Option<AttemptBody> {
        let mut state = self.state();
        if state.spent {
            return None;
        }
        state.attempt += 1;
        state.position = 0;
        if let Some(waiting) = state.waiting.take() {
            waiting.wake();
        }
        Some(AttemptBody {
            replay: self.clone(),
            attempt: state.attempt,
        })
    }

    /// A node answered: nothing more is kept.
    fn commit(&self) {
        self.state().spend();
    }
}

/// One attempt's view of a [`Replay`].
struct AttemptBody {
    replay: Replay,
    attempt: u64,
}

impl http_body::Body for AttemptBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let mut state = this.replay.state();
        if state.attempt != this.attempt {
            // Superseded: the node it went to refused the call.
            return Poll::Ready(None);
        }
        if let Some(kept) = state.kept.get(state.position) {
            let frame = kept.frame();
            state.position += 1;
            state.drop_replayed();
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let Some(inner) = state.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let Poll::Ready(polled) = Pin::new(inner).poll_frame(cx) else {
                state.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            };
            state.waiting = None;
            return match polled {
                None => {
                    state.inner = None;
                    Poll::Ready(None)
                }
                // An empty chunk (the caller's end of stream, as the server
                // read it) is not passed on: the receiving node's HTTP/2
                // counts empty DATA frames over a connection's life and
                // closes it after a hundred, which every node-to-node
                // connection would reach.
                Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => continue,
                Some(Ok(frame)) => {
                    state.keep(&frame);
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(status)) => {
                    state.spend();
                    Poll::Ready(Some(Err(status)))
                }
            };
        }
    }
}

#[cfg(test)]
mod tests;
