//! Liveness and readiness: the flag a process sets while it serves, which
//! the metrics endpoint reports as `GET /readyz`, and the client
//! (`tentacle probe`, `tentacle-hub probe`) that a container's HEALTHCHECK
//! or an operator runs against it.
//!
//! `/livez` answers 200 whenever the metrics server answers at all: the
//! process runs. `/readyz` answers 200 only between [`Readiness::set_ready`]
//! (the agent listens or polls, the hub's listener serves) and
//! [`Readiness::set_not_ready`] (shutdown began), so an orchestrator stops
//! sending work to a process that is still starting or already draining.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where `probe` looks when neither `--address` nor
/// `$TENTACLE_METRICS_LISTEN` names the metrics endpoint.
pub const DEFAULT_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9100);

/// The variable both binaries read for `--metrics-listen` and `probe`'s
/// default address.
pub const METRICS_LISTEN_VARIABLE: &str = "TENTACLE_METRICS_LISTEN";

/// Whether this process serves. Starts not ready.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub const fn new() -> Self {
        Self(AtomicBool::new(false))
    }

    /// The process serves: `/readyz` answers 200.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// The process is shutting down (or not up yet): `/readyz` answers 503.
    pub fn set_not_ready(&self) {
        self.0.store(false, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// This process's readiness, next to its [`crate::metrics::METRICS`]: one
/// metrics endpoint per process reports one flag.
pub static READINESS: Readiness = Readiness::new();

/// Why a probe failed; each is one line for the health check's log.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("not ready: {url} answered {status}")]
    NotReady {
        url: String,
        status: http::StatusCode,
    },
    #[error(
        "nothing answers at {url}: {reason}; is the process running with --metrics-listen {address}?"
    )]
    Unreachable {
        url: String,
        address: SocketAddr,
        reason: String,
    },
    #[error("no answer from {url} within {}", humantime::format_duration(*.timeout))]
    TimedOut { url: String, timeout: Duration },
}

/// The address a probe dials for a metrics server bound to `listen`: a
/// wildcard bind (0.0.0.0, ::) is reached on loopback.
pub fn dial_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The `probe` verb's options, shared by `tentacle` and `tentacle-hub`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// The program's --metrics-listen address (a wildcard one is probed on
    /// loopback).
    #[arg(long, env = METRICS_LISTEN_VARIABLE, default_value_t = DEFAULT_ADDRESS)]
    pub address: SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl ProbeArgs {
    /// Runs the probe these options describe.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        probe(self.address, self.timeout).await
    }
}

/// `GET http://ADDRESS/readyz`: `Ok` when it answers 200 within `timeout`.
pub async fn probe(address: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let url = format!("http://{}/readyz", dial_address(address));
    let unreachable = |reason: String| ProbeError::Unreachable {
        url: url.clone(),
        address,
        reason,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| unreachable(e.to_string()))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<axum::body::Body>();
    let response = tokio::time::timeout(timeout, client.get(uri))
        .await
        .map_err(|_| ProbeError::TimedOut {
            url: url.clone(),
            timeout,
        })?
        .map_err(|error| unreachable(innermost(&error)))?;
    match response.status() {
        http::StatusCode::OK => Ok(()),
        status => Err(ProbeError::NotReady { url, status }),
    }
}

/// The last error in a chain: hyper's outer ones only say "client error".
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_starts_unset_and_follows_its_setters() {
        let readiness = Readiness::new();
        assert!(!readiness.is_ready());
        readiness.set_ready();
        assert!(readiness.is_ready());
        readiness.set_not_ready();
        assert!(!readiness.is_ready());
    }

    #[test]
    fn wildcard_binds_are_probed_on_loopback() {
        let any4: SocketAddr = "0.0.0.0:9100".parse().expect("address");
        assert_eq!(dial_address(any4), DEFAULT_ADDRESS);
        let any6: SocketAddr = "[::]:9200".parse().expect("address");
        assert_eq!(
            dial_address(any6),
            "[::1]:9200".parse::<SocketAddr>().expect("address")
        );
        let named: SocketAddr = "10.1.2.3:9100".parse().expect("address");
        assert_eq!(dial_address(named), named);
    }

    /// The only test that touches the process-wide flag.
    #[tokio::test]
    async fn the_metrics_server_reports_readiness_and_the_probe_reads_it() {
        let address = crate::metrics::spawn_metrics("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("serve");
        let timeout = Duration::from_secs(3);
        let starting = probe(address, timeout).await.expect_err("not ready yet");
        assert!(
            matches!(starting, ProbeError::NotReady { status, .. } if status == http::StatusCode::SERVICE_UNAVAILABLE),
            "{starting:?}"
        );
        assert!(starting.to_string().contains("503"), "{starting}");
        READINESS.set_ready();
        probe(address, timeout).await.expect("ready");
        READINESS.set_not_ready();
        assert!(probe(address, timeout).await.is_err(), "draining again");
        // Liveness does not depend on readiness.
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<axum::body::Body>();
        let live = client
            .get(format!("http://{address}/livez").parse().expect("uri"))
            .await
            .expect("livez");
        assert_eq!(live.status(), http::StatusCode::OK);
    }

    #[tokio::test]
    async fn a_probe_of_a_closed_port_fails_in_one_line() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let error = probe(address, Duration::from_secs(3))
            .await
            .expect_err("nothing listens");
        assert!(matches!(error, ProbeError::Unreachable { .. }), "{error:?}");
        let line = error.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        // Accepts the connection but never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let _held = tokio::spawn(async move {
            let accepted = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(accepted);
        });
        let error = probe(address, Duration::from_millis(300))
            .await
            .expect_err("no answer");
        assert!(matches!(error, ProbeError::TimedOut { .. }), "{error:?}");
        assert!(error.to_string().contains("300ms"), "{error}");
    }
}
