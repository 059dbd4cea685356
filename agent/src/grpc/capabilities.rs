//! `tentacle.v1.CapabilitiesService`: what this agent offers.

use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_server::CapabilitiesService;
use tonic::{Request, Response, Status};

use crate::scripts::find_on_path;

/// Feature flags a control plane can test for.
pub const FEATURES: &[&str] = &[
    "script.watch",
    "script.isolation",
    "script.masking",
    "script.execution-timeout",
    "file.sha256",
    "file.resume-download",
];

/// The capabilities service; answers from what it found at start-up.
#[derive(Debug, Clone)]
pub struct CapabilitiesApi {
    capabilities: pb::Capabilities,
}

impl CapabilitiesApi {
    pub fn new() -> Self {
        let service = |name: &str| pb::ServiceVersion {
            name: name.to_owned(),
            version: 1,
        };
        let interpreters = ["bash", "sh", "pwsh"]
            .into_iter()
            .filter(|name| find_on_path(name).is_some())
            .map(str::to_owned)
            .collect();
        Self {
            capabilities: pb::Capabilities {
                services: vec![
                    service("tentacle.v1.ScriptService"),
                    service("tentacle.v1.FileService"),
                    service("tentacle.v1.CapabilitiesService"),
                ],
                agent_version: crate::VERSION.to_owned(),
                os: std::env::consts::OS.to_owned(),
                arch: std::env::consts::ARCH.to_owned(),
                features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
                interpreters,
            },
        }
    }
}

impl Default for CapabilitiesApi {
    fn default() -> Self {
        Self::new()
    }
}

#[tonic::async_trait]
impl CapabilitiesService for CapabilitiesApi {
    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::Capabilities>, Status> {
        Ok(Response::new(self.capabilities.clone()))
    }
}
