//! [`RegistryStore`]: where a hub keeps what must outlive it and be shared
//! by every node of a cluster: the registered agents (thumbprints, roles,
//! environments, rotations), hashed credentials, and the rotations waiting
//! for an operator.
//!
//! Two backends implement it: the files in the hub's home
//! ([`crate::hub::HubStore`], the embedded default, one node) and etcd
//! ([`crate::store_etcd::EtcdStore`], any number of nodes). The rules a
//! registration, a rotation or a token obeys are the same functions for
//! both ([`crate::trust::register_into`], [`crate::rotation`]); only how
//! they are made atomic differs: a file lock and a whole-file rename, or an
//! etcd transaction per agent.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tentacle_proto::Thumbprint;

use crate::credentials::{
    ChosenSecretError, CredentialError, CredentialKind, Redeemed, StoredCredential,
};
use crate::hub::{RotateError, TrustedAgent};
use crate::rotation::{PendingError, PendingRotation};
use crate::trust::{NameTaken, TrustFileError};

pub mod etcd;
pub mod files;
pub mod migrate;
pub mod open;

/// How a hub's view of the registry catches up with a write it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The whole registry as written (the file backend): the hub replaces
    /// its view with it.
    Whole(Vec<TrustedAgent>),
    /// The store's revision after the write (etcd): the hub's watch of the
    /// store applies it, and the writer waits until the watch has seen it.
    Revision(i64),
    /// Nothing changed.
    Unchanged,
}

/// The store could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(Arc<TrustFileError>),
    #[error(
        "etcd ({endpoints}) did not answer: {reason}; registrations and trust changes wait until a majority of etcd members is back"
    )]
    EtcdUnavailable { endpoints: String, reason: String },
    #[error("etcd ({endpoints}) holds a value this hub cannot read at `{key}`: {reason}")]
    Corrupt {
        endpoints: String,
        key: String,
        reason: String,
    },
    #[error(
        "etcd ({endpoints}) kept changing under this write; it was tried {attempts} times; try again"
    )]
    Contended { endpoints: String, attempts: u32 },
}

impl From<TrustFileError> for StoreError {
    fn from(error: TrustFileError) -> Self {
        Self::File(Arc::new(error))
    }
}

/// The outcome of each registration of a batch, in order.
pub type Registered = Vec<Result<(), NameTaken>>;

/// What every hub store does. Each method is one atomic change: two hubs
/// (or a hub and `tentacle-hub server trust`) writing at once never lose
/// each other's updates, and a one-time token is used up once in the
/// whole cluster.
pub trait RegistryStore: Send + Sync + fmt::Debug {
    /// Where the store is, for messages: a path or etcd's endpoints.
    fn describe(&self) -> String;

    /// Whether every node learns of changes through a watch of the store
    /// (etcd), rather than by reading it again.
    fn is_watched(&self) -> bool {
        false
    }

    /// The agent holding `thumbprint`, read from the store itself rather
    /// than this hub's view: for a tunnel from an agent that registered on
    /// another node a moment ago. `None` if the store has no faster way
    /// than the view (the files are reread every second anyway).
    fn lookup(
        &self,
        _thumbprint: Thumbprint,
    ) -> BoxFuture<'_, Result<Option<TrustedAgent>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// Every registered agent.
    fn load(&self) -> BoxFuture<'_, Result<Vec<TrustedAgent>, StoreError>>;

    /// Stores registrations in order; each is refused if its name belongs to
    /// another agent ([`crate::trust::register_into`]).
    fn register_all(
        &self,
        batch: Vec<TrustedAgent>,
    ) -> BoxFuture<'_, Result<(Registered, Synced), StoreError>>;

    /// An operator's edit: adds `agent`, replacing any entry with its
    /// thumbprint or its name ([`crate::trust::upsert_into`]).
    fn upsert(&self, agent: TrustedAgent) -> BoxFuture<'_, Result<Synced, StoreError>>;

    /// Forgets the agent with `thumbprint` (current or being retired).
    /// Returns whether one was registered.
    fn remove(&self, thumbprint: Thumbprint) -> BoxFuture<'_, Result<(bool, Synced), StoreError>>;

    /// Trusts `new` for the agent holding `current`, keeping `current` for
    /// `overlap` ([`crate::trust::rotate_in`]). Returns when `current`
    /// retires (Unix seconds).
    fn rotate(
        &self,
        current: Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> BoxFuture<'_, Result<(u64, Synced), RotateError>>;

    /// Stops trusting `retired` for `agent` once its rotation overlap is
    /// over, unless the entry changed since. Several nodes may call this
    /// for one agent: only one changes anything, and only that one gets
    /// `true` (it writes the audit event).
    fn retire(
        &self,
        agent: TrustedAgent,
        retired: Thumbprint,
    ) -> BoxFuture<'_, Result<(bool, Synced), StoreError>>;

    /// Makes a new secret of `kind` valid for `ttl` (or until removed) and
    /// returns it; only its hash is stored.
    fn create_credential(
        &self,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<String, CredentialError>>;

    /// Stores a secret the operator chose; `false` if it was already
    /// stored and valid.
    fn add_credential(
        &self,
        kind: CredentialKind,
        secret: String,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<bool, ChosenSecretError>>;

    /// Stores a credential copied from another store, hashed as it is;
    /// `false` if it was there already.
    fn import_credential(
        &self,
        credential: StoredCredential,
    ) -> BoxFuture<'_, Result<bool, CredentialError>>;

    /// Checks a secret; a token is used up by a successful check.
    fn redeem(
        &self,
        secret: String,
        kind: CredentialKind,
    ) -> BoxFuture<'_, Result<Redeemed, CredentialError>>;

    /// Makes a used-up token valid again, when what it was for was refused.
    fn restore(&self, redeemed: Redeemed) -> BoxFuture<'_, Result<(), CredentialError>>;

    /// Records a rotation waiting for an operator
    /// ([`crate::rotation::merge_request`]).
    fn request_rotation(
        &self,
        rotation: PendingRotation,
    ) -> BoxFuture<'_, Result<(), PendingError>>;

    /// The rotations waiting, in the order requested.
    fn pending_rotations(&self) -> BoxFuture<'_, Result<Vec<PendingRotation>, PendingError>>;

    /// Marks a waiting rotation approved ([`crate::rotation::selects`]).
    fn approve_rotation(
        &self,
        selector: String,
    ) -> BoxFuture<'_, Result<PendingRotation, PendingError>>;

    /// Removes and returns the approved rotations; of several nodes taking
    /// them at once, each rotation goes to one.
    fn take_approved_rotations(&self) -> BoxFuture<'_, Result<Vec<PendingRotation>, PendingError>>;
}

/// Which store a hub uses: `--store`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreUrl {
    /// The files in the hub's home.
    #[default]
    Files,
    /// etcd, at these `HOST:PORT` endpoints.
    Etcd(Vec<String>),
}

/// Not a store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a store: use `files` (the hub's home, the default) or etcd://HOST:PORT[,HOST:PORT...]"
)]
pub struct ParseStoreUrlError(String);

impl FromStr for StoreUrl {
    type Err = ParseStoreUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text == "files" || text.is_empty() {
            return Ok(Self::Files);
        }
        let Some(rest) = text.strip_prefix("etcd://") else {
            return Err(ParseStoreUrlError(text.to_owned()));
        };
        let endpoints: Vec<String> = rest
            .trim_end_matches('/')
            .split(',')
            .map(|e| e.trim().to_owned())
            .collect();
        let valid = endpoints.iter().all(|endpoint| {
            endpoint
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        });
        if endpoints.is_empty() || !valid {
            return Err(ParseStoreUrlError(text.to_owned()));
        }
        Ok(Self::Etcd(endpoints))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Files => f.write_str("files"),
            Self::Etcd(endpoints) => write!(f, "etcd://{}", endpoints.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_name_files_or_etcd_endpoints() {
        assert_eq!("files".parse::<StoreUrl>(), Ok(StoreUrl::Files));
        assert_eq!(
            "etcd://127.0.0.1:2379,etcd-1.etcd:2379/".parse::<StoreUrl>(),
            Ok(StoreUrl::Etcd(vec![
                "127.0.0.1:2379".into(),
                "etcd-1.etcd:2379".into()
            ]))
        );
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://:2379",
            "redis://x:1",
            "etcd://a:99999",
        ] {
            let error = bad.parse::<StoreUrl>().expect_err(bad);
            assert!(error.to_string().contains("etcd://HOST:PORT"), "{error}");
        }
    }
}
