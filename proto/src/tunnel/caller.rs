//! The hub's end of a tunnel: [`TunnelCaller`] sends each call as frames
//! with an id of its own and turns the agent's answer back into an HTTP
//! response, so tonic's generated clients work over it unchanged.
//!
//! It also keeps the hub's half of the agent's drain handshake: a call is
//! reserved ([`TunnelCaller::reserve`]) when the hub picks the tunnel for
//! it and the reservation ends once its `start` frame is queued;
//! [`TunnelCaller::acknowledge_drain`] refuses new reservations, waits for
//! the ones made, and queues `drain_ack` behind their starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;

use super::body::{Incoming, IncomingBody, Rest, SendError, send_body_after, send_ready};
use super::headers::{from_wire, to_wire};
use super::window::{RecvWindow, SendWindow};
use super::{CallFrames, Outbound};
use crate::v1::tunnel_frame::Kind;
use crate::v1::{CallCancel, CallStart, TunnelDrainAck};

/// The tunnel closed before the call could be answered.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the tunnel to the agent closed")]
pub struct CallerClosed;

/// Calls over one tunnel; cheap to clone.
#[derive(Debug, Clone)]
pub struct TunnelCaller {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    outbound: Outbound,
    next_call: AtomicU64,
    calls: Mutex<HashMap<u64, Slot>>,
    closed: AtomicBool,
    /// The agent's announced limit of concurrent calls; callers beyond it
    /// wait for a turn here rather than being refused there.
    turns: Option<Arc<Semaphore>>,
    starts: Mutex<Starts>,
    /// Notified when the last reservation ends.
    started: Notify,
}

/// Calls picked for this tunnel whose `start` is not queued yet.
#[derive(Debug, Default)]
struct Starts {
    /// The agent drained the tunnel: no new reservation.
    draining: bool,
    reserved: usize,
}

/// A call the hub picked this tunnel for, until its `start` frame is
/// queued: a drain acknowledgment waits for it.
#[derive(Debug)]
pub struct StartReservation {
    shared: Arc<Shared>,
}

impl Drop for StartReservation {
    fn drop(&mut self) {
        let mut starts = self.shared.starts();
        starts.reserved = starts.reserved.saturating_sub(1);
        if starts.reserved == 0 {
            self.shared.started.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct Slot {
    frames: mpsc::UnboundedSender<Incoming>,
    send: Arc<SendWindow>,
    recv: Arc<RecvWindow>,
    /// Stops the task sending the request body.
    stop: CancellationToken,
}

impl TunnelCaller {
    /// A caller sending through `outbound`; `max_concurrent_calls` is the
    /// agent's announced limit (0: none).
    pub fn new(outbound: Outbound, max_concurrent_calls: u32) -> Self {
        let turns = usize::try_from(max_concurrent_calls)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Arc::new(Semaphore::new(n)));
        Self {
            shared: Arc::new(Shared {
                outbound,
                next_call: AtomicU64::new(1),
                calls: Mutex::default(),
                closed: AtomicBool::new(false),
                turns,
                starts: Mutex::default(),
                started: Notify::new(),
            }),
        }
    }

    /// Calls still running (their response not yet read to the end).
    pub fn calls(&self) -> usize {
        self.shared.calls().len()
    }

    /// Fails every running call and refuses new ones: the tunnel is gone.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        if let Some(turns) = &self.shared.turns {
            turns.close();
        }
        let slots: Vec<Slot> = self.shared.calls().drain().map(|(_, s)| s).collect();
        for slot in slots {
            slot.stop.cancel();
        }
    }

    /// Reserves a call's place on this tunnel, unless the agent drained it
    /// or it closed.
    pub fn reserve(&self) -> Option<StartReservation> {
        let mut starts = self.shared.starts();
        if starts.draining || self.shared.closed.load(Ordering::Acquire) {
            return None;
        }
        starts.reserved += 1;
        Some(StartReservation {
            shared: self.shared.clone(),
        })
    }

    /// Whether the agent drained this tunnel ([`Self::acknowledge_drain`]).
    pub fn is_draining(&self) -> bool {
        self.shared.starts().draining
    }

    /// The hub's answer to the agent's `drain`: reserves nothing more,
    /// waits up to `bound` for the starts of calls already reserved to be
    /// queued, then queues `drain_ack` behind them. Returns whether it was
    /// sent: after `bound` it is not, since a start could still follow it,
    /// and the agent falls back on its own bound.
    pub async fn acknowledge_drain(&self, bound: Duration) -> bool {
        self.shared.starts().draining = true;
        let queued = async {
            loop {
                let started = self.shared.started.notified();
                if self.shared.starts().reserved == 0 {
                    return;
                }
                started.await;
            }
        };
        if tokio::time::timeout(bound, queued).await.is_err() {
            tracing::warn!(
                ?bound,
                "calls picked for a draining tunnel did not start in time; not acknowledging the drain"
            );
            return false;
        }
        self.shared
            .outbound
            .ordered(Kind::DrainAck(TunnelDrainAck {}))
            .await
    }

    /// Sends `request` to the agent and waits for its response headers;
    /// the body streams after. A tunnel that closes (or that the agent
    /// drained) first is an error; everything the agent answers (failures
    /// included) is a response.
    pub async fn call(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, CallerClosed> {
        let reservation = self.reserve().ok_or(CallerClosed)?;
        self.call_reserved(reservation, request).await
    }

    /// [`Self::call`] for a call [`Self::reserve`] made room for.
    pub async fn call_reserved(
        &self,
        reservation: StartReservation,
        request: http::Request<Body>,
    ) -> Result<http::Response<Body>, CallerClosed> {
        let turn = match &self.shared.turns {
            Some(turns) => Some(
                turns
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| CallerClosed)?,
            ),
            None => None,
        };
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(CallerClosed);
        }
        let call = self.shared.next_call.fetch_add(1, Ordering::Relaxed);
        let (frames, mut answers) = mpsc::unbounded_channel();
        let slot = Slot {
            frames,
            send: Arc::default(),
            recv: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (send, recv, stop) = (slot.send.clone(), slot.recv.clone(), slot.stop.clone());
        self.shared.calls().insert(call, slot);
        // From here on, a caller that goes away cancels the call.
        let guard = CallGuard {
            shared: self.shared.clone(),
            call,
            _turn: turn,
        };
        // A close between the check above and the insert missed this slot.
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(CallerClosed);
        }

        let (parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        let start = Kind::Start(CallStart {
            call,
            path,
            headers: to_wire(&parts.headers),
        });
        if !self.shared.outbound.ordered(start).await {
            return Err(CallerClosed);
        }
        // Queued: a drain acknowledgment may follow it now.
        drop(reservation);
        // A unary request is sent here, in one go with its start; only a
        // body still streaming gets a task of its own.
        let outbound = &self.shared.outbound;
        match send_ready(body, call, &send, outbound).await {
            Ok(Rest::Ended) | Err(SendError::Closed) => {}
            Err(SendError::Body(status)) => self.shared.request_failed(call, &status),
            Ok(Rest::More(body, first)) => {
                let outbound = outbound.clone();
                let shared = self.shared.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        sent = send_body_after(body, first, call, &send, &outbound, true) => {
                            if let Err(SendError::Body(status)) = sent {
                                shared.request_failed(call, &status);
                            }
                        }
                        () = stop.cancelled() => {}
                    }
                });
            }
        }

        match answers.recv().await {
            Some(Incoming::Headers(headers)) => {
                let body =
                    IncomingBody::new(call, answers, recv, self.shared.outbound.clone(), || {
                        tonic::Status::unavailable("the tunnel to the agent closed during the call")
                    })
                    .with_guard(guard);
                let mut response = http::Response::new(Body::new(body));
                *response.headers_mut() = headers;
                Ok(response)
            }
            // Trailers only: the agent answered without a body.
            Some(Incoming::Trailers(trailers)) => {
                let mut response = http::Response::new(Body::empty());
                *response.headers_mut() = trailers;
                Ok(response)
            }
            Some(Incoming::Failed(status)) => Ok(status.into_http()),
            Some(Incoming::Data(_) | Incoming::End) => {
                let status = tonic::Status::internal("the agent sent data before headers");
                self.shared.fail(call, status.clone(), true);
                Ok(status.into_http())
            }
            None => Err(CallerClosed),
        }
    }
}

impl Shared {
    fn starts(&self) -> MutexGuard<'_, Starts> {
        self.starts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn calls(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // A panic elsewhere never leaves the map half-changed: every change
        // is one insert or remove.
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends `call` with `status` on this side; with `tell_agent`, cancels
    /// it there too.
    fn fail(&self, call: u64, status: tonic::Status, tell_agent: bool) {
        let Some(slot) = self.calls().remove(&call) else {
            return;
        };
        slot.stop.cancel();
        let reason = status.message().to_owned();
        let _ = slot.frames.send(Incoming::Failed(status));
        if tell_agent {
            self.outbound
                .ordered_later(Kind::Cancel(CallCancel { call, reason }));
        }
    }

    /// The request's own stream failed: the agent must not take a
    /// truncated request for a whole one.
    fn request_failed(&self, call: u64, status: &tonic::Status) {
        let status =
            tonic::Status::cancelled(format!("the request stream failed: {}", status.message()));
        self.fail(call, status, true);
    }

    fn with_slot(&self, call: u64, f: impl FnOnce(&Slot)) {
        if let Some(slot) = self.calls().get(&call) {
            f(slot);
        }
    }
}

impl CallFrames for TunnelCaller {
    fn receive(&self, frame: Kind) {
        let shared = &self.shared;
        match frame {
            Kind::Response(response) => match from_wire(response.headers) {
                Ok(headers) => shared.with_slot(response.call, |slot| {
                    let _ = slot.frames.send(Incoming::Headers(headers));
                }),
                Err(error) => shared.fail(
                    response.call,
                    tonic::Status::internal(format!("the agent sent bad metadata: {error}")),
                    true,
                ),
            },
            Kind::Data(data) => {
                let mut overrun = None;
                shared.with_slot(data.call, |slot| {
                    match slot.recv.received(data.data.len()) {
                        Ok(()) => {
                            let _ = slot.frames.send(Incoming::Data(data.data));
                        }
                        Err(error) => overrun = Some(error),
                    }
                });
                if let Some(error) = overrun {
                    shared.fail(data.call, tonic::Status::internal(error.to_string()), true);
                }
            }
            Kind::Trailers(trailers) => {
                let Some(slot) = shared.calls().remove(&trailers.call) else {
                    return;
                };
                slot.stop.cancel();
                let answer = match from_wire(trailers.trailers) {
                    Ok(trailers) => Incoming::Trailers(trailers),
                    Err(error) => Incoming::Failed(tonic::Status::internal(format!(
                        "the agent sent bad trailers: {error}"
                    ))),
                };
                let _ = slot.frames.send(answer);
            }
            Kind::Cancel(cancel) => shared.fail(
                cancel.call,
                tonic::Status::cancelled(format!(
                    "the agent cancelled the call: {}",
                    cancel.reason
                )),
                false,
            ),
            Kind::Credit(credit) => {
                shared.with_slot(credit.call, |slot| slot.send.grant(credit.bytes))
            }
            // Calls go the other way; nothing to do with these.
            Kind::Start(_)
            | Kind::Hello(_)
            | Kind::Welcome(_)
            | Kind::Ping(_)
            | Kind::Pong(_)
            | Kind::Drain(_)
            | Kind::DrainAck(_) => {}
        }
    }
}

/// Cancels its call at the agent if the caller lets go before the call
/// ended, and holds the call's turn until then.
struct CallGuard {
    shared: Arc<Shared>,
    call: u64,
    _turn: Option<OwnedSemaphorePermit>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.shared.fail(
            self.call,
            tonic::Status::cancelled("the caller cancelled the call"),
            true,
        );
    }
}
