//! Accepts TCP connections, runs each TLS handshake in its own task, and hands
//! tonic a never-ending stream of authenticated connections.
//!
//! tonic's built-in TLS only verifies against CA roots, so the pinned
//! handshake happens here and the result goes to `serve_with_incoming`.
//! Each connection remembers its peer's thumbprint; when the trust store
//! changes, connections whose peer is no longer trusted are closed.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::tls::peer_thumbprint;
use crate::{Thumbprint, TrustStore};

/// Limits for the accept loop.
#[derive(Debug, Clone)]
pub struct AcceptSettings {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Authenticated connections waiting for the server to pick them up.
    pub backlog: usize,
    /// Drop peers whose thumbprint is not trusted once the handshake is
    /// done. Off only for servers whose TLS config admits unknown clients
    /// and that authorise every request themselves.
    pub require_trusted_peers: bool,
    /// How long the loop pauses after `accept` itself fails (out of file
    /// descriptors, usually) before it tries again. A fixed, short pause:
    /// there is one loop per listener, so no herd to spread with jitter, and
    /// connections are served again as soon as descriptors free up.
    pub accept_retry_delay: Duration,
}

impl Default for AcceptSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            backlog: 1024,
            require_trusted_peers: true,
            accept_retry_delay: Duration::from_millis(50),
        }
    }
}

/// Who is on the other end of a connection. tonic puts it into every
/// request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub thumbprint: Thumbprint,
    pub remote_addr: Option<SocketAddr>,
    /// TLS exported keying material of this connection, which a
    /// certificate rotation's proof signs ([`crate::rotation`]); `None`
    /// where there is no TLS of our own (a tunnel's calls, tests).
    pub channel_binding: Option<crate::rotation::ChannelBinding>,
}

/// The stream of authenticated connections for `serve_with_incoming`.
pub type Incoming = ReceiverStream<io::Result<PeerStream<TlsStream<TcpStream>>>>;

/// Starts accepting on `listener`. The loop ends when the returned stream is
/// dropped.
pub fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    trust: Arc<TrustStore>,
    settings: AcceptSettings,
) -> Incoming {
    let (tx, rx) = mpsc::channel(settings.backlog.max(1));
    let live = LiveConnections::default();
    tokio::spawn(revoke_on_trust_change(
        trust.clone(),
        live.clone(),
        tx.clone(),
    ));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Running out of descriptors must not end the loop:
                    // back off briefly and try again.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(settings.accept_retry_delay).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let live = live.clone();
            let trust = trust.clone();
            let timeout = settings.handshake_timeout;
            let require_trusted = settings.require_trusted_peers;
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::info!(%remote_addr, %error, "TLS handshake failed");
                        crate::metrics::METRICS.handshake_failed(handshake_failure_reason(&error));
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote_addr, ?timeout, "TLS handshake timed out");
                        crate::metrics::METRICS.handshake_failed("timeout");
                        return;
                    }
                };
                let Some(thumbprint) = peer_thumbprint(tls.get_ref().1.peer_certificates()) else {
                    // The verifier makes client certificates mandatory, so
                    // this means a rustls invariant broke; refuse anyway.
                    tracing::warn!(%remote_addr, "peer presented no certificate");
                    return;
                };
                let info = PeerInfo {
                    thumbprint,
                    remote_addr: Some(remote_addr),
                    channel_binding: crate::rotation::channel_binding(&**tls.get_ref().1),
                };
                // Track first, then check: a revocation that runs in between
                // then either sees this connection or is seen here.
                let stream = live.track(tls, info, trust.contains(&thumbprint) || require_trusted);
                if require_trusted && !trust.contains(&thumbprint) {
                    tracing::warn!(%remote_addr, %thumbprint, "refused a peer whose trust was removed during the handshake");
                    return;
                }
                tracing::debug!(%remote_addr, thumbprint = %thumbprint.short(), "peer connected");
                let _ = tx.send(Ok(stream)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A short, stable name for why a handshake failed, for metrics.
fn handshake_failure_reason(error: &io::Error) -> &'static str {
    let tls = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        )) => "untrusted_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "invalid_certificate",
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        Some(rustls::Error::PeerIncompatible(_)) => "incompatible",
        Some(_) => "tls_error",
        None => "io_error",
    }
}

async fn revoke_on_trust_change<T>(
    trust: Arc<TrustStore>,
    live: LiveConnections,
    server: mpsc::Sender<T>,
) {
    let mut changes = trust.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = server.closed() => return,
        }
        let revoked = live.revoke_untrusted(&trust);
        if revoked > 0 {
            tracing::info!(
                revoked,
                "closed connections whose peer is no longer trusted"
            );
        }
    }
}

/// Every open connection with its peer, so trust changes can reach them.
#[derive(Debug, Clone, Default)]
pub struct LiveConnections {
    inner: Arc<LiveInner>,
}

#[derive(Debug, Default)]
struct LiveInner {
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, (Thumbprint, CancellationToken)>>,
}

impl LiveConnections {
    /// Wraps `io` so it closes when its peer's trust is revoked. A peer that
    /// was not trusted when it connected (a registration) is not tracked.
    pub fn track<IO>(&self, io: IO, info: PeerInfo, trusted: bool) -> PeerStream<IO> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        if trusted {
            self.inner
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, (info.thumbprint, token.clone()));
        }
        PeerStream {
            io,
            info,
            revoked: Box::pin(token.cancelled_owned()),
            is_revoked: false,
            _registration: Registration {
                id,
                live: self.clone(),
            },
        }
    }

    /// Closes every connection whose peer is not in `trust`; returns how many.
    pub fn revoke_untrusted(&self, trust: &TrustStore) -> usize {
        let connections = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut revoked = 0;
        for (thumbprint, token) in connections.values() {
            if !trust.contains(thumbprint) && !token.is_cancelled() {
                tracing::info!(%thumbprint, "closing a connection: its peer is no longer trusted");
                token.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    pub fn len(&self) -> usize {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Registration {
    id: u64,
    live: LiveConnections,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.live
            .inner
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// An authenticated connection that fails every read and write once its
/// peer's trust is revoked, which makes the HTTP/2 server drop it.
pub struct PeerStream<IO> {
    io: IO,
    info: PeerInfo,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    is_revoked: bool,
    _registration: Registration,
}

impl<IO> std::fmt::Debug for PeerStream<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("info", &self.info)
            .field("is_revoked", &self.is_revoked)
            .finish_non_exhaustive()
    }
}

impl<IO> PeerStream<IO> {
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }

    fn check_revoked(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.is_revoked && self.revoked.poll_unpin(cx).is_ready() {
            self.is_revoked = true;
        }
        if self.is_revoked {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's certificate thumbprint is no longer trusted",
            ))
        } else {
            Ok(())
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for PeerStream<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PeerStream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_revoked(cx)?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        Poll::Ready(Ok(()))
    }
}

impl<IO> Connected for PeerStream<IO> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests;
