//! A hub's caller and an agent's server wired to each other in memory:
//! the whole frame protocol with no network under it, for tests of what
//! runs on top of a tunnel.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::server::CallService;
use super::{
    CallFrames, HeartbeatSettings, ServerSettings, SessionSignals, TunnelCaller, TunnelServer,
    outbound, run_session,
};

/// A caller whose calls `service` serves, until the token is cancelled.
pub fn connect<S: CallService>(
    service: S,
    settings: ServerSettings,
) -> (TunnelCaller, TunnelServer<S>, CancellationToken) {
    let stop = CancellationToken::new();
    let (hub_out, hub_frames) = outbound();
    let (agent_out, agent_frames) = outbound();
    let caller = TunnelCaller::new(hub_out.clone(), settings.max_concurrent_calls);
    let server = TunnelServer::new(service, agent_out.clone(), None, settings);
    // Each side reads what the other queued.
    let sides: [(_, _, Arc<dyn CallFrames>); 2] = [
        (agent_frames, hub_out, Arc::new(caller.clone())),
        (hub_frames, agent_out, Arc::new(server.clone())),
    ];
    for (frames, out, calls) in sides {
        tokio::spawn(run_session(
            frames.map(Ok::<_, tonic::Status>),
            out,
            calls,
            HeartbeatSettings::default(),
            SessionSignals::default(),
            stop.clone(),
        ));
    }
    (caller, server, stop)
}
