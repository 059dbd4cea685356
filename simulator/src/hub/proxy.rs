//! Forwards operators' calls to the agent named in their metadata, so a
//! `tentacle-sim` in another process reaches polling agents through this hub.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tentacle_proto::Thumbprint;
use tentacle_proto::incoming::PeerInfo;
use tonic::Status;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use super::Hub;
use crate::channel::{
    PICKUP_TIMEOUT_HEADER, PickupTimeout, TARGET_HEADER, TARGET_THUMBPRINT_HEADER,
};
use crate::target::Target;

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
            Ok(forward(hub, request)
                .await
                .unwrap_or_else(|status| status.into_http()))
        })
    }
}

fn header<'a>(request: &'a http::Request<axum::body::Body>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn forward(
    hub: Arc<Hub>,
    mut request: http::Request<axum::body::Body>,
) -> Result<http::Response<Body>, Status> {
    let caller = request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.thumbprint)
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    if !hub.is_operator(&caller) {
        return Err(Status::permission_denied(format!(
            "thumbprint {caller} may open tunnels but not send calls through this hub"
        )));
    }
    if !request.uri().path().starts_with("/tentacle.v1.") {
        return Err(Status::unimplemented(format!(
            "the hub forwards only tentacle.v1 calls, not {}",
            request.uri().path()
        )));
    }
    let target: Target = header(&request, TARGET_HEADER)
        .ok_or_else(|| {
            Status::invalid_argument(format!("name the agent in the `{TARGET_HEADER}` metadata"))
        })?
        .parse()
        .map_err(|e: crate::target::ParseTargetError| Status::invalid_argument(e.to_string()))?;
    let thumbprint: Thumbprint = header(&request, TARGET_THUMBPRINT_HEADER)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "give the agent's thumbprint in the `{TARGET_THUMBPRINT_HEADER}` metadata"
            ))
        })?
        .parse()
        .map_err(|e: tentacle_proto::thumbprint::ParseThumbprintError| {
            Status::invalid_argument(e.to_string())
        })?;
    if let Some(text) = header(&request, PICKUP_TIMEOUT_HEADER) {
        let timeout = humantime::parse_duration(text).map_err(|e| {
            Status::invalid_argument(format!(
                "`{PICKUP_TIMEOUT_HEADER}: {text}` is not a duration: {e}"
            ))
        })?;
        request.extensions_mut().insert(PickupTimeout(timeout));
    }
    for name in [
        TARGET_HEADER,
        TARGET_THUMBPRINT_HEADER,
        PICKUP_TIMEOUT_HEADER,
    ] {
        request.headers_mut().remove(name);
    }
    let mut channel = hub
        .channel(&target, thumbprint)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let request = request.map(Body::new);
    let ready = channel
        .ready()
        .await
        .map_err(|e| Status::unavailable(format!("{target} is not reachable: {e}")))?;
    ready
        .call(request)
        .await
        .map_err(|e| Status::unavailable(format!("the call to {target} failed: {e}")))
}
