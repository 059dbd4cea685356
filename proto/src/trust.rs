//! The set of peer thumbprints one end trusts, shared by the TLS verifiers and
//! whatever reloads it.
//!
//! Architecture Invariant: a change to the set applies to the next handshake
//! at once, and subscribers hear about it so they can drop connections whose
//! peer is no longer trusted.

use std::collections::BTreeSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::Thumbprint;

/// Thumbprints that may complete a handshake with us.
#[derive(Debug)]
pub struct TrustStore {
    trusted: ArcSwap<BTreeSet<Thumbprint>>,
    generation: watch::Sender<u64>,
}

impl TrustStore {
    pub fn new(trusted: impl IntoIterator<Item = Thumbprint>) -> Arc<Self> {
        Arc::new(Self {
            trusted: ArcSwap::from_pointee(trusted.into_iter().collect()),
            generation: watch::Sender::new(0),
        })
    }

    pub fn contains(&self, thumbprint: &Thumbprint) -> bool {
        self.trusted.load().contains(thumbprint)
    }

    pub fn snapshot(&self) -> Arc<BTreeSet<Thumbprint>> {
        self.trusted.load_full()
    }

    /// Replaces the whole set. Subscribers are told only if it changed.
    pub fn replace(&self, trusted: impl IntoIterator<Item = Thumbprint>) {
        let next: BTreeSet<Thumbprint> = trusted.into_iter().collect();
        if *self.trusted.load_full() == next {
            return;
        }
        self.trusted.store(Arc::new(next));
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn insert(&self, thumbprint: Thumbprint) {
        let mut next = (*self.snapshot()).clone();
        next.insert(thumbprint);
        self.replace(next);
    }

    pub fn remove(&self, thumbprint: &Thumbprint) {
        let mut next = (*self.snapshot()).clone();
        next.remove(thumbprint);
        self.replace(next);
    }

    /// A receiver that wakes whenever the set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_hear_only_real_changes() {
        let a = Thumbprint::of_der(b"a");
        let b = Thumbprint::of_der(b"b");
        let store = TrustStore::new([a]);
        let mut changes = store.subscribe();
        store.replace([a]);
        assert!(!changes.has_changed().expect("store alive"));
        store.insert(b);
        assert!(changes.has_changed().expect("store alive"));
        changes.mark_unchanged();
        assert!(store.contains(&b));
        store.remove(&a);
        assert!(!store.contains(&a));
        assert!(changes.has_changed().expect("store alive"));
    }
}
