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
    "package.cache",
    "health",
];

/// The capabilities service: what the agent can do (found at start-up) and
/// how it is doing (measured on each call).
#[derive(Debug, Clone)]
pub struct CapabilitiesApi {
    capabilities: pb::Capabilities,
    health: Option<HealthSource>,
}

/// Where health readings come from.
#[derive(Debug, Clone)]
pub struct HealthSource {
    pub files_root: std::path::PathBuf,
    /// The same probe uploads check, so a simulated disk reads the same
    /// here as it does to them.
    pub free_space: std::sync::Arc<dyn crate::files::FreeSpace>,
    pub scripts: std::sync::Arc<crate::scripts::Scripts>,
    pub started: std::time::Instant,
}

impl CapabilitiesApi {
    /// Capabilities plus health readings from `health`.
    pub fn with_health(health: HealthSource) -> Self {
        Self {
            health: Some(health),
            ..Self::new()
        }
    }

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
            health: None,
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

    async fn get_health(
        &self,
        _request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::AgentHealth>, Status> {
        let Some(health) = &self.health else {
            return Err(Status::unimplemented(
                "this agent reports no health readings",
            ));
        };
        let root = health.files_root.clone();
        let probe = health.free_space.clone();
        let free = tokio::task::spawn_blocking(move || probe.available_bytes(&root))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("could not read free disk space: {e}")))?;
        Ok(Response::new(pb::AgentHealth {
            free_disk_bytes: free,
            active_scripts: u32::try_from(health.scripts.active()).unwrap_or(u32::MAX),
            uptime_seconds: health.started.elapsed().as_secs(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::files::FakeFreeSpace;
    use crate::scripts::process::{ProcessExecutor, ProcessSettings};
    use crate::scripts::{ScriptSettings, Scripts};

    #[tokio::test]
    async fn health_reads_free_space_from_the_agents_own_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = Arc::new(FakeFreeSpace::new(123_456));
        let api = CapabilitiesApi::with_health(HealthSource {
            files_root: dir.path().to_owned(),
            free_space: disk.clone(),
            scripts: Scripts::new(
                ScriptSettings::new(dir.path().join("work")),
                Arc::new(ProcessExecutor::new(ProcessSettings::default())),
            ),
            started: std::time::Instant::now(),
        });
        let read = |api: CapabilitiesApi| async move {
            api.get_health(Request::new(pb::GetHealthRequest::default()))
                .await
                .expect("health")
                .into_inner()
                .free_disk_bytes
        };
        assert_eq!(read(api.clone()).await, 123_456);
        disk.set(7);
        assert_eq!(read(api).await, 7, "each reading asks the probe again");
    }
}
