//! Registrations stored in groups. Each registration rewrites the registry
//! file, whose size grows with the fleet; when many agents register at
//! once (a new fleet, a reconnect after the hub's store moved), the ones
//! that arrive while a write is in progress are stored together by the
//! next write. Every caller still returns only after its own registration
//! is on disk.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use crate::trust::TrustedAgent;

/// Stores a group of registrations in order and returns one outcome per
/// registration, in the same order.
pub type GroupWriter<R> =
    Arc<dyn Fn(Vec<TrustedAgent>) -> futures::future::BoxFuture<'static, Vec<R>> + Send + Sync>;

/// The writer stopped before it answered this registration (it panicked, or
/// the runtime is shutting down).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the registration was interrupted; register again")]
pub struct Interrupted;

/// The registrations waiting for the next write, and the outcome each gets.
#[derive(Debug)]
pub struct GroupedRegistrations<R> {
    state: Mutex<Pending<R>>,
}

impl<R> Default for GroupedRegistrations<R> {
    fn default() -> Self {
        Self {
            state: Mutex::new(Pending {
                queue: Vec::new(),
                writing: false,
            }),
        }
    }
}

#[derive(Debug)]
struct Pending<R> {
    queue: Vec<(TrustedAgent, oneshot::Sender<R>)>,
    /// Whether a writer is running; it takes whatever is queued until the
    /// queue is empty.
    writing: bool,
}

impl<R: Send + 'static> GroupedRegistrations<R> {
    fn state(&self) -> std::sync::MutexGuard<'_, Pending<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `agent` with whatever else is waiting, through `write`;
    /// returns its own outcome once its group is stored.
    pub async fn register(
        self: &Arc<Self>,
        agent: TrustedAgent,
        write: GroupWriter<R>,
    ) -> Result<R, Interrupted> {
        let (done, stored) = oneshot::channel();
        let lead = {
            let mut state = self.state();
            state.queue.push((agent, done));
            !std::mem::replace(&mut state.writing, true)
        };
        if lead {
            let groups = self.clone();
            // A task of its own, so a caller that gives up does not stop
            // the writes of the others in its group.
            tokio::spawn(async move { groups.write_until_empty(&*write).await });
        }
        stored.await.map_err(|_| Interrupted)
    }

    /// Writes groups until nothing is queued.
    async fn write_until_empty(
        &self,
        write: &(
             dyn Fn(Vec<TrustedAgent>) -> futures::future::BoxFuture<'static, Vec<R>> + Send + Sync
         ),
    ) {
        // A panic below must not leave `writing` set, or no registration
        // would ever lead a writer again. On a normal return the loop clears
        // it under the lock, and another writer may already have set it
        // since.
        struct Release<'a, R>(&'a Mutex<Pending<R>>);
        impl<R> Drop for Release<'_, R> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .writing = false;
                }
            }
        }
        let _release = Release(&self.state);
        loop {
            let group = {
                let mut state = self.state();
                if state.queue.is_empty() {
                    state.writing = false;
                    return;
                }
                std::mem::take(&mut state.queue)
            };
            let (agents, waiters): (Vec<_>, Vec<_>) = group.into_iter().unzip();
            // A waiter without an outcome sees `Interrupted`.
            for (waiter, outcome) in waiters.into_iter().zip(write(agents).await) {
                let _ = waiter.send(outcome);
            }
        }
    }

    /// Whether a writer is running now.
    pub fn is_writing(&self) -> bool {
        self.state().writing
    }
}

#[cfg(test)]
mod tests;
