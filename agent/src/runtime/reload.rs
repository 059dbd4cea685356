//! Reloading a home's `tentacle.toml` and certificate while the agent runs,
//! so `configure --trust` and friends apply without a restart, and so does
//! a rotated certificate (`rotate-certificate` points the configuration at
//! the new files).
//!
//! Each tick only stats the files; a file is read and parsed again only
//! when its stamp (device, inode, length, modification time) changed. That
//! keeps a tick cheap when thousands of agents run in one process, and
//! [`Home::save`] and `Identity::save` replace files by renaming, so every
//! save gives a new inode even within one clock tick.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tentacle_proto::tls::IdentityCell;
use tentacle_proto::{Identity, TrustStore};
use tokio_util::sync::CancellationToken;

use super::AgentError;
use crate::config::{AgentConfig, Home};

/// Which version of a file was last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// Never looked at: the next poll reads the file whatever it finds.
    Unknown,
    /// Missing or not readable; reading it again would fail the same way
    /// until it changes.
    Absent,
    Stamp {
        device: u64,
        inode: u64,
        len: u64,
        modified: Option<SystemTime>,
    },
}

impl Version {
    fn of(path: &Path) -> Self {
        match std::fs::metadata(path) {
            Ok(meta) => Self::Stamp {
                device: meta.dev(),
                inode: meta.ino(),
                len: meta.len(),
                modified: meta.modified().ok(),
            },
            Err(_) => Self::Absent,
        }
    }
}

/// What one poll read again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Reloaded {
    pub config: bool,
    pub identity: bool,
}

/// The configuration and certificate files of one home, and the versions
/// of them the running agent uses.
#[derive(Debug)]
pub(crate) struct FileSource {
    home: Home,
    config: Version,
    certificate: PathBuf,
    key: PathBuf,
    identity: (Version, Version),
}

impl FileSource {
    /// Reads the configuration (unless `given`, which then counts as not yet
    /// read from the file) and the identity it names. Each stamp is taken
    /// before its file is read, so a change in between is read again on the
    /// next poll rather than missed.
    pub(crate) fn open(
        home: Home,
        given: Option<AgentConfig>,
    ) -> Result<(Self, AgentConfig, Identity), AgentError> {
        let (version, config) = match given {
            Some(config) => (Version::Unknown, config),
            None => (Version::of(&home.config_path()), home.load()?),
        };
        let (certificate, key) = certificate_paths(&home, &config);
        let identity_version = (Version::of(&certificate), Version::of(&key));
        let identity = Identity::load(&certificate, &key)?;
        let source = Self {
            home,
            config: version,
            certificate,
            key,
            identity: identity_version,
        };
        Ok((source, config, identity))
    }

    /// Applies whatever changed on disk since the last poll.
    pub(crate) fn poll(&mut self, trust: &TrustStore, identity: &IdentityCell) -> Reloaded {
        let mut reloaded = Reloaded::default();
        let version = Version::of(&self.home.config_path());
        if version != self.config {
            self.config = version;
            reloaded.config = true;
            match self.home.load() {
                Ok(config) => {
                    let before = trust.snapshot();
                    trust.replace(config.trust.thumbprints.iter().copied());
                    trust.set_certificate_validity(config.trust.certificate_validity);
                    let after = trust.snapshot();
                    if before != after {
                        tracing::info!(trusted = after.len(), "trust list changed");
                    }
                    (self.certificate, self.key) = certificate_paths(&self.home, &config);
                }
                Err(error) => {
                    tracing::warn!(%error, "could not reload the configuration; keeping the current trust list and certificate");
                    return reloaded;
                }
            }
        }
        let versions = (Version::of(&self.certificate), Version::of(&self.key));
        if versions != self.identity {
            self.identity = versions;
            reloaded.identity = true;
            let replaced = Identity::load(&self.certificate, &self.key)
                .map_err(|e| e.to_string())
                .and_then(|next| identity.replace(next).map_err(|e| e.to_string()));
            match replaced {
                Ok(true) => {
                    tracing::info!(thumbprint = %identity.thumbprint(), "switched to a new certificate")
                }
                Ok(false) => {}
                Err(message) => {
                    tracing::warn!(%message, "could not load the configured certificate; keeping the current one")
                }
            }
        }
        reloaded
    }
}

fn certificate_paths(home: &Home, config: &AgentConfig) -> (PathBuf, PathBuf) {
    (
        home.resolve(&config.certificate.certificate),
        home.resolve(&config.certificate.key),
    )
}

/// Polls `source` every `every` until `stop`.
pub(crate) async fn run(
    mut source: FileSource,
    trust: Arc<TrustStore>,
    identity: Arc<IdentityCell>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(every.max(Duration::from_millis(50)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.cancelled() => return,
        }
        source.poll(&trust, &identity);
    }
}

#[cfg(test)]
mod tests {
    use tentacle_proto::Thumbprint;

    use super::*;

    fn home_with(dir: &Path, trusted: &[Thumbprint]) -> (Home, AgentConfig, Identity) {
        let home = Home::new(dir);
        let mut config = AgentConfig::default();
        config.trust.thumbprints = trusted.to_vec();
        home.save(&config).expect("save");
        let identity = Identity::generate("reload test").expect("identity");
        let (certificate, key) = certificate_paths(&home, &config);
        identity.save(&certificate, &key).expect("save identity");
        (home, config, identity)
    }

    fn thumbprint(name: &str) -> Thumbprint {
        Thumbprint::of_der(name.as_bytes())
    }

    #[test]
    fn unchanged_files_are_not_read_again_and_changed_ones_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (home, mut config, first) = home_with(dir.path(), &[thumbprint("a")]);
        let (mut source, loaded, identity) = FileSource::open(home.clone(), None).expect("open");
        assert_eq!(loaded, config);
        assert_eq!(identity.thumbprint(), first.thumbprint());
        let trust = TrustStore::new(loaded.trust.thumbprints.iter().copied());
        let cell = IdentityCell::new(identity).expect("cell");

        for _ in 0..3 {
            assert_eq!(
                source.poll(&trust, &cell),
                Reloaded::default(),
                "nothing changed, so nothing is parsed"
            );
        }

        config.trust.thumbprints.push(thumbprint("b"));
        home.save(&config).expect("save");
        assert_eq!(
            source.poll(&trust, &cell),
            Reloaded {
                config: true,
                identity: false
            }
        );
        assert!(trust.contains(&thumbprint("b")), "the new trust applies");
        assert_eq!(source.poll(&trust, &cell), Reloaded::default());

        let second = Identity::generate("rotated").expect("identity");
        let (certificate, key) = certificate_paths(&home, &config);
        second.save(&certificate, &key).expect("save identity");
        assert_eq!(
            source.poll(&trust, &cell),
            Reloaded {
                config: false,
                identity: true
            }
        );
        assert_eq!(cell.thumbprint(), second.thumbprint());
        assert_eq!(source.poll(&trust, &cell), Reloaded::default());
    }

    #[test]
    fn a_broken_file_is_reported_once_and_read_again_when_fixed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (home, mut config, _) = home_with(dir.path(), &[thumbprint("a")]);
        let (mut source, _, identity) = FileSource::open(home.clone(), None).expect("open");
        let trust = TrustStore::new([thumbprint("a")]);
        let cell = IdentityCell::new(identity).expect("cell");

        std::fs::write(home.config_path(), "[listen]\nprot = 1\n").expect("break");
        assert!(source.poll(&trust, &cell).config);
        assert!(trust.contains(&thumbprint("a")), "the old trust stays");
        assert!(!source.poll(&trust, &cell).config, "not parsed again");

        config.trust.thumbprints = vec![thumbprint("c")];
        home.save(&config).expect("fix");
        assert!(source.poll(&trust, &cell).config);
        assert!(trust.contains(&thumbprint("c")) && !trust.contains(&thumbprint("a")));
    }

    #[test]
    fn a_given_configuration_is_checked_against_the_file_on_the_first_poll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (home, config, _) = home_with(dir.path(), &[thumbprint("on disk")]);
        let mut given = config.clone();
        given.trust.thumbprints = vec![thumbprint("given")];
        let (mut source, loaded, identity) =
            FileSource::open(home, Some(given.clone())).expect("open");
        assert_eq!(loaded, given);
        let trust = TrustStore::new(loaded.trust.thumbprints.iter().copied());
        let cell = IdentityCell::new(identity).expect("cell");
        assert!(source.poll(&trust, &cell).config);
        assert!(trust.contains(&thumbprint("on disk")));
        assert!(!source.poll(&trust, &cell).config);
    }
}
