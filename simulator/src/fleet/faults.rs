//! Faults injected into a virtual tentacle's connections: added latency
//! with jitter, and cut connections. Each agent has one [`Faults`] handle;
//! its [`FaultDialer`] (polling) or its listener (listening) wraps every
//! connection in a [`FaultyStream`] that obeys the handle.
//!
//! The dialer also spreads agents over several loopback source addresses
//! (127.0.0.x) so that thousands of connections to one hub port do not run
//! out of ephemeral ports.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use tentacle_agent::polling::Dialer;
use tentacle_agent::polling::dialer::{Dialed, connect_with_timeout};
use tentacle_proto::dial::ListeningAddress;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::nodes::{LastNode, NodeLinks, OpenLink};

/// The faults currently applied to one agent's connections.
#[derive(Debug, Default)]
pub struct Faults {
    /// Added to every write, in microseconds.
    latency_us: AtomicU64,
    /// Up to this much more, drawn per write.
    jitter_us: AtomicU64,
    /// Cancelled to cut every connection open now; replaced afterwards.
    cut: Mutex<CancellationToken>,
}

impl Faults {
    /// Delays every write by `latency` plus up to `jitter`.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(micros(latency), Ordering::Relaxed);
        self.jitter_us.store(micros(jitter), Ordering::Relaxed);
    }

    pub fn clear_latency(&self) {
        self.set_latency(Duration::ZERO, Duration::ZERO);
    }

    /// Breaks every connection open now, as a dropped network path would;
    /// connections opened afterwards work.
    pub fn cut(&self) {
        let mut cut = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn current_cut(&self) -> CancellationToken {
        self.cut
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn delay(&self) -> Option<Duration> {
        let latency = self.latency_us.load(Ordering::Relaxed);
        let jitter = self.jitter_us.load(Ordering::Relaxed);
        if latency == 0 && jitter == 0 {
            return None;
        }
        let extra = if jitter == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter)
        };
        Some(Duration::from_micros(latency.saturating_add(extra)))
    }
}

/// Dials TCP from a chosen loopback source address, through [`Faults`].
#[derive(Debug)]
pub struct FaultDialer {
    pub faults: std::sync::Arc<Faults>,
    /// Bind to this local address first (port 0), if set.
    pub source: Option<IpAddr>,
    /// Counts each connection against the hub node it goes to, and notes
    /// that node as the agent's, if set.
    pub nodes: Option<(std::sync::Arc<NodeLinks>, std::sync::Arc<LastNode>)>,
}

/// The source address for agent `index` when spreading over `count`
/// addresses from 127.0.0.1 upwards.
pub fn spread_source(index: usize, count: u8) -> Option<IpAddr> {
    if count <= 1 {
        return None;
    }
    let host = 1 + (index % usize::from(count)) as u8;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
}

impl Dialer for FaultDialer {
    fn dial<'a>(
        &'a self,
        hub: &'a ListeningAddress,
        timeout: Duration,
    ) -> BoxFuture<'a, io::Result<Dialed>> {
        Box::pin(async move {
            let remote = tokio::net::lookup_host((hub.host(), hub.port()))
                .await?
                .next()
                .ok_or_else(|| io::Error::other(format!("{} did not resolve", hub.host())))?;
            let tcp = match self.source {
                // A loopback source can only reach a loopback hub.
                Some(source)
                    if remote.ip().is_loopback() && source.is_ipv4() == remote.is_ipv4() =>
                {
                    let socket = if remote.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(source, 0))?;
                    connect_with_timeout(socket.connect(remote), timeout).await?
                }
                _ => connect_with_timeout(TcpStream::connect(remote), timeout).await?,
            };
            tcp.set_nodelay(true)?;
            let mut stream = FaultyStream::new(tcp, self.faults.clone());
            if let Some((links, last)) = &self.nodes
                && let Some(node) = links.index_of(hub)
            {
                last.set(node);
                stream.link = Some(links.opened(node));
            }
            Ok(Dialed {
                remote_addr: Some(remote),
                stream: Box::new(stream),
            })
        })
    }
}

/// A stream that fails once its agent's connections are cut and delays
/// writes by the agent's current latency.
pub struct FaultyStream<S> {
    inner: S,
    faults: std::sync::Arc<Faults>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    delay: Option<Pin<Box<Sleep>>>,
    /// Counts this connection against its hub node while it is open.
    link: Option<OpenLink>,
}

impl<S> std::fmt::Debug for FaultyStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStream").finish_non_exhaustive()
    }
}

impl<S> FaultyStream<S> {
    pub fn new(inner: S, faults: std::sync::Arc<Faults>) -> Self {
        let cut = Box::pin(faults.current_cut().cancelled_owned());
        Self {
            inner,
            faults,
            cut,
            delay: None,
            link: None,
        }
    }

    fn check_cut(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection cut by the fleet's chaos",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

// A listening agent's accepted connections keep the peer details the
// services read.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FaultyStream<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FaultyStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Polling the cut first also registers this task to wake on a cut
        // while the read is pending.
        self.check_cut(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FaultyStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_cut(cx)?;
        if self.delay.is_none()
            && let Some(delay) = self.faults.delay()
        {
            self.delay = Some(Box::pin(tokio::time::sleep(delay)));
        }
        if let Some(delay) = self.delay.as_mut() {
            if delay.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.delay = None;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_cut(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_cut_breaks_open_streams_and_latency_delays_writes() {
        let faults = Arc::new(Faults::default());
        let (a, mut b) = tokio::io::duplex(1024);
        let mut stream = FaultyStream::new(a, faults.clone());

        stream.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"hello");

        faults.set_latency(Duration::from_millis(60), Duration::ZERO);
        let started = Instant::now();
        stream.write_all(b"slow").await.expect("write");
        assert!(started.elapsed() >= Duration::from_millis(60));
        faults.clear_latency();

        // A read that is already waiting wakes up with an error.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            stream.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        faults.cut();
        let result = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the cut wakes the reader")
            .expect("join");
        assert_eq!(
            result.expect_err("cut").kind(),
            io::ErrorKind::ConnectionReset
        );

        // A stream opened after the cut works.
        let (c, _d) = tokio::io::duplex(64);
        let mut fresh = FaultyStream::new(c, faults);
        fresh
            .write_all(b"ok")
            .await
            .expect("a new stream is not cut");
    }

    #[test]
    fn sources_spread_over_loopback() {
        assert_eq!(spread_source(0, 1), None);
        assert_eq!(
            spread_source(0, 4),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))
        );
        assert_eq!(
            spread_source(5, 4),
            Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        );
    }
}
