use super::*;
use crate::hub::{AgentMode, Hub, HubSettings, HubStore};
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
            tokio::spawn(async move { hub.register_grouped(agent(i)).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("stored");
    }
    // The same agent registering again (its own certificate) replaces its
    // entry.
    let mut moved = agent(7);
    moved.roles = vec!["db".into()];
    hub.register_grouped(moved.clone())
        .await
        .expect("re-registered");

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
    assert!(!hub.grouped_is_writing(), "the writer finished");
}

fn index(agent: &TrustedAgent) -> usize {
    agent.name["agent-".len()..].parse().expect("agent-N")
}

/// Registrations that share a write still get their own outcomes, not the
/// group's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_registration_gets_its_own_outcome() {
    let groups: Arc<GroupedRegistrations<Result<usize, usize>>> = Arc::default();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let write: GroupWriter<Result<usize, usize>> = Arc::new({
        let sizes = sizes.clone();
        move |batch: Vec<TrustedAgent>| {
            let sizes = sizes.clone();
            Box::pin(async move {
                // Slow enough that the others queue up behind the first.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                sizes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(batch.len());
                batch
                    .iter()
                    .map(|a| match index(a) {
                        even if even % 2 == 0 => Ok(even),
                        odd => Err(odd),
                    })
                    .collect()
            }) as futures::future::BoxFuture<'static, _>
        }
    });
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (groups, write) = (groups.clone(), write.clone());
            tokio::spawn(async move { (i, groups.register(agent(i), write).await) })
        })
        .collect();
    for task in tasks {
        let (i, outcome) = task.await.expect("task");
        let expected = if i % 2 == 0 { Ok(i) } else { Err(i) };
        assert_eq!(outcome.expect("answered"), expected, "agent-{i}");
    }
    let sizes = sizes.lock().unwrap_or_else(PoisonError::into_inner).clone();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        40,
        "each stored once: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&n| n > 1),
        "some shared a write: {sizes:?}"
    );
    assert!(!groups.is_writing());
}

#[tokio::test]
async fn a_registration_the_writer_does_not_answer_is_interrupted() {
    let groups: Arc<GroupedRegistrations<()>> = Arc::default();
    let write: GroupWriter<()> =
        Arc::new(|_batch: Vec<TrustedAgent>| Box::pin(async { Vec::new() }));
    assert!(matches!(
        groups.register(agent(1), write.clone()).await,
        Err(Interrupted)
    ));
    // The writer clears its flag just after it drops the unanswered
    // waiter, so the waiter may wake first; the flag must clear soon after,
    // or no registration could lead a writer again.
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while groups.is_writing() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the next registration can lead a writer");
    let answered: GroupWriter<()> = Arc::new(|batch: Vec<TrustedAgent>| {
        let answers = vec![(); batch.len()];
        Box::pin(async move { answers })
    });
    groups.register(agent(2), answered).await.expect("answered");
}
