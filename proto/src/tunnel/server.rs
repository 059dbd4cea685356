//! The agent's end of a tunnel: [`TunnelServer`] turns each call's frames
//! into an HTTP request for the agent's routes (the same ones a listening
//! agent serves) and sends the response back as frames.
//!
//! It does what an HTTP/2 server would for those routes: it limits
//! concurrent calls, enforces `grpc-timeout`, stops a handler when the hub
//! cancels, and wraps each call in the server span.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use super::body::{Incoming, IncomingBody, SendError, send_body};
use super::headers::{from_wire, status_trailers, to_wire};
use super::window::{RecvWindow, SendWindow};
use super::{CallFrames, Outbound};
use crate::incoming::PeerInfo;
use crate::v1::tunnel_frame::Kind;
use crate::v1::{CallCancel, CallResponse, CallStart, CallTrailers};

/// How a tunnel's calls are served.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Calls run at once; more are refused with RESOURCE_EXHAUSTED (the
    /// hub, told this limit in the hello, queues them instead).
    pub max_concurrent_calls: u32,
    /// Names the server spans: "agent".
    pub side: &'static str,
}

/// What a tunnel server serves calls with: the agent's routes, or any
/// service of their shape.
pub trait CallService:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> CallService for S where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves one tunnel's calls with `S` (the agent's routes).
pub struct TunnelServer<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for TunnelServer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for TunnelServer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelServer")
            .field("calls", &self.shared.calls().len())
            .finish_non_exhaustive()
    }
}

struct Shared<S> {
    service: S,
    outbound: Outbound,
    peer: Option<PeerInfo>,
    settings: ServerSettings,
    calls: Mutex<HashMap<u64, Slot>>,
    accepting: AtomicBool,
    /// Woken whenever a call ends.
    ended: Notify,
}

struct Slot {
    /// The request body's queue; `None` once the request stream ended.
    frames: Option<mpsc::UnboundedSender<Incoming>>,
    send: Arc<SendWindow>,
    recv: Arc<RecvWindow>,
    task: Option<AbortHandle>,
}

impl<S: CallService> TunnelServer<S> {
    /// Serves calls with `service`, answering through `outbound`; handlers
    /// see `peer` in their request's extensions.
    pub fn new(
        service: S,
        outbound: Outbound,
        peer: Option<PeerInfo>,
        settings: ServerSettings,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                service,
                outbound,
                peer,
                settings,
                calls: Mutex::default(),
                accepting: AtomicBool::new(true),
                ended: Notify::new(),
            }),
        }
    }

    fn start(&self, start: CallStart) {
        let shared = &self.shared;
        let call = start.call;
        let refuse = |status: tonic::Status| {
            shared.outbound.ordered_later(ended_with(call, &status));
        };
        if !shared.accepting.load(Ordering::Acquire) {
            return refuse(tonic::Status::unavailable(
                "the agent is shutting down; try again once it is back",
            ));
        }
        let request = match request_for(start, shared.peer.clone()) {
            Ok(request) => request,
            Err(status) => return refuse(status),
        };
        let deadline = crate::tunnel::grpc_timeout(request.headers());
        let span = crate::telemetry::tracing_on()
            .then(|| crate::telemetry::server_span(shared.settings.side)(&request));

        let (frames, queue) = mpsc::unbounded_channel();
        let slot = Slot {
            frames: Some(frames),
            send: Arc::default(),
            recv: Arc::default(),
            task: None,
        };
        let (send, recv) = (slot.send.clone(), slot.recv.clone());
        {
            let mut calls = shared.calls();
            if calls.contains_key(&call) {
                drop(calls);
                tracing::debug!(call, "the hub reused a running call's id; ignored");
                return;
            }
            let limit = usize::try_from(shared.settings.max_concurrent_calls).unwrap_or(usize::MAX);
            if calls.len() >= limit {
                drop(calls);
                return refuse(tonic::Status::resource_exhausted(format!(
                    "the agent is running its limit of {limit} calls on this tunnel; try again shortly"
                )));
            }
            calls.insert(call, slot);
        }
        let body = IncomingBody::new(call, queue, recv, shared.outbound.clone(), || {
            tonic::Status::cancelled("the hub cancelled the call")
        });
        let request = request.map(|()| Body::new(body));

        let run = serve_call(
            shared.service.clone(),
            request,
            call,
            send,
            shared.outbound.clone(),
        );
        let outbound = shared.outbound.clone();
        let timed = async move {
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout(deadline, run).await.is_err() {
                        let status = tonic::Status::deadline_exceeded(
                            "the call's deadline passed while the agent was still serving it",
                        );
                        outbound.ordered(ended_with(call, &status)).await;
                    }
                }
                None => run.await,
            }
        };
        let shared_for_end = self.shared.clone();
        let task = async move {
            timed.await;
            shared_for_end.calls().remove(&call);
            shared_for_end.ended.notify_waiters();
        };
        let handle = match span {
            Some(span) => tokio::spawn(tracing::Instrument::instrument(task, span)),
            None => tokio::spawn(task),
        };
        if let Some(slot) = self.shared.calls().get_mut(&call) {
            slot.task = Some(handle.abort_handle());
        }
    }

    /// Refuses new calls from now on; running ones go on.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Waits until no call runs, up to `grace`; whether none does.
    pub async fn wait_idle(&self, grace: Duration) -> bool {
        let wait = async {
            loop {
                let ended = self.shared.ended.notified();
                if self.shared.calls().is_empty() {
                    return;
                }
                ended.await;
            }
        };
        tokio::time::timeout(grace, wait).await.is_ok()
    }

    /// Stops every running call: the tunnel is gone.
    pub fn close(&self) {
        self.stop_accepting();
        let slots: Vec<Slot> = self.shared.calls().drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Some(task) = slot.task {
                task.abort();
            }
        }
        self.shared.ended.notify_waiters();
    }

    /// Calls running now.
    pub fn calls(&self) -> usize {
        self.shared.calls().len()
    }
}

impl<S> Shared<S> {
    fn calls(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // Every change is one insert or remove, so a poisoned map is whole.
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops `call` here; with a reason, tells the hub why.
    fn cancel(&self, call: u64, tell_hub: Option<String>) {
        let Some(slot) = self.calls().remove(&call) else {
            return;
        };
        if let Some(task) = slot.task {
            task.abort();
        }
        self.ended.notify_waiters();
        if let Some(reason) = tell_hub {
            self.outbound
                .ordered_later(Kind::Cancel(CallCancel { call, reason }));
        }
    }
}

/// The HTTP request a `start` frame describes, or why there is none.
fn request_for(
    start: CallStart,
    peer: Option<PeerInfo>,
) -> Result<http::Request<()>, tonic::Status> {
    let headers = from_wire(start.headers)
        .map_err(|e| tonic::Status::invalid_argument(format!("the call's metadata: {e}")))?;
    let uri: http::Uri = start.path.parse().map_err(|_| {
        tonic::Status::invalid_argument(format!("{:?} is not a gRPC method path", start.path))
    })?;
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    if let Some(peer) = peer {
        request.extensions_mut().insert(peer);
    }
    Ok(request)
}

/// The frame that ends `call` with `status`.
fn ended_with(call: u64, status: &tonic::Status) -> Kind {
    Kind::Trailers(CallTrailers {
        call,
        trailers: status_trailers(status),
    })
}

/// Runs one call's handler and sends its response as frames.
async fn serve_call<S: CallService>(
    service: S,
    request: http::Request<Body>,
    call: u64,
    send: Arc<SendWindow>,
    outbound: Outbound,
) {
    let Ok(response) = service.oneshot(request).await;
    let (parts, body) = response.into_parts();
    if parts.headers.contains_key("grpc-status") {
        // Trailers only: the status is already in the headers.
        outbound
            .ordered(Kind::Trailers(CallTrailers {
                call,
                trailers: to_wire(&parts.headers),
            }))
            .await;
        return;
    }
    let headers = Kind::Response(CallResponse {
        call,
        headers: to_wire(&parts.headers),
    });
    if !outbound.ordered(headers).await {
        return;
    }
    let end = match send_body(body, call, &send, &outbound, false).await {
        Ok(Some(trailers)) => Kind::Trailers(CallTrailers {
            call,
            trailers: to_wire(&trailers),
        }),
        Ok(None) => ended_with(
            call,
            &tonic::Status::internal("the agent's handler ended its response without a status"),
        ),
        Err(SendError::Body(status)) => ended_with(call, &status),
        Err(SendError::Closed) => return,
    };
    outbound.ordered(end).await;
}

impl<S: CallService> CallFrames for TunnelServer<S> {
    fn receive(&self, frame: Kind) {
        let shared = &self.shared;
        match frame {
            Kind::Start(start) => self.start(start),
            Kind::Data(data) => {
                let mut overrun = None;
                if let Some(slot) = shared.calls().get_mut(&data.call) {
                    match slot.recv.received(data.data.len()) {
                        Err(error) => overrun = Some(error),
                        Ok(()) => {
                            if let Some(frames) = &slot.frames
                                && !data.data.is_empty()
                            {
                                let _ = frames.send(Incoming::Data(data.data));
                            }
                            if data.end
                                && let Some(frames) = slot.frames.take()
                            {
                                let _ = frames.send(Incoming::End);
                            }
                        }
                    }
                }
                if let Some(error) = overrun {
                    shared.cancel(data.call, Some(error.to_string()));
                }
            }
            Kind::Cancel(cancel) => shared.cancel(cancel.call, None),
            Kind::Credit(credit) => {
                if let Some(slot) = shared.calls().get(&credit.call) {
                    slot.send.grant(credit.bytes);
                }
            }
            // Answers go the other way; nothing to do with these.
            Kind::Response(_)
            | Kind::Trailers(_)
            | Kind::Hello(_)
            | Kind::Welcome(_)
            | Kind::Ping(_)
            | Kind::Pong(_)
            | Kind::Drain(_)
            | Kind::DrainAck(_) => {}
        }
    }
}
