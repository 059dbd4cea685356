//! A TCP proxy that injects network faults between a client and a server,
//! for the end-to-end fault matrix.
//!
//! Every accepted connection is forwarded to one upstream address, byte for
//! byte, both ways, while the proxy obeys the [`Fault`] set on it: bytes can
//! stop flowing, be late, trickle, have their tail held back, or the
//! connections can be cut or refused. Clearing the fault lets everything
//! held flow again, so a test can check that both ends recover without a
//! restart.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does to the bytes and connections passing through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes stop flowing both ways; connections stay open, so neither end
    /// hears anything until the fault clears (a frozen path, not a dead one).
    Pause,
    /// Every open connection is cut with a reset when the fault is set, and
    /// every new one as soon as it carries a byte.
    Kill,
    /// New connections are reset as soon as they are accepted; open ones
    /// carry on.
    Refuse,
    /// Every chunk of bytes arrives this much later.
    Delay(Duration),
    /// The last `n` bytes each side has sent are held back until the fault
    /// clears: a record or frame that never completes.
    HoldBack(usize),
    /// At most this many bytes per second each way, per connection.
    Bandwidth(u64),
}

impl Fault {
    /// A short name for summaries.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Kill => "kill",
            Self::Refuse => "refuse",
            Self::Delay(_) => "delay",
            Self::HoldBack(_) => "hold-back",
            Self::Bandwidth(_) => "bandwidth",
        }
    }
}

/// A running proxy; dropping it stops it and cuts its connections.
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    control: FaultControl,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
}

/// Sets and clears a proxy's fault; clones control the same proxy, so a
/// callback deep in a flow can set it at the right moment.
#[derive(Debug, Clone)]
pub struct FaultControl {
    fault: Arc<watch::Sender<Option<Fault>>>,
    /// Cancelled to cut every open connection; replaced afterwards.
    cut: Arc<Mutex<CancellationToken>>,
}

impl FaultControl {
    /// Applies `fault` from now on, replacing any other.
    pub fn set(&self, fault: Fault) {
        if fault == Fault::Kill {
            self.cut_all();
        }
        self.fault.send_replace(Some(fault));
    }

    /// Lets bytes flow freely again, releasing whatever was held.
    pub fn clear(&self) {
        self.fault.send_replace(None);
    }

    /// Resets every connection open now; new ones are served as usual.
    pub fn cut_all(&self) {
        let mut cut = self.cut.lock().unwrap_or_else(PoisonError::into_inner);
        cut.cancel();
        *cut = CancellationToken::new();
    }
}

/// The most bytes read ahead of the writer per direction: beyond this, a
/// paused or trickling proxy stops reading and TCP pushes back on the sender.
const READ_AHEAD: usize = 256 * 1024;

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (fault, faults) = watch::channel(None);
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let accepted = Arc::new(AtomicU64::new(0));
        tokio::spawn(accept_loop(
            listener,
            upstream,
            faults,
            cut.clone(),
            stop.clone(),
            accepted.clone(),
        ));
        Ok(Self {
            address,
            control: FaultControl {
                fault: Arc::new(fault),
                cut,
            },
            stop,
            accepted,
        })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// How many connections the proxy has accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// A handle that sets and clears this proxy's fault.
    pub fn control(&self) -> FaultControl {
        self.control.clone()
    }

    /// Applies `fault` from now on, replacing any other.
    pub fn set(&self, fault: Fault) {
        self.control.set(fault);
    }

    /// Lets bytes flow freely again, releasing whatever was held.
    pub fn clear(&self) {
        self.control.clear();
    }

    /// Resets every connection open now; new ones are served as usual.
    pub fn cut_all(&self) {
        self.control.cut_all();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Option<Fault>>,
    cut: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let (client, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // Out of descriptors or a reset before accept: try again.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        if *faults.borrow() == Some(Fault::Refuse) {
            reset(client);
            continue;
        }
        let cut = cut.lock().unwrap_or_else(PoisonError::into_inner).clone();
        tokio::spawn(forward(client, upstream, faults.clone(), cut));
    }
}

/// Closes `stream` with a reset rather than an orderly close, as a dead
/// middlebox or a crashed peer would.
fn reset(stream: TcpStream) {
    // Linger zero makes the close a reset. If the option cannot be set the
    // close is merely orderly, which still ends the connection.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn forward(
    client: TcpStream,
    upstream: SocketAddr,
    faults: watch::Receiver<Option<Fault>>,
    cut: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, faults.clone(), cut.clone());
    let down = pump(server_read, client_write, faults, cut.clone());
    let (up, down) = tokio::join!(up, down);
    if cut.is_cancelled() {
        // Reunite the halves so the close below is a reset on both sides.
        for (read, write) in [up, down].into_iter().flatten() {
            if let Ok(stream) = read.reunite(write) {
                reset(stream);
            }
        }
    }
}

/// Copies one direction under the current fault until either end closes or
/// the connection is cut. Returns the halves when cut, so they can be reset.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut faults: watch::Receiver<Option<Fault>>,
    cut: CancellationToken,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut eof = false;
    loop {
        let fault = *faults.borrow_and_update();
        let ready = match fault {
            Some(Fault::Pause) => 0,
            Some(Fault::HoldBack(n)) => pending.len().saturating_sub(n),
            _ => pending.len(),
        };
        if ready > 0 {
            let send = match fault {
                // A tenth of a second's worth per step.
                Some(Fault::Bandwidth(rate)) => ready.min((rate / 10).max(1) as usize),
                _ => ready,
            };
            let wait = match fault {
                Some(Fault::Delay(delay)) => delay,
                Some(Fault::Bandwidth(_)) => Duration::from_millis(100),
                _ => Duration::ZERO,
            };
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cut.cancelled() => return Some((from, to)),
                }
            }
            let written = tokio::select! {
                written = to.write_all(&pending[..send]) => written,
                () = cut.cancelled() => return Some((from, to)),
            };
            if written.is_err() {
                return None;
            }
            pending.drain(..send);
            continue;
        }
        if eof && pending.is_empty() {
            let _ = to.shutdown().await;
            return None;
        }
        tokio::select! {
            read = from.read(&mut buffer), if !eof && pending.len() < READ_AHEAD => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    if fault == Some(Fault::Kill) {
                        return Some((from, to));
                    }
                    pending.extend_from_slice(&buffer[..n]);
                }
            },
            changed = faults.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            () = cut.cancelled() => return Some((from, to)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(bytes).await?;
        let mut back = vec![0u8; bytes.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_without_a_fault() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&mut stream, &bytes).await.expect("echo"), bytes);
    }

    #[tokio::test]
    async fn a_pause_holds_bytes_until_it_clears() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        proxy.set(Fault::Pause);
        stream.write_all(b"held").await.expect("write");
        let mut back = [0u8; 4];
        let early =
            tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut back)).await;
        assert!(early.is_err(), "bytes crossed a paused proxy");
        proxy.clear();
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("released")
            .expect("read");
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn hold_back_keeps_the_tail_until_it_clears() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        proxy.set(Fault::HoldBack(3));
        // Held back both ways: "abcdef" reaches the echo, "abc" comes back.
        stream.write_all(b"abcdefghi").await.expect("write");
        let mut head = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
            .await
            .expect("head arrives")
            .expect("read");
        assert_eq!(&head, b"abc");
        let mut tail = [0u8; 6];
        let early =
            tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut tail)).await;
        assert!(early.is_err(), "the held tail crossed");
        proxy.clear();
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut tail))
            .await
            .expect("tail released")
            .expect("read");
        assert_eq!(&tail, b"defghi");
    }

    #[tokio::test]
    async fn kill_cuts_open_connections_and_refuse_cuts_new_ones() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut open = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut open, b"x").await.expect("echo"), b"x");
        proxy.set(Fault::Kill);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), open.read(&mut byte))
            .await
            .expect("the cut is heard");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        proxy.set(Fault::Refuse);
        let mut new = TcpStream::connect(proxy.address()).await.expect("connect");
        let read = tokio::time::timeout(Duration::from_secs(5), new.read(&mut byte))
            .await
            .expect("the refusal is heard");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        proxy.clear();
        let mut again = TcpStream::connect(proxy.address()).await.expect("connect");
        assert_eq!(round_trip(&mut again, b"y").await.expect("echo"), b"y");
    }

    #[tokio::test]
    async fn bandwidth_and_delay_slow_bytes_down() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        proxy.set(Fault::Bandwidth(100_000));
        let bytes = vec![7u8; 50_000];
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, &bytes).await.expect("echo"), bytes);
        // 50 kB at 100 kB/s each way: at least 0.4 s, whatever the machine.
        assert!(started.elapsed() >= Duration::from_millis(400));

        proxy.set(Fault::Delay(Duration::from_millis(200)));
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"z").await.expect("echo"), b"z");
        assert!(started.elapsed() >= Duration::from_millis(400));
    }
}
