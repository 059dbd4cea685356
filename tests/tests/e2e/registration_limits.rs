//! Registration's budget of failures per source address, over real
//! loopback connections from chosen source addresses: a flood of guessed
//! tokens from one address is refused with `RESOURCE_EXHAUSTED` once its
//! budget is spent, while agents on other addresses register promptly, and
//! a fleet's burst of good registrations from a few addresses is never
//! refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tentacle_hub::credentials::CredentialKind;
use tentacle_hub::limits::RegistrationLimits;
use tentacle_hub::{Hub, HubSettings, HubStore};
use tentacle_proto::Thumbprint;
use tentacle_proto::v1::register_request::Credential;
use tentacle_tests::registering::{
    channel_from, loopback, polling_request, register, register_new_agent,
};
use tonic::Code;

/// A hub with its store in `dir`, serving on 127.0.0.1 until the token is
/// cancelled; returns its address and an API key.
async fn start_hub(
    dir: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
) -> (Arc<Hub>, SocketAddr, String) {
    let store = HubStore::in_dir(dir);
    let key = store
        .credentials
        .create(CredentialKind::ApiKey, None)
        .expect("api key");
    // The default limits: what a hub runs with unless told otherwise.
    let settings = HubSettings::default();
    assert_eq!(settings.registration_limits, RegistrationLimits::default());
    let hub = Hub::with_store(tentacle_tests::client_identity(), settings, store).expect("hub");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn({
        let hub = hub.clone();
        async move {
            hub.serve(listener, stop.cancelled_owned())
                .await
                .expect("hub serves");
        }
    });
    (hub, address, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_bad_tokens_is_refused_while_good_registrations_succeed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (hub, address, key) = start_hub(dir.path(), stop).await;
    let hub_thumbprint: Thumbprint = hub.identity().thumbprint();
    let limits = RegistrationLimits::default();

    // A fleet's burst: 200 agents over 127.0.0.1-16, at once, never refused.
    let burst = Instant::now();
    let agents: Vec<_> = (0..200u32)
        .map(|i| {
            let key = key.clone();
            tokio::spawn(async move {
                let source = loopback(1 + (i % 16) as u8);
                register_new_agent(
                    source,
                    address,
                    hub_thumbprint,
                    &format!("fleet-{i}"),
                    Credential::ApiKey(key),
                )
                .await
            })
        })
        .collect();
    for agent in agents {
        agent.await.expect("task").expect("a fleet agent registers");
    }
    assert!(burst.elapsed() < Duration::from_secs(60));
    assert_eq!(hub.agents().len(), 200);

    // The flood: 500 guessed tokens from 127.0.0.1, four at a time on one
    // connection, while agents on 127.0.0.2 register.
    let throttled_before = tentacle_proto::metrics::METRICS
        .hub_registrations_throttled
        .get();
    let attacker = channel_from(
        loopback(1),
        address,
        hub_thumbprint,
        &tentacle_tests::client_identity(),
    )
    .await
    .expect("attacker connects");
    let flood_started = Instant::now();
    let flood: Vec<_> = (0..4)
        .map(|worker| {
            let channel = attacker.clone();
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for i in 0..125 {
                    let guess = Credential::Token(format!("tt_{worker:02}{i:046}"));
                    let outcome = register(channel.clone(), polling_request("intruder", guess))
                        .await
                        .expect_err("a guessed token never registers");
                    if outcome.code() == Code::ResourceExhausted {
                        assert!(
                            outcome.message().contains("127.0.0.1")
                                && outcome.message().contains("try again in"),
                            "{outcome:?}"
                        );
                    }
                    codes.push(outcome.code());
                }
                codes
            })
        })
        .collect();
    let good: Vec<_> = (0..50u32)
        .map(|i| {
            let key = key.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                register_new_agent(
                    loopback(2),
                    address,
                    hub_thumbprint,
                    &format!("neighbour-{i}"),
                    Credential::ApiKey(key),
                )
                .await
                .expect("an agent on another address registers during the flood");
                started.elapsed()
            })
        })
        .collect();
    for agent in good {
        let took = agent.await.expect("task");
        assert!(
            took < Duration::from_secs(10),
            "registered, but after {took:?}"
        );
    }
    let mut codes = Vec::new();
    for worker in flood {
        codes.extend(worker.await.expect("flood worker"));
    }
    let flood_took = flood_started.elapsed();
    assert!(flood_took < Duration::from_secs(30), "{flood_took:?}");
    assert_eq!(codes.len(), 500);
    let checked = codes
        .iter()
        .filter(|c| **c == Code::PermissionDenied)
        .count();
    let refused = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!(checked + refused, 500, "{codes:?}");
    // The burst, what refilled while the flood ran, and at most the three
    // other attempts in flight when the budget ran out.
    let refill = Duration::from_secs(60) / limits.failures_per_minute;
    let allowed = limits.failure_burst as usize
        + (flood_took.as_secs_f64() / refill.as_secs_f64()).ceil() as usize
        + 3;
    assert!(
        checked >= limits.failure_burst as usize && checked <= allowed,
        "{checked} guesses were checked; at most {allowed} may be"
    );
    assert!(
        tentacle_proto::metrics::METRICS
            .hub_registrations_throttled
            .get()
            >= throttled_before + refused as u64
    );
    assert_eq!(hub.agents().len(), 250, "every good agent, no intruder");
}
