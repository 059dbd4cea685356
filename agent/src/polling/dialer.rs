//! How a polling agent reaches its hub: the byte stream each tunnel's TLS
//! runs over. The default dials TCP, through an HTTP CONNECT proxy when one
//! is configured; the fleet simulator supplies its own to bind source
//! addresses and inject faults (latency, cut connections).

use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::proxy::ProxySettings;
use tentacle_proto::dial::ListeningAddress;

/// A connected byte stream.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

/// A stream to the hub and the address it reached.
pub struct Dialed {
    pub stream: Box<dyn Connection>,
    pub remote_addr: Option<SocketAddr>,
}

impl Debug for Dialed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialed")
            .field("remote_addr", &self.remote_addr)
            .finish_non_exhaustive()
    }
}

/// Opens connections to a hub.
pub trait Dialer: Debug + Send + Sync + 'static {
    fn dial<'a>(
        &'a self,
        hub: &'a ListeningAddress,
        timeout: Duration,
    ) -> BoxFuture<'a, std::io::Result<Dialed>>;
}

/// Plain TCP with `TCP_NODELAY`, through `proxy` if given or through
/// `HTTPS_PROXY` from the environment.
#[derive(Debug, Clone, Default)]
pub struct TcpDialer {
    pub proxy: Option<ProxySettings>,
}

impl Dialer for TcpDialer {
    fn dial<'a>(
        &'a self,
        hub: &'a ListeningAddress,
        timeout: Duration,
    ) -> BoxFuture<'a, std::io::Result<Dialed>> {
        Box::pin(async move {
            let (host, port) = (hub.host(), hub.port());
            let proxy = self.proxy.clone().or_else(|| ProxySettings::from_env(host));
            let tcp = match proxy {
                Some(proxy) => proxy.connect(host, port, timeout).await?,
                None => connect_with_timeout(TcpStream::connect((host, port)), timeout).await?,
            };
            // tonic's own nodelay setting never reaches a stream we bring.
            tcp.set_nodelay(true)?;
            Ok(Dialed {
                remote_addr: tcp.peer_addr().ok(),
                stream: Box::new(tcp),
            })
        })
    }
}

/// `connect`, failing with `TimedOut` after `timeout`.
pub async fn connect_with_timeout(
    connect: impl Future<Output = std::io::Result<TcpStream>>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}
