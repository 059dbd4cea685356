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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use arc_swap::ArcSwap;
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

/// Thumbprints that may complete a handshake with us.
#[derive(Debug)]
pub struct TrustStore {
    trusted: ArcSwap<BTreeSet<Thumbprint>>,
    generation: watch::Sender<u64>,
    enforce_validity: AtomicBool,
}

impl TrustStore {
    pub fn new(trusted: impl IntoIterator<Item = Thumbprint>) -> Arc<Self> {
        Arc::new(Self {
            trusted: ArcSwap::from_pointee(trusted.into_iter().collect()),
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
