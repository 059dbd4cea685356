//! [`Hub::serve`]: the hub on a listener. One server takes polling agents'
//! tunnels, registrations, the fleet list and operators' forwarded calls,
//! all over pinned mTLS. While it serves, the registry file is reloaded (so
//! `tentacle-hub server trust add/remove` from another shell applies) and
//! rotated certificates are retired when their overlap ends; at shutdown
//! the tunnels are drained.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::http2::Http2Settings;
use tentacle_proto::incoming::accept_tls;
use tentacle_proto::v1::fleet_service_server::FleetServiceServer;
use tentacle_proto::v1::registration_service_server::RegistrationServiceServer;
use tentacle_proto::v1::tunnel_service_server::TunnelServiceServer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;

use crate::hub::{Hub, HubError};
use crate::{proxy, registration, tunnels};

impl Hub {
    /// Serves tunnels and operators' calls on `listener` until `shutdown`,
    /// then drains: every tunnel is told, gets up to the drain grace to
    /// finish its calls, and is closed.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), HubError> {
        // A hub that takes registrations lets unknown certificates finish the
        // handshake; every service then authorises each call itself.
        let open = self.store().is_some();
        let identity = tentacle_proto::tls::IdentityCell::new(self.identity().clone())?;
        let tls = if open {
            tentacle_proto::tls::server_config_open_to_registration(
                identity,
                self.tls_trust().clone(),
            )?
        } else {
            tentacle_proto::tls::server_config(identity, self.tls_trust().clone())?
        };
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        tokio::spawn(self.clone().maintain_registry(background.clone()));
        let mut accept = self.settings().accept.clone();
        accept.require_trusted_peers = !open;
        let incoming = accept_tls(
            listener,
            TlsAcceptor::from(tls),
            self.tls_trust().clone(),
            accept,
        );
        let hub = self.clone();
        let drained = CancellationToken::new();
        let signal = {
            let drained = drained.clone();
            async move {
                shutdown.await;
                // Before the drain, so an orchestrator stops routing here.
                tentacle_proto::probe::READINESS.set_not_ready();
                hub.drain().await;
                drained.cancel();
            }
        };
        let builder = Http2Settings::for_tunnels(&self.settings().heartbeat)
            .apply_to_server(Server::builder());
        let serving = tentacle_proto::telemetry::with_server_spans(builder, "hub")
            .add_routes(self.routes())
            .serve_with_incoming_shutdown(incoming, signal);
        // The listener is bound and accepting: ready for `/readyz`.
        tentacle_proto::probe::READINESS.set_ready();
        // tonic waits for every connection to close after the drain; a
        // connection that never does must not keep the hub alive forever.
        tokio::pin!(serving);
        let result = tokio::select! {
            result = &mut serving => result,
            () = async {
                drained.cancelled().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            } => {
                tracing::warn!("connections still open after the drain; stopping anyway");
                Ok(())
            }
        };
        Ok(result?)
    }

    /// The services the hub serves: tunnels, registration, the fleet list,
    /// and the forwarder for every other `tentacle.v1` call.
    pub(crate) fn routes(self: &Arc<Self>) -> Routes {
        let tunnels = TunnelServiceServer::new(tunnels::TunnelApi::new(self.clone()))
            .max_decoding_message_size(tentacle_proto::tunnel::MAX_FRAME);
        let registration = registration::RegistrationApi::new(self.clone());
        Routes::from(
            Routes::new(tunnels)
                .add_service(
                    RegistrationServiceServer::new(registration.clone())
                        .max_decoding_message_size(self.settings().max_message_bytes),
                )
                .add_service(
                    FleetServiceServer::new(registration)
                        .max_decoding_message_size(self.settings().max_message_bytes),
                )
                .into_axum_router()
                .fallback_service(proxy::Forwarder::new(self.clone())),
        )
    }

    /// Until `stop`: picks up edits other processes made to the registry
    /// file, and retires thumbprints whose rotation overlap has passed.
    async fn maintain_registry(self: Arc<Self>, stop: CancellationToken) {
        let mut interval = tokio::time::interval(
            self.settings()
                .registry_reload_interval
                .max(Duration::from_millis(50)),
        );
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = stop.cancelled() => return,
            }
            if !self.store().is_some_and(|s| s.is_watched())
                && let Err(error) = self.reload_agents().await
            {
                tracing::warn!(%error, "could not reload the agent registry file");
            }
            self.apply_approved_rotations().await;
            self.retire_rotated_certificates().await;
        }
    }
}
