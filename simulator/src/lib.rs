//! Tentacle's load simulator: thousands of virtual tentacles (real agents
//! with simulated scripts) that load-test a hub, with scenarios, chaos,
//! invariants and reports. It reaches the hub and the agent only through
//! their public APIs (`tentacle-hub`, `tentacle-agent`).
//!
//! - [`fleet`]: virtual tentacles, many in one process.
//! - [`scenario`], [`run`], [`invariants`], [`report`]: scenario files, the
//!   runner that plays them with chaos, what must hold at the end, and the
//!   JSON/HTML/terminal report.
//! - [`demo`]: a self-contained agent plus client, for a first look.

pub mod bench;
pub mod demo;
pub mod fleet;
pub mod invariants;
pub mod report;
pub mod run;
pub mod scenario;
