use super::*;
use crate::testing::{agent_id, idle_tunnel, thumbprint};

/// How long a test waits for a tunnel that is already there.
const NOW: Duration = Duration::from_secs(1);

#[tokio::test]
async fn the_least_busy_usable_tunnel_is_picked() {
    let registry = Registry::default();
    let print = thumbprint("web-01");
    let tunnels: Vec<_> = (0..3)
        .map(|_| {
            let (tunnel, frames) = idle_tunnel("web-01", print);
            registry.add(tunnel.clone());
            (tunnel, frames)
        })
        .collect();
    let [(a, _), (b, _), (c, _)] = &tunnels[..] else {
        unreachable!()
    };
    let _calls = [a.begin_call(), a.begin_call(), b.begin_call()];
    let agent = agent_id("web-01");
    let picked = registry.pick(&agent, &print, NOW).await.expect("pick");
    assert_eq!(picked.id, c.id, "the idle tunnel");

    let _more = [c.begin_call(), c.begin_call(), c.begin_call()];
    let picked = registry.pick(&agent, &print, NOW).await.expect("pick");
    assert_eq!(picked.id, b.id, "one call beats two and three");

    // A draining tunnel gets no new calls, however idle.
    let (draining, _frames) = idle_tunnel("web-01", print);
    draining.start_draining();
    registry.add(draining.clone());
    let picked = registry.pick(&agent, &print, NOW).await.expect("pick");
    assert_eq!(picked.id, b.id);
    assert_eq!(registry.connected_agents(), 1);
}

#[tokio::test]
async fn a_tunnel_its_agent_drained_is_not_picked_and_its_ack_waits_for_picked_calls() {
    let registry = Registry::default();
    let print = thumbprint("web-01");
    let agent = agent_id("web-01");
    // A caller whose frames to the agent are kept, to see the ack.
    let (to_agent, mut sent) = tentacle_proto::tunnel::outbound();
    let old = Arc::new(Tunnel::new(
        agent.clone(),
        print,
        TunnelCaller::new(to_agent.clone(), 0),
        to_agent,
        CancellationToken::new(),
    ));
    registry.add(old.clone());
    // Picked before the agent's drain: its start is not queued yet.
    let picked = registry.pick(&agent, &print, NOW).await.expect("pick");
    assert_eq!(picked.id, old.id);
    let acknowledged = tokio::spawn({
        let old = old.clone();
        async move { old.caller.acknowledge_drain(Duration::from_secs(60)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !acknowledged.is_finished(),
        "the picked call has yet to start"
    );
    let refused = registry.pick(&agent, &print, Duration::ZERO).await;
    assert!(refused.is_err(), "the drained tunnel takes no new call");
    let (new, _new_frames) = idle_tunnel("web-01", print);
    registry.add(new.clone());
    let next = registry.pick(&agent, &print, NOW).await.expect("pick");
    assert_eq!(next.id, new.id, "the replacement takes new calls");
    drop(picked);
    assert!(
        acknowledged.await.expect("ack"),
        "acknowledged once it started"
    );
    let frame = sent.try_next().expect("a frame for the agent");
    assert!(
        matches!(
            frame.kind,
            Some(tentacle_proto::v1::tunnel_frame::Kind::DrainAck(_))
        ),
        "{frame:?}"
    );
}

#[tokio::test]
async fn a_tunnel_with_another_certificate_is_not_picked() {
    let registry = Registry::default();
    let (tunnel, _frames) = idle_tunnel("web-01", thumbprint("someone-else"));
    registry.add(tunnel);
    let refused = registry
        .pick(&agent_id("web-01"), &thumbprint("web-01"), NOW)
        .await;
    assert!(
        matches!(refused, Err(PickError::WrongThumbprint { .. })),
        "{refused:?}"
    );
    // While the agent rotates, either registered thumbprint reaches it.
    registry.set_aliases([(
        agent_id("web-01"),
        vec![thumbprint("web-01"), thumbprint("someone-else")],
    )]);
    registry
        .pick(&agent_id("web-01"), &thumbprint("web-01"), NOW)
        .await
        .expect("an alias is the same agent");
}

#[tokio::test(start_paused = true)]
async fn a_call_waits_for_an_agent_that_connects_later() {
    let registry = Arc::new(Registry::default());
    let print = thumbprint("web-01");
    let waiting = tokio::spawn({
        let registry = registry.clone();
        async move {
            let start = tokio::time::Instant::now();
            let picked = registry
                .pick(&agent_id("web-01"), &print, Duration::from_secs(60))
                .await;
            (picked, start.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiting.is_finished(), "no tunnel yet");
    let (tunnel, _frames) = idle_tunnel("web-01", print);
    registry.add(tunnel.clone());
    let (picked, waited) = waiting.await.expect("task");
    assert_eq!(picked.expect("picked").id, tunnel.id);
    assert_eq!(waited, Duration::from_secs(5), "picked when it arrived");
}

#[tokio::test(start_paused = true)]
async fn a_call_gives_up_after_the_pickup_timeout() {
    let registry = Registry::default();
    let agent = agent_id("web-01");
    let start = tokio::time::Instant::now();
    let refused = registry
        .pick(&agent, &thumbprint("web-01"), Duration::from_secs(30))
        .await;
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert_eq!(
        refused.map(|t| t.id),
        Err(PickError::NotConnected {
            agent: "web-01".into(),
            waited: "30s".into(),
        })
    );
    assert!(
        registry
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty(),
        "the waiter's slot is forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn an_early_tunnel_from_another_agent_does_not_end_the_wait() {
    let registry = Arc::new(Registry::default());
    let waiting = tokio::spawn({
        let registry = registry.clone();
        async move {
            registry
                .pick(
                    &agent_id("web-01"),
                    &thumbprint("web-01"),
                    Duration::from_secs(10),
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (other, _frames) = idle_tunnel("web-02", thumbprint("web-02"));
    registry.add(other);
    assert!(matches!(
        waiting.await.expect("task"),
        Err(PickError::NotConnected { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn closing_fails_waiting_calls_and_refuses_new_tunnels() {
    let registry = Arc::new(Registry::default());
    let print = thumbprint("web-01");
    let waiting = tokio::spawn({
        let registry = registry.clone();
        async move {
            let start = tokio::time::Instant::now();
            let picked = registry
                .pick(&agent_id("web-01"), &print, Duration::from_secs(60))
                .await;
            (picked.map(|t| t.id), start.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    registry.close();
    let (picked, waited) = waiting.await.expect("task");
    assert_eq!(picked, Err(PickError::Closing));
    assert_eq!(
        waited,
        Duration::from_secs(2),
        "at once, not at the timeout"
    );

    let (late, _frames) = idle_tunnel("web-01", print);
    registry.add(late.clone());
    assert!(late.stop.is_cancelled(), "a tunnel after close is stopped");
    assert!(registry.tunnels().is_empty());
    assert_eq!(
        registry
            .pick(&agent_id("web-01"), &print, Duration::from_secs(60))
            .await
            .map(|t| t.id),
        Err(PickError::Closing)
    );
}

#[tokio::test]
async fn a_closed_tunnel_is_forgotten() {
    let registry = Registry::default();
    let print = thumbprint("web-01");
    let (tunnel, _frames) = idle_tunnel("web-01", print);
    registry.add(tunnel.clone());
    assert_eq!(registry.connected_agents(), 1);
    registry.remove(&tunnel);
    assert_eq!(registry.connected_agents(), 0);
    assert!(registry.tunnels().is_empty());
    // A stopped tunnel still listed is not picked either.
    let (stopped, _frames) = idle_tunnel("web-01", print);
    stopped.stop.cancel();
    registry.add(stopped);
    assert!(
        registry
            .pick(&agent_id("web-01"), &print, Duration::ZERO)
            .await
            .is_err()
    );
}

/// A hub in a cluster asks without waiting whether it serves a call here.
#[tokio::test]
async fn serves_now_says_whether_a_tunnel_answers_without_waiting() {
    let registry = Registry::default();
    let (agent, print) = (agent_id("web-01"), thumbprint("web-01"));
    assert!(!registry.serves_now(&agent, &print));
    let (tunnel, _frames) = idle_tunnel("web-01", print);
    registry.add(tunnel.clone());
    assert!(registry.serves_now(&agent, &print));
    // Another certificate's tunnel answers too: with a refusal.
    assert!(registry.serves_now(&agent, &thumbprint("stranger")));
    tunnel.start_draining();
    assert!(!registry.serves_now(&agent, &print), "a draining tunnel");
    assert!(registry.pick(&agent, &print, Duration::ZERO).await.is_err());
}

/// `pick_or` ends with whichever comes first: a tunnel, or the other
/// future; neither is polled for.
#[tokio::test(start_paused = true)]
async fn pick_or_ends_with_a_tunnel_or_the_other_future_whichever_is_first() {
    let registry = Arc::new(Registry::default());
    let (agent, print) = (agent_id("web-01"), thumbprint("web-01"));
    let (tell, told) = tokio::sync::oneshot::channel::<&str>();
    let waiting = tokio::spawn({
        let (registry, agent) = (registry.clone(), agent.clone());
        async move {
            let other = async { told.await.unwrap_or("dropped") };
            registry
                .pick_or(&agent, &print, Duration::from_secs(60), other)
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiting.is_finished());
    tell.send("holder named").expect("send");
    match waiting.await.expect("task") {
        Ok(Waited::Other(said)) => assert_eq!(said, "holder named"),
        other => panic!("expected the other future, got {other:?}"),
    }
    assert_eq!(registry.connected_agents(), 0);

    let waiting = tokio::spawn({
        let (registry, agent) = (registry.clone(), agent.clone());
        async move {
            let other = std::future::pending::<()>();
            registry
                .pick_or(&agent, &print, Duration::from_secs(60), other)
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (tunnel, _frames) = idle_tunnel("web-01", print);
    registry.add(tunnel.clone());
    match waiting.await.expect("task") {
        Ok(Waited::Tunnel(picked)) => assert_eq!(picked.id, tunnel.id),
        other => panic!("expected the tunnel, got {other:?}"),
    }
}
