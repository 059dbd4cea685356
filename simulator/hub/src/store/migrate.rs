//! `tentacle-hub store migrate`: copies a hub's file registry (agents,
//! credentials, pending rotations) into another store, so a single hub
//! becomes the first node of a cluster without its agents registering
//! again. Entries already there are left as they are, so running it twice
//! copies nothing twice.

use super::{RegistryStore, StoreError};
use crate::credentials::CredentialError;
use crate::hub::HubStore;
use crate::rotation::PendingError;

/// What a migration copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub agents: usize,
    pub agents_already_there: usize,
    pub credentials: usize,
    pub rotations: usize,
}

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Rotations(#[from] PendingError),
    #[error("could not read {0}: {1}")]
    Files(String, String),
}

/// Copies `files` into `to`.
pub async fn migrate(files: &HubStore, to: &dyn RegistryStore) -> Result<Migrated, MigrateError> {
    let mut migrated = Migrated::default();
    let agents = files.agents.load().map_err(|e| {
        MigrateError::Files(files.agents.path().display().to_string(), e.to_string())
    })?;
    let existing = to.load().await?;
    for agent in agents {
        if existing.contains(&agent) {
            migrated.agents_already_there += 1;
            continue;
        }
        // The operator's own edit: the file's entry wins over a different
        // one under its name.
        to.upsert(agent).await?;
        migrated.agents += 1;
    }
    for credential in files.credentials.entries()? {
        if to.import_credential(credential).await? {
            migrated.credentials += 1;
        }
    }
    for rotation in files.rotations.load()? {
        to.request_rotation(rotation).await?;
        migrated.rotations += 1;
    }
    Ok(migrated)
}
