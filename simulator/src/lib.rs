//! Tentacle's control plane side: the hub that reaches agents in either
//! mode, clients for them, and the fleet simulator.
//!
//! - [`target`]: `https://host:port` and `poll://agent-id`.
//! - [`channel`]: [`channel::AgentChannel`], one tower service for every
//!   way of reaching an agent.
//! - [`hub`]: tunnels from polling agents, pooled listening connections, and
//!   the forwarding of operators' calls.
//! - [`client`]: typed calls to one agent.
//! - [`home`]: the control plane's own identity on disk.
//! - [`demo`]: a self-contained agent plus client, for a first look.
//! - [`fleet`]: virtual tentacles, many in one process.
//! - [`scenario`], [`run`], [`invariants`], [`report`]: scenario files, the
//!   runner that plays them with chaos, what must hold at the end, and the
//!   JSON/HTML/terminal report.

pub mod channel;
pub mod client;
pub mod demo;
pub mod deploy;
pub mod fleet;
pub mod home;
pub mod hub;
pub mod invariants;
pub mod report;
pub mod run;
pub mod scenario;
pub mod target;
