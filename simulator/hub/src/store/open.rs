//! `--store` and its TLS flags, and opening the store they name: the
//! files in the hub's home, or etcd. Every registry verb and the server
//! take the same flags, so `tentacle-hub server trust add --store
//! etcd://…` changes what every node of that cluster trusts.

use std::path::PathBuf;
use std::sync::Arc;

use super::etcd::{EtcdSettings, EtcdStore, EtcdTls, OpenError};
use super::files::FileRegistry;
use super::{RegistryStore, StoreUrl};
use crate::home::HubHome;

/// Where the registry lives.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// The registry: `files` (agents.toml, credentials.toml and
    /// rotations.toml in the hub's home; the default) or
    /// etcd://HOST:PORT[,HOST:PORT...], shared by every hub node on it.
    #[arg(
        long,
        env = "TENTACLE_HUB_STORE",
        default_value = "files",
        global = true
    )]
    pub store: StoreUrl,
    /// Every etcd key of this hub cluster starts with this, so several
    /// clusters can share one etcd.
    #[arg(
        long,
        env = "TENTACLE_HUB_ETCD_PREFIX",
        default_value = "/tentacle/",
        global = true
    )]
    pub etcd_prefix: String,
    /// How long one request to etcd may take before etcd counts as not
    /// answering; it must cover an election after etcd loses its leader.
    #[arg(long, env = "TENTACLE_HUB_ETCD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    pub etcd_timeout: std::time::Duration,
    /// The CA certificate (PEM) that signed etcd's server certificates;
    /// with it, the hub speaks TLS to etcd.
    #[arg(long, env = "TENTACLE_HUB_ETCD_CA", global = true)]
    pub etcd_ca: Option<PathBuf>,
    /// The hub's client certificate for etcd (PEM).
    #[arg(long, env = "TENTACLE_HUB_ETCD_CERT", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// The key of `--etcd-cert` (PEM).
    #[arg(long, env = "TENTACLE_HUB_ETCD_KEY", global = true)]
    pub etcd_key: Option<PathBuf>,
}

/// An open store, and etcd's own handle when that is what it is.
#[derive(Debug, Clone)]
pub struct OpenStore {
    pub store: Arc<dyn RegistryStore>,
    pub etcd: Option<EtcdStore>,
}

impl StoreArgs {
    /// etcd's settings, if the store is etcd.
    pub fn etcd_settings(&self) -> Result<Option<EtcdSettings>, OpenError> {
        let StoreUrl::Etcd(endpoints) = &self.store else {
            return Ok(None);
        };
        let mut settings = EtcdSettings::new(endpoints.clone());
        settings.prefix = self.etcd_prefix.clone();
        settings.request_timeout = self.etcd_timeout;
        settings.tls = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => None,
            (Some(ca), Some(certificate), Some(key)) => Some(EtcdTls {
                ca: ca.clone(),
                certificate: certificate.clone(),
                key: key.clone(),
            }),
            (ca, certificate, key) => {
                let missing: Vec<&str> = [
                    (ca.is_none(), "--etcd-ca"),
                    (certificate.is_none(), "--etcd-cert"),
                    (key.is_none(), "--etcd-key"),
                ]
                .into_iter()
                .filter_map(|(missing, flag)| missing.then_some(flag))
                .collect();
                return Err(OpenError::IncompleteTls(missing.join(", ")));
            }
        };
        Ok(Some(settings))
    }

    /// Opens the store: `home`'s files, or etcd.
    pub async fn open(&self, home: &HubHome) -> Result<OpenStore, OpenError> {
        match self.etcd_settings()? {
            None => Ok(OpenStore {
                store: Arc::new(FileRegistry::new(home.store())),
                etcd: None,
            }),
            Some(settings) => {
                let etcd = EtcdStore::connect(&settings).await?;
                Ok(OpenStore {
                    store: Arc::new(etcd.clone()),
                    etcd: Some(etcd),
                })
            }
        }
    }
}
