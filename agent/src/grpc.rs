//! The gRPC edge of the agent: converts between `tentacle.v1` messages and
//! the agent's own types, and maps its errors to gRPC statuses.
//!
//! API Boundary: nothing below this module sees a protobuf type.

mod capabilities;
mod errors;
mod files;
mod packages;
mod scripts;

pub use capabilities::{CapabilitiesApi, HealthSource};
pub use files::FileApi;
pub use packages::PackageApi;
pub use scripts::ScriptApi;
