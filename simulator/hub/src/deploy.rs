//! Runs one script on many agents at once, with bounded parallelism, and
//! collects a result per target. Rendering is the caller's business: every
//! line and every result goes to a [`DeployObserver`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tentacle_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::client::{AgentClient, FollowSettings, PackageDelivery};

/// One agent to deploy to.
#[derive(Debug, Clone)]
pub struct DeployTarget {
    pub name: String,
    pub target: String,
    pub client: AgentClient,
}

/// A package to make ready on every target before the script runs.
#[derive(Debug, Clone)]
pub struct PackageSpec {
    pub local: std::path::PathBuf,
    pub sha256: String,
    /// The application directory name on the agent.
    pub application: String,
    /// The environment variable that tells the script where it is.
    pub env_var: String,
}

/// How one target's deployment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetOutcome {
    /// The script ran; 0 is success.
    Exited(i32),
    /// The call failed before the script's end was known.
    Failed(String),
}

impl TargetOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Self::Exited(0))
    }
}

/// The result for one target.
#[derive(Debug, Clone)]
pub struct TargetResult {
    pub name: String,
    pub target: String,
    pub outcome: TargetOutcome,
    pub elapsed: Duration,
    /// What happened to each package, by application name.
    pub packages: Vec<(String, PackageDelivery)>,
}

/// Hears about a deployment as it happens.
pub trait DeployObserver: Send + Sync {
    fn started(&self, target: &str);
    fn line(&self, target: &str, line: &pb::LogLine);
    fn finished(&self, result: &TargetResult);
}

/// Runs `script` on every target, at most `parallelism` at a time, after
/// making `packages` ready there (each uploaded only where the agent's cache
/// lacks it; its path is in its `env_var`). When `cancel` fires, every
/// running script is cancelled on its agent.
pub async fn deploy(
    targets: Vec<DeployTarget>,
    script: &str,
    packages: Vec<PackageSpec>,
    parallelism: usize,
    observer: Arc<dyn DeployObserver>,
    cancel: CancellationToken,
) -> Vec<TargetResult> {
    let deployment = uuid::Uuid::new_v4().simple().to_string();
    let runs = targets.into_iter().map(|target| {
        let observer = observer.clone();
        let cancel = cancel.clone();
        let packages = packages.clone();
        let mut request = pb::StartScriptRequest {
            ticket: format!("deploy-{deployment}-{}", target.name),
            script_body: script.to_owned(),
            ..Default::default()
        };
        let span = tracing::info_span!(
            target: tentacle_proto::telemetry::TRACE_TARGET,
            "deploy target",
            otel.name = format!("deploy {}", target.name),
            target = %target.target,
            ticket = %request.ticket,
            exit_code = tracing::field::Empty,
        );
        let run = async move {
            observer.started(&target.name);
            let started = Instant::now();
            let ticket = request.ticket.clone();
            let mut delivered = Vec::new();
            let mut failure = None;
            for package in &packages {
                match target
                    .client
                    .ensure_package(&package.local, &package.sha256, &package.application)
                    .await
                {
                    Ok(delivery) => {
                        request.environment.push(pb::EnvironmentVariable {
                            name: package.env_var.clone(),
                            value: delivery.path.clone(),
                            sensitive: false,
                        });
                        delivered.push((package.application.clone(), delivery));
                    }
                    Err(error) => {
                        failure = Some(format!("{}: {error}", package.application));
                        break;
                    }
                }
            }
            let outcome = if let Some(reason) = failure {
                TargetOutcome::Failed(reason)
            } else if cancel.is_cancelled() {
                TargetOutcome::Failed("cancelled before it started".into())
            } else {
                let name = target.name.clone();
                let run = target
                    .client
                    .run_script(
                        request,
                        |line| observer.line(&name, line),
                        &cancel,
                        &FollowSettings::default(),
                    )
                    .await;
                match run {
                    Ok(end) => {
                        let _ = target.client.complete_script(&ticket).await;
                        TargetOutcome::Exited(end.exit_code)
                    }
                    Err(error) => TargetOutcome::Failed(error.to_string()),
                }
            };
            let result = TargetResult {
                name: target.name,
                target: target.target,
                outcome,
                elapsed: started.elapsed(),
                packages: delivered,
            };
            if let TargetOutcome::Exited(code) = &result.outcome {
                tracing::Span::current().record("exit_code", code);
            }
            observer.finished(&result);
            result
        };
        tracing::Instrument::instrument(run, span)
    });
    let span = tracing::info_span!(target: tentacle_proto::telemetry::TRACE_TARGET, "deploy", otel.name = "deploy", deployment = %deployment);
    let mut results: Vec<TargetResult> = tracing::Instrument::instrument(
        futures::stream::iter(runs)
            .buffer_unordered(parallelism.max(1))
            .collect(),
        span,
    )
    .await;
    results.sort_by(|a, b| a.name.cmp(&b.name));
    results
}
