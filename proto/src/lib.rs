//! Tentacle's gRPC contract and the wire pieces both ends share.
//!
//! API Boundary: this is the only crate that knows the protobuf types and the
//! TLS wiring. The agent and the simulator convert to their own types at their
//! edges.
//!
//! - [`v1`]: the generated `tentacle.v1` messages, clients and servers.
//! - [`thumbprint`], [`identity`], [`trust`]: who a peer is and whom we trust.
//! - [`tls`]: rustls configurations that pin peers by thumbprint.
//! - [`incoming`]: a TLS accept loop that feeds tonic and can drop peers
//!   whose trust was removed.
//! - [`dial`]: a pinned-mTLS client channel to a listening agent.
//! - [`tunnel`]: the byte pipe and session under a reverse tunnel.
//! - [`http2`]: the HTTP/2 settings every server and client applies.
//! - [`backoff`]: exponential backoff with full jitter for retry loops.
//! - [`exit_code`]: the exit codes the agent reports itself.
//! - [`metrics`], [`probe`]: `/metrics`, `/livez` and `/readyz`, and the
//!   readiness probe client.

pub mod backoff;
pub mod dial;
pub mod exit_code;
pub mod http2;
pub mod identity;
pub mod incoming;
pub mod metrics;
pub mod probe;
pub mod rotation;
pub mod systemd;
pub mod telemetry;
pub mod thumbprint;
pub mod tls;
pub mod trust;
pub mod tunnel;

/// The generated `tentacle.v1` package.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("tentacle.v1");

    /// The encoded descriptors of every `tentacle.v1` file, for server
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tentacle_v1_descriptor");
}

pub use identity::Identity;
pub use thumbprint::Thumbprint;
pub use trust::TrustStore;
