//! The file backend of [`RegistryStore`]: `agents.toml`, `credentials.toml`
//! and `rotations.toml` in the hub's home, each changed under its file lock
//! ([`crate::store_file`]). Every call runs on the blocking pool, since a
//! write may wait for another process's lock and rewrites a file that grows
//! with the fleet.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tentacle_proto::Thumbprint;

use super::{Registered, RegistryStore, StoreError, Synced};
use crate::credentials::{
    ChosenSecretError, CredentialError, CredentialKind, Redeemed, StoredCredential,
};
use crate::hub::{HubStore, RotateError, TrustedAgent};
use crate::rotation::{PendingError, PendingRotation};
use crate::trust;

/// [`HubStore`] as a [`RegistryStore`].
#[derive(Debug, Clone)]
pub struct FileRegistry {
    files: Arc<HubStore>,
}

impl FileRegistry {
    pub fn new(files: HubStore) -> Self {
        Self {
            files: Arc::new(files),
        }
    }

    pub fn files(&self) -> &HubStore {
        &self.files
    }

    /// Runs `work` on the blocking pool with the files.
    /// Runs `work` on the blocking pool with the files; a task that did
    /// not finish (the runtime is shutting down) is `interrupted`'s error.
    fn blocking<T, E>(
        &self,
        work: impl FnOnce(&HubStore) -> Result<T, E> + Send + 'static,
        interrupted: fn(&HubStore, String) -> E,
    ) -> BoxFuture<'static, Result<T, E>>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let files = self.files.clone();
        Box::pin(async move {
            let worker = files.clone();
            match tokio::task::spawn_blocking(move || work(&worker)).await {
                Ok(outcome) => outcome,
                Err(error) => Err(interrupted(&files, error.to_string())),
            }
        })
    }

    /// Applies `change` to the whole agent list under the file's lock.
    fn update<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut Vec<TrustedAgent>) -> T + Send + 'static,
    ) -> BoxFuture<'static, Result<(T, Synced), StoreError>> {
        self.blocking(
            move |files| {
                let (outcome, after) = files.agents.update(change)?;
                Ok((outcome, Synced::Whole(after)))
            },
            agents_error,
        )
    }
}

impl RegistryStore for FileRegistry {
    fn describe(&self) -> String {
        self.files.agents.path().display().to_string()
    }

    fn load(&self) -> BoxFuture<'_, Result<Vec<TrustedAgent>, StoreError>> {
        self.blocking(|files| Ok(files.agents.load()?), agents_error)
    }

    fn register_all(
        &self,
        batch: Vec<TrustedAgent>,
    ) -> BoxFuture<'_, Result<(Registered, Synced), StoreError>> {
        self.update(move |agents| {
            batch
                .into_iter()
                .map(|agent| trust::register_into(agents, agent))
                .collect()
        })
    }

    fn upsert(&self, agent: TrustedAgent) -> BoxFuture<'_, Result<Synced, StoreError>> {
        let update = self.update(move |agents| trust::upsert_into(agents, agent));
        Box::pin(async move { Ok(update.await?.1) })
    }

    fn remove(&self, thumbprint: Thumbprint) -> BoxFuture<'_, Result<(bool, Synced), StoreError>> {
        self.update(move |agents| {
            let before = agents.len();
            agents.retain(|a| !a.has_thumbprint(&thumbprint));
            agents.len() != before
        })
    }

    fn rotate(
        &self,
        current: Thumbprint,
        new: Thumbprint,
        overlap: Duration,
    ) -> BoxFuture<'_, Result<(u64, Synced), RotateError>> {
        let update = self.update(move |agents| {
            crate::rotation::rotate_in(agents, &current, new, overlap, crate::hub::unix_now())
        });
        Box::pin(async move {
            let (outcome, synced) = update.await.map_err(RotateError::Store)?;
            Ok((outcome?, synced))
        })
    }

    fn retire(
        &self,
        agent: TrustedAgent,
        retired: Thumbprint,
    ) -> BoxFuture<'_, Result<(bool, Synced), StoreError>> {
        self.update(move |agents| crate::rotation::retire_in(agents, &agent, &retired))
    }

    fn create_credential(
        &self,
        kind: CredentialKind,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<String, CredentialError>> {
        self.blocking(
            move |files| files.credentials.create(kind, ttl),
            credentials_error,
        )
    }

    fn add_credential(
        &self,
        kind: CredentialKind,
        secret: String,
        ttl: Option<Duration>,
    ) -> BoxFuture<'_, Result<bool, ChosenSecretError>> {
        self.blocking(
            move |files| files.credentials.add(kind, &secret, ttl),
            |files, reason| ChosenSecretError::Store(credentials_error(files, reason)),
        )
    }

    fn import_credential(
        &self,
        credential: StoredCredential,
    ) -> BoxFuture<'_, Result<bool, CredentialError>> {
        self.blocking(
            move |files| files.credentials.import(credential),
            credentials_error,
        )
    }

    fn redeem(
        &self,
        secret: String,
        kind: CredentialKind,
    ) -> BoxFuture<'_, Result<Redeemed, CredentialError>> {
        self.blocking(
            move |files| files.credentials.redeem(&secret, kind),
            credentials_error,
        )
    }

    fn restore(&self, redeemed: Redeemed) -> BoxFuture<'_, Result<(), CredentialError>> {
        self.blocking(
            move |files| files.credentials.restore(redeemed),
            credentials_error,
        )
    }

    fn request_rotation(
        &self,
        rotation: PendingRotation,
    ) -> BoxFuture<'_, Result<(), PendingError>> {
        self.blocking(
            move |files| files.rotations.request(rotation),
            rotations_error,
        )
    }

    fn pending_rotations(&self) -> BoxFuture<'_, Result<Vec<PendingRotation>, PendingError>> {
        self.blocking(|files| files.rotations.load(), rotations_error)
    }

    fn approve_rotation(
        &self,
        selector: String,
    ) -> BoxFuture<'_, Result<PendingRotation, PendingError>> {
        self.blocking(
            move |files| files.rotations.approve(&selector),
            rotations_error,
        )
    }

    fn take_approved_rotations(&self) -> BoxFuture<'_, Result<Vec<PendingRotation>, PendingError>> {
        self.blocking(|files| files.rotations.take_approved(), rotations_error)
    }
}

fn agents_error(files: &HubStore, reason: String) -> StoreError {
    StoreError::from(trust::TrustFileError::Write {
        path: files.agents.path().to_owned(),
        source: std::io::Error::other(reason),
    })
}

fn credentials_error(files: &HubStore, reason: String) -> CredentialError {
    CredentialError::Store {
        path: files.credentials.path().to_owned(),
        message: reason,
    }
}

fn rotations_error(files: &HubStore, reason: String) -> PendingError {
    PendingError::Store {
        path: files.rotations.path().to_owned(),
        message: reason,
    }
}
