//! Accepts TCP connections, runs each TLS handshake in its own task, and hands
//! tonic a never-ending stream of authenticated connections.
//!
//! tonic's built-in TLS only verifies against CA roots, so the pinned
//! handshake happens here and the result goes to `serve_with_incoming`.
//! Each connection remembers its peer's thumbprint; when the trust store
//! changes, connections whose peer is no longer trusted are closed.
//!
//! Both kinds of slot are bounded ([`AcceptSettings`]). Handshakes in
//! progress are what an unauthenticated client can hold (each for at most
//! the handshake timeout). When they are all taken, a new connection evicts
//! the oldest one if it has been shaking hands for longer than
//! `evict_handshakes_after` (a real client finishes in milliseconds), so a
//! slowloris holding every slot is pushed out by the next arrivals instead
//! of locking trusted peers out for the whole timeout; if every handshake
//! is younger (a burst of real clients, a fleet reconnecting), the new
//! connection is closed instead, so work already under way completes and
//! the newcomer retries. Open connections have passed the handshake; one
//! beyond their limit is closed at once.

use std::collections::{BTreeMap, HashMap};
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
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
    /// TLS handshakes in progress at once. A connection beyond it evicts
    /// the oldest handshake in progress if that one is older than
    /// `evict_handshakes_after`, and is closed otherwise: unauthenticated
    /// clients (a slowloris, a connection flood) never hold more than this
    /// many, and cannot keep a real client out by holding them.
    pub max_handshakes: usize,
    /// How long a handshake may be in progress before a newcomer may take
    /// its slot when every slot is taken. Far longer than a real handshake
    /// takes, far shorter than `handshake_timeout`.
    pub evict_handshakes_after: Duration,
    /// Connections open at once, handshakes included. A connection beyond
    /// it is closed at once. Descriptors run out long before the default.
    pub max_connections: usize,
}

/// The default [`AcceptSettings::max_handshakes`]: far more than loopback
/// or a fleet's reconnect needs at once (a handshake takes milliseconds),
/// few enough that their buffers stay in the tens of megabytes.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// The default [`AcceptSettings::evict_handshakes_after`].
pub const DEFAULT_EVICT_HANDSHAKES_AFTER: Duration = Duration::from_secs(1);
/// The default [`AcceptSettings::max_connections`]: a hub's fleet with
/// several tunnels each, well under a raised descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;

impl Default for AcceptSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            backlog: 1024,
            require_trusted_peers: true,
            accept_retry_delay: Duration::from_millis(50),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            evict_handshakes_after: DEFAULT_EVICT_HANDSHAKES_AFTER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
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
    let handshakes = Handshakes::new(settings.max_handshakes, settings.evict_handshakes_after);
    let connections = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    tokio::spawn(async move {
        let mut overload = Overload::default();
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
            let Ok(connection_slot) = connections.clone().try_acquire_owned() else {
                // Closed before any TLS work; counted, and logged at most
                // every few seconds so a flood does not flood the logs.
                drop(tcp);
                crate::metrics::METRICS.handshake_failed("over_limit");
                overload.note(Limit::Connections, &settings, remote_addr);
                continue;
            };
            let handshake_slot = match handshakes.begin() {
                Begun::Free(slot) => slot,
                Begun::Evicted(slot) => {
                    crate::metrics::METRICS.handshake_failed("evicted");
                    overload.note(Limit::HandshakesEvicted, &settings, remote_addr);
                    slot
                }
                Begun::Full => {
                    drop(tcp);
                    crate::metrics::METRICS.handshake_failed("over_limit");
                    overload.note(Limit::Handshakes, &settings, remote_addr);
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
                let handshake = tokio::select! {
                    handshake = tokio::time::timeout(timeout, acceptor.accept(tcp)) => handshake,
                    () = handshake_slot.evicted() => {
                        tracing::debug!(%remote_addr, "dropped an unfinished TLS handshake to make room for a new connection");
                        return;
                    }
                };
                drop(handshake_slot);
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        let reason = handshake_failure_reason(&error);
                        tracing::info!(
                            %remote_addr,
                            reason,
                            %error,
                            "TLS handshake failed: {}",
                            handshake_failure_hint(reason)
                        );
                        crate::metrics::METRICS.handshake_failed(reason);
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
                let stream = live
                    .track(tls, info, trust.contains(&thumbprint) || require_trusted)
                    .holding(connection_slot);
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

/// Handshakes in progress, oldest first, so that a new connection beyond
/// `max` can evict the one that has waited longest.
#[derive(Debug)]
struct Handshakes {
    max: usize,
    evict_after: Duration,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    next_id: u64,
    /// By id, which only grows: the first entry is the oldest.
    started: BTreeMap<u64, (tokio::time::Instant, CancellationToken)>,
}

/// What [`Handshakes::begin`] made room for.
enum Begun {
    Free(HandshakeSlot),
    /// The oldest handshake was dropped for this one.
    Evicted(HandshakeSlot),
    /// Every slot is taken by a handshake too young to evict.
    Full,
}

impl Handshakes {
    fn new(max: usize, evict_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            evict_after,
            pending: Mutex::default(),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Every change is one insert or remove: a poisoned map is whole.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new handshake, if there is room or an old one to evict.
    fn begin(self: &Arc<Self>) -> Begun {
        let now = tokio::time::Instant::now();
        let mut pending = self.pending();
        let mut evicted = false;
        if pending.started.len() >= self.max {
            let oldest_is_stale = pending
                .started
                .first_key_value()
                .is_some_and(|(_, (started, _))| now - *started >= self.evict_after);
            if !oldest_is_stale {
                return Begun::Full;
            }
            if let Some((_, (_, oldest))) = pending.started.pop_first() {
                oldest.cancel();
                evicted = true;
            }
        }
        let token = CancellationToken::new();
        let id = pending.next_id;
        pending.next_id += 1;
        pending.started.insert(id, (now, token.clone()));
        drop(pending);
        let slot = HandshakeSlot {
            id,
            token,
            handshakes: self.clone(),
        };
        if evicted {
            Begun::Evicted(slot)
        } else {
            Begun::Free(slot)
        }
    }
}

/// One handshake's place among those in progress; freed when dropped.
#[derive(Debug)]
struct HandshakeSlot {
    id: u64,
    token: CancellationToken,
    handshakes: Arc<Handshakes>,
}

impl HandshakeSlot {
    /// Completes when a newer connection took this slot.
    async fn evicted(&self) {
        self.token.cancelled().await;
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.handshakes.pending().started.remove(&self.id);
    }
}

/// Which limit a connection ran into.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Every handshake slot was taken: the oldest handshake was dropped.
    HandshakesEvicted,
    /// Every handshake slot was taken by a young handshake: the new
    /// connection was closed.
    Handshakes,
    /// Every connection slot was taken: the new connection was closed.
    Connections,
}

/// Connections turned away because a limit was reached, reported in one
/// line at most every [`Overload::EVERY`].
#[derive(Debug, Default)]
struct Overload {
    since_report: u64,
    last_report: Option<tokio::time::Instant>,
}

impl Overload {
    const EVERY: Duration = Duration::from_secs(5);

    fn note(&mut self, limit: Limit, settings: &AcceptSettings, remote_addr: SocketAddr) {
        self.since_report += 1;
        let now = tokio::time::Instant::now();
        if self.last_report.is_some_and(|at| now - at < Self::EVERY) {
            return;
        }
        let count = self.since_report;
        match limit {
            Limit::HandshakesEvicted => tracing::warn!(
                %remote_addr,
                max_handshakes = settings.max_handshakes,
                dropped = count,
                "every TLS handshake slot is taken: dropped the oldest unfinished handshakes to make room (a slowloris or a connection flood; raise max_handshakes if the load is real)"
            ),
            Limit::Handshakes => tracing::warn!(
                %remote_addr,
                max_handshakes = settings.max_handshakes,
                refused = count,
                "closed new connections at once: every TLS handshake slot is taken by a handshake under way (a burst of clients; they retry, or raise max_handshakes)"
            ),
            Limit::Connections => tracing::warn!(
                %remote_addr,
                max_connections = settings.max_connections,
                refused = count,
                "closed new connections at once: max_connections are open (raise it if the load is real)"
            ),
        }
        self.since_report = 0;
        self.last_report = Some(now);
    }
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

/// What a failed handshake's reason means, for the one log line.
fn handshake_failure_hint(reason: &str) -> &'static str {
    match reason {
        "untrusted_certificate" => {
            "the client's certificate thumbprint is not trusted; trust it (`configure --trust`) if it should connect"
        }
        "invalid_certificate" => {
            "the client's certificate was refused: its signature does not match it (the client lacks the certificate's key), or it is outside its dates while validity is enforced"
        }
        "no_certificate" => "the client presented no certificate; every client must present one",
        "incompatible" => "the client shares no TLS version, cipher suite or protocol with us",
        "tls_error" => {
            "the client does not speak TLS (plain HTTP, a scanner) or sent a broken handshake"
        }
        _ => "the connection failed or closed during the handshake",
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
                _slot: None,
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
    /// The connection's slot under `max_connections`, freed with it.
    _slot: Option<OwnedSemaphorePermit>,
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
    /// Keeps `slot` until the connection is dropped.
    fn holding(mut self, slot: OwnedSemaphorePermit) -> Self {
        self._registration._slot = Some(slot);
        self
    }

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
