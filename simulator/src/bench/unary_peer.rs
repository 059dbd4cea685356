//! The bench's plain tonic baseline: a gRPC server over the same pinned
//! mTLS as an agent, answering `GetCapabilities` with a constant and doing
//! nothing else. Comparing an agent with it shows what the agent's own
//! logic costs a small call; it runs in a process of its own, started as
//! the hidden `tentacle-sim bench-unary-peer`.

use std::io::Write;

use tentacle_proto::incoming::{AcceptSettings, accept_tls};
use tentacle_proto::tls::IdentityCell;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_server::{
    CapabilitiesService, CapabilitiesServiceServer,
};
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio_rustls::TlsAcceptor;

/// Why the baseline server stopped.
#[derive(Debug, thiserror::Error)]
pub enum UnaryPeerError {
    #[error("making the baseline's certificate: {0}")]
    Identity(#[from] tentacle_proto::identity::IdentityError),
    #[error("the baseline's TLS settings: {0}")]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Answers every `GetCapabilities` with the same message.
#[derive(Debug, Clone)]
struct Constant(pb::Capabilities);

#[tonic::async_trait]
impl CapabilitiesService for Constant {
    async fn get_capabilities(
        &self,
        _request: tonic::Request<pb::GetCapabilitiesRequest>,
    ) -> Result<tonic::Response<pb::Capabilities>, tonic::Status> {
        Ok(tonic::Response::new(self.0.clone()))
    }

    async fn get_health(
        &self,
        _request: tonic::Request<pb::GetHealthRequest>,
    ) -> Result<tonic::Response<pb::AgentHealth>, tonic::Status> {
        Ok(tonic::Response::new(pb::AgentHealth::default()))
    }
}

/// Serves on a free loopback port, trusting only `client`. Writes one line,
/// `ADDRESS THUMBPRINT`, to `ready` once it accepts, then serves until the
/// process is killed.
pub async fn serve(client: Thumbprint, mut ready: impl Write) -> Result<(), UnaryPeerError> {
    let identity = Identity::generate("tentacle-bench-baseline")?;
    let thumbprint = identity.thumbprint();
    let trust = TrustStore::new([client]);
    let tls = tentacle_proto::tls::server_config(IdentityCell::new(identity)?, trust.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| UnaryPeerError::Io {
            what: "binding a loopback port",
            source,
        })?;
    let address = listener.local_addr().map_err(|source| UnaryPeerError::Io {
        what: "reading the bound address",
        source,
    })?;
    let incoming = accept_tls(
        listener,
        TlsAcceptor::from(tls),
        trust,
        AcceptSettings::default(),
    );
    writeln!(ready, "{address} {thumbprint}")
        .and_then(|()| ready.flush())
        .map_err(|source| UnaryPeerError::Io {
            what: "announcing the address",
            source,
        })?;
    let answer = Constant(pb::Capabilities {
        agent_version: "baseline".to_owned(),
        os: std::env::consts::OS.to_owned(),
        arch: std::env::consts::ARCH.to_owned(),
        ..Default::default()
    });
    tentacle_proto::http2::Http2Settings::default()
        .apply_to_server(tonic::transport::Server::builder())
        .add_service(CapabilitiesServiceServer::new(answer))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
