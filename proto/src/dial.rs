//! Dials a listening agent over pinned mutual TLS and returns a tonic
//! [`Channel`], so callers use the generated clients unchanged.
//!
//! Owns the client side of a direct connection: the target address, the
//! TCP + TLS connect under one timeout ([`DialSettings`]), and turning a
//! failed connect into one sentence of advice.

pub mod accepted;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::http2::Http2Settings;

pub use accepted::{Accepted, wait_until_accepted};

/// The port a listening agent uses unless told otherwise.
pub const DEFAULT_LISTENING_PORT: u16 = 10933;

/// Where a listening agent is: `https://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListeningAddress {
    host: String,
    port: u16,
}

/// A target that is not `https://host[:port]`.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a listening target: expected https://HOST:PORT, for example https://10.0.0.5:10933"
)]
pub struct ParseTargetError(String);

impl std::str::FromStr for ListeningAddress {
    type Err = ParseTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseTargetError(s.to_owned());
        let uri: Uri = s.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") || uri.path_and_query().is_some_and(|p| p != "/") {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(DEFAULT_LISTENING_PORT),
        })
    }
}

impl std::fmt::Display for ListeningAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

impl ListeningAddress {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Timeouts and HTTP/2 settings for a client channel.
#[derive(Debug, Clone)]
pub struct DialSettings {
    /// Covers the TCP connect, the TLS handshake and the wait for the
    /// server's first bytes (see [`wait_until_accepted`]).
    pub connect_timeout: Duration,
    pub http2: Http2Settings,
}

impl Default for DialSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(60),
            http2: Http2Settings {
                // Clients have always advertised HTTP/2's own 16 KiB frames.
                max_frame_bytes: None,
                ..Http2Settings::default()
            },
        }
    }
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to {target}: {reason}")]
pub struct DialError {
    target: String,
    // The reason already says what the transport error chain did; keeping
    // the chain out of `source` stops it being printed twice.
    reason: String,
}

impl DialError {
    fn new(target: String, error: tonic::transport::Error) -> Self {
        Self {
            target,
            reason: describe_connect_error(&error),
        }
    }
}

/// The most useful sentence about a failed connection: TLS failures get
/// advice, anything else its innermost cause.
pub fn describe_connect_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = Some(error);
    let mut innermost = error.to_string();
    while let Some(e) = current {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return describe_tls_error(tls);
        }
        innermost = e.to_string();
        current = e.source();
    }
    // rustls reports an alert from the peer inside a plain I/O error whose
    // text is all that is left of it.
    const REFUSALS: [&str; 3] = ["AccessDenied", "CertificateUnknown", "BadCertificate"];
    if innermost.contains("fatal alert") && REFUSALS.iter().any(|r| innermost.contains(r)) {
        return PEER_REFUSED_US.to_owned();
    }
    // Under TLS 1.3 a refused client learns of it only when its first write
    // hits a closed connection.
    let lower = innermost.to_ascii_lowercase();
    if lower.contains("broken pipe") || lower.contains("connection reset") {
        return format!(
            "{innermost}; the peer closed the connection, which on a first call usually means it does not trust our thumbprint (`configure --trust`)"
        );
    }
    innermost
}

const PEER_REFUSED_US: &str =
    "the peer refused our certificate: it does not trust our thumbprint yet (`configure --trust`)";

/// One line about a failed call: the transport's reason when the call never
/// reached the peer, otherwise the peer's status.
pub fn describe_status(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => describe_connect_error(source),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

fn describe_tls_error(error: &rustls::Error) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    match error {
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "the peer's certificate does not match the pinned thumbprint; check it with `show-thumbprint` on the peer".to_owned()
        }
        Error::AlertReceived(
            AlertDescription::AccessDenied
            | AlertDescription::CertificateUnknown
            | AlertDescription::BadCertificate
            | AlertDescription::DecryptError,
        ) => PEER_REFUSED_US.to_owned(),
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::NotValidYet) => {
            "the peer's certificate is outside its validity dates, which this side enforces (`[trust] certificate_validity = \"enforced\"`); give the peer a new certificate, or set it to \"ignored\"".to_owned()
        }
        Error::AlertReceived(AlertDescription::CertificateExpired) => {
            "the peer refused our certificate as outside its validity dates (it enforces them); make a new certificate with `new-certificate` and have the peer trust it".to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Opens a TCP connection with `TCP_NODELAY`, runs the pinned handshake,
/// and waits until the server shows it accepted our certificate.
pub async fn dial_tls(
    address: &ListeningAddress,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> io::Result<Accepted<TlsStream<TcpStream>>> {
    let server_name = ServerName::try_from(address.host().to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connect = async {
        let tcp = TcpStream::connect((address.host(), address.port())).await?;
        // Without this every small call waits ~40 ms for delayed ACKs.
        tcp.set_nodelay(true)?;
        TlsConnector::from(tls).connect(server_name, tcp).await
    };
    let started = tokio::time::Instant::now();
    let tls = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    wait_until_accepted(tls, timeout.saturating_sub(started.elapsed())).await
}

/// A channel to a listening agent. The first connection is made before this
/// returns, so an unreachable agent or a refused handshake shows up here.
pub async fn channel(
    address: &ListeningAddress,
    tls: Arc<rustls::ClientConfig>,
    settings: &DialSettings,
) -> Result<Channel, DialError> {
    let target = address.clone();
    let timeout = settings.connect_timeout;
    let connector = tower::service_fn(move |_: Uri| {
        let target = target.clone();
        let tls = tls.clone();
        async move { dial_tls(&target, tls, timeout).await.map(TokioIo::new) }
    });
    endpoint(settings)
        .connect_with_connector(connector)
        .await
        .map_err(|source| DialError::new(address.to_string(), source))
}

fn endpoint(settings: &DialSettings) -> Endpoint {
    // The URI only names the HTTP/2 authority; the connector decides where
    // the bytes go.
    let endpoint = Endpoint::from_static("http://tentacle")
        .connect_timeout(settings.connect_timeout)
        .tcp_nodelay(true);
    settings.http2.apply_to_endpoint(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_defaults_are_the_settings_clients_always_used() {
        let d = DialSettings::default();
        assert_eq!(d.connect_timeout, Duration::from_secs(60));
        assert_eq!(d.http2.keepalive_interval, Some(Duration::from_secs(30)));
        assert_eq!(d.http2.keepalive_timeout, Duration::from_secs(20));
        assert_eq!(d.http2.stream_window_bytes, None);
        assert_eq!(d.http2.connection_window_bytes, None);
        assert_eq!(d.http2.max_frame_bytes, None);
        assert_eq!(d.http2.validate(), Ok(()));
    }

    #[test]
    fn parses_listening_targets() {
        let a: ListeningAddress = "https://127.0.0.1:1234".parse().expect("valid");
        assert_eq!((a.host(), a.port()), ("127.0.0.1", 1234));
        let b: ListeningAddress = "https://agent.example".parse().expect("valid");
        assert_eq!(b.port(), DEFAULT_LISTENING_PORT);
        let c: ListeningAddress = "https://[::1]:99".parse().expect("valid");
        assert_eq!(c.host(), "::1");
        assert_eq!(c.to_string(), "https://[::1]:99");
        for bad in ["http://x:1", "x:1", "https://x:1/path", ""] {
            assert!(bad.parse::<ListeningAddress>().is_err(), "{bad}");
        }
    }
}
