//! The Tentacle agent: runs scripts and moves files for a control plane it
//! trusts by certificate thumbprint.
//!
//! - [`scripts`] and [`files`]: the work itself, with no knowledge of gRPC.
//! - [`grpc`]: the `tentacle.v1` services over them.
//! - [`server`]: one set of routes that every transport serves.
//! - [`runtime`]: an agent instance: its configuration, identity, trust and
//!   background tasks.
//! - [`config`]: the instance home and `tentacle.toml`.

pub mod config;
pub mod files;
pub mod grpc;
pub mod packages;
pub mod polling;
pub mod runtime;
pub mod scripts;
pub mod server;

/// This agent's version, as reported in its capabilities.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
