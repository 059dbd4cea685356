//! The etcd store against a real etcd: the registration rules hold across
//! hubs, a one-time token is used once however many hubs redeem it at
//! once, the initial load pages past one response, each hub's watch
//! applies changes one by one and recovers from compaction, and a hub
//! that has not heard of an agent yet looks it up before refusing it.

use std::sync::Arc;
use std::time::Duration;

use tentacle_hub::credentials::{CredentialError, CredentialKind};
use tentacle_hub::hub::RegisterError;
use tentacle_hub::store::RegistryStore;
use tentacle_hub::store::etcd::{EtcdSettings, EtcdStore};
use tentacle_hub::{AgentMode, Hub, HubSettings, TrustedAgent};
use tentacle_proto::{Identity, Thumbprint};
use tentacle_tests::etcd::{EtcdCluster, etcd_or_skip};
use tokio_util::sync::CancellationToken;

fn agent(name: &str, seed: &str) -> TrustedAgent {
    TrustedAgent {
        thumbprint: Thumbprint::of_der(seed.as_bytes()),
        name: name.into(),
        mode: AgentMode::Polling,
        address: None,
        roles: vec!["web".into()],
        environments: Vec::new(),
        previous_thumbprint: None,
        retire_previous_at: None,
    }
}

async fn store(etcd: &EtcdCluster, prefix: &str) -> EtcdStore {
    let mut settings = EtcdSettings::new(etcd.endpoints());
    settings.prefix = prefix.into();
    EtcdStore::connect(&settings)
        .await
        .expect("connect to etcd")
}

/// A hub following `store`, as a node does.
async fn following_hub(store: &EtcdStore) -> (Arc<Hub>, CancellationToken) {
    let identity = Identity::generate("hub").expect("identity");
    let hub = Hub::with_registry_store(
        identity,
        HubSettings::default(),
        Arc::new(store.clone()),
        true,
    )
    .await
    .expect("hub");
    let stop = CancellationToken::new();
    tentacle_hub::store::etcd::watch::follow(store.clone(), hub.clone(), stop.clone())
        .await
        .expect("follow");
    (hub, stop)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_through_two_hubs_follow_one_set_of_rules() {
    if !etcd_or_skip("cluster_store::registrations_through_two_hubs_follow_one_set_of_rules") {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = store(&etcd, "/rules/").await;
    let (a, _stop_a) = following_hub(&store).await;
    let (b, _stop_b) = following_hub(&store).await;

    let first = agent("web-01", "first");
    a.register(first.clone()).await.expect("registered on a");
    // B learns it through its watch; A knew it when register returned.
    assert!(a.allows_tunnel(&first.thumbprint, "web-01"));
    eventually("b sees the registration", || {
        b.allows_tunnel(&first.thumbprint, "web-01")
    })
    .await;

    // The name belongs to one thumbprint, whichever hub is asked.
    let thief = agent("web-01", "thief");
    let refused = b.register(thief.clone()).await;
    assert!(
        matches!(&refused, Err(RegisterError::NameTaken(t)) if t.owner == first.thumbprint),
        "{refused:?}"
    );
    // The same agent under a new name frees the old one.
    let mut renamed = first.clone();
    renamed.name = "web-09".into();
    b.register(renamed.clone()).await.expect("renamed");
    eventually("a sees the rename", || {
        a.allows_tunnel(&first.thumbprint, "web-09")
            && !a.allows_tunnel(&first.thumbprint, "web-01")
    })
    .await;
    a.register(thief.clone())
        .await
        .expect("the old name is free");

    // A rotation's two thumbprints lead to one agent, on every hub.
    let new = Thumbprint::of_der(b"web-09 new");
    a.rotate(&first.thumbprint, new, Duration::from_secs(600))
        .await
        .expect("rotated");
    eventually("b trusts both thumbprints of web-09", || {
        b.allows_tunnel(&new, "web-09") && b.allows_tunnel(&first.thumbprint, "web-09")
    })
    .await;
    // A rotation to a thumbprint another agent holds is refused.
    let taken = b
        .rotate(&new, thief.thumbprint, Duration::from_secs(600))
        .await;
    assert!(taken.is_err(), "{taken:?}");

    // Deregistering on one hub untrusts everywhere.
    b.deregister(&new).await.expect("deregistered");
    eventually("a forgets web-09", || {
        !a.allows_tunnel(&new, "web-09") && !a.allows_tunnel(&first.thumbprint, "web-09")
    })
    .await;
    let names: Vec<String> = store
        .load()
        .await
        .expect("load")
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["web-01"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_redeemed_by_many_hubs_at_once_is_used_once() {
    if !etcd_or_skip("cluster_store::a_token_redeemed_by_many_hubs_at_once_is_used_once") {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let hubs = [
        store(&etcd, "/tokens/").await,
        store(&etcd, "/tokens/").await,
        store(&etcd, "/tokens/").await,
    ];
    for round in 0..10 {
        let token = hubs[0]
            .create_credential(CredentialKind::Token, Some(Duration::from_secs(60)))
            .await
            .expect("token");
        let tries = (0..12).map(|i| {
            let (store, token) = (hubs[i % 3].clone(), token.clone());
            tokio::spawn(async move { store.redeem(token, CredentialKind::Token).await })
        });
        let outcomes = futures::future::join_all(tries).await;
        let used = outcomes.iter().filter(|o| matches!(o, Ok(Ok(_)))).count();
        assert_eq!(used, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Ok(Ok(_)) | Ok(Err(CredentialError::Invalid)))),
            "{outcomes:?}"
        );
    }
    // An API key is not used up; a token comes back when given back.
    let key = hubs[1]
        .create_credential(CredentialKind::ApiKey, None)
        .await
        .expect("key");
    for store in &hubs {
        store
            .redeem(key.clone(), CredentialKind::ApiKey)
            .await
            .expect("api key");
    }
    let token = hubs[0]
        .create_credential(CredentialKind::Token, None)
        .await
        .expect("token");
    let used = hubs[2]
        .redeem(token.clone(), CredentialKind::Token)
        .await
        .expect("used");
    hubs[2].restore(used).await.expect("restored");
    hubs[1]
        .redeem(token, CredentialKind::Token)
        .await
        .expect("valid again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_loads_thousands_of_agents_in_pages_and_recovers_from_compaction() {
    if !etcd_or_skip(
        "cluster_store::a_hub_loads_thousands_of_agents_in_pages_and_recovers_from_compaction",
    ) {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = store(&etcd, "/paged/").await;
    let count = 2_500;
    let batch: Vec<TrustedAgent> = (0..count)
        .map(|i| agent(&format!("agent-{i:05}"), &format!("seed-{i}")))
        .collect();
    for chunk in batch.chunks(250) {
        let (outcomes, _) = store.register_all(chunk.to_vec()).await.expect("stored");
        assert!(outcomes.iter().all(Result::is_ok));
    }
    // More than one page of the load (1,000 keys a page).
    let (hub, stop) = following_hub(&store).await;
    assert_eq!(hub.agents().len(), count);
    let last = &batch[count - 1];
    assert!(hub.allows_tunnel(&last.thumbprint, &last.name));

    // Cut the hub's watch off, change the registry, and compact etcd past
    // what the watch saw: a new hub's watch starting from that revision
    // must read the registry again instead of missing the changes.
    stop.cancel();
    let gone = &batch[0];
    store.remove(gone.thumbprint).await.expect("removed");
    let added = agent("late-arrival", "late");
    store
        .register_all(vec![added.clone()])
        .await
        .expect("added");
    let status = etcd
        .etcdctl(
            &[0],
            tentacle_tests::etcd::Credentials::ClientCertificate,
            &["endpoint", "status", "--write-out", "json"],
        )
        .expect("status");
    let revision: i64 = status
        .split("\"revision\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .and_then(|r| r.trim().parse().ok())
        .expect("revision in status");
    etcd.etcdctl(
        &[0],
        tentacle_tests::etcd::Credentials::ClientCertificate,
        &["compact", &revision.to_string()],
    )
    .expect("compact");
    let resumed = CancellationToken::new();
    tentacle_hub::store::etcd::watch::resume(store.clone(), hub.clone(), 1, resumed.clone());
    eventually("the hub read the registry again after compaction", || {
        hub.allows_tunnel(&added.thumbprint, "late-arrival")
            && !hub.allows_tunnel(&gone.thumbprint, &gone.name)
    })
    .await;
    assert_eq!(hub.agents().len(), count);
    resumed.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_that_has_not_heard_of_an_agent_looks_it_up_before_refusing() {
    if !etcd_or_skip(
        "cluster_store::a_hub_that_has_not_heard_of_an_agent_looks_it_up_before_refusing",
    ) {
        return;
    }
    let etcd = EtcdCluster::start(1);
    let store = store(&etcd, "/miss/").await;
    // A hub whose watch is not running: it hears of nothing by itself.
    let identity = Identity::generate("hub").expect("identity");
    let deaf = Hub::with_registry_store(
        identity,
        HubSettings::default(),
        Arc::new(store.clone()),
        true,
    )
    .await
    .expect("hub");
    let newcomer = agent("web-07", "newcomer");
    store
        .register_all(vec![newcomer.clone()])
        .await
        .expect("registered elsewhere");
    assert!(!deaf.allows_tunnel(&newcomer.thumbprint, "web-07"));
    assert!(deaf.refresh_unknown(&newcomer.thumbprint).await);
    assert!(deaf.allows_tunnel(&newcomer.thumbprint, "web-07"));
    assert!(!deaf.refresh_unknown(&Thumbprint::of_der(b"nobody")).await);
}
