//! [`AgentChannel`]: one tower service that reaches an agent however it is
//! connected, so the generated tonic clients work the same for every mode.
//!
//! - `Direct`: a pinned-mTLS connection to a listening agent.
//! - `Polling`: a tunnel the agent opened to this process's hub; calls wait
//!   for the agent to connect, up to the pickup timeout.
//! - `ViaHub`: a connection to a hub in another process, which forwards
//!   each call to the agent named in the request's metadata.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::HeaderValue;
use tentacle_proto::Thumbprint;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::Service;

use crate::registry::{CallGuard, PickError, Registry};
use crate::target::{AgentId, Target};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The metadata key naming the agent a hub should forward a call to.
pub const TARGET_HEADER: &str = "tentacle-target";
/// The metadata key with the agent's expected thumbprint.
pub const TARGET_THUMBPRINT_HEADER: &str = "tentacle-target-thumbprint";
/// The metadata key with a pickup timeout for a forwarded call, e.g. `30s`.
pub const PICKUP_TIMEOUT_HEADER: &str = "tentacle-pickup-timeout";

/// The default time a call waits for a polling agent to connect.
pub const DEFAULT_PICKUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Put in a request's extensions to override the pickup timeout of that one
/// call: `request.extensions_mut().insert(PickupTimeout(..))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickupTimeout(pub Duration);

/// A channel to one agent.
#[derive(Debug, Clone)]
pub enum AgentChannel {
    Direct(Channel),
    Polling(PollingChannel),
    ViaHub(HubRouted),
}

impl From<Channel> for AgentChannel {
    fn from(channel: Channel) -> Self {
        Self::Direct(channel)
    }
}

impl Service<http::Request<Body>> for AgentChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::Direct(channel) => channel.poll_ready(cx).map_err(Into::into),
            Self::Polling(_) => Poll::Ready(Ok(())),
            Self::ViaHub(routed) => routed.channel.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if !tentacle_proto::telemetry::tracing_on() {
            return self.call_inner(request);
        }
        // One client span per call, whose context travels with the request
        // (through a hub and a tunnel alike) so the agent joins the trace.
        let span = tracing::info_span!(
            target: tentacle_proto::telemetry::TRACE_TARGET,
            "call",
            otel.name = format!("call {}", request.uri().path().trim_start_matches('/')),
            otel.kind = "client",
            rpc.method = %request.uri().path(),
            target = %self.describe(),
        );
        {
            let _entered = span.enter();
            tentacle_proto::telemetry::inject(request.headers_mut());
        }
        let future = self.call_inner(request);
        Box::pin(tracing::Instrument::instrument(future, span))
    }
}

impl AgentChannel {
    fn describe(&self) -> String {
        match self {
            Self::Direct(_) => "listening".to_owned(),
            Self::Polling(polling) => format!("poll://{}", polling.agent),
            Self::ViaHub(routed) => routed.target.to_str().unwrap_or_default().to_owned(),
        }
    }

    /// Routes the call, and reports a connection that broke before or
    /// during it as `Unavailable`, the status gRPC gives a lost connection
    /// and the one callers retry on; the transport layers underneath would
    /// otherwise surface it as `Unknown`.
    fn call_inner(
        &mut self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, BoxError>> {
        let future = self.route(request);
        Box::pin(async move {
            match future.await {
                Ok(response) => Ok(response.map(|body| Body::new(ConnectionBody::new(body, None)))),
                Err(error) => Ok(CallError::connection_lost(&*error).into_http()),
            }
        })
    }

    fn route(
        &mut self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, BoxError>> {
        match self {
            Self::Direct(channel) => {
                let future = channel.call(request);
                Box::pin(async move { future.await.map_err(Into::into) })
            }
            Self::Polling(polling) => Box::pin(polling.clone().call(request)),
            Self::ViaHub(routed) => {
                let mut request = request;
                let headers = request.headers_mut();
                headers.insert(TARGET_HEADER, routed.target.clone());
                headers.insert(TARGET_THUMBPRINT_HEADER, routed.thumbprint.clone());
                let pickup = request
                    .extensions()
                    .get::<PickupTimeout>()
                    .map(|p| p.0)
                    .or(routed.pickup_timeout);
                if let Some(timeout) = pickup
                    && let Ok(value) =
                        HeaderValue::from_str(&humantime::format_duration(timeout).to_string())
                {
                    request.headers_mut().insert(PICKUP_TIMEOUT_HEADER, value);
                }
                let future = routed.channel.call(request);
                Box::pin(async move { future.await.map_err(Into::into) })
            }
        }
    }
}

/// Calls to a polling agent through this process's hub.
#[derive(Debug, Clone)]
pub struct PollingChannel {
    registry: Arc<Registry>,
    agent: AgentId,
    thumbprint: Thumbprint,
    pickup_timeout: Duration,
}

impl PollingChannel {
    pub fn new(
        registry: Arc<Registry>,
        agent: AgentId,
        thumbprint: Thumbprint,
        pickup_timeout: Duration,
    ) -> Self {
        Self {
            registry,
            agent,
            thumbprint,
            pickup_timeout,
        }
    }

    async fn call(self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let pickup = request
            .extensions()
            .get::<PickupTimeout>()
            .map_or(self.pickup_timeout, |p| p.0);
        let deadline = grpc_timeout(request.headers());
        let wait = deadline.map_or(pickup, |d| d.min(pickup));
        let waiting = std::time::Instant::now();
        let tunnel = match self
            .registry
            .pick(&self.agent, &self.thumbprint, wait)
            .await
        {
            Ok(tunnel) => {
                tentacle_proto::metrics::METRICS
                    .hub_pickup_latency
                    .observe(waiting.elapsed().as_secs_f64());
                tunnel
            }
            Err(error) => return Ok(CallError::no_tunnel(error, deadline, pickup).into_http()),
        };
        let crate::registry::Picked {
            tunnel,
            reservation,
        } = tunnel;
        let guard = tunnel.begin_call();
        let response = tunnel.caller.call_reserved(reservation, request).await?;
        // Count the call as in flight until its response body is done.
        Ok(response.map(|body| Body::new(ConnectionBody::new(body, Some(guard)))))
    }
}

/// Calls forwarded by a hub in another process.
#[derive(Debug, Clone)]
pub struct HubRouted {
    channel: Channel,
    target: HeaderValue,
    thumbprint: HeaderValue,
    pickup_timeout: Option<Duration>,
}

impl HubRouted {
    /// Calls to `target` through the hub at the other end of `hub`. A
    /// `pickup_timeout` applies to every call that sets none of its own.
    pub fn new(
        hub: Channel,
        target: &Target,
        thumbprint: Thumbprint,
        pickup_timeout: Option<Duration>,
    ) -> Result<Self, BoxError> {
        Ok(Self {
            channel: hub,
            target: HeaderValue::from_str(&target.to_string())?,
            thumbprint: HeaderValue::from_str(&thumbprint.to_string())?,
            pickup_timeout,
        })
    }
}

pub use tentacle_proto::tunnel::grpc_timeout;

/// A response body that keeps its call counted until it ends, and reports
/// a stream that breaks as `UNAVAILABLE`.
pub(crate) struct ConnectionBody {
    inner: Body,
    _guard: Option<CallGuard>,
}

impl ConnectionBody {
    pub(crate) fn new(inner: Body, guard: Option<CallGuard>) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

/// Why a call through an [`AgentChannel`] did not reach the agent. It
/// becomes the call's status (see [`crate::errors`]) rather than a
/// transport error, which the layers above would report as `Unknown`.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No tunnel could be picked, and waiting longer may help.
    #[error(transparent)]
    NoTunnel(PickError),
    /// The caller's own deadline, shorter than the pickup timeout, ended
    /// the wait for the agent.
    #[error(transparent)]
    CallerDeadline(PickError),
    /// The connection to the agent broke before or during the call.
    #[error("the connection to the agent broke: {0}")]
    ConnectionLost(String),
    /// A response body failed part way; the status is the transport's.
    #[error("the connection to the agent broke: {}", .0.message())]
    BodyBroken(tonic::Status),
}

impl CallError {
    /// A pick that failed, for a call with the caller's `deadline` and the
    /// channel's `pickup` timeout.
    pub fn no_tunnel(error: PickError, deadline: Option<Duration>, pickup: Duration) -> Self {
        match (&error, deadline) {
            (PickError::NotConnected { .. }, Some(d)) if d <= pickup => Self::CallerDeadline(error),
            _ => Self::NoTunnel(error),
        }
    }

    pub fn connection_lost(error: &(dyn std::error::Error + 'static)) -> Self {
        Self::ConnectionLost(tentacle_proto::dial::describe_connect_error(error))
    }

    /// This error as the response a gRPC client reads its status from.
    fn into_http(self) -> http::Response<Body> {
        let status: tonic::Status = self.into();
        status.into_http()
    }
}

impl http_body::Body for ConnectionBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        // Errors here are the transport's: a gRPC error status arrives as a
        // trailer frame, not as a body error.
        match Pin::new(&mut self.get_mut().inner).poll_frame(cx) {
            Poll::Ready(Some(Err(status))) => {
                Poll::Ready(Some(Err(CallError::BodyBroken(status).into())))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
