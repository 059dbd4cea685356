//! HTTP CONNECT proxies for polling agents. TLS runs end to end through the
//! proxy: the proxy only ever sees encrypted bytes.

use std::io;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A proxy to tunnel through.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    pub host: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        f.debug_struct("ProxySettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The largest CONNECT response header accepted.
const MAX_RESPONSE: usize = 16 * 1024;

/// Why an `HTTPS_PROXY` value is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    /// The agent speaks plain HTTP to its proxy, so an `https://` proxy
    /// would get its credentials in clear text where the user expects TLS.
    #[error(
        "an https:// proxy is not supported: the agent speaks plain HTTP CONNECT to its proxy, which would send the proxy credentials unencrypted; use http://[user:password@]host:port (the connection to the hub inside the proxy is TLS either way)"
    )]
    Https,
    #[error("expected http://[user:password@]host:port")]
    Malformed,
}

impl ProxySettings {
    /// Reads `HTTPS_PROXY` (or `https_proxy`) as `http://[user:pass@]host:port`,
    /// unless `NO_PROXY` (or `no_proxy`) covers `target_host`.
    pub fn from_env(target_host: &str) -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::from_values(
            var("HTTPS_PROXY").or_else(|| var("https_proxy")),
            var("NO_PROXY").or_else(|| var("no_proxy")),
            target_host,
        )
    }

    /// [`Self::from_env`] with the variables' values given. A value that
    /// cannot be used is ignored with a warning that never shows its
    /// password.
    fn from_values(
        https_proxy: Option<String>,
        no_proxy: Option<String>,
        target_host: &str,
    ) -> Option<Self> {
        let url = https_proxy?;
        if no_proxy_covers(&no_proxy.unwrap_or_default(), target_host) {
            return None;
        }
        match Self::parse_url(&url) {
            Ok(proxy) => Some(proxy),
            Err(error) => {
                let url = redacted(&url);
                tracing::warn!(%url, "ignoring HTTPS_PROXY: {error}");
                None
            }
        }
    }

    fn parse_url(url: &str) -> Result<Self, ProxyUrlError> {
        if url
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
        {
            return Err(ProxyUrlError::Https);
        }
        let rest = url
            .strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/');
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((c, a)) => (Some(c), a),
            None => (None, rest),
        };
        // Without a port, curl's default for HTTP proxies.
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || address.starts_with('[') => {
                (host, port.parse().map_err(|_| ProxyUrlError::Malformed)?)
            }
            _ => (address, 1080),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() || host.contains('/') {
            return Err(ProxyUrlError::Malformed);
        }
        let (username, password) = match credentials.map(|c| c.split_once(':').unwrap_or((c, ""))) {
            Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
            None => (None, None),
        };
        Ok(Self {
            host,
            port,
            username,
            password,
        })
    }

    /// Opens a TCP connection to `host:port` through the proxy.
    pub async fn connect(&self, host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        tokio::time::timeout(timeout, self.connect_inner(host, port))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "the proxy did not answer in time")
            })?
    }

    async fn connect_inner(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("could not reach the proxy {}:{}: {e}", self.host, self.port),
                )
            })?;
        stream.set_nodelay(true)?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(user) = &self.username {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", self.password.as_deref().unwrap_or("")));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;

        // TLS speaks first from our side, so the proxy sends nothing after
        // its response until we do: reading in chunks cannot swallow bytes
        // that belong to the tunnel.
        let mut response = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        let end = loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the proxy closed the connection during CONNECT",
                ));
            }
            response.extend_from_slice(&chunk[..n]);
            if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if response.len() > MAX_RESPONSE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the proxy's CONNECT response is too long",
                ));
            }
        };
        let status_line = String::from_utf8_lossy(
            &response[..response.iter().position(|b| *b == b'\r').unwrap_or(0)],
        )
        .into_owned();
        let code = status_line.split_whitespace().nth(1).unwrap_or("");
        let success =
            status_line.starts_with("HTTP/1.") && code.len() == 3 && code.starts_with('2');
        if !success {
            // 407 is the standard answer; some proxies (tinyproxy) send 401.
            let hint = if code == "407" || code == "401" {
                "; check the proxy username and password (`tentacle polling-proxy`)"
            } else {
                ""
            };
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the proxy refused CONNECT {authority}: `{status_line}`{hint}"),
            ));
        }
        if end != response.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the proxy sent data after its CONNECT response",
            ));
        }
        Ok(stream)
    }
}

fn no_proxy_covers(no_proxy: &str, host: &str) -> bool {
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            // As curl: `example.com` and `.example.com` both cover the
            // domain and its subdomains.
            let suffix = entry.trim_start_matches('.').to_ascii_lowercase();
            let host = host.to_ascii_lowercase();
            entry == "*" || host == suffix || host.ends_with(&format!(".{suffix}"))
        })
}

/// `url` with the password of its credentials, if any, replaced by `***`.
fn redacted(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    match rest.rsplit_once('@') {
        Some((credentials, address)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}{user}:***@{address}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An https:// proxy would be spoken to in plain HTTP, credentials
    /// included, so it is refused; and no warning shows a password.
    #[test]
    fn an_https_proxy_is_refused_and_no_warning_shows_its_password() {
        assert_eq!(
            ProxySettings::parse_url("https://bob:s3cret@proxy.corp:3128"),
            Err(ProxyUrlError::Https)
        );
        assert_eq!(
            ProxySettings::parse_url("HTTPS://proxy.corp"),
            Err(ProxyUrlError::Https)
        );
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let writer = {
            let logs = logs.clone();
            move || LogSink(logs.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        let used = tracing::subscriber::with_default(subscriber, || {
            [
                "https://bob:s3cret@proxy.corp:3128",
                "http://bob:s3cret@proxy.corp:notaport",
            ]
            .map(|url| ProxySettings::from_values(Some(url.into()), None, "hub.corp"))
        });
        assert_eq!(used, [None, None]);
        let logs = String::from_utf8(logs.lock().expect("logs").clone()).expect("utf-8");
        assert_eq!(logs.matches("ignoring HTTPS_PROXY").count(), 2, "{logs}");
        assert!(
            logs.contains("an https:// proxy is not supported"),
            "{logs}"
        );
        assert!(logs.contains("bob:***@proxy.corp"), "{logs}");
        assert!(!logs.contains("s3cret"), "{logs}");
    }

    /// Collects what the test subscriber writes.
    struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogSink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("logs").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn redaction_keeps_the_user_and_hides_only_the_password() {
        assert_eq!(redacted("http://bob:pw@p:1"), "http://bob:***@p:1");
        assert_eq!(redacted("bob:pw@p:1"), "bob:***@p:1");
        assert_eq!(redacted("http://p:1"), "http://p:1");
        assert_eq!(redacted("http://a:b:c@d@p:1"), "http://a:***@p:1");
    }

    #[test]
    fn parses_proxy_urls() {
        let p = ProxySettings::parse_url("http://bob:s3cret@proxy.local:3128/").expect("valid");
        assert_eq!((p.host.as_str(), p.port), ("proxy.local", 3128));
        assert_eq!(
            (p.username.as_deref(), p.password.as_deref()),
            (Some("bob"), Some("s3cret"))
        );
        let q = ProxySettings::parse_url("127.0.0.1:8888").expect("valid");
        assert_eq!(q.username, None);
        let r = ProxySettings::parse_url("http://proxy.corp").expect("no port");
        assert_eq!((r.host.as_str(), r.port), ("proxy.corp", 1080));
        assert_eq!(
            ProxySettings::parse_url("http://:3128"),
            Err(ProxyUrlError::Malformed)
        );
        assert_eq!(
            ProxySettings::parse_url("http://proxy:port"),
            Err(ProxyUrlError::Malformed)
        );
        assert!(!format!("{p:?}").contains("s3cret"));
    }

    #[test]
    fn no_proxy_matches_hosts_and_suffixes() {
        assert!(no_proxy_covers("a.com, .corp.local", "hub.corp.local"));
        assert!(no_proxy_covers("*", "anything"));
        assert!(!no_proxy_covers(".corp.local", "corp.localx"));
        assert!(no_proxy_covers("corp.local", "hub.corp.local"));
        assert!(!no_proxy_covers("", "x"));
    }

    #[tokio::test]
    async fn a_refusing_proxy_gives_a_clear_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
        });
        let proxy = ProxySettings {
            host: "127.0.0.1".into(),
            port,
            username: Some("u".into()),
            password: Some("wrong".into()),
        };
        let err = proxy
            .connect("hub", 10943, Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("407"), "{err}");
        assert!(err.to_string().contains("password"), "{err}");
    }
}
