//! The operations a scenario's stages perform on one agent: a health
//! check, an upload, a script followed to its end. Each call is timed and
//! recorded; calls that fail the way chaos makes them fail are retried
//! (every RPC here is idempotent), anything else is given up at once so the
//! invariants can name it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Future;
use rand::{Rng, SeedableRng};
use tentacle_proto::backoff::Backoff;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::capabilities_service_client::CapabilitiesServiceClient;
use tentacle_proto::v1::file_service_client::FileServiceClient;
use tentacle_proto::v1::script_service_client::ScriptServiceClient;
use tonic::Status;

use super::Context;
use crate::fleet::VirtualAgent;
use crate::invariants::{self, ScriptEnd, ScriptRecord, UploadRecord};

/// Every unary call gets this long before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A watch stream that says nothing for this long is reopened.
const WATCH_IDLE: Duration = Duration::from_secs(60);
/// How long an operation keeps retrying before it gives up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(180);

/// Calls `f` until it succeeds, fails unexpectedly, or the retry budget is
/// spent; every attempt is recorded under `call`.
async fn retried<T, F, Fut>(
    ctx: &Context,
    call: &'static str,
    agent: &VirtualAgent,
    mut f: F,
) -> Result<T, Status>
where
    F: FnMut(tentacle_hub::channel::AgentChannel) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + GIVE_UP_AFTER;
    let mut backoff = retry_backoff();
    loop {
        let started = Instant::now();
        let result = match ctx
            .hub
            .channel(&agent.target, agent.thumbprint, agent.hub_node.get())
            .await
        {
            Ok(channel) => match tokio::time::timeout(CALL_TIMEOUT, f(channel)).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "no answer within {CALL_TIMEOUT:?}"
                ))),
            },
            Err(status) => Err(status),
        };
        ctx.recorder.call(call, &agent.name, started, &result);
        match result {
            Err(status)
                if invariants::expected_failure(status.code()) && Instant::now() < deadline =>
            {
                backoff.wait().await;
            }
            other => return other,
        }
    }
}

/// The wait between retries of one operation: jittered, so the thousands
/// of agents chaos hit at once are not all retried at the same moment.
fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
}

fn with_timeout<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// `GetHealth`; true if it answered.
pub async fn health(ctx: &Context, agent: &VirtualAgent) -> bool {
    retried(ctx, "GetHealth", agent, |channel| async move {
        CapabilitiesServiceClient::new(channel)
            .get_health(with_timeout(pb::GetHealthRequest {}))
            .await
            .map(|r| r.into_inner())
    })
    .await
    .is_ok()
}

/// A package every upload of a run sends: drawn from the seed, hashed once.
#[derive(Debug, Clone)]
pub struct Package {
    pub bytes: Bytes,
    pub sha256: String,
}

impl Package {
    pub fn new(size: usize, seed: u64) -> Self {
        use sha2::{Digest, Sha256};
        let mut bytes = vec![0u8; size];
        rand::rngs::StdRng::seed_from_u64(seed).fill(&mut bytes[..]);
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Self {
            bytes: Bytes::from(bytes),
            sha256,
        }
    }
}

/// Uploads `package`; true if the agent verified it.
pub async fn upload(ctx: &Context, agent: &VirtualAgent, package: &Package) -> bool {
    use pb::upload_file_request::Part;
    const CHUNK: usize = 256 * 1024;
    let path = format!("packages/{}.bin", &package.sha256[..16]);
    let result = retried(ctx, "UploadFile", agent, |channel| {
        let header = pb::UploadFileRequest {
            part: Some(Part::Header(pb::UploadHeader {
                path: path.clone(),
                size: package.bytes.len() as u64,
                sha256: package.sha256.clone(),
            })),
        };
        let bytes = package.bytes.clone();
        let chunks = (0..bytes.len().div_ceil(CHUNK)).map(move |i| pb::UploadFileRequest {
            part: Some(Part::Chunk(
                bytes
                    .slice(i * CHUNK..((i + 1) * CHUNK).min(bytes.len()))
                    .to_vec(),
            )),
        });
        let messages = futures::stream::iter(std::iter::once(header).chain(chunks));
        async move {
            FileServiceClient::new(channel)
                .upload_file(messages)
                .await
                .map(|r| r.into_inner())
        }
    })
    .await;
    match result {
        Ok(reply) => {
            ctx.recorder.upload(UploadRecord {
                agent: agent.name.clone(),
                sent_sha256: package.sha256.clone(),
                sent_size: package.bytes.len() as u64,
                reply_sha256: reply.sha256,
                reply_size: reply.size,
            });
            true
        }
        Err(_) => false,
    }
}

/// Starts one script, cancels it part-way if asked, follows its log to the
/// end and completes it. The record goes to the recorder whatever happens.
pub async fn script(ctx: Arc<Context>, agent: Arc<VirtualAgent>, ticket: String, cancel: bool) {
    let plan = ctx.model.plan(ctx.seed, &ticket);
    let crashes_before = ctx.recorder.crashes(&agent.name);
    let mut record = ScriptRecord {
        agent: agent.name.clone(),
        ticket: ticket.clone(),
        planned_lines: plan.lines,
        planned_exit: plan.exit_code,
        lines: Vec::new(),
        end: ScriptEnd::Abandoned("never acknowledged".into()),
        cancel_requested: false,
        agent_crashed: false,
        executions: 0,
    };
    let started = retried(&ctx, "StartScript", &agent, |channel| {
        let request = pb::StartScriptRequest {
            ticket: ticket.clone(),
            script_body: "simulated".into(),
            ..Default::default()
        };
        async move {
            ScriptServiceClient::new(channel)
                .start_script(with_timeout(request))
                .await
                .map(|r| r.into_inner())
        }
    })
    .await;
    if let Err(status) = started {
        record.end = ScriptEnd::Abandoned(format!("StartScript: {status}"));
    } else {
        let canceller = cancel.then(|| {
            // Part-way through the script's planned run.
            let delay = plan.duration.mul_f64(rand::rng().random_range(0.1..0.6));
            let (ctx, agent, ticket) = (ctx.clone(), agent.clone(), ticket.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = retried(&ctx, "CancelScript", &agent, |channel| {
                    let request = pb::CancelScriptRequest {
                        ticket: ticket.clone(),
                        after_sequence: u64::MAX,
                    };
                    async move {
                        ScriptServiceClient::new(channel)
                            .cancel_script(with_timeout(request))
                            .await
                            .map(|r| r.into_inner())
                    }
                })
                .await;
            })
        });
        record.cancel_requested = cancel;
        record.end = follow(&ctx, &agent, &ticket, &mut record.lines).await;
        if let Some(canceller) = canceller {
            // Let the cancel call finish so it is recorded; it is bounded by
            // its own retry budget.
            let _ = canceller.await;
        }
        if matches!(record.end, ScriptEnd::Exited(_)) {
            let _ = retried(&ctx, "CompleteScript", &agent, |channel| {
                let request = pb::CompleteScriptRequest {
                    ticket: ticket.clone(),
                    after_sequence: u64::MAX,
                };
                async move {
                    ScriptServiceClient::new(channel)
                        .complete_script(with_timeout(request))
                        .await
                        .map(|r| r.into_inner())
                }
            })
            .await;
        }
    }
    record.agent_crashed = ctx.recorder.crashes(&agent.name) != crashes_before;
    ctx.recorder.script(record);
}

/// Watches `ticket` from the start, reopening the stream from the last
/// sequence after each break, and keeps every line exactly as received.
async fn follow(
    ctx: &Context,
    agent: &VirtualAgent,
    ticket: &str,
    lines: &mut Vec<(u64, String)>,
) -> ScriptEnd {
    use pb::watch_script_event::Event;
    let deadline = Instant::now() + GIVE_UP_AFTER;
    let mut after = 0u64;
    let mut backoff = retry_backoff();
    loop {
        let started = Instant::now();
        let outcome: Result<Option<i32>, Status> = async {
            let channel = ctx
                .hub
                .channel(&agent.target, agent.thumbprint, agent.hub_node.get())
                .await?;
            let mut stream = ScriptServiceClient::new(channel)
                .watch_script(pb::WatchScriptRequest {
                    ticket: ticket.to_owned(),
                    after_sequence: after,
                })
                .await?
                .into_inner();
            loop {
                let message = tokio::time::timeout(WATCH_IDLE, stream.message())
                    .await
                    .map_err(|_| Status::deadline_exceeded("the watch stream went quiet"))??;
                match message.and_then(|m| m.event) {
                    None => return Ok(None),
                    Some(Event::Logs(batch)) => {
                        for line in batch.lines {
                            after = after.max(line.sequence);
                            lines.push((line.sequence, line.text));
                        }
                    }
                    Some(Event::State(_)) => {}
                    Some(Event::Result(result)) => return Ok(Some(result.exit_code)),
                }
            }
        }
        .await;
        ctx.recorder
            .call("WatchScript", &agent.name, started, &outcome);
        match outcome {
            Ok(Some(exit_code)) => return ScriptEnd::Exited(exit_code),
            Ok(None) | Err(_) if Instant::now() >= deadline => {
                return ScriptEnd::Abandoned(format!(
                    "no end within {GIVE_UP_AFTER:?} (last sequence {after})"
                ));
            }
            Ok(None) => {}
            Err(status) if invariants::expected_failure(status.code()) => {}
            Err(status) => return ScriptEnd::Abandoned(format!("WatchScript: {status}")),
        }
        backoff.wait().await;
    }
}
