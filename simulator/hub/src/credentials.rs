//! One-time registration tokens and API keys, kept hashed in
//! `credentials.toml` in the hub's home.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store_file::{self, StoreLock, StoreLockGuard};

/// What a credential allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// Registers one agent, once, before it expires.
    Token,
    /// Registers any number of agents until removed.
    ApiKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// One hashed credential as a store keeps it.
pub struct StoredCredential {
    pub(crate) kind: CredentialKind,
    /// SHA-256 of the secret; the secret itself is never stored.
    pub(crate) sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) expires_unix: Option<u64>,
}

impl StoredCredential {
    /// A new credential of `kind` for `secret`, valid for `ttl` from now.
    pub(crate) fn new(kind: CredentialKind, secret: &str, ttl: Option<Duration>) -> Self {
        Self {
            kind,
            sha256: digest(secret),
            expires_unix: ttl.map(|ttl| now_unix().saturating_add(ttl.as_secs())),
        }
    }

    /// Whether this is a valid credential of `kind` now.
    pub(crate) fn is_valid(&self, kind: CredentialKind) -> bool {
        self.kind == kind && self.expires_unix.is_none_or(|t| t > now_unix())
    }
}

/// A new random secret of `kind`: `tt_…` for tokens, `tk_…` for API keys.
pub(crate) fn new_secret(kind: CredentialKind) -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let prefix = match kind {
        CredentialKind::Token => "tt",
        CredentialKind::ApiKey => "tk",
    };
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Checks the length of a secret an operator chose.
pub(crate) fn check_chosen(secret: &str) -> Result<(), ChosenSecretError> {
    // What is hashed is the trimmed secret, so that is what must be long.
    let chars = secret.trim().chars().count();
    if chars < MIN_CHOSEN_SECRET_CHARS {
        return Err(ChosenSecretError::TooShort { chars });
    }
    Ok(())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CredentialFile {
    #[serde(default, rename = "credential")]
    credentials: Vec<StoredCredential>,
}

/// Why a credential was refused or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("the registration token or API key is not valid (unknown, expired, or already used)")]
    Invalid,
    #[error("could not read or write {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error(transparent)]
    Shared(crate::store::StoreError),
}

/// The fewest characters [`CredentialStore::add`] accepts in a secret the
/// operator chose: shorter ones can be guessed.
pub const MIN_CHOSEN_SECRET_CHARS: usize = 16;

/// Why a secret the operator chose was not stored.
#[derive(Debug, thiserror::Error)]
pub enum ChosenSecretError {
    #[error(
        "it has {chars} characters; use at least {MIN_CHOSEN_SECRET_CHARS} (e.g. `openssl rand -hex 24`)"
    )]
    TooShort { chars: usize },
    #[error(transparent)]
    Store(#[from] CredentialError),
}

/// `credentials.toml`. Every read-modify-write happens under this
/// process's mutex and the file's [`StoreLock`], which `tentacle-hub server
/// token create` in another process takes too, and reads the file again
/// under them, so no writer loses another's credential or brings back a used
/// token.
#[derive(Debug)]
pub struct CredentialStore {
    path: PathBuf,
    file_lock: StoreLock,
    lock: Mutex<()>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

impl CredentialStore {
    /// The store at `path`, locked for writes with the default timeout.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            file_lock: StoreLock::beside(&path, store_file::DEFAULT_LOCK_TIMEOUT),
            path,
            lock: Mutex::new(()),
        }
    }

    /// This store with writers waiting up to `timeout` for the lock.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.file_lock = StoreLock::beside(&self.path, timeout);
        self
    }

    /// The lock every writer of this file takes.
    pub fn file_lock(&self) -> &StoreLock {
        &self.file_lock
    }

    /// This process's mutex, then the lock between processes.
    fn locked(&self) -> Result<(std::sync::MutexGuard<'_, ()>, StoreLockGuard), CredentialError> {
        let threads = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let processes = self.file_lock.acquire().map_err(|e| self.store_error(e))?;
        Ok((threads, processes))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn store_error(&self, message: impl std::fmt::Display) -> CredentialError {
        CredentialError::Store {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    fn load(&self) -> Result<CredentialFile, CredentialError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text).map_err(|e| self.store_error(e.message())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CredentialFile::default()),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Replaces the file; call with the lock held. Owner-only: the hashes
    /// are no secret, but nobody else has a use for them.
    fn save(&self, file: &CredentialFile) -> Result<(), CredentialError> {
        let text = toml::to_string_pretty(file).map_err(|e| self.store_error(e))?;
        store_file::replace(&self.path, text.as_bytes(), 0o600).map_err(|e| self.store_error(e))
    }

    /// Makes a new secret of `kind` and returns it; only its hash is kept.
    pub fn create(
        &self,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> Result<String, CredentialError> {
        let secret = new_secret(kind);
        let _guard = self.locked()?;
        let mut file = self.load()?;
        let now = now_unix();
        // Expired tokens are dropped whenever the file is written.
        file.credentials
            .retain(|c| c.expires_unix.is_none_or(|t| t > now));
        file.credentials
            .push(StoredCredential::new(kind, &secret, ttl));
        self.save(&file)?;
        Ok(secret)
    }

    /// Stores a secret the operator chose (say, an API key from a
    /// Kubernetes Secret that agents are given too), hashed like those
    /// [`Self::create`] makes. Returns `false`, and writes nothing, when it
    /// is already stored and valid, so a hub can call this at every start.
    pub fn add(
        &self,
        kind: CredentialKind,
        secret: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, ChosenSecretError> {
        check_chosen(secret)?;
        let _guard = self.locked()?;
        let mut file = self.load()?;
        let wanted = digest(secret);
        let now = now_unix();
        if file
            .credentials
            .iter()
            .any(|c| c.kind == kind && c.sha256 == wanted && c.expires_unix.is_none_or(|t| t > now))
        {
            return Ok(false);
        }
        file.credentials
            .retain(|c| c.expires_unix.is_none_or(|t| t > now));
        file.credentials
            .push(StoredCredential::new(kind, secret, ttl));
        self.save(&file)?;
        Ok(true)
    }

    /// Every stored credential (hashed), for a migration to another store.
    pub(crate) fn entries(&self) -> Result<Vec<StoredCredential>, CredentialError> {
        Ok(self.load()?.credentials)
    }

    /// Stores a credential as it is (hashed); `false` if it was there.
    pub(crate) fn import(&self, credential: StoredCredential) -> Result<bool, CredentialError> {
        let _guard = self.locked()?;
        let mut file = self.load()?;
        if file.credentials.contains(&credential) {
            return Ok(false);
        }
        file.credentials.push(credential);
        self.save(&file)?;
        Ok(true)
    }

    /// Checks a secret; a token is used up by a successful check, under
    /// the lock, so two uses of one token never both succeed. Give the
    /// result to [`Self::restore`] if what the token was for is then
    /// refused. An API key is only read, without the lock between
    /// processes (every writer renames a whole file into place), so a
    /// fleet registering by key never waits for another process's write.
    pub fn redeem(&self, secret: &str, kind: CredentialKind) -> Result<Redeemed, CredentialError> {
        let _guard = match kind {
            CredentialKind::Token => Some(self.locked()?),
            CredentialKind::ApiKey => None,
        };
        let mut file = self.load()?;
        let wanted = digest(secret);
        let now = now_unix();
        let position = file.credentials.iter().position(|c| {
            c.kind == kind && c.sha256 == wanted && c.expires_unix.is_none_or(|t| t > now)
        });
        match (position, kind) {
            (None, _) => Err(CredentialError::Invalid),
            (Some(_), CredentialKind::ApiKey) => Ok(Redeemed { used_up: None }),
            (Some(index), CredentialKind::Token) => {
                let token = file.credentials.remove(index);
                self.save(&file)?;
                Ok(Redeemed {
                    used_up: Some(token),
                })
            }
        }
    }

    /// Makes a token [`Self::redeem`] used up valid again (until its
    /// original expiry); an API key was never used up.
    pub fn restore(&self, redeemed: Redeemed) -> Result<(), CredentialError> {
        let Some(token) = redeemed.used_up else {
            return Ok(());
        };
        let _guard = self.locked()?;
        let mut file = self.load()?;
        if !file.credentials.contains(&token) {
            file.credentials.push(token);
        }
        self.save(&file)
    }
}

/// A credential [`CredentialStore::redeem`] accepted: the token it used up,
/// if it was one, so a refused registration can give it back.
#[derive(Debug)]
pub struct Redeemed {
    pub(crate) used_up: Option<StoredCredential>,
}

impl Redeemed {
    /// Whether a one-time token was used up.
    pub fn used_a_token(&self) -> bool {
        self.used_up.is_some()
    }
}

#[cfg(test)]
mod tests;
