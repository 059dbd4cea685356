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

/// A self-signed identity valid only between the two dates.
fn dated_identity(name: &str, not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> Identity {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["tentacle".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let certificate = params.self_signed(&key_pair).expect("certificate");
    Identity::from_der(
        certificate.der().clone(),
        rustls_pki_types::PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
    )
}

/// A pair whose client (and server) certificates are `client` / `server`.
fn pair_of(server: Identity, client: Identity) -> Pair {
    Pair {
        server_trust: TrustStore::new([client.thumbprint()]),
        client_trust: TrustStore::new([server.thumbprint()]),
        server,
        client,
    }
}

#[tokio::test]
async fn an_expired_pinned_certificate_is_accepted_unless_validity_is_enforced() {
    let expired = dated_identity("expired client", (2001, 1, 1), (2002, 1, 1));
    let pair = pair_of(identity("server"), expired);
    assert_eq!(
        pair.server_trust.certificate_validity(),
        CertificateValidity::Ignored,
        "ignored by default"
    );
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    outcome.server.expect("pinning alone decides by default");

    pair.server_trust
        .set_certificate_validity(CertificateValidity::Enforced);
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    let error = outcome.server.expect_err("refused once enforced");
    assert!(
        matches!(
            tls_error(&error),
            Some(rustls::Error::InvalidCertificate(CertificateError::Expired))
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_enforcing_client_refuses_a_server_certificate_outside_its_dates() {
    let future = dated_identity("future server", (2090, 1, 1), (2100, 1, 1));
    let pair = pair_of(future, identity("client"));
    pair.client_trust
        .set_certificate_validity(CertificateValidity::Enforced);
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    let error = outcome.client.expect_err("not valid yet");
    assert!(
        matches!(
            tls_error(&error),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet
            ))
        ),
        "{error:?}"
    );
    // A current certificate passes the same enforcing client.
    let current = pair_of(identity("server"), identity("client"));
    current
        .client_trust
        .set_certificate_validity(CertificateValidity::Enforced);
    current
        .server_trust
        .set_certificate_validity(CertificateValidity::Enforced);
    let outcome = handshake(current.server_config(), current.client_config()).await;
    outcome.client.expect("a current certificate is accepted");
    outcome.server.expect("both ways");
}

/// Always presents one certificate with one key, matched or not.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client that presents `certificate` but signs with `key`'s key: what
/// someone who copied a trusted certificate (it is public) without its key
/// can do. rustls refuses to build that from `with_client_auth_cert`, so
/// the pair goes in through a resolver, unchecked.
fn impostor_config(
    certificate: rustls_pki_types::CertificateDer<'static>,
    key: &Identity,
    trust: Arc<TrustStore>,
) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let signer = provider
        .key_provider
        .load_private_key(key.key().clone_key())
        .expect("key");
    let certified = Arc::new(CertifiedKey::new(vec![certificate], signer));
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(trust, provider)))
        .with_client_cert_resolver(Arc::new(Presents(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn a_trusted_certificate_without_its_key_fails_the_handshake() {
    let pair = Pair::new();
    let thief = identity("thief");
    let config = impostor_config(
        pair.client.certificate().clone(),
        &thief,
        pair.client_trust.clone(),
    );
    let outcome = handshake(pair.server_config(), config).await;
    // The thumbprint matches; the CertificateVerify signature, made with
    // another key, does not verify against the certificate's public key.
    let error = outcome.server.expect_err("refused");
    assert!(
        matches!(
            tls_error(&error),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature
            )) | Some(rustls::Error::PeerMisbehaved(_))
        ),
        "{error:?}"
    );
    let outcome = handshake(pair.server_config(), pair.client_config()).await;
    outcome.server.expect("the real holder still gets in");
}

#[tokio::test]
async fn garbage_bytes_as_a_certificate_are_refused() {
    let pair = Pair::new();
    let garbage = rustls_pki_types::CertificateDer::from(b"not a certificate at all".to_vec());
    // Trusting the garbage's thumbprint must not make it a certificate.
    pair.server_trust.insert(Thumbprint::of_der(&garbage));
    let config = impostor_config(garbage, &pair.client, pair.client_trust.clone());
    let outcome = handshake(pair.server_config(), config).await;
    let error = outcome.server.expect_err("refused");
    assert!(
        matches!(
            tls_error(&error),
            Some(rustls::Error::InvalidCertificate(_))
        ),
        "{error:?}"
    );
}
