//! Keeping a hub's view of the registry equal to etcd's: read everything
//! once, page by page at one revision (50,000 agents are more than one
//! 4 MiB message), then watch from the next revision and apply each change
//! on its own. A watch that falls behind etcd's compaction cannot resume,
//! so the view is read again and only the differences applied. A watch
//! that breaks (etcd lost its quorum, a member went away) resumes from the
//! last revision seen once etcd answers again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::EtcdStore;
use super::keys::prefix_end;
use crate::hub::{Hub, TrustedAgent};
use crate::store::StoreError;

/// Keys per page of a load.
pub const PAGE: i64 = 1000;

/// Every key under `prefix`, read in pages of [`PAGE`] at one revision;
/// returns them with that revision.
pub async fn load_prefix(
    client: &Client,
    prefix: &[u8],
) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
    load_range(client, prefix, &prefix_end(prefix)).await
}

/// Every key from `start` up to (not including) `end`, read in pages of
/// [`PAGE`] at one revision; returns them with that revision.
pub async fn load_range(
    client: &Client,
    start: &[u8],
    end: &[u8],
) -> Result<(Vec<KeyValue>, i64), etcd_client::Error> {
    let end = end.to_vec();
    let mut kv = client.kv_client();
    let mut from = start.to_vec();
    let mut revision = 0;
    let mut all = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let mut page = kv.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else {
            break;
        };
        // The next page starts just after the last key of this one.
        from = last.key().to_vec();
        from.push(0);
        all.extend(kvs);
        if !more {
            break;
        }
    }
    Ok((all, revision))
}

/// Every registered agent and the revision they were read at.
pub async fn load_agents(store: &EtcdStore) -> Result<(Vec<TrustedAgent>, i64), StoreError> {
    let (kvs, revision) = load_prefix(&store.client, &store.keys.agents())
        .await
        .map_err(|e| store.unavailable(e))?;
    let mut agents = Vec::with_capacity(kvs.len());
    for kv in kvs {
        match store.parse_agent(kv.key(), kv.value()) {
            Ok(agent) => agents.push(agent),
            // One unreadable entry must not hide every other agent.
            Err(error) => tracing::error!(%error, "skipped an unreadable agent entry"),
        }
    }
    Ok((agents, revision))
}

/// Makes `hub`'s view equal to `agents`, one change at a time, so
/// connections of agents that did not change are untouched.
fn apply_whole(hub: &Hub, agents: Vec<TrustedAgent>) {
    let current = hub.agents();
    if current.is_empty() {
        hub.set_agents(agents);
        return;
    }
    let mut wanted: HashMap<String, TrustedAgent> =
        agents.into_iter().map(|a| (a.name.clone(), a)).collect();
    for agent in current.iter() {
        match wanted.remove(&agent.name) {
            Some(fresh) if fresh == *agent => {}
            Some(fresh) => hub.apply_put(fresh),
            None => hub.apply_delete(&agent.name),
        }
    }
    for (_, fresh) in wanted {
        hub.apply_put(fresh);
    }
}

/// Loads the registry into `hub`, then follows etcd's changes until
/// `stop`. Returns once the first load is applied; the watch runs on.
pub async fn follow(
    store: EtcdStore,
    hub: Arc<Hub>,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    let (agents, revision) = load_agents(&store).await?;
    tracing::info!(
        agents = agents.len(),
        revision,
        "loaded the registry from etcd"
    );
    apply_whole(&hub, agents);
    hub.set_watched_revision(revision);
    resume(store, hub, revision, stop);
    Ok(())
}

/// Follows etcd's changes into `hub` from just after `revision` until
/// `stop`, reading everything again if etcd compacted past it.
pub fn resume(store: EtcdStore, hub: Arc<Hub>, revision: i64, stop: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            () = watch_from(&store, &hub, revision) => {}
            () = stop.cancelled() => {}
        }
    });
}

/// Why a watch ended.
enum Ended {
    /// etcd compacted the revisions the watch needed: read everything
    /// again.
    Compacted,
    /// The stream broke; resume after the last revision seen.
    Broken(String),
}

async fn watch_from(store: &EtcdStore, hub: &Hub, mut revision: i64) {
    let mut backoff = Duration::from_millis(200);
    let mut outage = false;
    loop {
        match watch_once(store, hub, &mut revision).await {
            Ended::Compacted => {
                tracing::warn!(
                    revision,
                    "etcd compacted past this node's registry watch; reading the registry again"
                );
                match load_agents(store).await {
                    Ok((agents, fresh)) => {
                        apply_whole(hub, agents);
                        revision = fresh;
                        hub.set_watched_revision(fresh);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not read the registry again");
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            Ended::Broken(reason) => {
                if !outage {
                    tracing::warn!(
                        %reason,
                        revision,
                        "the registry watch on etcd broke; this node keeps its view and resumes when etcd answers"
                    );
                    outage = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if outage {
            tracing::info!(revision, "the registry watch on etcd resumed");
            outage = false;
        }
        backoff = Duration::from_millis(200);
    }
}

/// One watch from `revision + 1`, applying what it brings and moving
/// `revision` along.
async fn watch_once(store: &EtcdStore, hub: &Hub, revision: &mut i64) -> Ended {
    let options = WatchOptions::new()
        .with_range(prefix_end(&store.keys.agents()))
        .with_start_revision(*revision + 1)
        .with_progress_notify();
    let mut client = store.client.clone();
    let mut stream = match client.watch(store.keys.agents(), Some(options)).await {
        Ok(stream) => stream,
        Err(error) => return Ended::Broken(error.to_string()),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ended::Broken("etcd closed the watch".into()),
            Err(error) => return Ended::Broken(error.to_string()),
        };
        if response.compact_revision() > 0 {
            return Ended::Compacted;
        }
        if response.canceled() {
            return Ended::Broken(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            ));
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(name) = store.keys.agent_name(kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => match store.parse_agent(kv.key(), kv.value()) {
                    Ok(agent) if agent.name == name => hub.apply_put(agent),
                    Ok(agent) => tracing::error!(
                        key = name,
                        entry = agent.name,
                        "skipped an agent entry stored under another name's key"
                    ),
                    Err(error) => tracing::error!(%error, "skipped an unreadable agent entry"),
                },
                EventType::Delete => hub.apply_delete(name),
            }
            *revision = (*revision).max(kv.mod_revision());
        }
        // Only a progress notice (no events) promises that nothing up to its
        // header's revision is still to come; a catching-up watch may send
        // older events after a response whose header is newer.
        if response.events().is_empty()
            && let Some(header) = response.header()
        {
            *revision = (*revision).max(header.revision());
        }
        hub.set_watched_revision(*revision);
    }
}
