//! The reverse tunnel's session and call multiplexing, shared by the hub
//! and the agent.
//!
//! One `Open` stream carries every call the hub makes to a polling agent
//! (see `tentacle/v1/tunnel.proto` for the frames and their rules):
//!
//! - [`run_session`] reads the peer's frames, answers and sends
//!   heartbeats, notices drains, and hands call frames to a [`CallFrames`]:
//!   the hub's [`TunnelCaller`] or the agent's [`TunnelServer`].
//! - [`outbound`] is the queue of frames to the peer: call frames in order,
//!   with credit and heartbeat frames ahead of them.
//!
//! Architecture Invariant: the reader never waits on a call. Each call's
//! received bytes are bounded by its window ([`CALL_WINDOW`]), so the
//! reader queues them without blocking, and one slow consumer never stalls
//! the other calls or the heartbeats of its tunnel.
//!
//! Limits: [`MAX_CHUNK`], [`MAX_FRAME`] and [`CALL_WINDOW`] are part of the
//! protocol (both ends rely on them), so they are constants, not settings;
//! the heartbeat is [`HeartbeatSettings`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::v1::TunnelFrame;
use crate::v1::tunnel_frame::Kind;

mod body;
mod caller;
mod headers;
pub mod memory;
mod server;
mod window;

pub use caller::{CallerClosed, StartReservation, TunnelCaller};
pub use server::{CallService, ServerSettings, TunnelServer};

/// The most bytes one `data` frame carries.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Frames queued for the peer in order (call frames) on each side of one
/// tunnel, ahead of HTTP/2 flow control.
pub const OUTBOUND_FRAMES: usize = 16;

/// The most `data` payload bytes a side may have sent on one call without
/// the receiver's credit: each direction of each call buffers at most this.
pub const CALL_WINDOW: u32 = 1 << 20;

/// The frame protocol this build speaks (`TunnelHello.protocol`).
pub const PROTOCOL: u32 = 2;

/// The largest `TunnelFrame` either side accepts: one chunk plus framing.
/// Both ends set it as their decoding limit.
pub const MAX_FRAME: usize = MAX_CHUNK + 1024;

/// The shortest heartbeat interval a session honours; shorter ones (zero
/// included, which would make the ticker panic) are raised to it.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// Heartbeats of one tunnel session.
#[derive(Debug, Clone)]
pub struct HeartbeatSettings {
    /// How often a ping is sent when the tunnel is idle.
    pub interval: Duration,
    /// A tunnel that hears nothing for this long is dead.
    pub timeout: Duration,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(20),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Where a session hands the frames of calls: the hub's [`TunnelCaller`]
/// or the agent's [`TunnelServer`].
pub trait CallFrames: Send + Sync + 'static {
    /// A call frame from the peer. Must not block: see the module's
    /// invariant.
    fn receive(&self, frame: Kind);
}

/// The sending side of a tunnel's frames to the peer.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Frames whose order matters: hello, drain, and every call frame
    /// except credit. Bounded, so senders feel backpressure.
    pub ordered: mpsc::Sender<TunnelFrame>,
    /// Credit, ping and pong frames, sent ahead of the ordered queue. They
    /// are small and few (one credit per quarter window consumed), and
    /// must never wait behind data, or windows could not reopen.
    pub urgent: mpsc::UnboundedSender<TunnelFrame>,
}

impl Outbound {
    /// Queues an urgent frame; false once the tunnel is closed.
    pub fn urgent(&self, kind: Kind) -> bool {
        self.urgent.send(TunnelFrame { kind: Some(kind) }).is_ok()
    }

    /// Queues an ordered frame, waiting for room; false once the tunnel is
    /// closed.
    pub async fn ordered(&self, kind: Kind) -> bool {
        self.ordered
            .send(TunnelFrame { kind: Some(kind) })
            .await
            .is_ok()
    }

    /// Queues an ordered frame from where nothing can wait (a drop): now if
    /// there is room, else from a task of its own.
    pub fn ordered_later(&self, kind: Kind) {
        let frame = TunnelFrame { kind: Some(kind) };
        if let Err(mpsc::error::TrySendError::Full(frame)) = self.ordered.try_send(frame)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let ordered = self.ordered.clone();
            runtime.spawn(async move {
                let _ = ordered.send(frame).await;
            });
        }
    }
}

/// The frames for the peer, urgent ones first; what the outer stream sends.
#[derive(Debug)]
pub struct OutboundFrames {
    ordered: mpsc::Receiver<TunnelFrame>,
    urgent: mpsc::UnboundedReceiver<TunnelFrame>,
}

impl OutboundFrames {
    /// Takes no more frames; those already queued are still yielded, then
    /// the stream ends.
    pub fn close(&mut self) {
        self.ordered.close();
        self.urgent.close();
    }

    /// The next queued frame, if one is queued now.
    pub fn try_next(&mut self) -> Option<TunnelFrame> {
        self.urgent
            .try_recv()
            .or_else(|_| self.ordered.try_recv())
            .ok()
    }
}

impl Stream for OutboundFrames {
    type Item = TunnelFrame;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TunnelFrame>> {
        let this = self.get_mut();
        let urgent = match this.urgent.poll_recv(cx) {
            Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame)),
            Poll::Ready(None) => true,
            Poll::Pending => false,
        };
        match this.ordered.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame)),
            // Ends once both queues have ended.
            Poll::Ready(None) if urgent => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// A tunnel's outbound queues: the senders, and the stream for the peer.
pub fn outbound() -> (Outbound, OutboundFrames) {
    let (ordered, ordered_rx) = mpsc::channel(OUTBOUND_FRAMES);
    let (urgent, urgent_rx) = mpsc::unbounded_channel();
    (
        Outbound { ordered, urgent },
        OutboundFrames {
            ordered: ordered_rx,
            urgent: urgent_rx,
        },
    )
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The peer closed the outer stream.
    PeerClosed,
    /// The outer stream failed.
    StreamError(String),
    /// Nothing was heard for the heartbeat timeout.
    HeartbeatTimeout,
    /// This side asked the session to stop.
    Stopped,
    /// This side opened a replacement (a new certificate) and is draining
    /// this tunnel in the background.
    Replaced,
}

/// What a running session tells its owner.
#[derive(Debug, Clone, Default)]
pub struct SessionSignals {
    /// Fires when the peer sends `drain`.
    pub drained: CancellationToken,
    /// Fires when the hub sends `drain_ack`: no call start follows.
    pub drain_acknowledged: CancellationToken,
}

/// When the peer was last heard from, shared by a session's tasks.
#[derive(Debug, Clone)]
struct Liveness {
    started: Instant,
    last_heard_ms: Arc<AtomicU64>,
}

impl Liveness {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_heard_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn heard(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_heard_ms.store(now, Ordering::Relaxed);
    }

    /// Whether nothing was heard for longer than `timeout`.
    fn is_dead(&self, timeout: Duration) -> bool {
        let heard = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(heard) > timeout
    }
}

/// Reads the peer's frames, handing call frames to `calls`, until the peer
/// ends, the heartbeat times out, or `stop` fires. Pings go out through
/// `outbound`.
pub async fn run_session<S>(
    incoming: S,
    outbound: Outbound,
    calls: Arc<dyn CallFrames>,
    heartbeat: HeartbeatSettings,
    signals: SessionSignals,
    stop: CancellationToken,
) -> SessionEnd
where
    S: Stream<Item = Result<TunnelFrame, tonic::Status>> + Send + Unpin + 'static,
{
    let liveness = Liveness::new();
    let reader = read_frames(incoming, &outbound, &*calls, &signals, &liveness);
    let heartbeats = async {
        let mut tick = tokio::time::interval(heartbeat.interval.max(MIN_HEARTBEAT_INTERVAL));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        loop {
            tick.tick().await;
            if liveness.is_dead(heartbeat.timeout) {
                return SessionEnd::HeartbeatTimeout;
            }
            nonce += 1;
            if !outbound.urgent(Kind::Ping(nonce)) {
                return SessionEnd::PeerClosed;
            }
        }
    };
    tokio::select! {
        end = reader => end,
        end = heartbeats => end,
        () = stop.cancelled() => SessionEnd::Stopped,
    }
}

async fn read_frames<S>(
    mut incoming: S,
    outbound: &Outbound,
    calls: &dyn CallFrames,
    signals: &SessionSignals,
    liveness: &Liveness,
) -> SessionEnd
where
    S: Stream<Item = Result<TunnelFrame, tonic::Status>> + Unpin,
{
    loop {
        let frame = match incoming.next().await {
            None => return SessionEnd::PeerClosed,
            Some(Err(status)) => return SessionEnd::StreamError(status.message().to_owned()),
            Some(Ok(frame)) => frame,
        };
        liveness.heard();
        match frame.kind {
            Some(Kind::Ping(nonce)) => {
                outbound.urgent(Kind::Pong(nonce));
            }
            Some(Kind::Drain(drain)) => {
                tracing::info!(reason = %drain.reason, "the peer is draining this tunnel");
                signals.drained.cancel();
            }
            Some(Kind::DrainAck(_)) => signals.drain_acknowledged.cancel(),
            Some(
                kind @ (Kind::Start(_)
                | Kind::Response(_)
                | Kind::Data(_)
                | Kind::Trailers(_)
                | Kind::Cancel(_)
                | Kind::Credit(_)),
            ) => calls.receive(kind),
            Some(Kind::Pong(_) | Kind::Hello(_) | Kind::Welcome(_)) | None => {}
        }
    }
}

/// How the agent's drain of a replaced tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplacedDrain {
    /// The hub acknowledged: every call it picked this tunnel for had
    /// arrived.
    Acknowledged,
    /// No acknowledgment within the bound (a hub that predates it, or one
    /// still waiting for a call to start); calls it picked later fail.
    Unacknowledged,
    /// The tunnel closed first.
    Closed,
}

/// The agent's side of replacing a tunnel: sends `drain`, keeps serving
/// until the hub's `drain_ack` (at most `bound`), then stops accepting and
/// waits up to `grace` for running calls. The caller closes the session.
pub async fn drain_replaced<S: CallService>(
    server: &TunnelServer<S>,
    outbound: &Outbound,
    signals: &SessionSignals,
    reason: &str,
    bound: Duration,
    grace: Duration,
) -> ReplacedDrain {
    let drain = Kind::Drain(crate::v1::TunnelDrain {
        reason: reason.to_owned(),
    });
    let ended = if !outbound.ordered(drain).await {
        ReplacedDrain::Closed
    } else if tokio::time::timeout(bound, signals.drain_acknowledged.cancelled())
        .await
        .is_ok()
    {
        ReplacedDrain::Acknowledged
    } else {
        tracing::warn!(
            ?bound,
            "the hub did not acknowledge the tunnel's drain in time (an older hub, or a call it picked has not started); closing it once running calls end"
        );
        ReplacedDrain::Unacknowledged
    };
    server.stop_accepting();
    server.wait_idle(grace).await;
    ended
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m,
/// u, n). Anything else is no deadline, as gRPC specifies.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod hostile_tests;
