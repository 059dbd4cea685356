//! Registering with a hub over the network the way an agent does (pinned
//! mutual TLS, `RegistrationService.Register`), from a chosen loopback
//! source address, so a test can be several machines at once: the hub
//! counts failed registrations per source address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hyper_util::rt::TokioIo;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::register_request::Credential;
use tentacle_proto::v1::registration_service_client::RegistrationServiceClient;
use tentacle_proto::{Identity, Thumbprint, TrustStore};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

/// `127.0.0.N`.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// A channel to the hub at `hub` from `source` (port chosen by the system),
/// presenting `identity` and pinning `hub_thumbprint`. Connected before it
/// returns.
pub async fn channel_from(
    source: IpAddr,
    hub: SocketAddr,
    hub_thumbprint: Thumbprint,
    identity: &Identity,
) -> anyhow::Result<Channel> {
    let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([hub_thumbprint]))?;
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        async move {
            let socket = match source {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            let tcp = socket.connect(hub).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::from(hub.ip());
            let stream = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(Endpoint::from_static("http://tentacle")
        .connect_with_connector(connector)
        .await?)
}

/// A polling agent's registration as `name`.
pub fn polling_request(name: &str, credential: Credential) -> pb::RegisterRequest {
    pb::RegisterRequest {
        credential: Some(credential),
        name: name.into(),
        mode: pb::AgentMode::Polling as i32,
        roles: Vec::new(),
        environments: Vec::new(),
        public_hostname: String::new(),
        port: 0,
    }
}

/// Registers over `channel`.
pub async fn register(
    channel: Channel,
    request: pb::RegisterRequest,
) -> Result<pb::RegisterResponse, tonic::Status> {
    RegistrationServiceClient::new(channel)
        .register(request)
        .await
        .map(tonic::Response::into_inner)
}

/// A new agent identity that registers as `name` from `source` on a
/// connection of its own, as one agent in a fleet does.
pub async fn register_new_agent(
    source: IpAddr,
    hub: SocketAddr,
    hub_thumbprint: Thumbprint,
    name: &str,
    credential: Credential,
) -> Result<(Thumbprint, pb::RegisterResponse), tonic::Status> {
    let identity = crate::client_identity();
    let channel = channel_from(source, hub, hub_thumbprint, &identity)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect from {source}: {e:#}")))?;
    let response = register(channel, polling_request(name, credential)).await?;
    Ok((identity.thumbprint(), response))
}
