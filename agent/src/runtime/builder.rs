//! Assembling an [`Agent`] from its parts.
//!
//! The real agent takes every default. The fleet simulator's virtual
//! tentacles swap only what cannot be real for ten thousand agents in one
//! process: how scripts execute, where uploads go, how tunnels and
//! accepted connections reach the network, where the configuration comes
//! from, and what the disk says about free space. Everything else (the
//! script table and its cleaner, files, packages, routes, serve settings,
//! health, shutdown, polling) is the agent's own code in [`Agent::serve`].

use std::path::PathBuf;
use std::sync::Arc;

use tentacle_proto::tls::IdentityCell;
use tentacle_proto::{Identity, TrustStore};

use super::reload::FileSource;
use super::{Agent, AgentError, StreamLayer};
use crate::config::{AgentConfig, Home};
use crate::files::{Files, FreeSpace, UploadSink};
use crate::packages::Packages;
use crate::polling::Dialer;
use crate::scripts::process::ProcessExecutor;
use crate::scripts::{Executor, Scripts};

/// Where an agent's configuration and identity come from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// `tentacle.toml` and the certificate files in the home, reloaded
    /// while the agent runs whenever they change. The real agent's source.
    Home,
    /// As [`ConfigSource::Home`], starting from a configuration the caller
    /// already read; the file is compared with it on the first reload.
    HomeStartingWith(AgentConfig),
    /// Fixed for the agent's life; nothing is read from disk and nothing is
    /// polled. Relative paths still resolve against the home.
    InMemory {
        config: AgentConfig,
        identity: Identity,
    },
}

/// The parts of an agent that may be swapped; see [`Agent::builder`].
#[derive(Debug)]
pub struct AgentBuilder {
    home: Home,
    source: ConfigSource,
    executor: Option<Arc<dyn Executor>>,
    upload_sink: UploadSink,
    dialer: Option<Arc<dyn Dialer>>,
    stream_layer: StreamLayer,
    free_space: Option<Arc<dyn FreeSpace>>,
    script_host: Option<PathBuf>,
}

impl AgentBuilder {
    pub(super) fn new(home: Home) -> Self {
        Self {
            home,
            source: ConfigSource::Home,
            executor: None,
            upload_sink: UploadSink::Store,
            dialer: None,
            stream_layer: StreamLayer::identity(),
            free_space: None,
            script_host: None,
        }
    }

    /// Where the configuration and identity come from; by default the
    /// home's files.
    pub fn config_source(mut self, source: ConfigSource) -> Self {
        self.source = source;
        self
    }

    /// Runs scripts; by default real processes with the configured limits.
    pub fn executor(mut self, executor: Arc<dyn Executor>) -> Self {
        self.executor = Some(executor);
        self
    }

    /// Where verified file uploads go; by default into place.
    pub fn upload_sink(mut self, sink: UploadSink) -> Self {
        self.upload_sink = sink;
        self
    }

    /// Opens polling tunnels' connections; by default TCP through the
    /// configured proxy.
    pub fn dialer(mut self, dialer: Arc<dyn Dialer>) -> Self {
        self.dialer = Some(dialer);
        self
    }

    /// Wraps every accepted listening connection; by default none.
    pub fn stream_layer(mut self, layer: StreamLayer) -> Self {
        self.stream_layer = layer;
        self
    }

    /// Runs the default executor's scripts detached, under `program
    /// script-host` (the `tentacle` binary itself), so they outlive the
    /// agent process and the next one re-attaches to them. Without it they
    /// are the agent's children and end with it.
    pub fn script_host(mut self, program: PathBuf) -> Self {
        self.script_host = Some(program);
        self
    }

    /// Answers the free-space checks of file and package uploads; by
    /// default the file system.
    pub fn free_space(mut self, probe: Arc<dyn FreeSpace>) -> Self {
        self.free_space = Some(probe);
        self
    }

    /// Reads the configuration and identity, loads the workspaces left by an
    /// earlier run, and prepares the files root and package cache.
    pub fn build(self) -> Result<Agent, AgentError> {
        let home = self.home;
        let (config, identity, reload) = match self.source {
            ConfigSource::Home => {
                let (source, config, identity) = FileSource::open(home.clone(), None)?;
                (config, identity, Some(source))
            }
            ConfigSource::HomeStartingWith(config) => {
                let (source, config, identity) = FileSource::open(home.clone(), Some(config))?;
                (config, identity, Some(source))
            }
            ConfigSource::InMemory { config, identity } => (config, identity, None),
        };
        let identity = IdentityCell::new(identity)?;
        let trust = TrustStore::new(config.trust.thumbprints.iter().copied());
        trust.set_certificate_validity(config.trust.certificate_validity);
        let executor = self.executor.unwrap_or_else(|| {
            let mut settings = config.process_settings();
            settings.host_program = self.script_host;
            Arc::new(ProcessExecutor::new(settings))
        });

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

        let mut file_settings = config.file_settings(&home);
        file_settings.upload_sink = self.upload_sink;
        let mut package_settings = config.package_settings(&home);
        if let Some(probe) = self.free_space {
            file_settings.free_space = probe.clone();
            package_settings.free_space = probe;
        }
        let files_root = file_settings.root.clone();
        let files = Files::new(file_settings).map_err(|source| AgentError::Storage {
            what: "the files root",
            path: files_root,
            source,
        })?;
        let cache_dir = package_settings.cache_dir.clone();
        let packages = Packages::new(package_settings).map_err(|source| AgentError::Storage {
            what: "the package cache",
            path: cache_dir,
            source,
        })?;
        Ok(Agent {
            config,
            identity,
            trust,
            scripts,
            files,
            packages,
            reload,
            dialer: self.dialer,
            stream_layer: self.stream_layer,
        })
    }
}
