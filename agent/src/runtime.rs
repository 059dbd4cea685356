//! One agent instance at run time: its configuration, identity, trust, script
//! table and background tasks, and the listening server.
//!
//! [`Agent::builder`] assembles an agent ([`AgentBuilder`], in `builder`);
//! two of the parts it may swap are seams of their own here: where the
//! configuration comes from and how it is reloaded ([`ConfigSource`], in
//! `reload`), and the layer over accepted connections ([`StreamLayer`], in
//! `stream`). [`Agent::serve`] runs everything else the same way for every
//! agent.

mod builder;
mod reload;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::incoming::{AcceptSettings, accept_tls};
use tentacle_proto::tls::IdentityCell;
use tentacle_proto::{Identity, TrustStore};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError, Home, PollingConfigError};
use crate::files::Files;
use crate::grpc::{CapabilitiesApi, FileApi, HealthSource, PackageApi, ScriptApi};
use crate::packages::Packages;
use crate::polling::Dialer;
use crate::scripts::{Executor, Scripts};
use crate::server::{self, ServeSettings};

pub use builder::{AgentBuilder, ConfigSource};
pub use stream::{Accepted, BoxedIo, StreamLayer};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] tentacle_proto::identity::IdentityError),
    #[error(transparent)]
    Tls(#[from] tentacle_proto::tls::TlsConfigError),
    #[error(transparent)]
    Routes(#[from] server::RoutesError),
    #[error("could not prepare {what} at {path}: {source}")]
    Storage {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "could not listen on {address}: {source}; is another agent using the port? change it with `tentacle configure --port`"
    )]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Polling(#[from] PollingConfigError),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A loaded agent, ready to serve.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    identity: Arc<IdentityCell>,
    trust: Arc<TrustStore>,
    scripts: Arc<Scripts>,
    files: Files,
    packages: Packages,
    /// The files to reload while serving; none for an in-memory source.
    reload: Option<reload::FileSource>,
    /// Replaces the configured dialer for polling, if set.
    dialer: Option<Arc<dyn Dialer>>,
    stream_layer: StreamLayer,
}

impl Agent {
    /// Starts assembling the instance at `home`; every part not swapped is
    /// the real agent's.
    pub fn builder(home: Home) -> AgentBuilder {
        AgentBuilder::new(home)
    }

    /// Loads the real agent at `home`: its files, its process executor.
    pub fn load(home: Home) -> Result<Self, AgentError> {
        Self::builder(home).build()
    }

    /// Loads the instance with any script executor, starting from `config`
    /// (already read from the home, whose files are still reloaded).
    pub fn with_executor(
        home: Home,
        config: AgentConfig,
        executor: Arc<dyn Executor>,
    ) -> Result<Self, AgentError> {
        Self::builder(home)
            .config_source(ConfigSource::HomeStartingWith(config))
            .executor(executor)
            .build()
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The identity in use now (it changes when the certificate is rotated).
    pub fn identity(&self) -> Identity {
        self.identity.current()
    }

    pub fn trust(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    pub fn scripts(&self) -> &Arc<Scripts> {
        &self.scripts
    }

    fn serve_settings(&self) -> ServeSettings {
        ServeSettings {
            max_message_bytes: self.config.server.max_message_bytes,
            max_concurrent_streams: self.config.server.max_concurrent_streams,
            http2: self.config.server.http2,
        }
    }

    /// Binds the configured listening address.
    pub async fn bind(&self) -> Result<TcpListener, AgentError> {
        let address = SocketAddr::new(self.config.listen.address, self.config.listen.port);
        TcpListener::bind(address)
            .await
            .map_err(|source| AgentError::Bind { address, source })
    }

    /// Serves until `shutdown` completes: in listening mode on `listener`
    /// (when given) and in polling mode when the configuration enables it.
    /// After `shutdown`, running calls get the configured grace period.
    ///
    /// Dropping the future (aborting its task) stops the background tasks
    /// and tunnels at once, without the grace period: a crash.
    pub async fn serve(
        mut self,
        listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AgentError> {
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        if let Some(source) = self.reload.take() {
            tokio::spawn(reload::run(
                source,
                self.trust.clone(),
                self.identity.clone(),
                self.config.server.trust_reload_interval,
                background.clone(),
            ));
        }
        tokio::spawn(self.scripts.clone().run_cleaner(background.clone()));

        let settings = self.serve_settings();
        let services = server::Services {
            scripts: ScriptApi::new(self.scripts.clone()),
            files: FileApi::new(self.files.clone()),
            packages: PackageApi::new(self.packages.clone()),
            capabilities: CapabilitiesApi::with_health(HealthSource {
                files_root: self.files.root().to_owned(),
                free_space: self.files.free_space().clone(),
                scripts: self.scripts.clone(),
                started: std::time::Instant::now(),
            }),
        };
        let (routes, health) = server::routes(services, &settings).await?;

        let polling_stop = CancellationToken::new();
        let _stop_polling = polling_stop.clone().drop_guard();
        let polling = if self.config.polling.enabled {
            let mut polling_settings = self.config.polling_settings()?;
            if let Some(dialer) = &self.dialer {
                polling_settings.dialer = dialer.clone();
            }
            tracing::info!(
                agent_id = %polling_settings.agent_id,
                hubs = polling_settings.hubs.len(),
                tunnels = polling_settings.tunnels,
                "polling"
            );
            Some(tokio::spawn(crate::polling::run(
                polling_settings,
                self.identity.clone(),
                routes.clone(),
                settings.clone(),
                polling_stop.clone(),
            )))
        } else {
            None
        };

        let stopping = CancellationToken::new();
        let signal = {
            let stopping = stopping.clone();
            async move {
                shutdown.await;
                // First, so an orchestrator stops routing to this agent.
                tentacle_proto::probe::READINESS.set_not_ready();
                tracing::info!("shutting down: no new connections; letting running calls finish");
                health
                    .set_not_serving::<tentacle_proto::v1::script_service_server::ScriptServiceServer<ScriptApi>>()
                    .await;
                stopping.cancel();
            }
        };
        // The listener is bound and polling has started: ready for `/readyz`.
        tentacle_proto::probe::READINESS.set_ready();
        let result = match listener {
            Some(listener) => {
                self.serve_listening(listener, routes, signal, &stopping, &settings)
                    .await
            }
            None => {
                signal.await;
                Ok(())
            }
        };
        polling_stop.cancel();
        if let Some(polling) = polling {
            let _ = polling.await;
        }
        self.stop_scripts().await;
        result
    }

    async fn serve_listening(
        &self,
        listener: TcpListener,
        routes: tonic::service::Routes,
        signal: impl Future<Output = ()>,
        stopping: &CancellationToken,
        settings: &ServeSettings,
    ) -> Result<(), AgentError> {
        let tls = tentacle_proto::tls::server_config(self.identity.clone(), self.trust.clone())?;
        let local = listener.local_addr().ok();
        let layer = self.stream_layer.clone();
        let incoming = accept_tls(
            listener,
            TlsAcceptor::from(tls),
            self.trust.clone(),
            AcceptSettings {
                handshake_timeout: self.config.server.handshake_timeout,
                max_handshakes: self.config.server.max_handshakes,
                evict_handshakes_after: self.config.server.evict_handshakes_after,
                max_connections: self.config.server.max_connections,
                ..AcceptSettings::default()
            },
        )
        .map(move |accepted| accepted.map(|stream| layer.wrap(stream)));
        tracing::info!(
            address = %local.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            thumbprint = %self.identity.thumbprint(),
            trusted = self.trust.len(),
            "listening"
        );
        let grace = self.config.server.shutdown_grace;
        let serving = server::serve(routes, incoming, signal, settings);
        tokio::pin!(serving);
        tokio::select! {
            result = &mut serving => result.map_err(AgentError::from),
            () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "calls still running after the shutdown grace period; closing them");
                Ok(())
            }
        }
    }

    /// Stops scripts that would not outlive the agent (pending ones, and
    /// running ones the executor does not detach; they complete as
    /// canceled) and waits for them. Detached running scripts keep running;
    /// the next agent process re-attaches to them.
    async fn stop_scripts(&self) {
        let stopped = self.scripts.stop_for_shutdown();
        if stopped == 0 {
            return;
        }
        tracing::warn!(stopped, "stopping scripts that are still running");
        let deadline = self.config.scripts.kill_grace + Duration::from_secs(5);
        let _ = tokio::time::timeout(deadline, async {
            while self.scripts.active_attached() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests;
