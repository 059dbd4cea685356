//! The calls the cells make, with the hooks that set a fault mid-call.

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tentacle_hub::client::{AgentClient, ClientError};
use tentacle_hub::deploy::{DeployObserver, TargetResult};
use tentacle_proto::v1 as pb;
use tentacle_tests::fault_proxy::{Fault, FaultControl};

use super::rig::{Rig, Seen, retry};

pub(super) fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

pub(super) fn describe_client(error: &ClientError) -> String {
    error.to_string()
}

/// Follows `ticket` from after `seen`'s last line to the script's end,
/// with one watch call under `deadline`.
pub(super) async fn watch_once(
    client: &AgentClient,
    ticket: &str,
    seen: &Seen,
    deadline: Duration,
    mut on_line: impl FnMut(),
) -> Result<pb::ScriptResult, String> {
    use pb::watch_script_event::Event;
    let mut request = tonic::Request::new(pb::WatchScriptRequest {
        ticket: ticket.to_owned(),
        after_sequence: seen.last_sequence(),
    });
    request.set_timeout(deadline);
    let mut stream = client
        .scripts()
        .watch_script(request)
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    loop {
        match stream.message().await.map_err(|s| describe(&s))? {
            None => return Err("the watch ended before the script did".into()),
            Some(event) => match event.event {
                Some(Event::Logs(batch)) => {
                    for line in &batch.lines {
                        if line.sequence > seen.last_sequence() {
                            seen.push(line);
                            on_line();
                        }
                    }
                }
                Some(Event::Result(result)) => return Ok(result),
                _ => {}
            },
        }
    }
}

/// Follows `ticket` to its end after a fault, retrying until it works.
pub(super) async fn recover_watch(rig: &Rig, ticket: &str, seen: &Seen) -> pb::ScriptResult {
    retry("watching the script", || async {
        let client = rig.fresh_client().await?;
        watch_once(&client, ticket, seen, rig.tier.stream_deadline, || {}).await
    })
    .await
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A payload that differs per cell, so a stale file cannot pass for it.
pub(super) fn payload(cell: usize) -> Vec<u8> {
    (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(cell as u32) % 251) as u8)
        .collect()
}

/// Sets a cell's fault in the middle of a call.
pub(super) type Trigger = Box<dyn FnOnce() + Send>;

pub(super) fn trigger(control: FaultControl, fault: Fault) -> Trigger {
    Box::new(move || control.set(fault))
}

/// Uploads `bytes` with the fault set after the first chunk when `trigger`
/// is given.
pub(super) async fn upload(
    client: &AgentClient,
    remote: &str,
    bytes: &[u8],
    deadline: Duration,
    mut trigger: Option<Trigger>,
) -> Result<pb::UploadFileResponse, String> {
    use pb::upload_file_request::Part;
    let mut messages = vec![pb::UploadFileRequest {
        part: Some(Part::Header(pb::UploadHeader {
            path: remote.to_owned(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        })),
    }];
    messages.extend(bytes.chunks(16 * 1024).map(|chunk| pb::UploadFileRequest {
        part: Some(Part::Chunk(chunk.to_vec())),
    }));
    let mut index = 0usize;
    let stream = futures::stream::iter(messages).inspect(move |_| {
        index += 1;
        if index == 3
            && let Some(trigger) = trigger.take()
        {
            trigger();
        }
    });
    let mut request = tonic::Request::new(stream);
    request.set_timeout(deadline);
    let response = client
        .files()
        .upload_file(request)
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    if response.sha256 != sha256_hex(bytes) {
        return Err(format!("stored digest {} differs", response.sha256));
    }
    Ok(response)
}

/// Downloads `remote` whole, setting the fault after the first chunk when
/// `trigger` is given; returns the bytes once the trailer's digest matched.
pub(super) async fn download(
    client: &AgentClient,
    remote: &str,
    deadline: Duration,
    mut trigger: Option<Trigger>,
) -> Result<Vec<u8>, String> {
    use pb::download_file_response::Part;
    let mut request = tonic::Request::new(pb::DownloadFileRequest {
        path: remote.to_owned(),
        offset: 0,
    });
    request.set_timeout(deadline);
    let mut stream = client
        .files()
        .download_file(request)
        .await
        .map_err(|s| describe(&s))?
        .into_inner();
    let mut bytes = Vec::new();
    loop {
        match stream.message().await.map_err(|s| describe(&s))? {
            None => return Err("the download ended without a trailer".into()),
            Some(message) => match message.part {
                Some(Part::Header(_)) => {}
                Some(Part::Chunk(chunk)) => {
                    bytes.extend_from_slice(&chunk);
                    if let Some(trigger) = trigger.take() {
                        trigger();
                    }
                }
                Some(Part::Trailer(trailer)) => {
                    if trailer.sha256 != sha256_hex(&bytes) {
                        return Err("the trailer's digest does not match the bytes".into());
                    }
                    return Ok(bytes);
                }
                None => return Err("an empty download message".into()),
            },
        }
    }
}

/// Lines of a deploy, for the matrix: triggers the fault on the first one.
pub(super) struct DeployLines {
    pub(super) seen: Seen,
    pub(super) trigger: Mutex<Option<Trigger>>,
}

impl DeployObserver for DeployLines {
    fn started(&self, _target: &str) {}
    fn line(&self, _target: &str, line: &pb::LogLine) {
        self.seen.push(line);
        if let Some(trigger) = self.trigger.lock().expect("trigger").take() {
            trigger();
        }
    }
    fn finished(&self, _result: &TargetResult) {}
}

pub(super) fn unary<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}
