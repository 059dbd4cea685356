//! Tentacle's control plane side: clients that reach agents, and (later) the
//! hub and the fleet simulator.
//!
//! - [`client`]: typed calls to one agent over any tonic channel.
//! - [`home`]: the control plane's own identity on disk.
//! - [`demo`]: a self-contained agent plus client, for a first look.

pub mod client;
pub mod demo;
pub mod home;
