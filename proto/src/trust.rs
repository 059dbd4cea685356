//! The set of peer thumbprints one end trusts, shared by the TLS verifiers and
//! whatever reloads it.
//!
//! Architecture Invariant: a change to the set applies to the next handshake
//! at once, and subscribers hear about it so they can drop connections whose
//! peer is no longer trusted.
//!
//! The store also holds the one policy the verifiers apply besides the
//! thumbprint: whether a pinned certificate's validity dates count
//! ([`CertificateValidity`]; ignored by default, see SECURITY.md).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use tokio::sync::watch;

use crate::Thumbprint;

/// Whether a pinned certificate's `notBefore`/`notAfter` dates are checked.
///
/// Pinning trusts a certificate by its thumbprint, and withdrawing trust is
/// removing the thumbprint, so dates add nothing to who is trusted; Octopus
/// Tentacle certificates are issued for 100 years, and an agent whose
/// certificate lapsed would silently fall off its hub. `Ignored` is
/// therefore the default. `Enforced` refuses a certificate outside its
/// dates (and one whose dates cannot be read), for operators whose policy
/// requires expiring credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertificateValidity {
    #[default]
    Ignored,
    Enforced,
}

/// Thumbprints that may complete a handshake with us. A single change
/// costs a lookup, not a copy of the set: a hub on a shared store applies
/// registrations one at a time, and copying 50,000 thumbprints for each of
/// 50,000 arrivals would be the whole machine's work.
#[derive(Debug)]
pub struct TrustStore {
    trusted: RwLock<BTreeSet<Thumbprint>>,
    generation: watch::Sender<u64>,
    enforce_validity: AtomicBool,
}

impl TrustStore {
    pub fn new(trusted: impl IntoIterator<Item = Thumbprint>) -> Arc<Self> {
        Arc::new(Self {
            trusted: RwLock::new(trusted.into_iter().collect()),
            generation: watch::Sender::new(0),
            enforce_validity: AtomicBool::new(false),
        })
    }

    /// Whether the verifiers check validity dates; applies to the next
    /// handshake. Open connections are not re-checked.
    pub fn set_certificate_validity(&self, validity: CertificateValidity) {
        self.enforce_validity
            .store(validity == CertificateValidity::Enforced, Ordering::Release);
    }

    pub fn certificate_validity(&self) -> CertificateValidity {
        if self.enforce_validity.load(Ordering::Acquire) {
            CertificateValidity::Enforced
        } else {
            CertificateValidity::Ignored
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<Thumbprint>> {
        self.trusted.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<Thumbprint>> {
        self.trusted.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn contains(&self, thumbprint: &Thumbprint) -> bool {
        self.read().contains(thumbprint)
    }

    /// A copy of the set as it is now.
    pub fn snapshot(&self) -> Arc<BTreeSet<Thumbprint>> {
        Arc::new(self.read().clone())
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Replaces the whole set. Subscribers are told only if it changed.
    pub fn replace(&self, trusted: impl IntoIterator<Item = Thumbprint>) {
        let next: BTreeSet<Thumbprint> = trusted.into_iter().collect();
        {
            let mut current = self.write();
            if *current == next {
                return;
            }
            *current = next;
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Trusts one more thumbprint; subscribers are told if it is new.
    pub fn insert(&self, thumbprint: Thumbprint) {
        if self.write().insert(thumbprint) {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Stops trusting one thumbprint; subscribers are told if it was there.
    pub fn remove(&self, thumbprint: &Thumbprint) {
        if self.write().remove(thumbprint) {
            self.generation.send_modify(|g| *g += 1);
        }
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
