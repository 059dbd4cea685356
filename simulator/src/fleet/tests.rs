//! A virtual tentacle is the real agent with a few parts swapped: it runs
//! the agent's own workspace cleaner and its own shutdown, which turns its
//! health to NOT_SERVING. No hub is needed: the agents are prepared and
//! launched without registering.

use std::path::Path;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::*;

/// The fleet's settings for one agent whose hub is `hub`, which is never
/// dialled by a listening agent.
fn one_agent(work: &Path, hub: &Identity, listening: bool) -> FleetSettings {
    let mut settings = FleetSettings::new(
        1,
        ListeningAddress::new("127.0.0.1", 9),
        hub.thumbprint(),
        "unused: these agents do not register".into(),
        work.to_owned(),
    );
    settings.listening = usize::from(listening);
    settings.shutdown_grace = Duration::from_secs(2);
    settings.reconnect_initial = Duration::from_millis(100);
    settings.reconnect_max = Duration::from_millis(200);
    settings
}

async fn launched(settings: &FleetSettings) -> VirtualAgent {
    let agent = prepare(settings, 0).expect("prepare");
    let running = launch(settings, &agent).await.expect("launch");
    *agent.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(running);
    agent
}

/// A workspace a previous run left behind, complete long ago.
fn leave_expired_workspace(work_root: &Path, ticket: &str) -> std::path::PathBuf {
    let dir = work_root.join(ticket);
    std::fs::create_dir_all(&dir).expect("workspace");
    let state = format!(
        r#"{{"ticket":"{ticket}","phase":"complete","exit_code":0,"created_ms":1,"completed_ms":1}}"#
    );
    std::fs::write(dir.join("tentacle-state.json"), state).expect("state");
    dir
}

#[tokio::test]
async fn a_virtual_agents_cleaner_removes_an_expired_workspace() {
    let work = tempfile::tempdir().expect("tempdir");
    let hub = Identity::generate("fleet test hub").expect("identity");
    let mut settings = one_agent(work.path(), &hub, false);
    settings.workspace_max_age = Duration::from_secs(60);
    settings.cleanup_interval = Duration::from_millis(50);
    let agent = prepare(&settings, 0).expect("prepare");
    let expired = leave_expired_workspace(&agent.dir.join("work"), "left-over");

    let running = launch(&settings, &agent).await.expect("launch");
    *agent.running.lock().unwrap_or_else(PoisonError::into_inner) = Some(running);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while expired.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's cleaner never removed {}",
            expired.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agent.is_running());
    agent.crash();
    assert!(!agent.is_running());
}

/// Bytes in, bytes out: the simulator has no generated health client, and
/// the two messages it needs are one field each.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `grpc.health.v1.HealthCheckRequest { service }`.
fn health_request(service: &str) -> Bytes {
    let mut bytes = vec![0x0a, u8::try_from(service.len()).expect("a short name")];
    bytes.extend_from_slice(service.as_bytes());
    Bytes::from(bytes)
}

/// The status of a `HealthCheckResponse`: field 1, a small varint; absent
/// means UNKNOWN (0).
fn health_status(message: &[u8]) -> u8 {
    match message {
        [0x08, status, ..] => *status,
        _ => 0,
    }
}

const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

#[tokio::test]
async fn a_virtual_agents_health_turns_not_serving_when_it_stops() {
    let work = tempfile::tempdir().expect("tempdir");
    let hub = Identity::generate("fleet test hub").expect("identity");
    let settings = one_agent(work.path(), &hub, true);
    let agent = launched(&settings).await;
    let port = agent.port.expect("a listening agent");

    let tls =
        tentacle_proto::tls::client_config(&hub, TrustStore::new([agent.thumbprint])).expect("tls");
    let channel = dial::channel(
        &ListeningAddress::new("127.0.0.1", port),
        tls,
        &DialSettings::default(),
    )
    .await
    .expect("the hub's identity reaches the virtual agent over pinned mTLS");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut watch = grpc
        .server_streaming(
            tonic::Request::new(health_request("tentacle.v1.ScriptService")),
            http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Watch"),
            RawCodec,
        )
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(health_status(&first), SERVING);

    agent.stop();
    assert!(!agent.is_running());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the status changes once the agent stops")
        .expect("watch")
        .expect("a status");
    assert_eq!(health_status(&next), NOT_SERVING);
}
