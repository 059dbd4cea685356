//! Tentacle's control plane side: the hub that reaches agents in either
//! mode, clients for them, and (later) the fleet simulator.
//!
//! - [`target`]: `https://host:port` and `poll://agent-id`.
//! - [`channel`]: [`channel::AgentChannel`], one tower service for every
//!   way of reaching an agent.
//! - [`hub`]: tunnels from polling agents, pooled listening connections, and
//!   the forwarding of operators' calls.
//! - [`client`]: typed calls to one agent.
//! - [`home`]: the control plane's own identity on disk.
//! - [`demo`]: a self-contained agent plus client, for a first look.

pub mod channel;
pub mod client;
pub mod demo;
pub mod deploy;
pub mod fleet;
pub mod home;
pub mod hub;
pub mod target;
