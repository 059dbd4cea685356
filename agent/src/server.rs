//! The agent's gRPC routes, built once and served by any transport.
//!
//! Architecture Invariant: there is exactly one set of handlers. Listening
//! mode serves these routes over pinned-TLS TCP connections; any other
//! transport (an in-memory pipe in tests, a tunnel) serves the same routes.

use std::any::Any;
use std::future::Future;
use std::sync::OnceLock;

use tentacle_proto::http2::Http2Settings;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_server::CapabilitiesServiceServer;
use tentacle_proto::v1::file_service_server::FileServiceServer;
use tentacle_proto::v1::package_service_server::PackageServiceServer;
use tentacle_proto::v1::script_service_server::ScriptServiceServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::Connected;
use tonic_health::server::HealthReporter;

use crate::grpc::{CapabilitiesApi, FileApi, PackageApi, ScriptApi};

/// HTTP/2 and message limits for serving.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    /// Keepalive, windows and frame size (`[server.http2]`). Inside tunnels
    /// the pings are turned off: the session already sends heartbeats, and
    /// a ping would queue behind bulk data.
    pub http2: Http2Settings,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024 * 1024,
            max_concurrent_streams: 1024,
            http2: Http2Settings::default(),
        }
    }
}

/// A route table could not be built.
#[derive(Debug, thiserror::Error)]
#[error("could not build the reflection service: {0}")]
pub struct RoutesError(#[from] tonic_reflection::server::Error);

/// The agent's `tentacle.v1` services.
#[derive(Debug, Clone)]
pub struct Services {
    pub scripts: ScriptApi,
    pub files: FileApi,
    pub packages: PackageApi,
    pub capabilities: CapabilitiesApi,
}

/// The agent's services plus `grpc.health.v1.Health` and server reflection.
pub async fn routes(
    services: Services,
    settings: &ServeSettings,
) -> Result<(Routes, HealthReporter), RoutesError> {
    let Services {
        scripts,
        files,
        packages,
        capabilities,
    } = services;
    let limit = settings.max_message_bytes;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ScriptServiceServer<ScriptApi>>().await;
    health.set_serving::<FileServiceServer<FileApi>>().await;
    health
        .set_serving::<CapabilitiesServiceServer<CapabilitiesApi>>()
        .await;
    health
        .set_serving::<PackageServiceServer<PackageApi>>()
        .await;
    // The reflection services decode every descriptor they serve; they are
    // the same for every agent, so a process hosting thousands of agents
    // (the simulator) builds them once.
    static REFLECTION_V1: OnceLock<Box<dyn Any + Send + Sync>> = OnceLock::new();
    static REFLECTION_V1ALPHA: OnceLock<Box<dyn Any + Send + Sync>> = OnceLock::new();
    let reflection_v1 = shared(&REFLECTION_V1, || reflection().build_v1())?;
    let reflection_v1alpha = shared(&REFLECTION_V1ALPHA, || reflection().build_v1alpha())?;
    let routes = Routes::new(
        ScriptServiceServer::new(scripts)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(
        FileServiceServer::new(files)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(
        PackageServiceServer::new(packages)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    )
    .add_service(CapabilitiesServiceServer::new(capabilities))
    .add_service(health_service)
    .add_service(reflection_v1)
    .add_service(reflection_v1alpha);
    Ok((routes, health))
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The value `cell` holds, built by `build` the first time. The cell is
/// typed `Any` because the reflection services' types cannot be named;
/// `T` is inferred from `build`, so the downcast always matches.
fn shared<T, E>(
    cell: &'static OnceLock<Box<dyn Any + Send + Sync>>,
    build: impl FnOnce() -> Result<T, E>,
) -> Result<T, E>
where
    T: Clone + Send + Sync + 'static,
{
    if let Some(built) = cell.get().and_then(|b| b.downcast_ref::<T>()) {
        return Ok(built.clone());
    }
    let built = build()?;
    let _ = cell.set(Box::new(built.clone()));
    Ok(built)
}

/// Serves `routes` on every connection `incoming` yields until `shutdown`
/// completes, then waits for open calls to finish.
pub async fn serve<I, IO, IE>(
    routes: Routes,
    incoming: I,
    shutdown: impl Future<Output = ()>,
    settings: &ServeSettings,
) -> Result<(), tonic::transport::Error>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = settings
        .http2
        .apply_to_server(Server::builder())
        .max_concurrent_streams(Some(settings.max_concurrent_streams));
    tentacle_proto::telemetry::with_server_spans(builder, "agent")
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests;
