//! The agents a hub trusts: thumbprint, name, mode and address, kept in
//! `agents.toml` in the hub's home, and the rule that a registration never
//! takes a name from another agent ([`register_into`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tentacle_proto::Thumbprint;

use crate::store_file::{self, LockError, StoreLock, StoreLockGuard};

/// How the hub reaches an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentMode {
    Listening,
    Polling,
}

/// One trusted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedAgent {
    pub thumbprint: Thumbprint,
    /// For polling agents, the agent id they open tunnels as.
    pub name: String,
    pub mode: AgentMode,
    /// For listening agents, `https://HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environments: Vec<String>,
    /// During a certificate rotation, the thumbprint being retired; trusted
    /// until `retire_previous_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_thumbprint: Option<Thumbprint>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_previous_at: Option<u64>,
}

impl TrustedAgent {
    /// Whether `thumbprint` is this agent's, current or being retired.
    pub fn has_thumbprint(&self, thumbprint: &Thumbprint) -> bool {
        self.thumbprint == *thumbprint || self.previous_thumbprint.as_ref() == Some(thumbprint)
    }

    /// Every thumbprint trusted for this agent now.
    pub fn thumbprints(&self) -> impl Iterator<Item = Thumbprint> + '_ {
        std::iter::once(self.thumbprint).chain(self.previous_thumbprint)
    }

    /// Whether the agent has `role` and `environment` (empty matches all).
    pub fn matches(&self, role: &str, environment: &str) -> bool {
        (role.is_empty() || self.roles.iter().any(|r| r == role))
            && (environment.is_empty() || self.environments.iter().any(|e| e == environment))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    #[serde(default, rename = "agent")]
    agents: Vec<TrustedAgent>,
}

/// The trust file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TrustFileError {
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid agent trust file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// Adds `agent` to `agents`, replacing any entry with its thumbprint or
/// its name. For an operator's edit (`tentacle-hub server trust add`),
/// which may hand a name to a new certificate; registrations use
/// [`register_into`].
pub fn upsert_into(agents: &mut Vec<TrustedAgent>, agent: TrustedAgent) {
    agents.retain(|a| !a.has_thumbprint(&agent.thumbprint) && a.name != agent.name);
    agents.push(agent);
}

/// A registration asked for a name another agent holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the name `{name}` belongs to another agent (thumbprint {owner}); pick another name, or deregister that agent first (`tentacle deregister-from` on it, or `tentacle-hub server trust remove --thumbprint {owner}`)"
)]
pub struct NameTaken {
    pub name: String,
    pub owner: Thumbprint,
}

/// Adds `agent` to `agents` unless its name belongs to another agent, one
/// that shares none of its thumbprints. The same agent registering again
/// (or under a new name) replaces its entry.
pub fn register_into(agents: &mut Vec<TrustedAgent>, agent: TrustedAgent) -> Result<(), NameTaken> {
    let same_agent = |a: &TrustedAgent| agent.thumbprints().any(|t| a.has_thumbprint(&t));
    if let Some(owner) = agents
        .iter()
        .find(|a| a.name == agent.name && !same_agent(a))
    {
        return Err(NameTaken {
            name: agent.name,
            owner: owner.thumbprint,
        });
    }
    upsert_into(agents, agent);
    Ok(())
}

/// `agents.toml`. Every read-modify-write happens under this handle's
/// mutex (threads of this process) and the file's [`StoreLock`] (other
/// processes: the hub and `tentacle-hub server trust` from another shell),
/// and reads the file again under them, so concurrent writers neither
/// collide nor lose each other's updates.
///
/// The parsed file is cached under its inode, size and modification time: the
/// file grows with the fleet, and a hub rereads it every second, so it is
/// parsed again only when it changed. Under the lock the file's bytes are
/// compared instead: a freed inode can be reused by the next write within
/// one tick of the file system's clock, so the stamp alone could hide an
/// edit from the one reader that must never miss it.
///
/// Each entry's TOML is kept too: a registration rewrites the whole file,
/// and rendering 10,000 entries for every batch of registrations made the
/// writer the bottleneck of a fleet's arrival. Only changed entries are
/// rendered again.
#[derive(Debug, Clone)]
pub struct AgentTrustFile {
    path: PathBuf,
    file_lock: StoreLock,
    lock: std::sync::Arc<std::sync::Mutex<()>>,
    cache: std::sync::Arc<std::sync::Mutex<Cached>>,
    rendered: std::sync::Arc<std::sync::Mutex<Rendered>>,
}

/// Each stored entry and its `[[agent]]` table as last written.
type Rendered = std::collections::HashMap<Thumbprint, (TrustedAgent, String)>;

/// The last version of the file this handle read or wrote.
type Cached = Option<CachedFile>;

#[derive(Debug)]
struct CachedFile {
    stamp: Option<FileStamp>,
    text: String,
    agents: Vec<TrustedAgent>,
}

/// What identifies one version of the file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    // Every writer replaces the file through a rename, so each version is
    // a new inode, even if its size and time match the last one's.
    inode: u64,
    len: u64,
    modified: std::time::SystemTime,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path)?;
        Ok(Self {
            inode: metadata.ino(),
            len: metadata.len(),
            modified: metadata.modified()?,
        })
    }
}

impl AgentTrustFile {
    /// The file at `path`, locked for writes with the default timeout.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            file_lock: StoreLock::beside(&path, store_file::DEFAULT_LOCK_TIMEOUT),
            path,
            lock: std::sync::Arc::default(),
            cache: std::sync::Arc::default(),
            rendered: std::sync::Arc::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This file with writers waiting up to `timeout` for the lock.
    pub fn with_lock_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.file_lock = StoreLock::beside(&self.path, timeout);
        self
    }

    /// The lock every writer of this file takes.
    pub fn file_lock(&self) -> &StoreLock {
        &self.file_lock
    }

    /// This process's mutex, then the lock between processes.
    fn locked(&self) -> Result<(std::sync::MutexGuard<'_, ()>, StoreLockGuard), TrustFileError> {
        let threads = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let processes = self.file_lock.acquire()?;
        Ok((threads, processes))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every trusted agent; a missing file means none. Without the lock:
    /// every writer replaces the file through a rename, so a reader sees
    /// one whole version or the next.
    pub fn load(&self) -> Result<Vec<TrustedAgent>, TrustFileError> {
        let stamp = FileStamp::of(&self.path).ok();
        if let (Some(stamp), Some(cached)) = (stamp, self.cache().as_ref())
            && cached.stamp == Some(stamp)
        {
            return Ok(cached.agents.clone());
        }
        self.read(stamp)
    }

    /// [`Self::load`] for a writer holding the lock: the file is read
    /// whatever its stamp, and parsed only if its bytes changed.
    fn load_locked(&self) -> Result<Vec<TrustedAgent>, TrustFileError> {
        let stamp = FileStamp::of(&self.path).ok();
        self.read(stamp)
    }

    fn read(&self, stamp: Option<FileStamp>) -> Result<Vec<TrustedAgent>, TrustFileError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(TrustFileError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        if let Some(cached) = self.cache().as_mut()
            && cached.text == text
        {
            cached.stamp = stamp;
            return Ok(cached.agents.clone());
        }
        let file: TrustFile = toml::from_str(&text).map_err(|e| TrustFileError::Parse {
            path: self.path.clone(),
            message: e.message().to_owned(),
        })?;
        // The stamp taken before reading: a write racing this read changes
        // the file's stamp afterwards, so the next load parses again.
        *self.cache() = Some(CachedFile {
            stamp,
            text,
            agents: file.agents.clone(),
        });
        Ok(file.agents)
    }

    /// Replaces the file through a rename, under the lock.
    pub fn save(&self, agents: &[TrustedAgent]) -> Result<(), TrustFileError> {
        let _guard = self.locked()?;
        self.save_locked(agents)
    }

    fn save_locked(&self, agents: &[TrustedAgent]) -> Result<(), TrustFileError> {
        let err = |source| TrustFileError::Write {
            path: self.path.clone(),
            source,
        };
        let text = self
            .render(agents)
            .map_err(|e| err(std::io::Error::other(e)))?;
        store_file::replace(&self.path, text.as_bytes(), 0o644).map_err(err)?;
        *self.cache() = Some(CachedFile {
            stamp: FileStamp::of(&self.path).ok(),
            text,
            agents: agents.to_vec(),
        });
        Ok(())
    }

    /// The file's text for `agents`: one `[[agent]]` table each, rendered
    /// again only where the entry changed since the last write.
    fn render(&self, agents: &[TrustedAgent]) -> Result<String, toml::ser::Error> {
        let mut rendered = self
            .rendered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut last = std::mem::take(&mut *rendered);
        let mut now = Rendered::with_capacity(agents.len());
        let mut text = String::new();
        for agent in agents {
            let entry = match last.remove(&agent.thumbprint) {
                Some(entry) if entry.0 == *agent => entry,
                _ => (
                    agent.clone(),
                    format!("[[agent]]\n{}\n", toml::to_string(agent)?),
                ),
            };
            text.push_str(&entry.1);
            now.insert(agent.thumbprint, entry);
        }
        *rendered = now;
        Ok(text)
    }

    /// Adds an entry, replacing any with the same thumbprint or name.
    pub fn upsert(&self, agent: TrustedAgent) -> Result<(), TrustFileError> {
        self.upsert_all(vec![agent])
    }

    /// [`Self::upsert`] for several entries in order, with one write.
    pub fn upsert_all(&self, batch: Vec<TrustedAgent>) -> Result<(), TrustFileError> {
        self.update(|agents| {
            for agent in batch {
                upsert_into(agents, agent);
            }
        })
        .map(|_| ())
    }

    /// Applies `change` to the stored entries, read again under the lock,
    /// writing the file only if they changed. Returns what `change`
    /// returned and the entries as stored now.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<TrustedAgent>) -> T,
    ) -> Result<(T, Vec<TrustedAgent>), TrustFileError> {
        let _guard = self.locked()?;
        let mut agents = self.load_locked()?;
        let before = agents.clone();
        let outcome = change(&mut agents);
        if agents != before {
            self.save_locked(&agents)?;
        }
        Ok((outcome, agents))
    }

    /// Removes an entry; returns whether it was there.
    pub fn remove(&self, thumbprint: &Thumbprint) -> Result<bool, TrustFileError> {
        let (removed, _) = self.update(|agents| {
            let before = agents.len();
            agents.retain(|a| !a.has_thumbprint(thumbprint));
            agents.len() != before
        })?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests;
