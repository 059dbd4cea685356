//! The control plane's home: its certificate and key, kept in the home or,
//! when [`HubHome::with_identity_files`] names them, elsewhere (a Kubernetes
//! Secret mounted read-only), and its store ([`HubHome::store`]: the
//! registry and credentials, with how long their writers wait for a lock).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tentacle_proto::Identity;
use tentacle_proto::identity::IdentityError;

/// Where the hub (and operators who share its home) keep the identity.
#[derive(Debug, Clone)]
pub struct HubHome {
    dir: PathBuf,
    /// The certificate and key when they are not the home's own files.
    identity_files: Option<(PathBuf, PathBuf)>,
    /// How long a writer of the store waits for another process's write.
    lock_timeout: Duration,
}

/// The variable that names the hub's home.
pub const HOME_VARIABLE: &str = "TENTACLE_HUB_HOME";
/// The variable older setups name it with; read when [`HOME_VARIABLE`] is
/// unset.
pub const OLDER_HOME_VARIABLE: &str = "TENTACLE_SIM_HOME";

/// The hub's home when `--home` is not given: `$TENTACLE_HUB_HOME`, else
/// `$TENTACLE_SIM_HOME`, else `~/.tentacle-hub`.
pub fn default_dir() -> PathBuf {
    [HOME_VARIABLE, OLDER_HOME_VARIABLE]
        .into_iter()
        .find_map(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".tentacle-hub")
        })
}

/// The home has no identity yet, or it cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("no certificate in {0}: run `tentacle-hub new-certificate` first")]
    NoCertificate(PathBuf),
    #[error(
        "no certificate at {0} (named by --certificate or TENTACLE_HUB_CERTIFICATE): check the path, or make one there with `tentacle-hub new-certificate --certificate PATH --key PATH`"
    )]
    NoCertificateFile(PathBuf),
    #[error(
        "a certificate already exists at {0}; pass --force to replace it (agents that trust the old thumbprint will then refuse this client)"
    )]
    Exists(PathBuf),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl HubHome {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            identity_files: None,
            lock_timeout: crate::store_file::DEFAULT_LOCK_TIMEOUT,
        }
    }

    /// This home with writers of its store waiting up to `timeout` for
    /// the lock another process holds.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The registry and credentials kept in this home.
    pub fn store(&self) -> crate::hub::HubStore {
        crate::hub::HubStore::in_dir(&self.dir).with_lock_timeout(self.lock_timeout)
    }

    /// This home with its identity read from (and made at) `certificate`
    /// and `key` instead of the home's own files.
    pub fn with_identity_files(mut self, certificate: PathBuf, key: PathBuf) -> Self {
        self.identity_files = Some((certificate, key));
        self
    }

    /// Whether the identity lives outside the home.
    pub fn has_identity_files(&self) -> bool {
        self.identity_files.is_some()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn certificate_path(&self) -> PathBuf {
        match &self.identity_files {
            Some((certificate, _)) => certificate.clone(),
            None => self.file("crt.pem"),
        }
    }

    pub fn key_path(&self) -> PathBuf {
        match &self.identity_files {
            Some((_, key)) => key.clone(),
            None => self.file("key.pem"),
        }
    }

    /// `tentacle-hub.<suffix>`, or `tentacle-sim.<suffix>` in a home made
    /// before the hub had a binary of its own, so such homes keep working.
    fn file(&self, suffix: &str) -> PathBuf {
        let older = self.dir.join(format!("tentacle-sim.{suffix}"));
        let current = self.dir.join(format!("tentacle-hub.{suffix}"));
        if !current.exists() && self.dir.join("tentacle-sim.crt.pem").is_file() {
            older
        } else {
            current
        }
    }

    /// The tooling bundle pushed to every agent before a deployment, when
    /// one is set (`tentacle-hub tooling set`).
    pub fn tooling_bundle(&self) -> Option<PathBuf> {
        ["tooling.tar.gz", "tooling.zip"]
            .into_iter()
            .map(|name| self.dir.join(name))
            .find(|p| p.is_file())
    }

    /// Makes `bundle` (a .tar.gz or .zip) the tooling bundle.
    pub fn set_tooling_bundle(&self, bundle: &Path) -> std::io::Result<PathBuf> {
        let name = if bundle.to_string_lossy().ends_with(".zip") {
            "tooling.zip"
        } else {
            "tooling.tar.gz"
        };
        for old in ["tooling.tar.gz", "tooling.zip"] {
            let _ = std::fs::remove_file(self.dir.join(old));
        }
        let target = self.dir.join(name);
        std::fs::create_dir_all(&self.dir)?;
        std::fs::copy(bundle, &target)?;
        Ok(target)
    }

    pub fn identity(&self) -> Result<Identity, HomeError> {
        let certificate = self.certificate_path();
        if !certificate.exists() {
            return Err(match self.identity_files {
                Some(_) => HomeError::NoCertificateFile(certificate),
                None => HomeError::NoCertificate(self.dir.clone()),
            });
        }
        Ok(Identity::load(&certificate, &self.key_path())?)
    }

    /// Makes and stores a new identity. Returns `None` when one exists and
    /// `if_blank` is set.
    pub fn new_identity(&self, force: bool, if_blank: bool) -> Result<Option<Identity>, HomeError> {
        if self.certificate_path().exists() {
            if if_blank {
                return Ok(None);
            }
            if !force {
                return Err(HomeError::Exists(self.certificate_path()));
            }
        }
        let identity = Identity::generate("Tentacle control plane")?;
        identity.save(&self.certificate_path(), &self.key_path())?;
        Ok(Some(identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_files_outside_the_home_are_used_and_named_when_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        let home = HubHome::new(dir.path().join("home"))
            .with_identity_files(secret.join("tls.crt"), secret.join("tls.key"));
        let missing = home.identity().expect_err("none yet");
        assert!(
            matches!(missing, HomeError::NoCertificateFile(_)),
            "{missing:?}"
        );
        assert!(missing.to_string().contains("tls.crt"), "{missing}");
        let made = home.new_identity(false, true).expect("make").expect("made");
        assert!(secret.join("tls.key").is_file());
        assert!(!dir.path().join("home").exists(), "the home is untouched");
        assert_eq!(
            home.identity().expect("load").thumbprint(),
            made.thumbprint()
        );
        let plain = HubHome::new(dir.path().join("home"));
        assert!(matches!(plain.identity(), Err(HomeError::NoCertificate(_))));
    }
}
