//! Tentacle's control plane: the hub that reaches every agent, listening or
//! polling, through one API, and the clients that drive agents through it.
//!
//! Modules depend only on the ones listed above them:
//! - [`target`]: `https://host:port` and `poll://agent-id`.
//! - [`store_file`]: the lock between processes and the fsynced rename
//!   every writer of the hub's files uses; [`limits`]: the budget of
//!   failed registrations per source address.
//! - [`trust`] and [`credentials`]: the registry file (`agents.toml`) and
//!   the hashed one-time tokens and API keys (`credentials.toml`).
//! - [`cluster`]: this node, the other nodes of its cluster, and which of
//!   them hold which agents' tunnels (presence).
//! - [`registry`]: tunnels open now, by agent id, and calls waiting for one.
//! - [`rotation`]: the rotation approval policy, rotations waiting for an
//!   operator (`rotations.toml`), and the audit event of every rotation.
//! - [`channel`]: [`channel::AgentChannel`], one tower service for every
//!   way of reaching an agent.
//! - [`client`]: typed calls to one agent over any channel.
//! - [`peers`]: channels to the other nodes of this hub's cluster, and a
//!   call offered to one of them, streaming both ways.
//! - [`hub`]: [`Hub`], the state: trusted agents and operators, the
//!   listening pool, rotation and draining.
//! - [`grouped`]: registrations that arrive together share one write.
//! - [`errors`]: the one place hub errors become gRPC statuses.
//! - [`tunnels`], [`proxy`], [`registration`]: the services the hub serves.
//! - [`serve`]: [`Hub::serve`], which serves them with the registry
//!   reload and the drain at shutdown.
//! - [`args`]: the `--hub` arguments every program that reaches a hub
//!   shares.
//! - [`deploy`]: one script on many agents; [`home`]: the hub's identity on
//!   disk.

pub mod args;
pub mod channel;
pub mod client;
pub mod cluster;
pub mod credentials;
pub mod deploy;
pub mod errors;
pub mod grouped;
pub mod home;
pub mod hub;
pub mod limits;
pub mod peers;
pub mod proxy;
pub mod registration;
pub mod registry;
pub mod rotation;
pub mod serve;
pub mod store;
pub mod store_file;
pub mod target;
#[cfg(test)]
mod testing;
pub mod trust;
pub mod tunnels;

pub use hub::{DEFAULT_HUB_PORT, Hub, HubError, HubSettings, HubStore, RotateError, unix_now};
pub use registry::Registry;
pub use trust::{AgentMode, TrustedAgent};
