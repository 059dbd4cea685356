//! The seam between accepting a listening connection and serving it.
//!
//! Every authenticated connection the listener accepts is boxed as a
//! [`BoxedIo`] and passed through the agent's [`StreamLayer`] before the
//! server sees it. A real agent's layer returns the stream as it is; the
//! fleet simulator's wraps it in a fault-injecting stream. The peer's
//! identity is read before the layer runs, so no layer can change who the
//! services think is calling.

use std::fmt::Debug;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tentacle_proto::incoming::PeerInfo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::polling::dialer::Connection;

/// A connection's bytes, with its concrete type erased.
pub type BoxedIo = Box<dyn Connection>;

/// Wraps each accepted listening connection before it is served.
#[derive(Clone)]
pub struct StreamLayer(Arc<dyn Fn(BoxedIo) -> BoxedIo + Send + Sync>);

impl StreamLayer {
    pub fn new(wrap: impl Fn(BoxedIo) -> BoxedIo + Send + Sync + 'static) -> Self {
        Self(Arc::new(wrap))
    }

    /// The real agent's layer: every stream unchanged.
    pub fn identity() -> Self {
        Self::new(|io| io)
    }

    /// `io`, wrapped, still answering for `peer`.
    pub fn wrap(&self, io: impl Connection + Connected<ConnectInfo = PeerInfo>) -> Accepted {
        let peer = io.connect_info();
        Accepted {
            io: (self.0)(Box::new(io)),
            peer,
        }
    }
}

impl Default for StreamLayer {
    fn default() -> Self {
        Self::identity()
    }
}

impl Debug for StreamLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLayer").finish_non_exhaustive()
    }
}

/// An accepted connection after its layer: what the server reads and writes.
pub struct Accepted {
    io: BoxedIo,
    peer: PeerInfo,
}

impl Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Connected for Accepted {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tentacle_proto::Thumbprint;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A pipe end that says who is on the other side, as an accepted
    /// connection does.
    struct Peer(DuplexStream, PeerInfo);

    impl Connected for Peer {
        type ConnectInfo = PeerInfo;
        fn connect_info(&self) -> PeerInfo {
            self.1.clone()
        }
    }
    impl AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Peer {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_layer_wraps_each_stream_and_keeps_the_peer() {
        let wrapped = Arc::new(AtomicUsize::new(0));
        let layer = {
            let wrapped = wrapped.clone();
            StreamLayer::new(move |io| {
                wrapped.fetch_add(1, Ordering::Relaxed);
                io
            })
        };
        let peer = PeerInfo {
            thumbprint: Thumbprint::of_der(b"peer"),
            remote_addr: Some(SocketAddr::from(([127, 0, 0, 1], 4242))),
            channel_binding: None,
        };
        let (near, mut far) = tokio::io::duplex(64);
        let mut accepted = layer.wrap(Peer(near, peer.clone()));
        assert_eq!(wrapped.load(Ordering::Relaxed), 1);
        assert_eq!(accepted.connect_info().thumbprint, peer.thumbprint);
        assert_eq!(accepted.connect_info().remote_addr, peer.remote_addr);
        accepted.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        far.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }
}
