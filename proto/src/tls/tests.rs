//! Real rustls handshakes over in-memory pipes: who is admitted, who is
//! refused and by which side, and that no handshake is ever resumed.

use std::io;
use std::time::Duration;

use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;

fn identity(name: &str) -> Identity {
    Identity::generate(name).expect("identity")
}

struct Outcome {
    server: io::Result<server::TlsStream<DuplexStream>>,
    client: io::Result<client::TlsStream<DuplexStream>>,
}

/// Runs one handshake between the two configurations.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Outcome {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("tentacle").expect("server name");
    let both = async {
        tokio::join!(
            TlsAcceptor::from(server).accept(server_io),
            TlsConnector::from(client).connect(name, client_io),
        )
    };
    let (server, client) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("the handshake ended");
    Outcome { server, client }
}

/// The rustls error inside an I/O error, if there is one.
fn tls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

fn is_untrusted_certificate(error: &io::Error) -> bool {
    matches!(
        tls_error(error),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure
        ))
    )
}

/// Both ends of a pinned pair, each trusting the other.
struct Pair {
    server: Identity,
    client: Identity,
    server_trust: Arc<TrustStore>,
    client_trust: Arc<TrustStore>,
}

impl Pair {
    fn new() -> Self {
        let server = identity("server");
        let client = identity("client");
        Self {
            server_trust: TrustStore::new([client.thumbprint()]),
            client_trust: TrustStore::new([server.thumbprint()]),
            server,
            client,
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let cell = IdentityCell::new(self.server.clone()).expect("cell");
        server_config(cell, self.server_trust.clone()).expect("server config")
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.client, self.client_trust.clone()).expect("client config")
    }
}

#[tokio::test]
async fn peers_that_trust_each_other_complete_the_handshake() {
    let pair = Pair::new();
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    let mut server = outcome.server.expect("the server accepted");
    let mut client = outcome.client.expect("the client accepted");
    let (_, server_side) = server.get_ref();
    assert_eq!(
        peer_thumbprint(server_side.peer_certificates()),
        Some(pair.client.thumbprint())
    );
    assert_eq!(server_side.alpn_protocol(), Some(ALPN_H2));
    let (_, client_side) = client.get_ref();
    assert_eq!(
        peer_thumbprint(client_side.peer_certificates()),
        Some(pair.server.thumbprint())
    );
    server.write_all(b"ping").await.expect("write");
    server.flush().await.expect("flush");
    let mut got = [0u8; 4];
    client.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"ping");
}

#[tokio::test]
async fn the_server_refuses_a_client_it_does_not_trust() {
    let pair = Pair::new();
    pair.server_trust.replace([]);
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    let error = outcome.server.expect_err("the server refused");
    assert!(is_untrusted_certificate(&error), "{error:?}");
    // Under TLS 1.3 the client finishes first and hears of the refusal on
    // its next read, as the server's alert.
    if let Ok(mut client) = outcome.client {
        let mut buf = [0u8; 1];
        let error = client.read(&mut buf).await.expect_err("refused");
        assert!(
            matches!(
                tls_error(&error),
                Some(rustls::Error::AlertReceived(
                    rustls::AlertDescription::AccessDenied
                ))
            ),
            "{error:?}"
        );
    }
}

#[tokio::test]
async fn the_client_refuses_a_server_it_does_not_trust() {
    let pair = Pair::new();
    pair.client_trust
        .replace([identity("someone else").thumbprint()]);
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    let error = outcome.client.expect_err("the client refused");
    assert!(is_untrusted_certificate(&error), "{error:?}");
    let error = outcome.server.expect_err("the server heard of it");
    assert!(
        matches!(tls_error(&error), Some(rustls::Error::AlertReceived(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn removing_a_thumbprint_refuses_the_next_handshake() {
    let pair = Pair::new();
    let (server, client) = (pair.server_config(), pair.client_config());
    let first = handshake(server.clone(), client.clone()).await;
    assert!(first.server.is_ok() && first.client.is_ok());

    pair.server_trust.remove(&pair.client.thumbprint());
    let second = handshake(server.clone(), client.clone()).await;
    let error = second.server.expect_err("the client is no longer trusted");
    assert!(is_untrusted_certificate(&error), "{error:?}");

    pair.server_trust.insert(pair.client.thumbprint());
    pair.client_trust.remove(&pair.server.thumbprint());
    let third = handshake(server, client).await;
    let error = third.client.expect_err("the server is no longer trusted");
    assert!(is_untrusted_certificate(&error), "{error:?}");
}

/// Two handshakes with the same configurations, the first one used long
/// enough for session tickets to arrive; the kinds of the second.
async fn second_handshake_kinds(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> (Option<HandshakeKind>, Option<HandshakeKind>) {
    let first = handshake(server.clone(), client.clone()).await;
    let (mut s, mut c) = (
        first.server.expect("first server"),
        first.client.expect("first client"),
    );
    s.write_all(b"x").await.expect("write");
    s.flush().await.expect("flush");
    let mut buf = [0u8; 1];
    c.read_exact(&mut buf).await.expect("read");
    let second = handshake(server, client).await;
    let (s, c) = (
        second.server.expect("second server"),
        second.client.expect("second client"),
    );
    (
        s.get_ref().1.handshake_kind(),
        c.get_ref().1.handshake_kind(),
    )
}

#[tokio::test]
async fn every_handshake_is_a_full_one() {
    let pair = Pair::new();
    let (server, client) = (pair.server_config(), pair.client_config());
    assert_eq!(server.send_tls13_tickets, 0);
    assert!(!server.session_storage.can_cache());
    let kinds = second_handshake_kinds(server.clone(), client.clone()).await;
    assert_eq!(
        kinds,
        (Some(HandshakeKind::Full), Some(HandshakeKind::Full))
    );

    // The same pair with rustls' usual resumption does resume, so the check
    // above would notice resumption coming back.
    let mut resuming_server = (*server).clone();
    resuming_server.send_tls13_tickets = 2;
    resuming_server.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
    let mut resuming_client = (*client).clone();
    resuming_client.resumption = rustls::client::Resumption::in_memory_sessions(16);
    let kinds = second_handshake_kinds(Arc::new(resuming_server), Arc::new(resuming_client)).await;
    assert_eq!(
        kinds,
        (Some(HandshakeKind::Resumed), Some(HandshakeKind::Resumed))
    );
}

#[tokio::test]
async fn a_registration_server_admits_an_unknown_client_as_untrusted() {
    let pair = Pair::new();
    pair.server_trust.replace([]);
    let cell = IdentityCell::new(pair.server.clone()).expect("cell");
    let open =
        server_config_open_to_registration(cell, pair.server_trust.clone()).expect("server config");
    let outcome = handshake(open.clone(), pair.client_config()).await;
    let server = outcome.server.expect("an unknown client is admitted");
    let thumbprint = peer_thumbprint(server.get_ref().1.peer_certificates())
        .expect("the client presented a certificate");
    assert_eq!(thumbprint, pair.client.thumbprint());
    // The application decides what an unknown client may do; the trust
    // store still says it is not trusted.
    assert!(!pair.server_trust.contains(&thumbprint));

    // A certificate is still required.
    let verifier = Arc::new(PinnedVerifier::new(pair.client_trust.clone(), provider()));
    let mut anonymous = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
    let outcome = handshake(open, Arc::new(anonymous)).await;
    let error = outcome.server.expect_err("no certificate, no handshake");
    assert!(
        matches!(
            tls_error(&error),
            Some(rustls::Error::NoCertificatesPresented)
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_replaced_identity_is_presented_from_the_next_handshake() {
    let pair = Pair::new();
    let cell = IdentityCell::new(pair.server.clone()).expect("cell");
    let changes = cell.subscribe();
    let config = server_config(cell.clone(), pair.server_trust.clone()).expect("config");
    assert!(!cell.replace(pair.server.clone()).expect("same identity"));
    assert!(!changes.has_changed().expect("cell alive"));

    let rotated = identity("server, rotated");
    assert!(cell.replace(rotated.clone()).expect("new identity"));
    assert!(changes.has_changed().expect("cell alive"));
    assert_eq!(cell.thumbprint(), rotated.thumbprint());

    // A client still pinning the old thumbprint refuses the new certificate.
    let old_pin = handshake(config.clone(), pair.client_config()).await;
    let error = old_pin.client.expect_err("pinned to the old certificate");
    assert!(is_untrusted_certificate(&error), "{error:?}");
    pair.client_trust.replace([rotated.thumbprint()]);
    let new_pin = handshake(config, pair.client_config()).await;
    let client = new_pin.client.expect("pinned to the new certificate");
    assert_eq!(
        peer_thumbprint(client.get_ref().1.peer_certificates()),
        Some(rotated.thumbprint())
    );
}
