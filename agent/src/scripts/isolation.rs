//! Named reader/writer locks that keep scripts from running beside each
//! other when they must not.
//!
//! Full isolation takes the write side of its mutex and runs alone; no
//! isolation takes the read side and runs beside other no-isolation scripts.
//! tokio's lock is fair, so a waiting writer is not starved by a stream of
//! readers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// How a script shares its mutex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsolationLevel {
    Full,
    None,
}

/// Held while the script runs; dropping it releases the mutex.
#[derive(Debug)]
pub enum IsolationGuard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>),
}

/// The mutex could not be taken in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for the isolation mutex `{name}`")]
pub struct MutexTimeout {
    pub name: String,
    pub waited: Duration,
}

/// Every named mutex on this agent.
#[derive(Debug, Default)]
pub struct IsolationMutexes {
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

impl IsolationMutexes {
    fn lock_for(&self, name: &str) -> Arc<RwLock<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Takes the mutex at once if it is free.
    pub fn try_acquire(&self, name: &str, level: IsolationLevel) -> Option<IsolationGuard> {
        let lock = self.lock_for(name);
        match level {
            IsolationLevel::Full => lock.try_write_owned().ok().map(IsolationGuard::Exclusive),
            IsolationLevel::None => lock.try_read_owned().ok().map(IsolationGuard::Shared),
        }
    }

    /// Waits at most `timeout` for the mutex.
    pub async fn acquire(
        &self,
        name: &str,
        level: IsolationLevel,
        timeout: Duration,
    ) -> Result<IsolationGuard, MutexTimeout> {
        let lock = self.lock_for(name);
        let wait = async move {
            match level {
                IsolationLevel::Full => IsolationGuard::Exclusive(lock.write_owned().await),
                IsolationLevel::None => IsolationGuard::Shared(lock.read_owned().await),
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| MutexTimeout {
                name: name.to_owned(),
                waited: timeout,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_share_and_writers_exclude() {
        let mutexes = IsolationMutexes::default();
        let a = mutexes
            .try_acquire("m", IsolationLevel::None)
            .expect("free");
        assert!(mutexes.try_acquire("m", IsolationLevel::None).is_some());
        assert!(mutexes.try_acquire("m", IsolationLevel::Full).is_none());
        assert!(mutexes.try_acquire("other", IsolationLevel::Full).is_some());
        drop(a);
        let w = mutexes
            .try_acquire("m", IsolationLevel::Full)
            .expect("free");
        assert!(mutexes.try_acquire("m", IsolationLevel::None).is_none());
        drop(w);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_gives_up_after_the_timeout() {
        let mutexes = IsolationMutexes::default();
        let _held = mutexes
            .try_acquire("m", IsolationLevel::Full)
            .expect("free");
        let err = mutexes
            .acquire("m", IsolationLevel::None, Duration::from_secs(3))
            .await
            .expect_err("held");
        assert_eq!(err.waited, Duration::from_secs(3));
        assert!(err.to_string().contains("`m`"));
    }
}
