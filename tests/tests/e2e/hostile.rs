//! Hostile and broken input against both listeners: the real `tentacle`
//! process's listening port and an in-process hub's polling port. Each test
//! sends one kind of bad input and then proves that a trusted client still
//! gets a call through on a new connection: nothing hostile takes a
//! listener down or keeps a trusted peer out.
//!
//! The agent's refusals are checked in its log (it is another process);
//! the hub's through the handshake-failure counter it shares with this
//! process.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tentacle_hub::HubSettings;
use tentacle_proto::dial::{self, DialSettings, ListeningAddress};
use tentacle_proto::incoming::AcceptSettings;
use tentacle_proto::metrics::{HandshakeLabels, METRICS};
use tentacle_proto::v1::fleet_service_client::FleetServiceClient;
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::v1::tunnel_service_client::TunnelServiceClient;
use tentacle_proto::v1::{CallData, ListAgentsRequest, TunnelFrame, TunnelHello};
use tentacle_proto::{Identity, TrustStore};
use tentacle_tests::{AgentProcess, HubFixture, bash, client_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How long one refused connection may take to be closed.
const CLOSE: Duration = Duration::from_secs(10);
/// A short handshake timeout, so slow handshakes free their slots quickly.
const SHORT_HANDSHAKE: &str = "[server]\nhandshake_timeout = \"2s\"\n";

// ---------------------------------------------------------------------------
// The two listeners and their trusted clients.

/// A listening agent that trusts `me`, with `extra` settings.
fn agent(me: &Identity, extra: &str) -> AgentProcess {
    AgentProcess::start(&[me.thumbprint()], extra)
}

/// A trusted call on a new connection to the agent succeeds.
async fn agent_serves(agent: &AgentProcess, me: &Identity) {
    let client = tokio::time::timeout(Duration::from_secs(20), agent.client(me))
        .await
        .expect("a trusted client connects in time");
    client
        .capabilities()
        .await
        .unwrap_or_else(|e| panic!("a trusted call fails: {e}; log:\n{}", agent.log_text()));
}

fn agent_address(agent: &AgentProcess) -> SocketAddr {
    agent.address.expect("the agent listens")
}

/// A hub in this process; `handshake_timeout` as given.
async fn hub(handshake_timeout: Duration) -> HubFixture {
    let settings = HubSettings {
        accept: AcceptSettings {
            handshake_timeout,
            ..AcceptSettings::default()
        },
        ..HubSettings::default()
    };
    HubFixture::start_with(
        Identity::generate("hostile hub").expect("identity"),
        settings,
        "127.0.0.1:0",
    )
    .await
}

/// A trusted call (an operator listing the fleet, with the hub's own
/// certificate) on a new connection to the hub succeeds.
async fn hub_serves(hub: &HubFixture) {
    let identity = hub.hub.identity().clone();
    let tls = tentacle_proto::tls::client_config(&identity, TrustStore::new([hub.thumbprint()]))
        .expect("client config");
    let address = ListeningAddress::new("127.0.0.1", hub.address.port());
    let channel = tokio::time::timeout(
        Duration::from_secs(20),
        dial::channel(&address, tls, &DialSettings::default()),
    )
    .await
    .expect("a trusted client connects in time")
    .expect("a trusted client connects");
    FleetServiceClient::new(channel)
        .list_agents(ListAgentsRequest::default())
        .await
        .expect("a trusted call to the hub succeeds");
}

fn failures(reason: &str) -> u64 {
    METRICS
        .handshake_failures
        .get_or_create(&HandshakeLabels {
            reason: reason.to_owned(),
        })
        .get()
}

// ---------------------------------------------------------------------------
// Hand-made TLS clients.

/// Accepts any server: these clients test what the server does with
/// them, not whom they talk to.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Always presents one certificate with one key, whether they match or not.
#[derive(Debug)]
struct Presents(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let provider = tentacle_proto::tls::provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
}

fn with_alpn(mut config: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A client that presents `certificate` and signs with `signer`'s key.
fn presenting(
    certificate: CertificateDer<'static>,
    signer: &Identity,
) -> Arc<rustls::ClientConfig> {
    let key = tentacle_proto::tls::provider()
        .key_provider
        .load_private_key(signer.key().clone_key())
        .expect("key");
    let certified = Arc::new(CertifiedKey::new(vec![certificate], key));
    with_alpn(builder().with_client_cert_resolver(Arc::new(Presents(certified))))
}

/// A client with no certificate at all.
fn anonymous() -> Arc<rustls::ClientConfig> {
    with_alpn(builder().with_no_client_auth())
}

/// Whether the server refused a handshake from `config`: the handshake
/// fails, or (TLS 1.3, where the client finishes first) the server answers
/// with an alert or a close instead of its HTTP/2 settings.
async fn refused(address: SocketAddr, config: Arc<rustls::ClientConfig>) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(address).await?;
        let name = ServerName::try_from("tentacle").expect("server name");
        let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
        let mut first = [0u8; 1];
        match tls.read(&mut first).await {
            Ok(0) => Err(io::Error::other("closed")),
            Ok(_) => Ok(()),
            Err(error) => Err(error),
        }
    };
    tokio::time::timeout(CLOSE, attempt)
        .await
        .expect("the server decided in time")
        .is_err()
}

/// A self-signed identity valid only between the two years.
fn dated_identity(from_year: i32, to_year: i32) -> Identity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["tentacle".to_owned()]).expect("params");
    params.not_before = rcgen::date_time_ymd(from_year, 1, 1);
    params.not_after = rcgen::date_time_ymd(to_year, 1, 1);
    let certificate = params.self_signed(&key).expect("certificate");
    Identity::from_der(
        certificate.der().clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// The first flight of a real TLS client: its ClientHello record.
fn client_hello() -> Vec<u8> {
    let config = anonymous();
    let name = ServerName::try_from("tentacle").expect("server name");
    let mut connection = rustls::ClientConnection::new(config, name).expect("client");
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).expect("hello");
    hello
}

/// Sends `bytes` on a new connection (then, with `finish`, ends the
/// sending side) and waits for the server to close it.
async fn closed_after(address: SocketAddr, bytes: &[u8], finish: bool) -> bool {
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    // The server may close before everything is written; that is a refusal.
    let _ = tcp.write_all(bytes).await;
    if finish {
        let _ = tcp.shutdown().await;
    }
    closed_by_peer(tcp, CLOSE).await
}

/// Reads until the peer closes; false if it is still open after `wait`.
async fn closed_by_peer(mut tcp: TcpStream, wait: Duration) -> bool {
    let drain = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(wait, drain).await.is_ok()
}

/// Bytes no TLS server can make sense of, the same every run.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Certificates.

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_bad_certificates_and_keeps_serving() {
    let me = client_identity();
    let agent = agent(&me, "");
    let address = agent_address(&agent);

    let stranger = client_identity();
    assert!(
        refused(
            address,
            presenting(stranger.certificate().clone(), &stranger)
        )
        .await
    );
    assert!(agent.wait_for_log("the client's certificate thumbprint is not trusted", CLOSE));
    agent_serves(&agent, &me).await;

    assert!(refused(address, anonymous()).await, "no certificate");
    assert!(agent.wait_for_log("every client must present one", CLOSE));
    agent_serves(&agent, &me).await;

    let untrusted_lines = || {
        agent
            .log_text()
            .matches("thumbprint is not trusted")
            .count()
    };
    let before = untrusted_lines();
    let garbage = CertificateDer::from(b"\x30\x03garbage, not DER".to_vec());
    assert!(refused(address, presenting(garbage, &me)).await, "garbage");
    let deadline = Instant::now() + CLOSE;
    while untrusted_lines() == before {
        assert!(Instant::now() < deadline, "no log line for the garbage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent_serves(&agent, &me).await;

    // The trusted certificate is public; without its key the handshake's
    // CertificateVerify signature cannot match it.
    let thief = client_identity();
    assert!(refused(address, presenting(me.certificate().clone(), &thief)).await);
    assert!(
        agent.wait_for_log("the client lacks the certificate's key", CLOSE),
        "{}",
        agent.log_text()
    );
    agent_serves(&agent, &me).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_trusted_certificate_is_accepted_unless_validity_is_enforced() {
    let me = client_identity();
    let expired = dated_identity(2001, 2002);
    let ignoring = AgentProcess::start(&[me.thumbprint(), expired.thumbprint()], "");
    agent_serves(&ignoring, &expired).await;

    let enforcing = AgentProcess::start(
        &[me.thumbprint(), expired.thumbprint()],
        "[trust]\ncertificate_validity = \"enforced\"\n",
    );
    let address = agent_address(&enforcing);
    assert!(refused(address, presenting(expired.certificate().clone(), &expired)).await);
    assert!(
        enforcing.wait_for_log("outside its validity dates", CLOSE),
        "{}",
        enforcing.log_text()
    );
    // The client is told why, in words.
    let error = tentacle_hub::client::AgentClient::connect_listening(
        &enforcing.target(),
        enforcing.thumbprint,
        &expired,
        &DialSettings::default(),
    )
    .await
    .expect_err("refused");
    assert!(
        error.to_string().contains("outside its validity dates"),
        "{error}"
    );
    // A current certificate still gets in under enforcement.
    agent_serves(&enforcing, &me).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_polling_agent_checks_its_hubs_dates_only_when_it_enforces_validity() {
    let expired_hub = HubFixture::start(dated_identity(2001, 2002)).await;
    // By default the pinned thumbprint decides: the tunnel opens.
    let ignoring = expired_hub.polling_agent("");
    expired_hub
        .client(&ignoring)
        .await
        .capabilities()
        .await
        .expect("a call through the tunnel");

    let mut enforcing =
        expired_hub.prepare_polling_agent("[trust]\ncertificate_validity = \"enforced\"\n");
    expired_hub.trust(&enforcing);
    let _events = enforcing.spawn_no_wait();
    assert!(
        enforcing.wait_for_log("outside its validity dates", Duration::from_secs(20)),
        "{}",
        enforcing.log_text()
    );
    assert!(!enforcing.log_text().contains("tunnel open"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_refuses_bad_certificates_and_keeps_serving() {
    let hub = hub(Duration::from_secs(10)).await;
    let address = hub.address;
    let owner = hub.hub.identity().clone();

    let untrusted = failures("untrusted_certificate");
    let stranger = client_identity();
    assert!(
        refused(
            address,
            presenting(stranger.certificate().clone(), &stranger)
        )
        .await
    );
    assert!(failures("untrusted_certificate") > untrusted);
    hub_serves(&hub).await;

    let none = failures("no_certificate");
    assert!(refused(address, anonymous()).await);
    assert!(failures("no_certificate") > none);
    hub_serves(&hub).await;

    let garbage = CertificateDer::from(b"\x30\x03garbage, not DER".to_vec());
    assert!(refused(address, presenting(garbage, &owner)).await);
    hub_serves(&hub).await;

    let invalid = failures("invalid_certificate");
    let thief = client_identity();
    assert!(refused(address, presenting(owner.certificate().clone(), &thief)).await);
    assert!(failures("invalid_certificate") > invalid);
    hub_serves(&hub).await;
}

// ---------------------------------------------------------------------------
// 2. Protocol.

/// Inputs that are not TLS, or not TLS for long.
fn garbage_inputs() -> Vec<(&'static str, Vec<u8>, bool)> {
    let hello = client_hello();
    let mut garbled = hello.clone();
    for byte in garbled.iter_mut().skip(9).take(64) {
        *byte = 0xff;
    }
    vec![
        (
            "plain HTTP/1.1",
            b"GET / HTTP/1.1\r\nHost: tentacle\r\n\r\n".to_vec(),
            false,
        ),
        (
            "an HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            false,
        ),
        ("random bytes", noise(4096), false),
        ("a garbled ClientHello", garbled, false),
        (
            "half a ClientHello, then EOF",
            hello[..hello.len() / 2].to_vec(),
            true,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_closes_connections_that_do_not_speak_tls() {
    let me = client_identity();
    let agent = agent(&me, "");
    let address = agent_address(&agent);
    for (what, bytes, finish) in garbage_inputs() {
        assert!(
            closed_after(address, &bytes, finish).await,
            "{what} was kept open"
        );
        agent_serves(&agent, &me).await;
    }
    assert!(
        agent.wait_for_log("does not speak TLS", CLOSE),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_closes_connections_that_do_not_speak_tls() {
    let hub = hub(Duration::from_secs(10)).await;
    let before = failures("tls_error") + failures("io_error");
    for (what, bytes, finish) in garbage_inputs() {
        assert!(
            closed_after(hub.address, &bytes, finish).await,
            "{what} was kept open"
        );
        hub_serves(&hub).await;
    }
    assert!(failures("tls_error") + failures("io_error") >= before + 5);
}

/// Opens `count` connections that each send the start of a ClientHello
/// and then nothing.
async fn slow_handshakes(address: SocketAddr, count: usize) -> Vec<TcpStream> {
    let hello = client_hello();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut tcp = TcpStream::connect(address).await.expect("connect");
        tcp.write_all(&hello[..20]).await.expect("a few bytes");
        held.push(tcp);
    }
    held
}

/// Waits until the server has closed every one of `held`; how many it did.
async fn all_closed(held: Vec<TcpStream>, wait: Duration) -> usize {
    let waits = held.into_iter().map(|tcp| closed_by_peer(tcp, wait));
    futures::future::join_all(waits)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_unfinished_handshakes_do_not_stop_a_trusted_call_to_the_agent() {
    let me = client_identity();
    let agent = agent(&me, SHORT_HANDSHAKE);
    let held = slow_handshakes(agent_address(&agent), 1000).await;
    let started = Instant::now();
    agent_serves(&agent, &me).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The handshake timeout frees every slot.
    assert_eq!(all_closed(held, Duration::from_secs(20)).await, 1000);
    assert!(agent.wait_for_log("TLS handshake timed out", CLOSE));
    agent_serves(&agent, &me).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn more_unfinished_handshakes_than_slots_do_not_stop_a_trusted_call_to_the_agent() {
    let me = client_identity();
    // Ten times more slow clients than slots, and a long timeout: only
    // evicting the oldest lets the trusted client in.
    let agent = agent(
        &me,
        "[server]\nhandshake_timeout = \"60s\"\nmax_handshakes = 100\n",
    );
    let held = slow_handshakes(agent_address(&agent), 1000).await;
    // Older than `evict_handshakes_after` (1 s), and far from the timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    agent_serves(&agent, &me).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        agent.wait_for_log("every TLS handshake slot is taken", CLOSE),
        "{}",
        agent.log_text()
    );
    // At most 100 are still held; the rest were closed (beyond the slots
    // while the first 100 were young) or evicted, long before 60 s.
    let closed = all_closed(held, Duration::from_secs(3)).await;
    assert!(closed >= 900, "only {closed} of 1000 dropped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_unfinished_handshakes_do_not_stop_a_trusted_call_to_the_hub() {
    let hub = hub(Duration::from_secs(2)).await;
    let held = slow_handshakes(hub.address, 1000).await;
    let started = Instant::now();
    hub_serves(&hub).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(all_closed(held, Duration::from_secs(20)).await, 1000);
    hub_serves(&hub).await;
}

/// Makes `count` connection attempts at once, each a full handshake with
/// `identity`; returns (accepted, refused), all decided within 60 s.
async fn connection_storm(
    address: SocketAddr,
    identity: &Identity,
    server: tentacle_proto::Thumbprint,
    count: usize,
) -> (usize, usize) {
    let config = tentacle_proto::tls::client_config(identity, TrustStore::new([server]))
        .expect("client config");
    let attempts = (0..count).map(|_| {
        let config = config.clone();
        tokio::spawn(async move {
            let attempt = async {
                let tcp = TcpStream::connect(address).await?;
                let name = ServerName::try_from("tentacle").expect("server name");
                let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
                let mut first = [0u8; 1];
                match tls.read(&mut first).await? {
                    0 => Err(io::Error::other("closed")),
                    _ => Ok(()),
                }
            };
            tokio::time::timeout(Duration::from_secs(50), attempt).await
        })
    });
    let all = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(attempts))
        .await
        .expect("every attempt is decided within 60 s");
    let mut accepted = 0;
    for outcome in all {
        match outcome.expect("no attempt panics") {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!("an attempt hung past its own timeout"),
        }
    }
    (accepted, count - accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_concurrent_connections_are_decided_in_time_by_the_agent() {
    let me = client_identity();
    let agent = agent(&me, SHORT_HANDSHAKE);
    let (accepted, refused) =
        connection_storm(agent_address(&agent), &me, agent.thumbprint, 2000).await;
    assert!(accepted > 0, "none accepted, {refused} refused");
    agent_serves(&agent, &me).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_concurrent_connections_are_decided_in_time_by_the_hub() {
    let hub = hub(Duration::from_secs(2)).await;
    let owner = hub.hub.identity().clone();
    let (accepted, refused) = connection_storm(hub.address, &owner, hub.thumbprint(), 2000).await;
    assert!(accepted > 0, "none accepted, {refused} refused");
    hub_serves(&hub).await;
}

// ---------------------------------------------------------------------------
// 3. Size limits.

/// A script request of about `bytes` bytes.
fn large_script(bytes: usize) -> tentacle_proto::v1::StartScriptRequest {
    bash(&format!("# {}\necho ok", "x".repeat(bytes)))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_a_message_over_its_limit_and_the_limit_is_a_setting() {
    let me = client_identity();
    let small = agent(&me, "[server]\nmax_message_bytes = 65536\n");
    let status = small
        .client(&me)
        .await
        .scripts()
        .start_script(large_script(100_000))
        .await
        .expect_err("over the limit");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");
    agent_serves(&small, &me).await;

    // The default (16 MiB) takes the same request.
    let default = agent(&me, "");
    default
        .client(&me)
        .await
        .scripts()
        .start_script(large_script(100_000))
        .await
        .expect("within the default limit");
}

/// A capabilities call with `bytes` of metadata.
fn padded<T>(message: T, bytes: usize) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "x-padding",
        "p".repeat(bytes).parse().expect("ASCII metadata"),
    );
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_a_megabyte_of_metadata_and_the_limit_is_a_setting() {
    use tentacle_proto::v1::GetCapabilitiesRequest;
    use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
    let me = client_identity();
    let strict = agent(&me, "");
    let client = strict.client(&me).await;
    let status = CapabilitiesServiceClient::new(client.channel().clone())
        .get_capabilities(padded(GetCapabilitiesRequest {}, 1024 * 1024))
        .await
        .expect_err("a megabyte of metadata");
    // h2 closes the connection (GOAWAY ENHANCE_YOUR_CALM); the hub's
    // client reports the broken connection with h2's reason.
    assert!(
        status.code() == tonic::Code::ResourceExhausted
            || status.message().contains("header_list_way_too_large"),
        "{status:?}"
    );
    agent_serves(&strict, &me).await;

    let roomy = agent(&me, "[server.http2]\nmax_header_list_bytes = 2097152\n");
    let client = roomy.client(&me).await;
    CapabilitiesServiceClient::new(client.channel().clone())
        .get_capabilities(padded(GetCapabilitiesRequest {}, 1024 * 1024))
        .await
        .expect("within a raised limit");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_refuses_a_megabyte_of_metadata_and_an_oversize_message() {
    let hub = hub(Duration::from_secs(10)).await;
    let identity = hub.hub.identity().clone();
    let tls = tentacle_proto::tls::client_config(&identity, TrustStore::new([hub.thumbprint()]))
        .expect("client config");
    let address = ListeningAddress::new("127.0.0.1", hub.address.port());
    let channel = dial::channel(&address, tls, &DialSettings::default())
        .await
        .expect("connect");
    let status = FleetServiceClient::new(channel.clone())
        .list_agents(padded(ListAgentsRequest::default(), 1024 * 1024))
        .await
        .expect_err("a megabyte of metadata");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    hub_serves(&hub).await;

    // 5 MiB in one registration request: over gRPC's 4 MiB default.
    let registration = tentacle_proto::v1::RegisterRequest {
        name: "x".repeat(5 * 1024 * 1024),
        ..Default::default()
    };
    let status = tentacle_proto::v1::registration_service_client::RegistrationServiceClient::new(
        fresh_hub_channel(&hub).await,
    )
    .register(registration)
    .await
    .expect_err("an oversize message");
    assert!(status.message().contains("too large"), "{status:?}");
    hub_serves(&hub).await;

    // The limit is a setting: a smaller one refuses a 64 KiB request that
    // the default takes, with the same status.
    let small = HubFixture::start_with(
        Identity::generate("small hub").expect("identity"),
        HubSettings {
            max_message_bytes: 16 * 1024,
            ..HubSettings::default()
        },
        "127.0.0.1:0",
    )
    .await;
    let registration = tentacle_proto::v1::RegisterRequest {
        name: "x".repeat(64 * 1024),
        ..Default::default()
    };
    let status = tentacle_proto::v1::registration_service_client::RegistrationServiceClient::new(
        fresh_hub_channel(&small).await,
    )
    .register(registration.clone())
    .await
    .expect_err("over the configured limit");
    assert!(status.message().contains("too large"), "{status:?}");
    let status = tentacle_proto::v1::registration_service_client::RegistrationServiceClient::new(
        fresh_hub_channel(&hub).await,
    )
    .register(registration)
    .await
    .expect_err("a bad registration, but not for its size");
    assert!(!status.message().contains("too large"), "{status:?}");
    hub_serves(&small).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_checks_agents_dates_only_when_it_enforces_validity() {
    for (validity, refused_expected) in [
        (tentacle_proto::trust::CertificateValidity::Ignored, false),
        (tentacle_proto::trust::CertificateValidity::Enforced, true),
    ] {
        let hub = HubFixture::start_with(
            Identity::generate("dated hub").expect("identity"),
            HubSettings {
                certificate_validity: validity,
                ..HubSettings::default()
            },
            "127.0.0.1:0",
        )
        .await;
        let expired = dated_identity(2001, 2002);
        hub.hub.trust_agent(tentacle_hub::TrustedAgent {
            thumbprint: expired.thumbprint(),
            name: "dated".into(),
            mode: tentacle_hub::AgentMode::Polling,
            address: None,
            roles: Vec::new(),
            environments: Vec::new(),
            previous_thumbprint: None,
            retire_previous_at: None,
        });
        let was_refused = refused(
            hub.address,
            presenting(expired.certificate().clone(), &expired),
        )
        .await;
        assert_eq!(was_refused, refused_expected, "{validity:?}");
        hub_serves(&hub).await;
    }
}

async fn fresh_hub_channel(hub: &HubFixture) -> tonic::transport::Channel {
    let identity = hub.hub.identity().clone();
    let tls = tentacle_proto::tls::client_config(&identity, TrustStore::new([hub.thumbprint()]))
        .expect("client config");
    let address = ListeningAddress::new("127.0.0.1", hub.address.port());
    dial::channel(&address, tls, &DialSettings::default())
        .await
        .expect("connect")
}

// ---------------------------------------------------------------------------
// 4. Tunnel frames at the hub's door (the rest are unit tests beside the
// tunnel code, in `tentacle_proto::tunnel::hostile_tests`).

/// A polling agent's identity the hub trusts under `name`.
fn trusted_agent(hub: &HubFixture, name: &str) -> Identity {
    let identity = client_identity();
    hub.hub.trust_agent(tentacle_hub::TrustedAgent {
        thumbprint: identity.thumbprint(),
        name: name.to_owned(),
        mode: tentacle_hub::AgentMode::Polling,
        address: None,
        roles: Vec::new(),
        environments: Vec::new(),
        previous_thumbprint: None,
        retire_previous_at: None,
    });
    identity
}

/// Opens a tunnel as `identity`, sending `first` frames; returns the hub's
/// stream of answers or the status it refused with.
async fn open_tunnel(
    hub: &HubFixture,
    identity: &Identity,
    first: Vec<TunnelFrame>,
) -> (
    tokio::sync::mpsc::Sender<TunnelFrame>,
    Result<tonic::Streaming<TunnelFrame>, tonic::Status>,
) {
    let tls = tentacle_proto::tls::client_config(identity, TrustStore::new([hub.thumbprint()]))
        .expect("client config");
    let address = ListeningAddress::new("127.0.0.1", hub.address.port());
    let channel = dial::channel(&address, tls, &DialSettings::default())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for frame in first {
        tx.send(frame).await.expect("queued");
    }
    let client = TunnelServiceClient::new(channel).max_encoding_message_size(usize::MAX);
    let opened = tokio::time::timeout(
        Duration::from_secs(20),
        client
            .clone()
            .open(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("the hub answers the open in time")
    .map(tonic::Response::into_inner);
    (tx, opened)
}

fn hello(agent_id: &str) -> TunnelFrame {
    TunnelFrame {
        kind: Some(Kind::Hello(TunnelHello {
            agent_id: agent_id.to_owned(),
            agent_version: "hostile".into(),
            tunnel_index: 0,
            protocol: tentacle_proto::tunnel::PROTOCOL,
            max_concurrent_calls: 0,
        })),
    }
}

/// The first frame the hub sends that is not a ping.
async fn first_answer(stream: &mut tonic::Streaming<TunnelFrame>) -> Result<Kind, tonic::Status> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("an answer in time")?
        {
            Some(TunnelFrame {
                kind: Some(Kind::Ping(_)),
            }) => {}
            Some(TunnelFrame { kind: Some(kind) }) => return Ok(kind),
            Some(TunnelFrame { kind: None }) => {}
            None => return Err(tonic::Status::unknown("the stream ended")),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_refuses_a_tunnel_whose_first_frame_is_not_a_hello() {
    let hub = hub(Duration::from_secs(10)).await;
    let identity = trusted_agent(&hub, "eager-agent");
    let data = TunnelFrame {
        kind: Some(Kind::Data(CallData {
            call: 1,
            data: b"too soon".to_vec().into(),
            end: true,
        })),
    };
    let (_tx, opened) = open_tunnel(&hub, &identity, vec![data]).await;
    let status = match opened {
        Err(status) => status,
        Ok(mut stream) => first_answer(&mut stream).await.expect_err("refused"),
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // The same agent, saying hello first, is welcome.
    let (_tx, opened) = open_tunnel(&hub, &identity, vec![hello("eager-agent")]).await;
    let mut stream = opened.expect("opened");
    let answer = first_answer(&mut stream).await.expect("an answer");
    assert!(matches!(answer, Kind::Welcome(_)), "{answer:?}");
    hub_serves(&hub).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_hub_ends_a_tunnel_that_sends_a_frame_over_the_limit() {
    let hub = hub(Duration::from_secs(10)).await;
    let identity = trusted_agent(&hub, "bulky-agent");
    let (tx, opened) = open_tunnel(&hub, &identity, vec![hello("bulky-agent")]).await;
    let mut stream = opened.expect("opened");
    let welcome = first_answer(&mut stream).await.expect("welcome");
    assert!(matches!(welcome, Kind::Welcome(_)), "{welcome:?}");
    let oversized = TunnelFrame {
        kind: Some(Kind::Data(CallData {
            call: 1,
            data: vec![0u8; 4 * tentacle_proto::tunnel::MAX_FRAME].into(),
            end: false,
        })),
    };
    tx.send(oversized).await.expect("queued");
    // The hub stops reading this tunnel: its answer stream ends.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel stayed open");
    // A well-behaved tunnel and a trusted call still work.
    let (_tx, opened) = open_tunnel(&hub, &identity, vec![hello("bulky-agent")]).await;
    let mut stream = opened.expect("opened again");
    let answer = first_answer(&mut stream).await.expect("an answer");
    assert!(matches!(answer, Kind::Welcome(_)), "{answer:?}");
    hub_serves(&hub).await;
}

// ---------------------------------------------------------------------------
// 5. A hostile hub: what the polling agent does with a hub that breaks the
// tunnel's rules. The hub here is a hand-written `TunnelService` on pinned
// TLS: its first tunnel misbehaves, every later one makes a real call.

/// How the first tunnel misbehaves.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// A call's data before the welcome.
    DataBeforeWelcome,
    /// A welcome, then a frame four times the tunnel's limit.
    OversizedFrame,
}

#[derive(Debug, Clone)]
struct HostileHub {
    misbehaviour: Misbehaviour,
    opens: Arc<std::sync::atomic::AtomicUsize>,
    /// The grpc-status of each real call the agent answered.
    answered: tokio::sync::mpsc::UnboundedSender<String>,
}

type Frames = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<TunnelFrame, tonic::Status>> + Send + 'static>,
>;

#[tonic::async_trait]
impl tentacle_proto::v1::tunnel_service_server::TunnelService for HostileHub {
    type OpenStream = Frames;

    async fn open(
        &self,
        request: tonic::Request<tonic::Streaming<TunnelFrame>>,
    ) -> Result<tonic::Response<Frames>, tonic::Status> {
        let mut incoming = request.into_inner();
        let first = incoming.message().await?;
        assert!(
            matches!(
                first,
                Some(TunnelFrame {
                    kind: Some(Kind::Hello(_))
                })
            ),
            "the agent says hello first: {first:?}"
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let send = |kind| {
            let _ = tx.send(Ok(TunnelFrame { kind: Some(kind) }));
        };
        let welcome = Kind::Welcome(tentacle_proto::v1::TunnelWelcome {
            hub_version: "hostile".into(),
            protocol: tentacle_proto::tunnel::PROTOCOL,
        });
        let first_open = self.opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        if first_open {
            match self.misbehaviour {
                Misbehaviour::DataBeforeWelcome => send(Kind::Data(CallData {
                    call: 1,
                    data: b"too soon".to_vec().into(),
                    end: true,
                })),
                Misbehaviour::OversizedFrame => {
                    send(welcome);
                    send(Kind::Data(CallData {
                        call: 1,
                        data: vec![0u8; 4 * tentacle_proto::tunnel::MAX_FRAME].into(),
                        end: false,
                    }));
                }
            }
            // Keep the stream open: the agent must end it itself.
            tokio::spawn(async move {
                while let Ok(Some(_)) = incoming.message().await {}
                drop(tx);
            });
        } else {
            send(welcome);
            let header = |name: &str, value: &str| tentacle_proto::v1::CallHeader {
                name: name.into(),
                value: value.as_bytes().to_vec(),
            };
            send(Kind::Start(tentacle_proto::v1::CallStart {
                call: 1,
                path: "/tentacle.v1.CapabilitiesService/GetCapabilities".into(),
                headers: vec![
                    header("content-type", "application/grpc"),
                    header("te", "trailers"),
                ],
            }));
            // An empty GetCapabilitiesRequest: no compression, length 0.
            send(Kind::Data(CallData {
                call: 1,
                data: vec![0u8; 5].into(),
                end: true,
            }));
            let answered = self.answered.clone();
            tokio::spawn(async move {
                let _keep_open = tx;
                while let Ok(Some(frame)) = incoming.message().await {
                    if let Some(Kind::Trailers(trailers)) = frame.kind {
                        let status = trailers
                            .trailers
                            .iter()
                            .find(|h| h.name == "grpc-status")
                            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
                            .unwrap_or_default();
                        let _ = answered.send(status);
                    }
                }
            });
        }
        let frames: Frames = Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        Ok(tonic::Response::new(frames))
    }
}

/// Serves a [`HostileHub`] and points a new polling agent at it; returns
/// the agent (running) and the statuses of the real calls it answers.
async fn agent_under_hostile_hub(
    misbehaviour: Misbehaviour,
) -> (AgentProcess, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let identity = Identity::generate("hostile hub").expect("identity");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let mut agent = AgentProcess::prepare_polling(
        &format!("https://{address}"),
        &identity.thumbprint().to_string(),
    );
    let trust = TrustStore::new([agent.thumbprint]);
    let cell = tentacle_proto::tls::IdentityCell::new(identity).expect("cell");
    let tls = tentacle_proto::tls::server_config(cell, trust.clone()).expect("server config");
    let incoming = tentacle_proto::incoming::accept_tls(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        trust,
        AcceptSettings::default(),
    );
    let (answered, statuses) = tokio::sync::mpsc::unbounded_channel();
    let hub = HostileHub {
        misbehaviour,
        opens: Arc::default(),
        answered,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(tentacle_proto::v1::tunnel_service_server::TunnelServiceServer::new(hub))
            .serve_with_incoming(incoming),
    );
    let _events = agent.spawn_no_wait();
    (agent, statuses)
}

async fn answers_a_real_call(
    agent: &AgentProcess,
    statuses: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let status = tokio::time::timeout(Duration::from_secs(30), statuses.recv())
        .await
        .unwrap_or_else(|_| panic!("no call answered; log:\n{}", agent.log_text()))
        .expect("the hub runs");
    assert_eq!(status, "0", "the call succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_polling_agent_drops_a_tunnel_whose_hub_sends_data_before_its_welcome() {
    let (agent, mut statuses) = agent_under_hostile_hub(Misbehaviour::DataBeforeWelcome).await;
    answers_a_real_call(&agent, &mut statuses).await;
    assert!(
        agent.log_text().contains("did not welcome the tunnel"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_polling_agent_drops_a_tunnel_whose_hub_sends_a_frame_over_the_limit() {
    let (agent, mut statuses) = agent_under_hostile_hub(Misbehaviour::OversizedFrame).await;
    answers_a_real_call(&agent, &mut statuses).await;
    assert!(
        agent.log_text().contains("too large"),
        "{}",
        agent.log_text()
    );
}
