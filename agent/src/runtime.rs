//! One agent instance at run time: its configuration, identity, trust, script
//! table and background tasks, and the listening server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::incoming::{AcceptSettings, accept_tls};
use tentacle_proto::tls::IdentityCell;
use tentacle_proto::{Identity, TrustStore};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigError, Home};
use crate::files::Files;
use crate::grpc::{CapabilitiesApi, FileApi, HealthSource, PackageApi, ScriptApi};
use crate::packages::Packages;
use crate::scripts::process::ProcessExecutor;
use crate::scripts::{Executor, Scripts};
use crate::server::{self, ServeSettings};

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
    #[error("{0}")]
    Polling(String),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A loaded agent, ready to serve.
#[derive(Debug)]
pub struct Agent {
    home: Home,
    config: AgentConfig,
    identity: Arc<IdentityCell>,
    trust: Arc<TrustStore>,
    scripts: Arc<Scripts>,
    files: Files,
    packages: Packages,
}

impl Agent {
    /// Loads the instance at `home` with the real process executor.
    pub fn load(home: Home) -> Result<Self, AgentError> {
        let config = home.load()?;
        let executor = Arc::new(ProcessExecutor::new(config.process_settings()));
        Self::with_executor(home, config, executor)
    }

    /// Loads the instance with any script executor.
    pub fn with_executor(
        home: Home,
        config: AgentConfig,
        executor: Arc<dyn Executor>,
    ) -> Result<Self, AgentError> {
        let identity = IdentityCell::new(Identity::load(
            &home.resolve(&config.certificate.certificate),
            &home.resolve(&config.certificate.key),
        )?)?;
        let trust = TrustStore::new(config.trust.thumbprints.iter().copied());
        let script_settings = config.script_settings(&home);
        let work_root = script_settings.work_root.clone();
        let scripts = Scripts::new(script_settings, executor);
        let recovered = scripts.recover().map_err(|source| AgentError::Storage {
            what: "the script work directory",
            path: work_root,
            source,
        })?;
        if recovered > 0 {
            tracing::info!(recovered, "loaded workspaces left by an earlier run");
        }
        let file_settings = config.file_settings(&home);
        let files = Files::new(file_settings.clone()).map_err(|source| AgentError::Storage {
            what: "the files root",
            path: file_settings.root,
            source,
        })?;
        let package_settings = config.package_settings(&home);
        let packages =
            Packages::new(package_settings.clone()).map_err(|source| AgentError::Storage {
                what: "the package cache",
                path: package_settings.cache_dir,
                source,
            })?;
        Ok(Self {
            home,
            config,
            identity,
            trust,
            scripts,
            files,
            packages,
        })
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
            ..ServeSettings::default()
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
    pub async fn serve(
        self,
        listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AgentError> {
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        tokio::spawn(reload_config(
            self.home.clone(),
            self.trust.clone(),
            self.identity.clone(),
            self.config.server.trust_reload_interval,
            background.clone(),
        ));
        tokio::spawn(self.scripts.clone().run_cleaner(background.clone()));

        let settings = self.serve_settings();
        let services = server::Services {
            scripts: ScriptApi::new(self.scripts.clone()),
            files: FileApi::new(self.files.clone()),
            packages: PackageApi::new(self.packages.clone()),
            capabilities: CapabilitiesApi::with_health(HealthSource {
                files_root: self.files.root().to_owned(),
                scripts: self.scripts.clone(),
                started: std::time::Instant::now(),
            }),
        };
        let (routes, health) = server::routes(services, &settings).await?;

        let polling_stop = CancellationToken::new();
        let polling = if self.config.polling.enabled {
            let polling_settings = self
                .config
                .polling_settings()
                .map_err(AgentError::Polling)?;
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
                tracing::info!("shutting down: no new connections; letting running calls finish");
                health
                    .set_not_serving::<tentacle_proto::v1::script_service_server::ScriptServiceServer<ScriptApi>>()
                    .await;
                stopping.cancel();
            }
        };
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
        let incoming = accept_tls(
            listener,
            TlsAcceptor::from(tls),
            self.trust.clone(),
            AcceptSettings {
                handshake_timeout: self.config.server.handshake_timeout,
                ..AcceptSettings::default()
            },
        );
        tracing::info!(
            address = %local.map_or_else(|| "unknown".to_owned(), |a| a.to_string()),
            thumbprint = %self.identity.thumbprint(),
            trusted = self.trust.snapshot().len(),
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

    /// Stops scripts that are still running so none outlives the agent
    /// unobserved; they complete as "agent restarted".
    async fn stop_scripts(&self) {
        let active = self.scripts.active();
        if active == 0 {
            return;
        }
        tracing::warn!(active, "stopping scripts that are still running");
        self.scripts.stop_all();
        let deadline = self.config.scripts.kill_grace + Duration::from_secs(5);
        let _ = tokio::time::timeout(deadline, async {
            while self.scripts.active() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
}

/// Re-reads the configuration, so `configure --trust` and friends apply to a
/// running agent without a restart, and so does a rotated certificate
/// (`rotate-certificate` points the configuration at the new files).
async fn reload_config(
    home: Home,
    trust: Arc<TrustStore>,
    identity: Arc<IdentityCell>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(every.max(Duration::from_millis(50)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.cancelled() => return,
        }
        match home.load() {
            Ok(config) => {
                last_error = None;
                let before = trust.snapshot();
                trust.replace(config.trust.thumbprints);
                let after = trust.snapshot();
                if before != after {
                    tracing::info!(trusted = after.len(), "trust list changed");
                }
                let next = Identity::load(
                    &home.resolve(&config.certificate.certificate),
                    &home.resolve(&config.certificate.key),
                );
                match next
                    .map_err(|e| e.to_string())
                    .and_then(|i| identity.replace(i).map_err(|e| e.to_string()))
                {
                    Ok(true) => {
                        tracing::info!(thumbprint = %identity.thumbprint(), "switched to a new certificate")
                    }
                    Ok(false) => {}
                    Err(message) => {
                        if last_error.as_ref() != Some(&message) {
                            tracing::warn!(%message, "could not load the configured certificate; keeping the current one");
                            last_error = Some(message);
                        }
                    }
                }
            }
            Err(error) => {
                let message = error.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(%message, "could not reload the configuration; keeping the current trust list");
                    last_error = Some(message);
                }
            }
        }
    }
}
