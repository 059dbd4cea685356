//! Learning, right after a client handshake, whether the server accepted
//! our certificate.
//!
//! Under TLS 1.3 the client finishes its handshake before the server has
//! checked the client's certificate, so a refusal otherwise surfaces later,
//! on the first call, as a broken pipe, a closed connection or the server's
//! alert, depending on timing. Every server this project dials speaks
//! HTTP/2 first (its SETTINGS frame), so the client waits for those first
//! bytes: they prove acceptance, and an alert or a close here is a refusal.
//! The bytes read are replayed to whoever reads the stream next.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A stream whose first bytes were read early and are returned first.
#[derive(Debug)]
pub struct Accepted<S> {
    first: Vec<u8>,
    replayed: usize,
    inner: S,
}

/// The sentence for a server that hung up right after our handshake.
pub const CLOSED_AFTER_HANDSHAKE: &str = "the peer closed the connection right after the TLS handshake, which usually means it does not trust our thumbprint (`configure --trust`)";

/// Waits up to `timeout` for the server's first bytes.
pub async fn wait_until_accepted<S>(mut stream: S, timeout: Duration) -> io::Result<Accepted<S>>
where
    S: AsyncRead + Unpin,
{
    let mut first = vec![0u8; 1024];
    let read = tokio::time::timeout(timeout, stream.read(&mut first))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer sent nothing after the TLS handshake",
            )
        })?;
    match read {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            CLOSED_AFTER_HANDSHAKE,
        )),
        Ok(n) => {
            first.truncate(n);
            Ok(Accepted {
                first,
                replayed: 0,
                inner: stream,
            })
        }
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            Err(io::Error::new(error.kind(), CLOSED_AFTER_HANDSHAKE))
        }
        // An alert from the server arrives here; `describe_connect_error`
        // turns it into advice.
        Err(error) => Err(error),
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Accepted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.first.len() {
            let rest = &this.first[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.first.len() {
                this.first = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Accepted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_first_bytes_are_replayed_before_the_rest() {
        let (mut server, client) = tokio::io::duplex(64);
        server.write_all(b"SETTINGS").await.expect("write");
        let mut accepted = wait_until_accepted(client, Duration::from_secs(5))
            .await
            .expect("accepted");
        server.write_all(b" and more").await.expect("write");
        drop(server);
        let mut all = String::new();
        accepted.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "SETTINGS and more");
    }

    #[tokio::test]
    async fn a_close_after_the_handshake_is_a_refusal() {
        let (server, client) = tokio::io::duplex(64);
        drop(server);
        let error = wait_until_accepted(client, Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
        assert!(error.to_string().contains("does not trust our thumbprint"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out() {
        let (_server, client) = tokio::io::duplex(64);
        let error = wait_until_accepted(client, Duration::from_secs(3))
            .await
            .expect_err("silent");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
