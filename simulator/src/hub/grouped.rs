//! Registrations stored in groups. Each registration rewrites the registry
//! file, whose size grows with the fleet; when many agents register at
//! once (a new fleet, a reconnect after the hub's store moved), the ones
//! that arrive while a write is in progress are stored together by the
//! next write. Every caller still returns only after its own registration
//! is on disk.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::{Hub, TrustedAgent};

type Waiter = oneshot::Sender<Result<(), String>>;

/// The registrations waiting for the next write.
#[derive(Debug, Default)]
pub struct GroupedRegistrations {
    state: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    queue: Vec<(TrustedAgent, Waiter)>,
    /// Whether a writer is running; it takes whatever is queued until the
    /// queue is empty.
    writing: bool,
}

impl GroupedRegistrations {
    fn state(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stores `agent` with whatever else is waiting; returns once it is stored
/// (or why it could not be).
pub async fn register(hub: &Arc<Hub>, agent: TrustedAgent) -> Result<(), String> {
    let (done, stored) = oneshot::channel();
    let lead = {
        let mut state = hub.grouped.state();
        state.queue.push((agent, done));
        !std::mem::replace(&mut state.writing, true)
    };
    if lead {
        let hub = hub.clone();
        tokio::task::spawn_blocking(move || write_until_empty(&hub));
    }
    stored
        .await
        .map_err(|_| "the registration was interrupted; register again".to_owned())?
}

/// Writes groups until nothing is queued.
fn write_until_empty(hub: &Hub) {
    // A panic below must not leave `writing` set, or no registration
    // would ever lead a writer again. On a normal return the loop clears it
    // under the lock, and another writer may already have set it since.
    struct Release<'a>(&'a GroupedRegistrations);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.state().writing = false;
            }
        }
    }
    let _release = Release(&hub.grouped);
    loop {
        let group = {
            let mut state = hub.grouped.state();
            if state.queue.is_empty() {
                state.writing = false;
                return;
            }
            std::mem::take(&mut state.queue)
        };
        let (agents, waiters): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let result = hub.register_all(agents).map_err(|e| e.to_string());
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{AgentMode, HubSettings, HubStore};
    use tentacle_proto::{Identity, Thumbprint};

    fn agent(i: usize) -> TrustedAgent {
        TrustedAgent {
            thumbprint: Thumbprint::of_der(format!("agent-{i}").as_bytes()),
            name: format!("agent-{i}"),
            mode: AgentMode::Polling,
            address: None,
            roles: vec!["web".into()],
            environments: Vec::new(),
            previous_thumbprint: None,
            retire_previous_at: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_registrations_are_all_stored_and_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::generate("hub").expect("identity");
        let hub = Hub::with_store(
            identity,
            HubSettings::default(),
            HubStore::in_dir(dir.path()),
        )
        .expect("hub");
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let hub = hub.clone();
                tokio::spawn(async move { register(&hub, agent(i)).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("stored");
        }
        // A second registration of a name replaces the first.
        let mut moved = agent(7);
        moved.roles = vec!["db".into()];
        register(&hub, moved.clone()).await.expect("re-registered");

        let stored = HubStore::in_dir(dir.path()).agents.load().expect("load");
        assert_eq!(stored.len(), 300, "every registration is on disk once");
        assert_eq!(hub.agents().len(), 300, "and trusted in memory");
        let seven: Vec<_> = stored.iter().filter(|a| a.name == "agent-7").collect();
        assert_eq!(seven, [&moved]);
        for i in 0..300 {
            assert!(
                hub.agents()
                    .iter()
                    .any(|a| a.thumbprint == agent(i).thumbprint),
                "agent-{i} is trusted"
            );
        }
        assert!(!hub.grouped.state().writing, "the writer finished");
    }
}
