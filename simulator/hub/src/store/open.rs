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
    /// The CA certificate (PEM) that signed etcd's server certificates;
    /// with it, the hub speaks TLS to etcd.
    #[arg(long, env = "TENTACLE_HUB_ETCD_CA", global = true, requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    /// The hub's client certificate for etcd (PEM).
    #[arg(
        long,
        env = "TENTACLE_HUB_ETCD_CERT",
        global = true,
        requires = "etcd_ca"
    )]
    pub etcd_cert: Option<PathBuf>,
    /// The key of `--etcd-cert` (PEM).
    #[arg(
        long,
        env = "TENTACLE_HUB_ETCD_KEY",
        global = true,
        requires = "etcd_ca"
    )]
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
    pub fn etcd_settings(&self) -> Option<EtcdSettings> {
        let StoreUrl::Etcd(endpoints) = &self.store else {
            return None;
        };
        let mut settings = EtcdSettings::new(endpoints.clone());
        settings.prefix = self.etcd_prefix.clone();
        if let (Some(ca), Some(certificate), Some(key)) =
            (&self.etcd_ca, &self.etcd_cert, &self.etcd_key)
        {
            settings.tls = Some(EtcdTls {
                ca: ca.clone(),
                certificate: certificate.clone(),
                key: key.clone(),
            });
        }
        Some(settings)
    }

    /// Opens the store: `home`'s files, or etcd.
    pub async fn open(&self, home: &HubHome) -> Result<OpenStore, OpenError> {
        match self.etcd_settings() {
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
