//! A hub's caller and an agent's server wired to each other in memory:
//! the whole frame protocol with no network under it, for tests of what
//! runs on top of a tunnel.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::server::CallService;
use super::{
    CallFrames, HeartbeatSettings, Outbound, ServerSettings, SessionSignals, TunnelCaller,
    TunnelServer, outbound, run_session,
};

/// Both ends of an in-memory tunnel, with what each session signals.
pub struct Pair<S> {
    pub caller: TunnelCaller,
    pub server: TunnelServer<S>,
    /// The agent's frames to the hub (its `drain`, say).
    pub agent_outbound: Outbound,
    /// What the agent's session hears from the hub (`drain_ack`).
    pub agent_signals: SessionSignals,
    /// What the hub's session hears from the agent (`drain`).
    pub hub_signals: SessionSignals,
    /// Cancelling ends both sessions.
    pub stop: CancellationToken,
}

impl<S> std::fmt::Debug for Pair<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

/// A caller whose calls `service` serves, until the token is cancelled.
pub fn connect<S: CallService>(
    service: S,
    settings: ServerSettings,
) -> (TunnelCaller, TunnelServer<S>, CancellationToken) {
    let pair = pair(service, settings);
    (pair.caller, pair.server, pair.stop)
}

/// [`connect`], with each side's signals and the agent's outbound queue.
pub fn pair<S: CallService>(service: S, settings: ServerSettings) -> Pair<S> {
    let stop = CancellationToken::new();
    let (hub_out, hub_frames) = outbound();
    let (agent_out, agent_frames) = outbound();
    let caller = TunnelCaller::new(hub_out.clone(), settings.max_concurrent_calls);
    let server = TunnelServer::new(service, agent_out.clone(), None, settings);
    let (agent_signals, hub_signals) = (SessionSignals::default(), SessionSignals::default());
    // Each side reads what the other queued.
    let sides: [(_, _, Arc<dyn CallFrames>, _); 2] = [
        (
            agent_frames,
            hub_out,
            Arc::new(caller.clone()),
            hub_signals.clone(),
        ),
        (
            hub_frames,
            agent_out.clone(),
            Arc::new(server.clone()),
            agent_signals.clone(),
        ),
    ];
    for (frames, out, calls, signals) in sides {
        tokio::spawn(run_session(
            frames.map(Ok::<_, tonic::Status>),
            out,
            calls,
            HeartbeatSettings::default(),
            signals,
            stop.clone(),
        ));
    }
    Pair {
        caller,
        server,
        agent_outbound: agent_out,
        agent_signals,
        hub_signals,
        stop,
    }
}
