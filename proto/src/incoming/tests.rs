//! The accept loop over real TCP on 127.0.0.1 with real handshakes: what it
//! hands the server, what it drops, and that trust changes reach open
//! connections.

use std::time::Instant;

use futures::StreamExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::*;
use crate::Identity;
use crate::metrics::{HandshakeLabels, METRICS};
use crate::tls::{IdentityCell, client_config, server_config, server_config_open_to_registration};

/// Long enough for any handshake on loopback; a test that waits this long
/// has failed.
const PATIENCE: Duration = Duration::from_secs(10);

fn identity(name: &str) -> Identity {
    Identity::generate(name).expect("identity")
}

/// A listening accept loop and what a client needs to reach it.
struct Server {
    incoming: Incoming,
    address: SocketAddr,
    identity: Identity,
    trust: Arc<TrustStore>,
}

impl Server {
    async fn start(trusted: &[&Identity], settings: AcceptSettings, open: bool) -> Self {
        let identity = identity("server");
        let trust = TrustStore::new(trusted.iter().map(|i| i.thumbprint()));
        let cell = IdentityCell::new(identity.clone()).expect("cell");
        let config = if open {
            server_config_open_to_registration(cell, trust.clone())
        } else {
            server_config(cell, trust.clone())
        }
        .expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let incoming = accept_tls(listener, TlsAcceptor::from(config), trust.clone(), settings);
        Self {
            incoming,
            address,
            identity,
            trust,
        }
    }

    /// A client presenting `client` that pins this server.
    async fn connect(
        &self,
        client: &Identity,
    ) -> (SocketAddr, tokio_rustls::client::TlsStream<TcpStream>) {
        let config = client_config(client, TrustStore::new([self.identity.thumbprint()]))
            .expect("client config");
        let tcp = TcpStream::connect(self.address).await.expect("connect");
        let local = tcp.local_addr().expect("local address");
        let name = ServerName::try_from("tentacle").expect("server name");
        let tls = tokio::time::timeout(PATIENCE, TlsConnector::from(config).connect(name, tcp))
            .await
            .expect("the handshake ended")
            .expect("the client finished its handshake");
        (local, tls)
    }

    /// The next connection the loop hands the server.
    async fn next(&mut self) -> PeerStream<TlsStream<TcpStream>> {
        tokio::time::timeout(PATIENCE, self.incoming.next())
            .await
            .expect("a connection in time")
            .expect("the loop is running")
            .expect("an accepted connection")
    }
}

/// Reads until the peer closes the connection; false if it never does.
async fn closed_by_peer(mut stream: impl AsyncRead + Unpin) -> bool {
    let drain = async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, drain).await.is_ok()
}

fn failures(reason: &str) -> u64 {
    METRICS
        .handshake_failures
        .get_or_create(&HandshakeLabels {
            reason: reason.to_owned(),
        })
        .get()
}

#[tokio::test]
async fn accepted_connections_carry_the_peer_thumbprint_and_address() {
    let client = identity("client");
    let mut server = Server::start(&[&client], AcceptSettings::default(), false).await;
    let (local, mut tls) = server.connect(&client).await;
    let mut accepted = server.next().await;
    assert_eq!(accepted.info().thumbprint, client.thumbprint());
    assert_eq!(accepted.info().remote_addr, Some(local));
    assert_eq!(accepted.connect_info().thumbprint, client.thumbprint());
    // And it is the live connection, not a copy of its details.
    accepted.write_all(b"hello").await.expect("write");
    accepted.flush().await.expect("flush");
    let mut got = [0u8; 5];
    tls.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"hello");
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped_at_the_handshake_timeout() {
    let timeout = Duration::from_millis(200);
    let client = identity("client");
    let settings = AcceptSettings {
        handshake_timeout: timeout,
        ..AcceptSettings::default()
    };
    let mut server = Server::start(&[&client], settings, false).await;
    let timeouts_before = failures("timeout");
    let started = Instant::now();
    let silent = TcpStream::connect(server.address).await.expect("connect");
    let silent_address = silent.local_addr().expect("local address");
    assert!(closed_by_peer(silent).await, "the silent client was kept");
    assert!(
        started.elapsed() >= timeout,
        "dropped after {:?}, before the timeout",
        started.elapsed()
    );
    assert!(failures("timeout") > timeouts_before);
    // The silent connection was never handed on: the next one is the
    // client that did its handshake.
    let (local, _tls) = server.connect(&client).await;
    let accepted = server.next().await;
    assert_ne!(accepted.info().remote_addr, Some(silent_address));
    assert_eq!(accepted.info().remote_addr, Some(local));
}

#[tokio::test]
async fn bad_handshakes_do_not_stop_the_loop() {
    let client = identity("client");
    let stranger = identity("stranger");
    let mut server = Server::start(&[&client], AcceptSettings::default(), false).await;
    let untrusted_before = failures("untrusted_certificate");

    let mut garbage = TcpStream::connect(server.address).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: tentacle\r\n\r\n")
        .await
        .expect("write");
    assert!(closed_by_peer(garbage).await, "a non-TLS client was kept");

    // TLS 1.3: the stranger finishes its side, then hears the refusal.
    let (_, refused) = server.connect(&stranger).await;
    assert!(
        closed_by_peer(refused).await,
        "an untrusted client was kept"
    );
    assert!(failures("untrusted_certificate") > untrusted_before);

    let (local, _tls) = server.connect(&client).await;
    let accepted = server.next().await;
    assert_eq!(accepted.info().thumbprint, client.thumbprint());
    assert_eq!(accepted.info().remote_addr, Some(local));
}

#[tokio::test]
async fn an_open_connection_closes_when_its_peer_loses_trust() {
    let leaving = identity("leaving");
    let staying = identity("staying");
    let mut server = Server::start(&[&leaving, &staying], AcceptSettings::default(), false).await;
    let (_, mut leaving_tls) = server.connect(&leaving).await;
    let mut leaving_conn = server.next().await;
    let (_, mut staying_tls) = server.connect(&staying).await;
    let mut staying_conn = server.next().await;
    assert_eq!(leaving_conn.info().thumbprint, leaving.thumbprint());

    // A read already waiting on the connection is woken by the revocation.
    let waiting = tokio::spawn(async move {
        let mut buf = [0u8; 1];
        let result = leaving_conn.read(&mut buf).await;
        (result, leaving_conn)
    });
    tokio::task::yield_now().await;
    server.trust.remove(&leaving.thumbprint());
    let (result, leaving_conn) = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the revocation arrived")
        .expect("reader task");
    let error = result.expect_err("the read fails once trust is gone");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
    drop(leaving_conn);
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(PATIENCE, leaving_tls.read(&mut buf))
        .await
        .expect("the client saw the close");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    // The peer that is still trusted keeps its connection.
    staying_tls.write_all(b"still here").await.expect("write");
    staying_tls.flush().await.expect("flush");
    let mut got = [0u8; 10];
    staying_conn.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"still here");
}

#[tokio::test]
async fn unknown_peers_are_handed_on_only_where_registration_is_open() {
    let stranger = identity("stranger");
    let registration = AcceptSettings {
        require_trusted_peers: false,
        ..AcceptSettings::default()
    };
    let mut open = Server::start(&[], registration, true).await;
    let (local, _tls) = open.connect(&stranger).await;
    let accepted = open.next().await;
    assert_eq!(accepted.info().thumbprint, stranger.thumbprint());
    assert_eq!(accepted.info().remote_addr, Some(local));
    assert!(!open.trust.contains(&stranger.thumbprint()));

    // The same TLS configuration with the default settings: the handshake
    // completes, but the loop drops the connection instead of serving it.
    let client = identity("client");
    let mut strict = Server::start(&[&client], AcceptSettings::default(), true).await;
    let (_, dropped) = strict.connect(&stranger).await;
    assert!(closed_by_peer(dropped).await, "an unknown peer was served");
    let (local, _tls) = strict.connect(&client).await;
    assert_eq!(strict.next().await.info().remote_addr, Some(local));
}

fn info(thumbprint: Thumbprint) -> PeerInfo {
    PeerInfo {
        thumbprint,
        remote_addr: None,
        channel_binding: None,
    }
}

#[tokio::test]
async fn live_connections_revoke_only_tracked_peers_that_lost_trust() {
    let a = Thumbprint::of_der(b"a");
    let b = Thumbprint::of_der(b"b");
    let trust = TrustStore::new([a, b]);
    let live = LiveConnections::default();
    let (a_io, _a_far) = tokio::io::duplex(64);
    let (b_io, mut b_far) = tokio::io::duplex(64);
    let (r_io, _r_far) = tokio::io::duplex(64);
    let mut a_stream = live.track(a_io, info(a), true);
    let mut b_stream = live.track(b_io, info(b), true);
    // A registration: admitted untrusted, so there is no trust to lose.
    let mut registration = live.track(r_io, info(Thumbprint::of_der(b"r")), false);
    assert_eq!(live.len(), 2);

    assert_eq!(live.revoke_untrusted(&trust), 0);
    trust.remove(&a);
    assert_eq!(live.revoke_untrusted(&trust), 1);
    // Revoking again finds nothing new.
    assert_eq!(live.revoke_untrusted(&trust), 0);

    let mut buf = [0u8; 4];
    let error = a_stream.read(&mut buf).await.expect_err("revoked");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
    let error = a_stream.write(b"x").await.expect_err("revoked");
    assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
    assert!(a_stream.shutdown().await.is_ok(), "shutdown still works");

    b_far.write_all(b"ping").await.expect("write");
    b_stream.read_exact(&mut buf).await.expect("b is untouched");
    assert_eq!(&buf, b"ping");
    registration
        .write_all(b"ok")
        .await
        .expect("registration untouched");

    drop(a_stream);
    assert_eq!(live.len(), 1);
    drop(b_stream);
    drop(registration);
    assert!(live.is_empty());
}

#[tokio::test]
async fn a_connection_beyond_the_handshake_limit_evicts_the_oldest_unfinished_handshake() {
    let client = identity("client");
    let settings = AcceptSettings {
        // Long: nothing here may wait for it.
        handshake_timeout: PATIENCE * 3,
        max_handshakes: 4,
        evict_handshakes_after: Duration::from_millis(200),
        ..AcceptSettings::default()
    };
    let mut server = Server::start(&[&client], settings, false).await;
    let evicted_before = failures("evicted");
    // Four silent clients hold every handshake slot, longer than a real
    // handshake takes.
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(TcpStream::connect(server.address).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A real client still gets in, at once: it takes the oldest's slot.
    let started = Instant::now();
    let (local, _tls) = server.connect(&client).await;
    assert_eq!(server.next().await.info().remote_addr, Some(local));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    let oldest = holders.remove(0);
    assert!(closed_by_peer(oldest).await, "the oldest was kept");
    assert!(failures("evicted") > evicted_before);
    // Four more silent clients push out the rest, never more than four held.
    let mut newer = Vec::new();
    for _ in 0..4 {
        newer.push(TcpStream::connect(server.address).await.expect("connect"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for holder in holders {
        assert!(
            closed_by_peer(holder).await,
            "an old silent client was kept"
        );
    }
    drop(newer);
}

#[tokio::test]
async fn a_connection_beyond_the_handshake_limit_is_closed_while_every_handshake_is_young() {
    let client = identity("client");
    let settings = AcceptSettings {
        handshake_timeout: Duration::from_millis(800),
        max_handshakes: 4,
        // Longer than the timeout: nothing is ever old enough to evict,
        // as in a burst of real clients.
        evict_handshakes_after: PATIENCE,
        ..AcceptSettings::default()
    };
    let mut server = Server::start(&[&client], settings, false).await;
    let refused_before = failures("over_limit");
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(TcpStream::connect(server.address).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let fifth = TcpStream::connect(server.address).await.expect("connect");
    assert!(closed_by_peer(fifth).await, "the fifth was kept");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "closed after {:?}: it waited for a slot",
        started.elapsed()
    );
    assert!(failures("over_limit") > refused_before);
    // The handshakes under way keep their slots until their timeout, then
    // the slots free up for a real client.
    for holder in holders {
        assert!(closed_by_peer(holder).await, "a silent client was kept");
    }
    let (local, _tls) = server.connect(&client).await;
    assert_eq!(server.next().await.info().remote_addr, Some(local));
}

#[tokio::test]
async fn connections_beyond_the_connection_limit_are_closed_and_a_closed_one_frees_its_slot() {
    let client = identity("client");
    let settings = AcceptSettings {
        max_connections: 2,
        ..AcceptSettings::default()
    };
    let mut server = Server::start(&[&client], settings, false).await;
    let (_, first_tls) = server.connect(&client).await;
    let first = server.next().await;
    let (_, _second_tls) = server.connect(&client).await;
    let _second = server.next().await;
    let third = TcpStream::connect(server.address).await.expect("connect");
    assert!(closed_by_peer(third).await, "a third connection was kept");
    drop((first, first_tls));
    // The slot is freed when the server drops the connection.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let config = client_config(&client, TrustStore::new([server.identity.thumbprint()]))
            .expect("client config");
        let tcp = TcpStream::connect(server.address).await.expect("connect");
        let name = ServerName::try_from("tentacle").expect("server name");
        if TlsConnector::from(config).connect(name, tcp).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.next().await;
}
