//! Forwards operators' calls to the agent named in their metadata, so an
//! operator in another process reaches polling agents through this hub.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tentacle_proto::Thumbprint;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::thumbprint::ParseThumbprintError;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::channel::{
    BoxError, PICKUP_TIMEOUT_HEADER, PickupTimeout, TARGET_HEADER, TARGET_THUMBPRINT_HEADER,
};
use crate::errors::NoClientCertificate;
use crate::hub::{Hub, HubError};
use crate::target::{ParseTargetError, Target};

/// Why a call was not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    NoClientCertificate(#[from] NoClientCertificate),
    #[error(
        "thumbprint {0} may open tunnels but not send calls through this hub; use an operator's identity"
    )]
    NotOperator(Thumbprint),
    #[error("the hub forwards only tentacle.v1 calls, not {0}")]
    NotForwardable(String),
    #[error("name the agent in the `{TARGET_HEADER}` metadata")]
    NoTarget,
    #[error("`{TARGET_HEADER}`: {0}")]
    InvalidTarget(ParseTargetError),
    #[error("give the agent's thumbprint in the `{TARGET_THUMBPRINT_HEADER}` metadata")]
    NoThumbprint,
    #[error("`{TARGET_THUMBPRINT_HEADER}`: {0}")]
    InvalidThumbprint(ParseThumbprintError),
    #[error("`{PICKUP_TIMEOUT_HEADER}: {text}` is not a duration (e.g. `30s`): {reason}")]
    InvalidPickupTimeout { text: String, reason: String },
    #[error(transparent)]
    Channel(#[from] HubError),
    #[error("{target} is not reachable: {reason}")]
    Unreachable { target: Target, reason: String },
    #[error("the call to {target} failed: {reason}")]
    CallFailed { target: Target, reason: String },
}

/// The hub's fallback route: every call that is not `TunnelService`.
#[derive(Debug, Clone)]
pub struct Forwarder {
    hub: Arc<Hub>,
}

impl Forwarder {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl Service<http::Request<axum::body::Body>> for Forwarder {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        let hub = self.hub.clone();
        Box::pin(async move {
            Ok(forward(hub, request).await.unwrap_or_else(|error| {
                let status: Status = error.into();
                status.into_http()
            }))
        })
    }
}

fn header<'a>(request: &'a http::Request<axum::body::Body>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn forward(
    hub: Arc<Hub>,
    mut request: http::Request<axum::body::Body>,
) -> Result<http::Response<Body>, ForwardError> {
    let caller = request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.thumbprint)
        .ok_or(NoClientCertificate)?;
    if !hub.is_operator(&caller) {
        return Err(ForwardError::NotOperator(caller));
    }
    if !request.uri().path().starts_with("/tentacle.v1.") {
        return Err(ForwardError::NotForwardable(
            request.uri().path().to_owned(),
        ));
    }
    let target: Target = header(&request, TARGET_HEADER)
        .ok_or(ForwardError::NoTarget)?
        .parse()
        .map_err(ForwardError::InvalidTarget)?;
    let thumbprint: Thumbprint = header(&request, TARGET_THUMBPRINT_HEADER)
        .ok_or(ForwardError::NoThumbprint)?
        .parse()
        .map_err(ForwardError::InvalidThumbprint)?;
    if let Some(text) = header(&request, PICKUP_TIMEOUT_HEADER) {
        let timeout =
            humantime::parse_duration(text).map_err(|e| ForwardError::InvalidPickupTimeout {
                text: text.to_owned(),
                reason: e.to_string(),
            })?;
        let timeout = timeout.min(pickup_limit(&hub));
        request.extensions_mut().insert(PickupTimeout(timeout));
    }
    for name in [
        TARGET_HEADER,
        TARGET_THUMBPRINT_HEADER,
        PICKUP_TIMEOUT_HEADER,
    ] {
        request.headers_mut().remove(name);
    }
    let mut channel = hub.channel(&target, thumbprint).await?;
    let request = request.map(Body::new);
    let reason = |e: BoxError| tentacle_proto::dial::describe_connect_error(&*e);
    let ready = channel
        .ready()
        .await
        .map_err(|e| ForwardError::Unreachable {
            target: target.clone(),
            reason: reason(e),
        })?;
    ready
        .call(request)
        .await
        .map_err(|e| ForwardError::CallFailed {
            target,
            reason: reason(e),
        })
}

/// The longest pickup timeout an operator's call may ask for: the
/// configured bound, or the hub's own default if that is longer.
fn pickup_limit(hub: &Hub) -> std::time::Duration {
    let settings = hub.settings();
    settings.max_pickup_timeout.max(settings.pickup_timeout)
}

#[cfg(test)]
mod tests;
