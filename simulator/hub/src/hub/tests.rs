use std::path::Path;

use tonic::{Code, Status};

use super::*;
use crate::testing::{idle_tunnel, memory_hub, polling, stored_hub, thumbprint};

fn on_disk(dir: &Path) -> Vec<TrustedAgent> {
    HubStore::in_dir(dir).agents.load().expect("load")
}

/// `winner` holds its name, in memory and on disk, and is trusted;
/// `loser` is neither listed nor trusted.
fn assert_sole_owner(hub: &Hub, dir: &Path, winner: &TrustedAgent, loser: &TrustedAgent) {
    let name = &winner.name;
    let in_memory: Vec<_> = hub
        .agents()
        .iter()
        .filter(|a| a.name == *name)
        .cloned()
        .collect();
    assert_eq!(
        in_memory,
        std::slice::from_ref(winner),
        "one entry for {name} in memory"
    );
    let stored: Vec<_> = on_disk(dir)
        .into_iter()
        .filter(|a| a.name == *name)
        .collect();
    assert_eq!(
        stored,
        std::slice::from_ref(winner),
        "one entry for {name} on disk"
    );
    assert!(
        hub.tls_trust().contains(&winner.thumbprint),
        "{name}: winner trusted"
    );
    assert!(hub.allows_tunnel(&winner.thumbprint, name));
    assert!(
        !hub.tls_trust().contains(&loser.thumbprint),
        "{name}: loser not trusted"
    );
    assert!(!hub.allows_tunnel(&loser.thumbprint, name));
}

/// Two agents with different certificates register one name at the same
/// moment, again and again: each time exactly one wins, the other is told
/// the name is taken, and the winner's trust is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_name_registered_by_two_certificates_at_once_has_one_owner() {
    let (hub, dir) = stored_hub(HubSettings::default());
    for i in 0..200 {
        let name = format!("race-{i}");
        let first = polling(&name, thumbprint(&format!("{name}-a")));
        let second = polling(&name, thumbprint(&format!("{name}-b")));
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let register = |agent: TrustedAgent| {
            let (hub, start) = (hub.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                hub.register_grouped(agent).await
            })
        };
        let (a, b) = (register(first.clone()), register(second.clone()));
        let (a, b) = (a.await.expect("task"), b.await.expect("task"));
        let (winner, loser, refusal) = match (a, b) {
            (Ok(()), Err(refusal)) => (&first, &second, refusal),
            (Err(refusal), Ok(())) => (&second, &first, refusal),
            other => panic!("exactly one registration of {name} succeeds: {other:?}"),
        };
        assert!(
            matches!(&refusal, RegisterError::NameTaken(taken) if taken.owner == winner.thumbprint),
            "{refusal:?}"
        );
        let status: Status = refusal.into();
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(
            status.message().contains(&format!("`{name}`")),
            "{status:?}"
        );
        assert_sole_owner(&hub, dir.path(), winner, loser);
    }
    assert_eq!(on_disk(dir.path()).len(), 200, "one entry per name");
    assert!(!hub.grouped_is_writing(), "the writer finished");
}

/// Grouped registrations that land in one write are checked in order
/// against each other too: the first of a name wins, the rest of the
/// batch is still stored.
#[tokio::test]
async fn within_one_batch_the_first_registration_of_a_name_wins() {
    let (hub, dir) = stored_hub(HubSettings::default());
    let first = polling("web-01", thumbprint("a"));
    let second = polling("web-01", thumbprint("b"));
    let other = polling("web-02", thumbprint("c"));
    let outcomes = hub
        .register_all(vec![first.clone(), second.clone(), other.clone()])
        .await;
    assert!(
        matches!(
            outcomes.as_slice(),
            [Ok(()), Err(RegisterError::NameTaken(taken)), Ok(())]
                if taken.owner == first.thumbprint && taken.name == "web-01"
        ),
        "{outcomes:?}"
    );
    assert_sole_owner(&hub, dir.path(), &first, &second);
    assert!(on_disk(dir.path()).contains(&other));

    // A later batch cannot take the name either, in either position.
    let outcomes = hub
        .register_all(vec![second.clone(), polling("web-03", thumbprint("d"))])
        .await;
    assert!(
        matches!(
            outcomes.as_slice(),
            [Err(RegisterError::NameTaken(_)), Ok(())]
        ),
        "{outcomes:?}"
    );
    assert_sole_owner(&hub, dir.path(), &first, &second);
    assert_eq!(on_disk(dir.path()).len(), 3);
}

/// An agent registering again with its own certificate updates its entry,
/// under its name or a new one; a name it gives up is free for others.
#[tokio::test]
async fn an_agent_registering_again_updates_its_own_entry() {
    let (hub, dir) = stored_hub(HubSettings::default());
    let agent = polling("web-01", thumbprint("a"));
    hub.register(agent.clone()).await.expect("registered");
    let mut again = agent.clone();
    again.roles = vec!["db".into()];
    again.environments = vec!["prod".into()];
    hub.register(again.clone()).await.expect("registered again");
    assert_eq!(on_disk(dir.path()), [again.clone()]);
    assert_eq!(*hub.agents(), [again.clone()]);

    let mut renamed = again.clone();
    renamed.name = "web-09".into();
    hub.register(renamed.clone()).await.expect("renamed");
    assert_eq!(on_disk(dir.path()), [renamed.clone()]);
    let newcomer = polling("web-01", thumbprint("b"));
    hub.register(newcomer.clone())
        .await
        .expect("the old name is free");
    assert_eq!(on_disk(dir.path()), [renamed, newcomer]);
}

/// A name an operator's deregistration freed can be registered by another
/// certificate.
#[tokio::test]
async fn deregistering_frees_the_name() {
    let (hub, dir) = stored_hub(HubSettings::default());
    let first = polling("web-01", thumbprint("a"));
    let second = polling("web-01", thumbprint("b"));
    hub.register(first.clone()).await.expect("first");
    assert!(matches!(
        hub.register(second.clone()).await,
        Err(RegisterError::NameTaken(_))
    ));
    hub.deregister(&first.thumbprint).await.expect("deregister");
    assert!(!hub.tls_trust().contains(&first.thumbprint));
    hub.register(second.clone()).await.expect("second");
    assert_sole_owner(&hub, dir.path(), &second, &first);
}

/// A store that cannot be written is the hub's problem (`INTERNAL`), and
/// nothing is trusted that is not stored.
#[tokio::test]
async fn a_registration_the_store_cannot_hold_is_internal_and_not_trusted() {
    let (hub, dir) = stored_hub(HubSettings::default());
    std::fs::create_dir(dir.path().join("agents.toml")).expect("block the file");
    let agent = polling("web-01", thumbprint("a"));
    let error = hub
        .register(agent.clone())
        .await
        .expect_err("cannot be stored");
    assert!(
        matches!(error, RegisterError::Store(_)) && error.stored_nothing(),
        "{error:?}"
    );
    let status: Status = error.into();
    assert_eq!(status.code(), Code::Internal);
    assert!(hub.agents().is_empty());
    assert!(!hub.tls_trust().contains(&agent.thumbprint));
}

/// Two rotations from one certificate at the same moment: one is stored,
/// the other is refused rather than silently replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_from_one_certificate_have_one_outcome() {
    for i in 0..50 {
        let hub = memory_hub(HubSettings::default());
        let current = thumbprint(&format!("current-{i}"));
        hub.register(polling("web-01", current))
            .await
            .expect("registered");
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let rotate = |seed: &str| {
            let (hub, start, new) = (hub.clone(), start.clone(), thumbprint(seed));
            tokio::spawn(async move {
                start.wait().await;
                (
                    new,
                    hub.rotate(&current, new, Duration::from_secs(60)).await,
                )
            })
        };
        let (a, b) = (rotate("new-a"), rotate("new-b"));
        let results = [a.await.expect("task"), b.await.expect("task")];
        let won: Vec<_> = results
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(new, _)| *new)
            .collect();
        assert_eq!(won.len(), 1, "{results:?}");
        assert!(
            results
                .iter()
                .any(|(_, r)| matches!(r, Err(RotateError::AlreadyRotating(_)))),
            "{results:?}"
        );
        let agents = hub.agents();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].thumbprint, won[0]);
        assert_eq!(agents[0].previous_thumbprint, Some(current));
    }
}

/// A rotation cannot announce a certificate another agent holds: it would
/// take that agent's entry.
#[tokio::test]
async fn a_rotation_to_another_agents_thumbprint_is_refused() {
    let hub = memory_hub(HubSettings::default());
    let mine = polling("web-01", thumbprint("mine"));
    let theirs = polling("web-02", thumbprint("theirs"));
    hub.register(mine.clone()).await.expect("mine");
    hub.register(theirs.clone()).await.expect("theirs");
    let refused = hub
        .rotate(&mine.thumbprint, theirs.thumbprint, Duration::from_secs(60))
        .await;
    assert!(
        matches!(refused, Err(RotateError::ThumbprintInUse(t)) if t == theirs.thumbprint),
        "{refused:?}"
    );
    assert_eq!(*hub.agents(), [mine, theirs]);
}

/// A drain tells every open tunnel, closes them once their calls are done,
/// and refuses tunnels that arrive after it began.
#[tokio::test]
async fn a_drain_tells_every_tunnel_and_refuses_new_ones() {
    let hub = memory_hub(HubSettings {
        drain_grace: Duration::from_secs(5),
        ..HubSettings::default()
    });
    let (open, mut frames) = idle_tunnel("web-01", thumbprint("a"));
    hub.registry().add(open.clone());
    hub.drain().await;
    let notice = frames.try_next().expect("a drain notice");
    assert!(matches!(notice.kind, Some(Kind::Drain(_))), "{notice:?}");
    assert!(open.is_draining() && open.stop.is_cancelled());
    let (late, _late_frames) = idle_tunnel("web-02", thumbprint("b"));
    hub.registry().add(late.clone());
    assert!(
        late.stop.is_cancelled(),
        "a tunnel after the drain is stopped"
    );
    assert!(
        hub.registry().tunnels().iter().all(|t| t.id != late.id),
        "and not listed"
    );
}
