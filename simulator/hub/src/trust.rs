//! The agents a hub trusts: thumbprint, name, mode and address, kept in
//! `agents.toml` in the hub's home, and the rule that a registration never
//! takes a name from another agent ([`register_into`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tentacle_proto::Thumbprint;

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

/// `agents.toml`. A lock keeps this process's read-modify-write cycles
/// apart, so concurrent registrations neither collide nor lose updates.
///
/// The parsed file is cached under its inode, size and modification time: the
/// file grows with the fleet, and a hub rereads it every second and before
/// every registration, so it is parsed again only when it changed.
///
/// Each entry's TOML is kept too: a registration rewrites the whole file,
/// and rendering 10,000 entries for every batch of registrations made the
/// writer the bottleneck of a fleet's arrival. Only changed entries are
/// rendered again.
#[derive(Debug, Clone)]
pub struct AgentTrustFile {
    path: PathBuf,
    lock: std::sync::Arc<std::sync::Mutex<()>>,
    cache: std::sync::Arc<std::sync::Mutex<Cached>>,
    rendered: std::sync::Arc<std::sync::Mutex<Rendered>>,
}

/// Each stored entry and its `[[agent]]` table as last written.
type Rendered = std::collections::HashMap<Thumbprint, (TrustedAgent, String)>;

/// The last version of the file this handle read or wrote.
type Cached = Option<(FileStamp, Vec<TrustedAgent>)>;

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
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
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

    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every trusted agent; a missing file means none.
    pub fn load(&self) -> Result<Vec<TrustedAgent>, TrustFileError> {
        let stamp = FileStamp::of(&self.path).ok();
        if let (Some(stamp), Some((cached, agents))) = (stamp, self.cache().as_ref())
            && *cached == stamp
        {
            return Ok(agents.clone());
        }
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
        let file: TrustFile = toml::from_str(&text).map_err(|e| TrustFileError::Parse {
            path: self.path.clone(),
            message: e.message().to_owned(),
        })?;
        // The stamp taken before reading: a write racing this read changes
        // the file's stamp afterwards, so the next load parses again.
        *self.cache() = stamp.map(|stamp| (stamp, file.agents.clone()));
        Ok(file.agents)
    }

    /// Replaces the file through a rename.
    pub fn save(&self, agents: &[TrustedAgent]) -> Result<(), TrustFileError> {
        let _guard = self.locked();
        self.save_unlocked(agents)
    }

    fn save_unlocked(&self, agents: &[TrustedAgent]) -> Result<(), TrustFileError> {
        let err = |source| TrustFileError::Write {
            path: self.path.clone(),
            source,
        };
        let text = self
            .render(agents)
            .map_err(|e| err(std::io::Error::other(e)))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let temp = self
            .path
            .with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&temp, text).map_err(err)?;
        std::fs::rename(&temp, &self.path).map_err(err)?;
        *self.cache() = FileStamp::of(&self.path)
            .ok()
            .map(|stamp| (stamp, agents.to_vec()));
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
        let _guard = self.locked();
        let mut agents = self.load()?;
        for agent in batch {
            upsert_into(&mut agents, agent);
        }
        self.save_unlocked(&agents)
    }

    /// Applies `change` to the stored entries under this handle's lock,
    /// writing the file only if they changed. Returns what `change`
    /// returned and the entries as stored now.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<TrustedAgent>) -> T,
    ) -> Result<(T, Vec<TrustedAgent>), TrustFileError> {
        let _guard = self.locked();
        let mut agents = self.load()?;
        let before = agents.clone();
        let outcome = change(&mut agents);
        if agents != before {
            self.save_unlocked(&agents)?;
        }
        Ok((outcome, agents))
    }

    /// Removes an entry; returns whether it was there.
    pub fn remove(&self, thumbprint: &Thumbprint) -> Result<bool, TrustFileError> {
        let _guard = self.locked();
        let mut agents = self.load()?;
        let before = agents.len();
        agents.retain(|a| !a.has_thumbprint(thumbprint));
        self.save_unlocked(&agents)?;
        Ok(agents.len() != before)
    }
}

#[cfg(test)]
mod tests;
