//! Polling mode: the agent dials its hub(s), opens reverse tunnels, and
//! serves its usual routes over each tunnel's call frames.
//!
//! Servers pinned to one thumbprint are the nodes of one hub cluster and
//! share one [`cluster::Placement`]: the group's tunnels are on one node at
//! a time and move together. Each (group, tunnel index) pair is kept open
//! by its own task, which reconnects with exponential backoff and full
//! jitter so that thousands of agents dropped at once (a hub restart) come
//! back spread out over time.

pub mod cluster;
pub mod dialer;
pub mod proxy;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tentacle_proto::backoff::Backoff;
use tentacle_proto::dial::ListeningAddress;
use tentacle_proto::http2::Http2Settings;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::tls::IdentityCell;
use tentacle_proto::tunnel::{
    self, HeartbeatSettings, ServerSettings, SessionEnd, SessionSignals, TunnelServer,
};
use tentacle_proto::v1::tunnel_frame::Kind;
use tentacle_proto::v1::tunnel_service_client::TunnelServiceClient;
use tentacle_proto::v1::{TunnelFrame, TunnelHello};
use tentacle_proto::{Thumbprint, TrustStore};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Endpoint, Uri};

use crate::server::ServeSettings;
use cluster::{Placement, Seat};
pub use dialer::{Dialer, TcpDialer};
pub use proxy::ProxySettings;

/// One hub (or hub node) to poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEndpoint {
    pub address: ListeningAddress,
    pub thumbprint: Thumbprint,
}

/// How a polling agent behaves.
#[derive(Debug, Clone)]
pub struct PollingSettings {
    pub agent_id: String,
    /// Those sharing a thumbprint are nodes of one cluster ([`cluster`]).
    pub hubs: Vec<HubEndpoint>,
    /// Tunnels per hub (on one node of each cluster).
    pub tunnels: u32,
    pub heartbeat: HeartbeatSettings,
    /// The first reconnect waits a random time up to this; each failure
    /// doubles the window.
    pub reconnect_initial: Duration,
    /// The reconnect window never grows beyond this.
    pub reconnect_max: Duration,
    pub connect_timeout: Duration,
    /// How long calls inside a tunnel may run on after the agent is told to stop.
    pub shutdown_grace: Duration,
    /// Opens each tunnel's connection; [`TcpDialer`] unless a test or the
    /// simulator brings its own.
    pub dialer: Arc<dyn Dialer>,
    /// Whether the hub's pinned certificate must be within its dates.
    pub certificate_validity: tentacle_proto::trust::CertificateValidity,
}

/// Why one attempt to open a tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("could not reach the hub at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("could not open a tunnel to {address}: {reason}")]
    Open { address: String, reason: String },
    #[error(transparent)]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
}

/// Keeps every configured tunnel open until `stop` fires: `tunnels` to
/// each group of servers sharing a thumbprint, on one member of the group
/// at a time ([`cluster`]).
pub async fn run(
    settings: PollingSettings,
    identity: Arc<IdentityCell>,
    routes: Routes,
    serve: ServeSettings,
    stop: CancellationToken,
) {
    let mut tasks = Vec::new();
    for group in cluster::group_by_thumbprint(&settings.hubs) {
        let placement = Arc::new(Placement::new(group, &settings.agent_id));
        for index in 0..settings.tunnels.max(1) {
            tasks.push(tokio::spawn(maintain(
                settings.clone(),
                placement.clone(),
                index,
                identity.clone(),
                routes.clone(),
                serve.clone(),
                stop.clone(),
            )));
        }
    }
    futures::future::join_all(tasks).await;
}

async fn maintain(
    settings: PollingSettings,
    placement: Arc<Placement>,
    index: u32,
    identity: Arc<IdentityCell>,
    routes: Routes,
    serve: ServeSettings,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.reconnect_initial, settings.reconnect_max);
    // Set when the hub drained our tunnel: it is restarting, so retries
    // stay in the first window for a while instead of doubling away.
    let mut hub_restarting_since: Option<tokio::time::Instant> = None;
    while !stop.is_cancelled() {
        let opened = tokio::time::Instant::now();
        let signals = SessionSignals::default();
        let seat = placement.current();
        let hub = placement.endpoint(seat).clone();
        let outcome = open_and_serve(
            &settings,
            &hub,
            index,
            &identity,
            routes.clone(),
            &serve,
            Attempt {
                signals: signals.clone(),
                stop: &stop,
                placement: &placement,
                seat,
            },
        )
        .await;
        if signals.drained.is_cancelled() {
            hub_restarting_since = Some(tokio::time::Instant::now());
            backoff.reset();
        } else if outcome.is_ok() {
            hub_restarting_since = None;
        }
        match outcome {
            Ok(Served::Rotated) => {
                // A new certificate: open the replacement at once while the
                // old tunnel finishes its calls.
                tracing::info!(agent_id = %settings.agent_id, hub = %hub.address, tunnel = index, "reopening the tunnel with the new certificate");
                backoff.reset();
                continue;
            }
            Ok(Served::Moved) => {
                // The group left this node (it is draining, or another
                // tunnel found it unreachable before this one opened): the
                // next node is up as far as anyone knows, so only the first
                // window's jitter applies, not this tunnel's backoff.
                backoff.reset();
                let wait = backoff.first_window_delay(&mut rand::rng());
                tracing::debug!(agent_id = %settings.agent_id, ?wait, tunnel = index, "following the group to its next node after a jittered wait");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            Ok(Served::Ended(end)) => {
                tracing::info!(agent_id = %settings.agent_id, hub = %hub.address, tunnel = index, ?end, "tunnel closed")
            }
            Err(error) => {
                tracing::warn!(agent_id = %settings.agent_id, tunnel = index, %error, "tunnel attempt failed");
                if let Some(moved) = placement.failed(seat, &error.to_string()) {
                    moved.log(&settings.agent_id);
                }
            }
        }
        // A tunnel that stayed up a while resets the backoff.
        if opened.elapsed() > settings.reconnect_max {
            backoff.reset();
        }
        let wait = match hub_restarting_since {
            Some(since) if since.elapsed() < RESTART_RETRY_PERIOD => {
                backoff.first_window_delay(&mut rand::rng())
            }
            _ => backoff.next_delay(&mut rand::rng()),
        };
        tracing::debug!(agent_id = %settings.agent_id, ?wait, attempt = backoff.attempts(), tunnel = index, "reconnecting after a jittered wait");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// How one open tunnel ended, as the loop that keeps it needs to know.
#[derive(Debug)]
enum Served {
    /// The session ended (or never opened because the agent stopped).
    Ended(SessionEnd),
    /// The agent switched to a new certificate; the old tunnel finishes
    /// its calls in the background.
    Rotated,
    /// The tunnel's group moved to another node; the old tunnel finishes
    /// its calls in the background.
    Moved,
}

/// What one attempt is told from outside: when to stop, and where the
/// session reports the hub's drain notice.
struct Attempt<'a> {
    signals: SessionSignals,
    stop: &'a CancellationToken,
    /// The tunnel's group and the member this attempt dials: an open
    /// tunnel counts there, reports a drain there, and retires when the
    /// group moves away.
    placement: &'a Placement,
    seat: Seat,
}

async fn open_and_serve(
    settings: &PollingSettings,
    hub: &HubEndpoint,
    index: u32,
    identity_cell: &Arc<IdentityCell>,
    routes: Routes,
    serve: &ServeSettings,
    attempt: Attempt<'_>,
) -> Result<Served, TunnelError> {
    let Attempt {
        signals,
        stop,
        placement,
        seat,
    } = attempt;
    let address = hub.address.to_string();
    // Each attempt uses the identity current at that moment; a later change
    // replaces the tunnel.
    let mut identity_changes = identity_cell.subscribe();
    identity_changes.borrow_and_update();
    let identity = identity_cell.current();
    let hub_trust = TrustStore::new([hub.thumbprint]);
    hub_trust.set_certificate_validity(settings.certificate_validity);
    let tls_config = tentacle_proto::tls::client_config(&identity, hub_trust)?;
    let dialed = settings
        .dialer
        .dial(&hub.address, settings.connect_timeout)
        .await
        .map_err(|source| TunnelError::Connect {
            address: address.clone(),
            source,
        })?;
    let (tcp, remote_addr) = (dialed.stream, dialed.remote_addr);
    let server_name = rustls::pki_types::ServerName::try_from(hub.address.host().to_owned())
        .map_err(|e| TunnelError::Open {
            address: address.clone(),
            reason: e.to_string(),
        })?;
    let tls = tokio::time::timeout(
        settings.connect_timeout,
        tokio_rustls::TlsConnector::from(tls_config).connect(server_name, tcp),
    )
    .await
    .map_err(|_| TunnelError::Open {
        address: address.clone(),
        reason: "the TLS handshake timed out".into(),
    })?
    .map_err(|e| TunnelError::Open {
        address: address.clone(),
        reason: tentacle_proto::dial::describe_connect_error(&e),
    })?;
    let tls = tentacle_proto::dial::wait_until_accepted(tls, settings.connect_timeout)
        .await
        .map_err(|e| TunnelError::Open {
            address: address.clone(),
            reason: tentacle_proto::dial::describe_connect_error(&e),
        })?;

    // The outer HTTP/2 connection runs over exactly this one TLS stream.
    let mut once = Some(tls);
    let http2 = Http2Settings {
        // Clients have always advertised HTTP/2's own 16 KiB frames.
        max_frame_bytes: None,
        ..Http2Settings::for_tunnels(&settings.heartbeat)
    };
    let channel = http2
        .apply_to_endpoint(Endpoint::from_static("http://tentacle-hub"))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = once.take();
            async move {
                tls.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the tunnel's connection is gone"))
            }
        }))
        .await
        .map_err(|e| TunnelError::Open {
            address: address.clone(),
            reason: tentacle_proto::dial::describe_connect_error(&e),
        })?;

    let (outbound, frames) = tunnel::outbound();
    let hello = Kind::Hello(TunnelHello {
        agent_id: settings.agent_id.clone(),
        agent_version: crate::VERSION.to_owned(),
        tunnel_index: index,
        protocol: tunnel::PROTOCOL,
        max_concurrent_calls: serve.max_concurrent_streams,
    });
    outbound.ordered(hello).await;
    // A hub that accepts the stream but never answers must not hold this
    // tunnel slot (or the agent's shutdown) forever.
    let setup = async {
        let mut incoming = TunnelServiceClient::new(channel)
            .max_decoding_message_size(tunnel::MAX_FRAME)
            .open(frames)
            .await?
            .into_inner();
        loop {
            return match incoming.message().await? {
                // The hub's first heartbeat travels ahead of its ordered
                // frames and may overtake the welcome.
                Some(TunnelFrame {
                    kind: Some(Kind::Ping(nonce)),
                }) => {
                    outbound.urgent(Kind::Pong(nonce));
                    continue;
                }
                Some(TunnelFrame {
                    kind: Some(Kind::Pong(_)),
                }) => continue,
                Some(TunnelFrame {
                    kind: Some(Kind::Welcome(welcome)),
                }) if welcome.protocol == tunnel::PROTOCOL => Ok(incoming),
                Some(TunnelFrame {
                    kind: Some(Kind::Welcome(welcome)),
                }) => Err(tonic::Status::failed_precondition(format!(
                    "the hub speaks tunnel protocol {}, this agent speaks {}; upgrade the hub or the agent so that both match",
                    welcome.protocol,
                    tunnel::PROTOCOL
                ))),
                _ => Err(tonic::Status::unavailable(
                    "the hub did not welcome the tunnel",
                )),
            };
        }
    };
    let incoming = tokio::select! {
        result = tokio::time::timeout(settings.connect_timeout, setup) => match result {
            Ok(Ok(incoming)) => incoming,
            Ok(Err(status)) => {
                return Err(TunnelError::Open {
                    address,
                    reason: tentacle_proto::dial::describe_status(&status),
                });
            }
            Err(_) => {
                return Err(TunnelError::Open {
                    address,
                    reason: "the hub did not answer the tunnel in time".into(),
                });
            }
        },
        () = stop.cancelled() => return Ok(Served::Ended(SessionEnd::Stopped)),
    };
    tracing::info!(hub = %hub.address, tunnel = index, agent_id = %settings.agent_id, "tunnel open");

    let _open = TunnelGauge::open();
    let peer = PeerInfo {
        thumbprint: hub.thumbprint,
        remote_addr,
        channel_binding: None,
    };
    let server = TunnelServer::new(
        routes,
        outbound.clone(),
        Some(peer),
        ServerSettings {
            max_concurrent_calls: serve.max_concurrent_streams,
            side: "agent",
        },
    );
    let session_stop = CancellationToken::new();
    let mut session = tokio::spawn(tunnel::run_session(
        incoming,
        outbound.clone(),
        Arc::new(server.clone()),
        settings.heartbeat.clone(),
        signals.clone(),
        session_stop.clone(),
    ));
    // While this tunnel is open its node is reachable: another tunnel's
    // failed redial there does not move the group.
    let _counted = placement.opened(seat);
    let mut moves = placement.subscribe();
    // A move between choosing this node and subscribing is seen at once.
    moves.mark_changed();
    let mut drain_heard = false;
    let end = loop {
        tokio::select! {
            end = &mut session => break end,
            () = stop.cancelled() => {
                // The agent is stopping: refuse new calls in the tunnel, let
                // running ones finish while frames still flow, then close it.
                server.stop_accepting();
                server.wait_idle(settings.shutdown_grace).await;
                session_stop.cancel();
                break session.await;
            }
            _ = identity_changes.changed() => {
                retire_in_background(
                    Retiring { server, outbound, signals, session, session_stop, index },
                    Replacement::NewCertificate,
                    settings.shutdown_grace,
                );
                return Ok(Served::Rotated);
            }
            () = signals.drained.cancelled(), if !drain_heard => {
                // The node is going away: its group moves on now rather
                // than when the node closes this tunnel. A group of one
                // stays, and redials once the node has closed it.
                drain_heard = true;
                if let Some(moved) = placement.drained(seat) {
                    moved.log(&settings.agent_id);
                }
            }
            changed = moves.changed() => {
                // The sender lives in `placement`, which outlives this
                // call; an error would mean no further moves, so leave.
                if changed.is_err() || placement.has_moved_from(seat) {
                    retire_in_background(
                        Retiring { server, outbound, signals, session, session_stop, index },
                        Replacement::NewNode,
                        settings.shutdown_grace,
                    );
                    return Ok(Served::Moved);
                }
            }
        }
    };
    server.close();
    // The session task only ends by returning.
    Ok(Served::Ended(end.unwrap_or(SessionEnd::Stopped)))
}

/// A tunnel being replaced: by one with a new certificate, or by one on
/// another node of its cluster.
struct Retiring {
    server: TunnelServer<Routes>,
    outbound: tunnel::Outbound,
    signals: SessionSignals,
    session: tokio::task::JoinHandle<SessionEnd>,
    session_stop: CancellationToken,
    index: u32,
}

/// Why a tunnel is replaced.
#[derive(Debug, Clone, Copy)]
enum Replacement {
    /// The agent switched to a new certificate.
    NewCertificate,
    /// The tunnel's group moved to another node of its cluster.
    NewNode,
}

impl Replacement {
    /// What the hub is told in `drain`.
    fn reason(self) -> &'static str {
        match self {
            Self::NewCertificate => "the agent switched to a new certificate",
            Self::NewNode => "the agent is moving to another node of the hub cluster",
        }
    }
}

/// Tells the hub to stop picking the tunnel, serves until it confirms that
/// every call it picked for it has arrived (or `grace` passes), then lets
/// running ones finish and closes, all in the background.
fn retire_in_background(retiring: Retiring, why: Replacement, grace: Duration) {
    let Retiring {
        server,
        outbound,
        signals,
        mut session,
        session_stop,
        index,
    } = retiring;
    tokio::spawn(async move {
        let reason = why.reason();
        let drained = tunnel::drain_replaced(&server, &outbound, &signals, reason, grace, grace);
        let end = tokio::select! {
            drained = drained => {
                tracing::debug!(tunnel = index, ?drained, reason, "the replaced tunnel is drained");
                // A hub that acknowledged closes the tunnel once it has
                // read every answer; closing it from here could cut the
                // last ones off in flight.
                let by_hub = match drained {
                    tunnel::ReplacedDrain::Acknowledged => {
                        tokio::time::timeout(grace, &mut session).await.ok()
                    }
                    _ => None,
                };
                match by_hub {
                    Some(end) => end,
                    None => {
                        session_stop.cancel();
                        session.await
                    }
                }
            }
            end = &mut session => end,
        };
        server.close();
        let end = end.unwrap_or(SessionEnd::Stopped);
        match why {
            Replacement::NewCertificate => {
                tracing::info!(
                    tunnel = index,
                    ?end,
                    "the tunnel with the old certificate is closed"
                )
            }
            Replacement::NewNode => {
                tracing::info!(
                    tunnel = index,
                    ?end,
                    "the tunnel on the node left behind is closed"
                )
            }
        }
    });
}

/// Counts an open tunnel in the metrics while it lives.
struct TunnelGauge;

impl TunnelGauge {
    fn open() -> Self {
        tentacle_proto::metrics::METRICS.tunnels_open.inc();
        Self
    }
}

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        tentacle_proto::metrics::METRICS.tunnels_open.dec();
    }
}

/// How long after a hub drained its tunnel (a graceful restart) the
/// agent keeps retrying within the first reconnect window, so that a
/// restarted hub sees its whole fleet back within that window instead of
/// the stragglers of a doubled one. After this the usual doubling resumes,
/// for a hub that went away for good.
const RESTART_RETRY_PERIOD: Duration = Duration::from_secs(120);
