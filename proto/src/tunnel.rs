//! The byte pipe under a reverse tunnel, shared by the hub and the agent.
//!
//! [`pipe`] makes a [`TunnelIo`] (the inner HTTP/2 connection reads and
//! writes it) and the [`PipeEnds`] that a session pumps to and from the
//! outer `Open` stream. [`run_session`] does the pumping, answers and sends
//! heartbeats, and notices drains. See `tentacle/v1/tunnel.proto` for the
//! layering.
//!
//! Architecture Invariant: each direction is pumped by its own task through
//! bounded channels, so backpressure in one direction never stalls the
//! other, and a tunnel's buffered bytes are bounded by the channel sizes.
//!
//! Limits: the chunk size and buffer depth are [`PipeSettings`], the
//! heartbeat [`HeartbeatSettings`]; [`MAX_FRAME`] is part of the protocol
//! (both ends decode with it), so it is a constant, not a setting.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSender};
use tonic::transport::server::Connected;

use crate::incoming::PeerInfo;
use crate::v1::TunnelFrame;
use crate::v1::tunnel_frame::Kind;

/// The most bytes one `data` frame carries.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Chunks buffered in each direction of one tunnel.
pub const PIPE_CHUNKS: usize = 16;

/// The largest `TunnelFrame` either side accepts: one chunk plus framing.
/// Both ends set it as their decoding limit, which keeps a tunnel's
/// buffered bytes within [`PipeSettings::chunks`] `* MAX_FRAME` per
/// direction.
pub const MAX_FRAME: usize = MAX_CHUNK + 1024;

/// How a tunnel's pipe buffers bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeSettings {
    /// The most bytes one `data` frame carries. Capped at [`MAX_CHUNK`]:
    /// the peer's decoding limit, [`MAX_FRAME`], is derived from it, so a
    /// side may send smaller chunks but never larger ones.
    pub chunk_bytes: usize,
    /// Chunks buffered in each direction (at least one).
    pub chunks: usize,
}

impl Default for PipeSettings {
    fn default() -> Self {
        Self {
            chunk_bytes: MAX_CHUNK,
            chunks: PIPE_CHUNKS,
        }
    }
}

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

/// One end of the inner HTTP/2 connection.
pub struct TunnelIo {
    incoming: mpsc::Receiver<Bytes>,
    current: Bytes,
    outgoing: PollSender<Bytes>,
    chunk_bytes: usize,
    peer: Option<PeerInfo>,
}

impl std::fmt::Debug for TunnelIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelIo")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The session's side of the pipe.
#[derive(Debug)]
pub struct PipeEnds {
    /// Bytes from the outer stream, for the inner connection to read.
    pub to_inner: mpsc::Sender<Bytes>,
    /// Bytes the inner connection wrote, for the outer stream.
    pub from_inner: mpsc::Receiver<Bytes>,
}

/// A connected pipe with the default [`PipeSettings`]. `peer` is who is at
/// the far end of the tunnel; the inner server's handlers see it as the
/// connection's [`PeerInfo`].
pub fn pipe(peer: Option<PeerInfo>) -> (TunnelIo, PipeEnds) {
    pipe_with(peer, PipeSettings::default())
}

/// A connected pipe buffering as `settings` say.
pub fn pipe_with(peer: Option<PeerInfo>, settings: PipeSettings) -> (TunnelIo, PipeEnds) {
    let chunks = settings.chunks.max(1);
    let (to_inner, incoming) = mpsc::channel(chunks);
    let (outgoing, from_inner) = mpsc::channel(chunks);
    (
        TunnelIo {
            incoming,
            current: Bytes::new(),
            outgoing: PollSender::new(outgoing),
            chunk_bytes: settings.chunk_bytes.clamp(1, MAX_CHUNK),
            peer,
        },
        PipeEnds {
            to_inner,
            from_inner,
        },
    )
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.current.is_empty() {
            match ready!(self.incoming.poll_recv(cx)) {
                Some(bytes) => self.current = bytes,
                // The session ended: end of stream.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if ready!(self.outgoing.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(closed()));
        }
        let n = buf.len().min(self.chunk_bytes);
        self.outgoing
            .send_item(Bytes::copy_from_slice(&buf[..n]))
            .map_err(|_| closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outgoing.close();
        Poll::Ready(Ok(()))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the tunnel is closed")
}

impl Connected for TunnelIo {
    type ConnectInfo = Option<PeerInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
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
    /// The inner connection closed its side.
    InnerClosed,
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
}

/// When the peer was last heard from, shared by a session's tasks.
#[derive(Debug, Clone)]
struct Liveness {
    started: Instant,
    last_heard_ms: Arc<AtomicU64>,
    /// Set while the reader waits to hand bytes to a slow inner connection:
    /// frames are arriving, so the peer is alive even if none is read.
    delivering: Arc<std::sync::atomic::AtomicBool>,
}

impl Liveness {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_heard_ms: Arc::new(AtomicU64::new(0)),
            delivering: Arc::default(),
        }
    }

    fn heard(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_heard_ms.store(now, Ordering::Relaxed);
    }

    fn set_delivering(&self, delivering: bool) {
        self.delivering.store(delivering, Ordering::Relaxed);
    }

    /// Whether nothing was heard for longer than `timeout`.
    fn is_dead(&self, timeout: Duration) -> bool {
        let heard = Duration::from_millis(self.last_heard_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(heard) > timeout
            && !self.delivering.load(Ordering::Relaxed)
    }
}

/// Pumps frames between the outer stream and the pipe until either side
/// ends, the heartbeat times out, or `stop` fires.
pub async fn run_session<S>(
    incoming: S,
    outgoing: mpsc::Sender<TunnelFrame>,
    ends: PipeEnds,
    heartbeat: HeartbeatSettings,
    signals: SessionSignals,
    stop: CancellationToken,
) -> SessionEnd
where
    S: Stream<Item = Result<TunnelFrame, tonic::Status>> + Send + Unpin + 'static,
{
    let liveness = Liveness::new();
    let session = stop.child_token();
    let PipeEnds {
        to_inner,
        mut from_inner,
    } = ends;

    let reader = tokio::spawn(read_outer(
        incoming,
        to_inner,
        outgoing.clone(),
        signals,
        liveness.clone(),
        session.clone(),
    ));

    let writer = {
        let outgoing = outgoing.clone();
        let session = session.clone();
        tokio::spawn(async move {
            loop {
                let bytes = tokio::select! {
                    bytes = from_inner.recv() => bytes,
                    () = session.cancelled() => return SessionEnd::Stopped,
                };
                let Some(bytes) = bytes else {
                    return SessionEnd::InnerClosed;
                };
                let frame = TunnelFrame {
                    kind: Some(Kind::Data(bytes)),
                };
                if outgoing.send(frame).await.is_err() {
                    return SessionEnd::PeerClosed;
                }
            }
        })
    };

    let heartbeats = {
        let session = session.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat.interval.max(MIN_HEARTBEAT_INTERVAL));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = session.cancelled() => return SessionEnd::Stopped,
                }
                if liveness.is_dead(heartbeat.timeout) {
                    return SessionEnd::HeartbeatTimeout;
                }
                nonce += 1;
                let ping = TunnelFrame {
                    kind: Some(Kind::Ping(nonce)),
                };
                // Never block on a full queue: the timeout check above must
                // keep running even when the peer stopped reading.
                match outgoing.try_send(ping) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return SessionEnd::PeerClosed,
                }
            }
        })
    };

    // The first task to finish decides why the session ended.
    let mut tasks = [reader, writer, heartbeats];
    let (first, _, _) = futures::future::select_all(tasks.iter_mut()).await;
    session.cancel();
    for task in &tasks {
        task.abort();
    }
    match first {
        Ok(end) if stop.is_cancelled() => {
            let _ = end;
            SessionEnd::Stopped
        }
        Ok(end) => end,
        Err(_) => SessionEnd::Stopped,
    }
}

async fn read_outer<S>(
    mut incoming: S,
    to_inner: mpsc::Sender<Bytes>,
    outgoing: mpsc::Sender<TunnelFrame>,
    signals: SessionSignals,
    liveness: Liveness,
    session: CancellationToken,
) -> SessionEnd
where
    S: Stream<Item = Result<TunnelFrame, tonic::Status>> + Unpin,
{
    loop {
        let frame = tokio::select! {
            frame = incoming.next() => frame,
            () = session.cancelled() => return SessionEnd::Stopped,
        };
        let frame = match frame {
            None => return SessionEnd::PeerClosed,
            Some(Err(status)) => return SessionEnd::StreamError(status.message().to_owned()),
            Some(Ok(frame)) => frame,
        };
        liveness.heard();
        match frame.kind {
            Some(Kind::Data(bytes)) => {
                liveness.set_delivering(true);
                let sent = tokio::select! {
                    sent = to_inner.send(bytes) => sent,
                    () = session.cancelled() => return SessionEnd::Stopped,
                };
                liveness.set_delivering(false);
                if sent.is_err() {
                    return SessionEnd::InnerClosed;
                }
            }
            Some(Kind::Ping(nonce)) => {
                let pong = TunnelFrame {
                    kind: Some(Kind::Pong(nonce)),
                };
                // Never wait behind data for a pong: if the queue is full,
                // the data itself proves we are alive.
                let _ = outgoing.try_send(pong);
            }
            Some(Kind::Drain(drain)) => {
                tracing::info!(reason = %drain.reason, "the peer is draining this tunnel");
                signals.drained.cancel();
            }
            Some(Kind::Pong(_) | Kind::Hello(_) | Kind::Welcome(_)) | None => {}
        }
    }
}

#[cfg(test)]
mod tests;
