//! A call's message bytes in both directions: [`IncomingBody`] turns the
//! peer's `data` frames back into an HTTP body and gives credit as it is
//! read; [`send_body`] turns a body into `data` frames within the call's
//! window.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame};
use tokio::sync::mpsc;
use tonic::body::Body;

use super::window::{Consumed, RecvWindow, SendWindow};
use super::{MAX_CHUNK, Outbound};
use crate::v1::tunnel_frame::Kind;
use crate::v1::{CallCredit, CallData};

/// What the reader hands a call's body.
#[derive(Debug)]
pub enum Incoming {
    /// The response's headers (hub side, first).
    Headers(HeaderMap),
    Data(Bytes),
    /// The request stream ended (agent side).
    End,
    /// The response's trailers; the call is over (hub side).
    Trailers(HeaderMap),
    /// The call failed or was cancelled.
    Failed(tonic::Status),
}

/// The peer's side of one call as an HTTP body.
pub struct IncomingBody {
    call: u64,
    frames: mpsc::UnboundedReceiver<Incoming>,
    window: Arc<RecvWindow>,
    consumed: Consumed,
    outbound: Outbound,
    /// The status for a queue that closed before the body ended.
    cut_short: fn() -> tonic::Status,
    ended: bool,
    /// Kept as long as the body lives (the hub's call bookkeeping).
    _guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for IncomingBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingBody")
            .field("call", &self.call)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl IncomingBody {
    pub fn new(
        call: u64,
        frames: mpsc::UnboundedReceiver<Incoming>,
        window: Arc<RecvWindow>,
        outbound: Outbound,
        cut_short: fn() -> tonic::Status,
    ) -> Self {
        Self {
            call,
            frames,
            window,
            consumed: Consumed::default(),
            outbound,
            cut_short,
            ended: false,
            _guard: None,
        }
    }

    /// Keeps `guard` until the body is dropped.
    pub fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    fn credit(&mut self, bytes: usize) {
        if let Some(credit) = self.consumed.add(bytes) {
            self.window.credited(credit);
            self.outbound.urgent(Kind::Credit(CallCredit {
                call: self.call,
                bytes: credit,
            }));
        }
    }
}

impl http_body::Body for IncomingBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let next = match this.frames.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(next) => next,
        };
        match next {
            Some(Incoming::Data(bytes)) => {
                this.credit(bytes.len());
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Some(Incoming::Trailers(trailers)) => {
                this.ended = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Incoming::End) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Some(Incoming::Failed(status)) => {
                this.ended = true;
                Poll::Ready(Some(Err(status)))
            }
            Some(Incoming::Headers(_)) => {
                this.ended = true;
                Poll::Ready(Some(Err(tonic::Status::internal(
                    "the peer sent a call's headers twice",
                ))))
            }
            None => {
                this.ended = true;
                Poll::Ready(Some(Err((this.cut_short)())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// Why a body could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the tunnel closed")]
    Closed,
    #[error("{0}")]
    Body(tonic::Status),
}

/// Sends `body`'s bytes as `data` frames of `call`, within `window`; the
/// trailers, if the body ends with some, are returned for the caller to
/// send. With `end_request`, the last frame says the request stream ended.
pub async fn send_body(
    body: Body,
    call: u64,
    window: &SendWindow,
    outbound: &Outbound,
    end_request: bool,
) -> Result<Option<HeaderMap>, SendError> {
    send_body_after(body, None, call, window, outbound, end_request).await
}

/// What [`send_ready`] left to send.
#[derive(Debug)]
pub enum Rest {
    /// The request ended; its end is sent.
    Ended,
    /// More is to come: the body, and bytes taken from it but not sent.
    More(Body, Option<Bytes>),
}

/// Sends the request bytes `body` has ready now, up to [`MAX_CHUNK`] (a
/// unary request's message and its end), so that they leave together with
/// the call's start instead of after a task switch. Never waits for
/// credit: a call's first [`MAX_CHUNK`] bytes always fit its window.
pub async fn send_ready(
    mut body: Body,
    call: u64,
    window: &SendWindow,
    outbound: &Outbound,
) -> Result<Rest, SendError> {
    use futures::FutureExt;
    let mut sent = 0usize;
    loop {
        let Some(frame) =
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).now_or_never()
        else {
            return Ok(Rest::More(body, None));
        };
        let data = match frame {
            None => return send_end(call, outbound).await.map(|()| Rest::Ended),
            Some(Err(status)) => return Err(SendError::Body(status)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Requests carry no trailers; anything else is skipped.
                Err(_) => continue,
            },
        };
        if sent + data.len() > MAX_CHUNK {
            return Ok(Rest::More(body, Some(data)));
        }
        sent += data.len();
        send_data(data, call, window, outbound).await?;
    }
}

/// [`send_body`], sending `first` before the body's own bytes.
pub async fn send_body_after(
    mut body: Body,
    first: Option<Bytes>,
    call: u64,
    window: &SendWindow,
    outbound: &Outbound,
    end_request: bool,
) -> Result<Option<HeaderMap>, SendError> {
    if let Some(data) = first {
        send_data(data, call, window, outbound).await?;
    }
    let trailers = loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let frame = match frame {
            None => break None,
            Some(Err(status)) => return Err(SendError::Body(status)),
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => break Some(trailers),
                Err(_) => continue,
            },
        };
        send_data(data, call, window, outbound).await?;
    };
    if end_request {
        send_end(call, outbound).await?;
    }
    Ok(trailers)
}

/// Tells the agent that `call`'s request stream ended.
async fn send_end(call: u64, outbound: &Outbound) -> Result<(), SendError> {
    let end = Kind::Data(CallData {
        call,
        data: Bytes::new(),
        end: true,
    });
    if outbound.ordered(end).await {
        Ok(())
    } else {
        Err(SendError::Closed)
    }
}

/// Sends `data` as frames of at most [`MAX_CHUNK`], each within the window.
async fn send_data(
    mut data: Bytes,
    call: u64,
    window: &SendWindow,
    outbound: &Outbound,
) -> Result<(), SendError> {
    while !data.is_empty() {
        let n = window.reserve(data.len().min(MAX_CHUNK)).await;
        let chunk = data.split_to(n.min(data.len()));
        let frame = Kind::Data(CallData {
            call,
            data: chunk,
            end: false,
        });
        if !outbound.ordered(frame).await {
            return Err(SendError::Closed);
        }
    }
    Ok(())
}
