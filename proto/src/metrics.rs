//! Process-wide measurements, served as Prometheus text by
//! [`serve_metrics`] (`--metrics-listen`), beside the process's liveness
//! (`/livez`) and readiness (`/readyz`, from [`crate::probe::READINESS`]).
//!
//! One registry per process: the agent fills the `tentacle_agent_*`
//! families, the hub the `tentacle_hub_*` ones, and the TLS accept loop
//! counts refused handshakes for both.

use std::net::SocketAddr;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label with one value.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Label {
    pub value: String,
}

/// Why a TLS handshake was refused: `untrusted_certificate`,
/// `invalid_certificate`, `no_certificate`, `incompatible`, `tls_error`
/// (not TLS, or a broken handshake), `io_error`, `timeout`, `over_limit`
/// (closed: `max_connections` open) or `evicted` (dropped unfinished to make
/// room under `max_handshakes`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub reason: String,
}

/// Which way bytes went.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

/// What became of a certificate rotation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Every measurement a Tentacle process keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub scripts_running: Gauge,
    pub tunnels_open: Gauge,
    pub bytes_transferred: Family<DirectionLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub hub_connected_agents: Gauge,
    pub hub_tunnels_open: Gauge,
    pub hub_queued_calls: Gauge,
    pub hub_pickup_latency: Histogram,
    pub hub_registration_failures: Counter,
    pub hub_registrations_throttled: Counter,
    pub hub_certificate_rotations: Family<OutcomeLabels, Counter>,
    pub hub_forwarded_calls: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let scripts_running = Gauge::default();
        registry.register(
            "tentacle_agent_scripts_running",
            "Scripts pending or running on this agent",
            scripts_running.clone(),
        );
        let tunnels_open = Gauge::default();
        registry.register(
            "tentacle_agent_tunnels_open",
            "Polling tunnels this agent has open",
            tunnels_open.clone(),
        );
        let bytes_transferred = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tentacle_agent_file_bytes",
            "File bytes received (in) and sent (out) by this agent",
            bytes_transferred.clone(),
        );
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tentacle_tls_handshake_failures",
            "Refused or failed TLS handshakes, by reason",
            handshake_failures.clone(),
        );
        let hub_connected_agents = Gauge::default();
        registry.register(
            "tentacle_hub_connected_agents",
            "Polling agents with at least one open tunnel",
            hub_connected_agents.clone(),
        );
        let hub_tunnels_open = Gauge::default();
        registry.register(
            "tentacle_hub_tunnels_open",
            "Open tunnels",
            hub_tunnels_open.clone(),
        );
        let hub_queued_calls = Gauge::default();
        registry.register(
            "tentacle_hub_queued_calls",
            "Calls waiting for a polling agent to connect",
            hub_queued_calls.clone(),
        );
        let hub_pickup_latency = Histogram::new(exponential_buckets(0.0005, 4.0, 12));
        registry.register(
            "tentacle_hub_pickup_latency_seconds",
            "Time from a call to a polling agent until a tunnel picks it up",
            hub_pickup_latency.clone(),
        );
        let hub_registration_failures = Counter::default();
        registry.register(
            "tentacle_hub_registration_failures",
            "Registrations refused for a bad, used or missing token or API key",
            hub_registration_failures.clone(),
        );
        let hub_registrations_throttled = Counter::default();
        registry.register(
            "tentacle_hub_registrations_throttled",
            "Registrations refused unchecked: their source address had spent its budget of failures",
            hub_registrations_throttled.clone(),
        );
        let hub_certificate_rotations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "tentacle_hub_certificate_rotations",
            "Agent certificate rotations, by outcome (announced, pending, approved, refused, retired)",
            hub_certificate_rotations.clone(),
        );
        let hub_forwarded_calls = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "tentacle_hub_forwarded_calls",
            "Calls for polling agents passed between hub nodes, by outcome: answered (the node took the call), stale (it holds no tunnel for the agent), unreachable (it could not be reached), refused (this node refused a call meant for another)",
            hub_forwarded_calls.clone(),
        );
        Self {
            registry,
            scripts_running,
            tunnels_open,
            bytes_transferred,
            handshake_failures,
            hub_connected_agents,
            hub_tunnels_open,
            hub_queued_calls,
            hub_pickup_latency,
            hub_registration_failures,
            hub_registrations_throttled,
            hub_certificate_rotations,
            hub_forwarded_calls,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    pub fn add_bytes(&self, direction: &str, bytes: u64) {
        self.bytes_transferred
            .get_or_create(&DirectionLabels {
                direction: direction.to_owned(),
            })
            .inc_by(bytes);
    }

    /// Counts one certificate rotation event.
    pub fn certificate_rotation(&self, outcome: &str) {
        self.hub_certificate_rotations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one call passed to (or refused from) another hub node.
    pub fn forwarded_call(&self, outcome: &str) {
        self.hub_forwarded_calls
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// This process's measurements.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Serves `GET /metrics`, `GET /livez` and `GET /readyz` on `listener`
/// until the task is dropped. Only these: calls to the process itself stay
/// behind mTLS.
pub async fn serve_metrics(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::routing::get;
    let router = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    METRICS.encode(),
                )
            }),
        )
        .route("/livez", get(|| async { "live\n" }))
        .route(
            "/readyz",
            get(|| async {
                if crate::probe::READINESS.is_ready() {
                    (http::StatusCode::OK, "ready\n")
                } else {
                    (http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        );
    axum::serve(listener, router).await
}

/// Binds `address` and serves metrics there in the background.
pub async fn spawn_metrics(address: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = serve_metrics(listener).await {
            tracing::warn!(%error, "the metrics endpoint stopped");
        }
    });
    tracing::info!(address = %local, "serving metrics");
    Ok(local)
}
