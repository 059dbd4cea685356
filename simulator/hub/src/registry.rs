//! Open tunnels by agent id, and calls waiting for an agent to connect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tentacle_proto::Thumbprint;
use tentacle_proto::tunnel::{Outbound, StartReservation, TunnelCaller};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::target::AgentId;

/// One open tunnel to a polling agent.
#[derive(Debug)]
pub struct Tunnel {
    pub id: u64,
    pub agent_id: AgentId,
    pub thumbprint: Thumbprint,
    /// Sends calls to the agent over the tunnel.
    pub caller: TunnelCaller,
    /// Frames to the agent outside any call (drain).
    pub outbound: Outbound,
    /// Cancelling closes the tunnel.
    pub stop: CancellationToken,
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

impl Tunnel {
    pub fn new(
        agent_id: AgentId,
        thumbprint: Thumbprint,
        caller: TunnelCaller,
        outbound: Outbound,
        stop: CancellationToken,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            agent_id,
            thumbprint,
            caller,
            outbound,
            stop,
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Counts a call until the guard is dropped.
    pub fn begin_call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            tunnel: self.clone(),
        }
    }
}

/// A tunnel picked for one call, with the call's place on it: a drain
/// acknowledgment on that tunnel waits until the call's start is sent.
#[derive(Debug)]
pub struct Picked {
    pub tunnel: Arc<Tunnel>,
    pub reservation: StartReservation,
}

impl std::ops::Deref for Picked {
    type Target = Arc<Tunnel>;

    fn deref(&self) -> &Arc<Tunnel> {
        &self.tunnel
    }
}

/// A call in flight on a tunnel.
#[derive(Debug)]
pub struct CallGuard {
    tunnel: Arc<Tunnel>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.tunnel.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct AgentSlot {
    tunnels: Vec<Arc<Tunnel>>,
    /// Bumped whenever a tunnel arrives, to wake waiting calls.
    arrivals: Option<watch::Sender<u64>>,
}

/// Counts a call waiting for its agent in the metrics.
struct QueuedCall;

impl QueuedCall {
    fn new() -> Self {
        tentacle_proto::metrics::METRICS.hub_queued_calls.inc();
        Self
    }
}

impl Drop for QueuedCall {
    fn drop(&mut self) {
        tentacle_proto::metrics::METRICS.hub_queued_calls.dec();
    }
}

/// Drops a waiter's slot when the wait ends, however it ends.
struct SlotCleanup<'a> {
    registry: &'a Registry,
    agent: &'a AgentId,
}

impl Drop for SlotCleanup<'_> {
    fn drop(&mut self) {
        self.registry.forget_if_unused(self.agent);
    }
}

/// What [`Registry::pick_or`] waited for.
#[derive(Debug)]
pub enum Waited<T> {
    /// A tunnel here.
    Tunnel(Picked),
    /// The other future's output, which came first.
    Other(T),
}

/// Why no tunnel could be picked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PickError {
    #[error("agent {agent} did not connect within {waited}")]
    NotConnected { agent: String, waited: String },
    #[error("the hub is shutting down")]
    Closing,
    #[error("agent {agent} is connected with thumbprint {actual}, not the expected {expected}")]
    WrongThumbprint {
        agent: String,
        actual: String,
        expected: String,
    },
}

/// Every open tunnel, by agent.
#[derive(Debug, Default)]
pub struct Registry {
    agents: Mutex<HashMap<AgentId, AgentSlot>>,
    /// Cancelled when the hub shuts down.
    closing: CancellationToken,
    /// Every thumbprint registered for an agent: during a certificate
    /// rotation a caller that expects either one reaches the agent.
    aliases: Mutex<HashMap<AgentId, Vec<Thumbprint>>>,
    /// Where the tunnels opened and closed here are announced to the other
    /// nodes of a cluster.
    presence: std::sync::OnceLock<Arc<dyn crate::cluster::PresenceSink>>,
}

impl Registry {
    /// Stops accepting tunnels and fails waiting calls.
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Replaces the thumbprints known for each agent.
    pub fn set_aliases(&self, aliases: impl IntoIterator<Item = (AgentId, Vec<Thumbprint>)>) {
        *self.aliases.lock().unwrap_or_else(PoisonError::into_inner) =
            aliases.into_iter().collect();
    }

    /// Announces every tunnel opened or closed from now on to `sink`.
    pub fn announce_to(&self, sink: Arc<dyn crate::cluster::PresenceSink>) {
        let agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        for tunnel in agents.values().flat_map(|slot| slot.tunnels.iter()) {
            sink.tunnel_opened(&tunnel.agent_id, tunnel.id);
        }
        let _ = self.presence.set(sink);
    }

    /// Sets the thumbprints known for one agent.
    pub fn set_alias(&self, agent: AgentId, thumbprints: Vec<Thumbprint>) {
        self.aliases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(agent, thumbprints);
    }

    /// Forgets the thumbprints known for one agent.
    pub fn remove_alias(&self, agent: &AgentId) {
        self.aliases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(agent);
    }

    /// Whether a tunnel with `actual` serves a caller that expects `expected`.
    fn same_agent(&self, agent: &AgentId, expected: &Thumbprint, actual: &Thumbprint) -> bool {
        expected == actual
            || self
                .aliases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(agent)
                .is_some_and(|known| known.contains(expected) && known.contains(actual))
    }

    /// Registers a tunnel; a closing registry stops it at once instead.
    pub fn add(&self, tunnel: Arc<Tunnel>) {
        // Checked under the lock: `Hub::drain` closes the registry before it
        // takes its snapshot, so a tunnel is either in the snapshot or
        // stopped here.
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_closing() {
            tunnel.stop.cancel();
            return;
        }
        if let Some(sink) = self.presence.get() {
            sink.tunnel_opened(&tunnel.agent_id, tunnel.id);
        }
        let slot = agents.entry(tunnel.agent_id.clone()).or_default();
        slot.tunnels.push(tunnel);
        if let Some(arrivals) = &slot.arrivals {
            arrivals.send_modify(|n| *n += 1);
        }
        Self::publish(&agents);
    }

    /// Updates the tunnel and agent gauges; called with the table locked.
    fn publish(agents: &HashMap<AgentId, AgentSlot>) {
        let metrics = &tentacle_proto::metrics::METRICS;
        let tunnels: usize = agents.values().map(|s| s.tunnels.len()).sum();
        let connected = agents.values().filter(|s| !s.tunnels.is_empty()).count();
        metrics
            .hub_tunnels_open
            .set(i64::try_from(tunnels).unwrap_or(i64::MAX));
        metrics
            .hub_connected_agents
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
    }

    pub fn remove(&self, tunnel: &Tunnel) {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = agents.get_mut(&tunnel.agent_id) {
            let before = slot.tunnels.len();
            slot.tunnels.retain(|t| t.id != tunnel.id);
            if slot.tunnels.len() != before
                && let Some(sink) = self.presence.get()
            {
                sink.tunnel_closed(&tunnel.agent_id, tunnel.id);
            }
            let waiters = slot
                .arrivals
                .as_ref()
                .is_some_and(|a| a.receiver_count() > 0);
            if slot.tunnels.is_empty() && !waiters {
                agents.remove(&tunnel.agent_id);
            }
        }
        Self::publish(&agents);
    }

    /// Agents with at least one open tunnel.
    pub fn connected_agents(&self) -> usize {
        self.agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|s| !s.tunnels.is_empty())
            .count()
    }

    pub fn tunnels(&self) -> Vec<Arc<Tunnel>> {
        self.agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .flat_map(|s| s.tunnels.iter().cloned())
            .collect()
    }

    /// The least busy usable tunnel to `agent`, if one is open now, with
    /// the call's place reserved on it.
    fn pick_now(
        &self,
        agent: &AgentId,
        thumbprint: &Thumbprint,
    ) -> Result<Option<Picked>, PickError> {
        let agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slot) = agents.get(agent) else {
            return Ok(None);
        };
        let usable = slot
            .tunnels
            .iter()
            .filter(|t| !t.is_draining() && !t.stop.is_cancelled());
        let mut wrong = None;
        let mut candidates: Vec<&Arc<Tunnel>> = Vec::new();
        for tunnel in usable {
            if !self.same_agent(agent, thumbprint, &tunnel.thumbprint) {
                wrong = Some(tunnel.thumbprint);
                continue;
            }
            candidates.push(tunnel);
        }
        // Least busy first; a tunnel whose agent drained it a moment ago
        // refuses the reservation, and the next one is tried.
        candidates.sort_by_key(|t| t.in_flight());
        let picked = candidates.into_iter().find_map(|tunnel| {
            Some(Picked {
                reservation: tunnel.caller.reserve()?,
                tunnel: tunnel.clone(),
            })
        });
        match (picked, wrong) {
            (Some(picked), _) => Ok(Some(picked)),
            (None, Some(actual)) => Err(PickError::WrongThumbprint {
                agent: agent.to_string(),
                actual: actual.to_string(),
                expected: thumbprint.to_string(),
            }),
            (None, None) => Ok(None),
        }
    }

    fn arrivals(&self, agent: &AgentId) -> watch::Receiver<u64> {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        agents
            .entry(agent.clone())
            .or_default()
            .arrivals
            .get_or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Drops an agent's slot once it has neither tunnels nor waiters, so
    /// asking for unknown agents does not grow the table.
    fn forget_if_unused(&self, agent: &AgentId) {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let unused = agents.get(agent).is_some_and(|slot| {
            slot.tunnels.is_empty()
                && slot
                    .arrivals
                    .as_ref()
                    .is_none_or(|a| a.receiver_count() <= 1)
        });
        if unused {
            agents.remove(agent);
        }
    }

    /// Whether a call for `agent` with `thumbprint` would be answered here
    /// now, without waiting: a usable tunnel is open, or only tunnels with
    /// another certificate are (and the call is refused for that). A hub in
    /// a cluster serves such a call itself rather than forwarding it.
    pub fn serves_now(&self, agent: &AgentId, thumbprint: &Thumbprint) -> bool {
        // The reservation is dropped at once: the call picks again.
        !matches!(self.pick_now(agent, thumbprint), Ok(None))
    }

    /// Waits up to `timeout` for a tunnel to `agent` with `thumbprint`.
    pub async fn pick(
        &self,
        agent: &AgentId,
        thumbprint: &Thumbprint,
        timeout: Duration,
    ) -> Result<Picked, PickError> {
        let never = std::future::pending::<std::convert::Infallible>();
        match self.pick_or(agent, thumbprint, timeout, never).await? {
            Waited::Tunnel(picked) => Ok(picked),
            Waited::Other(never) => match never {},
        }
    }

    /// [`Self::pick`], or `other`'s output if it comes first: a hub in a
    /// cluster waits for a tunnel here or for another node to hold one,
    /// whichever comes first, without polling either.
    pub async fn pick_or<T>(
        &self,
        agent: &AgentId,
        thumbprint: &Thumbprint,
        timeout: Duration,
        other: impl Future<Output = T>,
    ) -> Result<Waited<T>, PickError> {
        if let Some(tunnel) = self.pick_now(agent, thumbprint)? {
            return Ok(Waited::Tunnel(tunnel));
        }
        if self.is_closing() {
            return Err(PickError::Closing);
        }
        let _queued = QueuedCall::new();
        let mut arrivals = self.arrivals(agent);
        // Forgets the slot however the wait ends, even if the caller gives up.
        let _cleanup = SlotCleanup {
            registry: self,
            agent,
        };
        let wait = async {
            loop {
                // Check after subscribing, so an arrival in between is seen.
                if let Some(tunnel) = self.pick_now(agent, thumbprint)? {
                    return Ok(tunnel);
                }
                if arrivals.changed().await.is_err() {
                    // The slot was dropped; subscribe again.
                    arrivals = self.arrivals(agent);
                }
            }
        };
        let result = tokio::select! {
            result = tokio::time::timeout(timeout, wait) => result,
            () = self.closing.cancelled() => return Err(PickError::Closing),
            output = other => return Ok(Waited::Other(output)),
        };
        match result {
            Ok(result) => result.map(Waited::Tunnel),
            Err(_) => Err(PickError::NotConnected {
                agent: agent.to_string(),
                waited: humantime::format_duration(timeout).to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
