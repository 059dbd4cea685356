//! A peer that breaks the frame rules, one rule per test: each side's
//! session is fed hand-made frames, and after each the session is still up
//! (or ended for the reason the rules give) and a well-formed call on the
//! same tunnel still works. Nothing here may panic either side.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::body::Body;

use super::*;
use crate::v1::{
    CallCancel, CallCredit, CallData, CallHeader, CallResponse, CallStart, CallTrailers,
    TunnelHello, TunnelWelcome,
};

type Handler =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// How long a test waits for a frame that must come.
const WAIT: Duration = Duration::from_secs(5);
/// How long a test watches for a frame that must not come.
const QUIET: Duration = Duration::from_millis(200);
/// The size of `/big`'s response: four windows.
const BIG: usize = 4 * CALL_WINDOW as usize;

/// `/big` answers with [`BIG`] bytes; every other path echoes its request
/// once the request ended.
fn handler() -> Handler {
    tower::util::BoxCloneSyncService::new(tower::service_fn(
        |request: http::Request<Body>| async move {
            let mut ok = http::HeaderMap::new();
            ok.insert("grpc-status", http::HeaderValue::from_static("0"));
            let body = if request.uri().path() == "/big" {
                Bytes::from(vec![7u8; BIG])
            } else {
                match request.into_body().collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(status) => return Ok(status.into_http()),
                }
            };
            let body = http_body_util::Full::new(body)
                .map_err(|never: Infallible| match never {})
                .with_trailers(async move { Some(Ok(ok)) });
            Ok::<_, Infallible>(http::Response::new(Body::new(body)))
        },
    ))
}

fn call_of(kind: &Kind) -> Option<u64> {
    match kind {
        Kind::Start(f) => Some(f.call),
        Kind::Response(f) => Some(f.call),
        Kind::Data(f) => Some(f.call),
        Kind::Trailers(f) => Some(f.call),
        Kind::Cancel(f) => Some(f.call),
        Kind::Credit(f) => Some(f.call),
        _ => None,
    }
}

fn start(call: u64, path: &str) -> Kind {
    Kind::Start(CallStart {
        call,
        path: path.into(),
        headers: Vec::new(),
    })
}

fn data(call: u64, bytes: &[u8], end: bool) -> Kind {
    Kind::Data(CallData {
        call,
        data: Bytes::copy_from_slice(bytes),
        end,
    })
}

fn ok_trailers(call: u64) -> Kind {
    Kind::Trailers(CallTrailers {
        call,
        trailers: vec![CallHeader {
            name: "grpc-status".into(),
            value: b"0".to_vec(),
        }],
    })
}

fn grpc_status(trailers: &CallTrailers) -> Option<String> {
    trailers
        .trailers
        .iter()
        .find(|h| h.name == "grpc-status")
        .map(|h| String::from_utf8_lossy(&h.value).into_owned())
}

/// One side's session fed by hand: `peer` is what the other side would
/// send, `frames` what this side sends back.
struct Harness {
    peer: mpsc::UnboundedSender<Result<TunnelFrame, tonic::Status>>,
    frames: OutboundFrames,
    session: JoinHandle<SessionEnd>,
    stop: CancellationToken,
}

impl Harness {
    fn new(out: Outbound, frames: OutboundFrames, calls: Arc<dyn CallFrames>) -> Self {
        let (peer, incoming) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let session = tokio::spawn(run_session(
            UnboundedReceiverStream::new(incoming),
            out,
            calls,
            HeartbeatSettings::default(),
            SessionSignals::default(),
            stop.clone(),
        ));
        Self {
            peer,
            frames,
            session,
            stop,
        }
    }

    fn send(&self, kind: Kind) {
        self.peer
            .send(Ok(TunnelFrame { kind: Some(kind) }))
            .expect("the session reads");
    }

    /// The next frame this side sent for `call`; others are skipped.
    async fn next_for(&mut self, call: u64) -> Kind {
        tokio::time::timeout(WAIT, async {
            loop {
                let frame = self.frames.next().await.expect("the queue is open");
                if let Some(kind) = frame.kind
                    && call_of(&kind) == Some(call)
                {
                    return kind;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no frame for call {call}"))
    }

    /// Every frame this side sends for `call` within [`QUIET`].
    async fn quiet_for(&mut self, call: u64) -> Vec<Kind> {
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(QUIET, async {
            while let Some(frame) = self.frames.next().await {
                if let Some(kind) = frame.kind
                    && call_of(&kind) == Some(call)
                {
                    seen.push(kind);
                }
            }
        })
        .await;
        seen
    }

    /// The cancel this side sends for `call`, skipping its other frames.
    async fn cancel_for(&mut self, call: u64) -> CallCancel {
        loop {
            if let Kind::Cancel(cancel) = self.next_for(call).await {
                return cancel;
            }
        }
    }

    fn assert_up(&self) {
        assert!(!self.session.is_finished(), "the session is still up");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The agent's server under a hub that breaks the rules.
fn agent() -> (Harness, TunnelServer<Handler>) {
    let (out, frames) = outbound();
    let settings = ServerSettings {
        max_concurrent_calls: 8,
        side: "agent",
    };
    let server = TunnelServer::new(handler(), out.clone(), None, settings);
    (Harness::new(out, frames, Arc::new(server.clone())), server)
}

/// A well-formed unary call on `call`: its echo comes back with OK.
async fn agent_echoes(harness: &mut Harness, call: u64) {
    harness.send(start(call, "/echo/Ping"));
    harness.send(data(call, b"still here", true));
    let mut body = Vec::new();
    loop {
        match harness.next_for(call).await {
            Kind::Response(_) | Kind::Credit(_) => {}
            Kind::Data(d) => body.extend_from_slice(&d.data),
            Kind::Trailers(t) => {
                assert_eq!(grpc_status(&t).as_deref(), Some("0"), "call {call}");
                break;
            }
            other => panic!("call {call}: unexpected {other:?}"),
        }
    }
    assert_eq!(body, b"still here", "call {call} got its echo");
    harness.assert_up();
}

#[tokio::test]
async fn frames_for_unknown_calls_are_ignored_by_the_agent() {
    let (mut hub, server) = agent();
    hub.send(data(77, b"nobody", false));
    hub.send(data(78, b"nobody", true));
    hub.send(Kind::Credit(CallCredit {
        call: 77,
        bytes: u32::MAX,
    }));
    hub.send(Kind::Cancel(CallCancel {
        call: 79,
        reason: "never started".into(),
    }));
    assert_eq!(hub.quiet_for(77).await, Vec::new(), "no answer for call 77");
    assert_eq!(server.calls(), 0, "no call was made up");
    agent_echoes(&mut hub, 1).await;
}

#[tokio::test]
async fn a_second_hello_and_hub_side_frames_are_ignored_by_the_agent() {
    let (mut hub, server) = agent();
    // Before any call, and again in the middle of one.
    let hello = || {
        Kind::Hello(TunnelHello {
            agent_id: "impostor".into(),
            protocol: PROTOCOL,
            ..TunnelHello::default()
        })
    };
    hub.send(hello());
    hub.send(Kind::Welcome(TunnelWelcome::default()));
    hub.send(start(4, "/echo/Slow"));
    hub.send(hello());
    // Frames only an agent sends, aimed at the running call.
    hub.send(Kind::Response(CallResponse {
        call: 4,
        headers: Vec::new(),
    }));
    hub.send(ok_trailers(4));
    hub.send(Kind::Pong(9));
    assert_eq!(hub.quiet_for(4).await, Vec::new(), "nothing answers those");
    assert_eq!(server.calls(), 1, "the call still runs");
    hub.send(data(4, b"whole", true));
    let mut got = Vec::new();
    loop {
        match hub.next_for(4).await {
            Kind::Data(d) => got.extend_from_slice(&d.data),
            Kind::Trailers(t) => {
                assert_eq!(grpc_status(&t).as_deref(), Some("0"));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(got, b"whole");
    agent_echoes(&mut hub, 5).await;
}

#[tokio::test]
async fn a_start_that_reuses_a_running_calls_id_is_ignored() {
    let (mut hub, server) = agent();
    hub.send(start(6, "/echo/First"));
    hub.send(data(6, b"one ", false));
    hub.send(start(6, "/echo/Second"));
    hub.send(data(6, b"two", true));
    let mut got = Vec::new();
    let mut trailers = 0;
    for kind in hub.quiet_for(6).await {
        match kind {
            Kind::Data(d) => got.extend_from_slice(&d.data),
            Kind::Trailers(t) => {
                assert_eq!(grpc_status(&t).as_deref(), Some("0"));
                trailers += 1;
            }
            _ => {}
        }
    }
    assert_eq!(trailers, 1, "one call, ended once");
    assert_eq!(got, b"one two", "the first call got every byte");
    assert_eq!(server.calls(), 0);
    agent_echoes(&mut hub, 7).await;
}

#[tokio::test]
async fn frames_after_a_cancel_are_ignored_by_the_agent() {
    let (mut hub, server) = agent();
    hub.send(start(8, "/echo/Cancelled"));
    hub.send(Kind::Cancel(CallCancel {
        call: 8,
        reason: "changed my mind".into(),
    }));
    hub.send(data(8, b"late", true));
    hub.send(Kind::Credit(CallCredit {
        call: 8,
        bytes: 1000,
    }));
    hub.send(Kind::Cancel(CallCancel {
        call: 8,
        reason: "again".into(),
    }));
    let answers = hub.quiet_for(8).await;
    assert!(
        answers.iter().all(|k| !matches!(k, Kind::Data(_))),
        "nothing is served for a cancelled call: {answers:?}"
    );
    assert_eq!(server.calls(), 0);
    agent_echoes(&mut hub, 9).await;
}

#[tokio::test]
async fn a_window_overrun_cancels_only_that_call() {
    let (mut hub, server) = agent();
    hub.send(start(10, "/echo/Flood"));
    hub.send(start(11, "/echo/Bystander"));
    let chunk = vec![0u8; MAX_CHUNK];
    for _ in 0..=CALL_WINDOW as usize / MAX_CHUNK {
        hub.send(data(10, &chunk, false));
    }
    let cancel = hub.cancel_for(10).await;
    assert!(cancel.reason.contains("window"), "{}", cancel.reason);
    assert_eq!(server.calls(), 1, "the bystander still runs");
    hub.send(data(11, b"fine", true));
    loop {
        if let Kind::Trailers(t) = hub.next_for(11).await {
            assert_eq!(grpc_status(&t).as_deref(), Some("0"));
            break;
        }
    }
    agent_echoes(&mut hub, 12).await;
}

#[tokio::test]
async fn a_data_frame_larger_than_a_chunk_cancels_its_call() {
    let (mut hub, server) = agent();
    hub.send(start(13, "/echo/Oversized"));
    hub.send(data(13, &vec![1u8; MAX_FRAME + 1], false));
    let cancel = hub.cancel_for(13).await;
    assert!(cancel.reason.contains("data frame"), "{}", cancel.reason);
    assert_eq!(server.calls(), 0);
    agent_echoes(&mut hub, 14).await;
}

#[tokio::test]
async fn repeated_maximum_credit_never_lets_the_agent_send_past_one_window() {
    let (mut hub, _server) = agent();
    hub.send(start(15, "/big"));
    hub.send(data(15, b"", true));
    // Queued before the agent sends a byte (fewer frames than a task's
    // scheduling budget, so the session reads them all first): each is a
    // claim to have read bytes that were never sent.
    for _ in 0..50 {
        hub.send(Kind::Credit(CallCredit {
            call: 15,
            bytes: u32::MAX,
        }));
    }
    // The hub never reads: the agent may send one window and no more.
    let mut sent = 0usize;
    for kind in hub.quiet_for(15).await {
        if let Kind::Data(d) = kind {
            sent += d.data.len();
        }
    }
    assert_eq!(sent, CALL_WINDOW as usize, "one window, without wrapping");
    // Honest credit after that still moves the call on.
    hub.send(Kind::Credit(CallCredit {
        call: 15,
        bytes: 1000,
    }));
    let Kind::Data(more) = hub.next_for(15).await else {
        panic!("more data after credit");
    };
    assert_eq!(more.data.len(), 1000);
    hub.assert_up();
}

/// The hub's caller under an agent that breaks the rules.
fn hub() -> (Harness, TunnelCaller) {
    let (out, frames) = outbound();
    let caller = TunnelCaller::new(out.clone(), 0);
    (Harness::new(out, frames, Arc::new(caller.clone())), caller)
}

fn request(path: &str) -> http::Request<Body> {
    let mut request = http::Request::new(Body::new(http_body_util::Full::new(Bytes::from_static(
        b"ask",
    ))));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!("http://agent{path}").parse().expect("uri");
    request
}

/// Starts a call through `caller`; returns its id (from the start frame)
/// and the task that waits for its response.
async fn begin(
    agent: &mut Harness,
    caller: &TunnelCaller,
) -> (u64, JoinHandle<Result<http::Response<Body>, CallerClosed>>) {
    let task = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call(request("/echo/Ask")).await }
    });
    let call = tokio::time::timeout(WAIT, async {
        loop {
            let frame = agent.frames.next().await.expect("queue open");
            if let Some(Kind::Start(start)) = frame.kind {
                return start.call;
            }
        }
    })
    .await
    .expect("a start frame");
    (call, task)
}

/// A whole call answered by hand: the caller sees the answer and OK.
async fn hub_calls(agent: &mut Harness, caller: &TunnelCaller) {
    let (call, task) = begin(agent, caller).await;
    agent.send(Kind::Response(CallResponse {
        call,
        headers: Vec::new(),
    }));
    agent.send(data(call, b"answer", false));
    agent.send(ok_trailers(call));
    let response = tokio::time::timeout(WAIT, task)
        .await
        .expect("answered")
        .expect("task")
        .expect("the tunnel is open");
    let collected = response.into_body().collect().await.expect("the body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"answer"));
    agent.assert_up();
}

#[tokio::test]
async fn frames_for_unknown_calls_and_agent_side_starts_are_ignored_by_the_hub() {
    let (mut agent, caller) = hub();
    agent.send(Kind::Response(CallResponse {
        call: 999,
        headers: Vec::new(),
    }));
    agent.send(data(999, b"stray", false));
    agent.send(ok_trailers(998));
    agent.send(Kind::Credit(CallCredit {
        call: 997,
        bytes: u32::MAX,
    }));
    agent.send(Kind::Cancel(CallCancel {
        call: 996,
        reason: "?".into(),
    }));
    // Frames only a hub sends, and a hello after setup.
    agent.send(start(1, "/tentacle.v1.ScriptService/StartScript"));
    agent.send(Kind::Welcome(TunnelWelcome::default()));
    agent.send(Kind::Hello(TunnelHello::default()));
    assert_eq!(caller.calls(), 0, "no call was made up");
    hub_calls(&mut agent, &caller).await;
    assert_eq!(
        agent.quiet_for(999).await,
        Vec::new(),
        "no answer to strays"
    );
}

#[tokio::test]
async fn data_before_headers_fails_that_call_and_the_next_works() {
    let (mut agent, caller) = hub();
    let (call, task) = begin(&mut agent, &caller).await;
    agent.send(data(call, b"too soon", false));
    let response = tokio::time::timeout(WAIT, task)
        .await
        .expect("answered")
        .expect("task")
        .expect("the tunnel is open");
    let status = tonic::Status::from_header_map(response.headers()).expect("a status");
    assert_eq!(status.code(), tonic::Code::Internal);
    assert!(status.message().contains("before headers"), "{status:?}");
    let cancel = agent.cancel_for(call).await;
    assert!(
        cancel.reason.contains("before headers"),
        "{}",
        cancel.reason
    );
    hub_calls(&mut agent, &caller).await;
}

#[tokio::test]
async fn headers_twice_fail_that_call_and_frames_after_its_end_are_ignored() {
    let (mut agent, caller) = hub();
    let (call, task) = begin(&mut agent, &caller).await;
    let response = Kind::Response(CallResponse {
        call,
        headers: Vec::new(),
    });
    agent.send(response.clone());
    agent.send(response);
    let answered = tokio::time::timeout(WAIT, task)
        .await
        .expect("answered")
        .expect("task")
        .expect("the tunnel is open");
    let error = answered
        .into_body()
        .collect()
        .await
        .expect_err("a broken body");
    assert!(error.message().contains("headers twice"), "{error:?}");
    // The call is over; more frames for it change nothing.
    agent.send(data(call, b"late", false));
    agent.send(ok_trailers(call));
    agent.send(ok_trailers(call));
    hub_calls(&mut agent, &caller).await;
    assert_eq!(caller.calls(), 0);
}

#[tokio::test]
async fn an_agent_that_overruns_a_window_has_the_call_failed_and_cancelled() {
    let (mut agent, caller) = hub();
    let (call, task) = begin(&mut agent, &caller).await;
    agent.send(Kind::Response(CallResponse {
        call,
        headers: Vec::new(),
    }));
    let chunk = vec![0u8; MAX_CHUNK];
    for _ in 0..=CALL_WINDOW as usize / MAX_CHUNK {
        agent.send(data(call, &chunk, false));
    }
    let cancel = agent.cancel_for(call).await;
    assert!(cancel.reason.contains("window"), "{}", cancel.reason);
    let response = task.await.expect("task").expect("answered");
    let mut body = response.into_body();
    let failed = loop {
        match body.frame().await {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the body must fail, not end"),
        }
    };
    assert_eq!(failed.code(), tonic::Code::Internal, "{failed:?}");
    hub_calls(&mut agent, &caller).await;
}

#[tokio::test]
async fn a_stream_error_ends_the_session_with_its_reason() {
    let (agent, _caller) = hub();
    agent
        .peer
        .send(Err(tonic::Status::out_of_range(
            "Error, decoded message length too large",
        )))
        .expect("the session reads");
    let mut agent = agent;
    let end = tokio::time::timeout(WAIT, &mut agent.session)
        .await
        .expect("the session ends")
        .expect("no panic");
    let SessionEnd::StreamError(reason) = end else {
        panic!("expected a stream error, got {end:?}");
    };
    assert!(reason.contains("too large"), "{reason}");
}

/// Random frames, seeded so a failure can be replayed: each sequence is
/// what a broken or hostile peer might send, any kind of frame for any of a
/// few call ids, with odd paths, headers, sizes and credits.
mod random {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::v1::TunnelDrain;

    /// Sequences per side; every one on a fresh session.
    const SEQUENCES: u64 = 300;
    const MAX_FRAMES: usize = 40;
    /// The call ids random frames aim at.
    const IDS: u64 = 6;

    fn text(rng: &mut StdRng) -> String {
        const PIECES: [&str; 9] = [
            "/echo/Ping",
            "/big",
            "",
            "grpc-status",
            "Bad Name",
            "x\n",
            "\u{0}",
            "ünï",
            "-bin",
        ];
        (0..rng.random_range(0..3))
            .map(|_| PIECES[rng.random_range(0..PIECES.len())])
            .collect()
    }

    fn headers(rng: &mut StdRng) -> Vec<CallHeader> {
        (0..rng.random_range(0..4))
            .map(|_| CallHeader {
                name: text(rng),
                value: (0..rng.random_range(0..20)).map(|_| rng.random()).collect(),
            })
            .collect()
    }

    fn bytes(rng: &mut StdRng) -> Vec<u8> {
        let len = match rng.random_range(0..10) {
            0 => MAX_CHUNK + rng.random_range(1..64),
            1 => MAX_CHUNK,
            _ => rng.random_range(0..64),
        };
        vec![rng.random(); len]
    }

    fn frame(rng: &mut StdRng) -> Kind {
        let call = rng.random_range(1..=IDS);
        match rng.random_range(0..13) {
            0 => Kind::Hello(TunnelHello {
                agent_id: text(rng),
                protocol: rng.random_range(0..4),
                max_concurrent_calls: rng.random(),
                ..TunnelHello::default()
            }),
            1 => Kind::Welcome(TunnelWelcome {
                hub_version: text(rng),
                protocol: rng.random_range(0..4),
            }),
            2 => Kind::Ping(rng.random()),
            3 => Kind::Pong(rng.random()),
            4 => Kind::Drain(TunnelDrain { reason: text(rng) }),
            5 | 6 => Kind::Start(CallStart {
                call,
                path: text(rng),
                headers: headers(rng),
            }),
            7 => Kind::Response(CallResponse {
                call,
                headers: headers(rng),
            }),
            8 | 9 => Kind::Data(CallData {
                call,
                data: Bytes::from(bytes(rng)),
                end: rng.random(),
            }),
            10 => Kind::Trailers(CallTrailers {
                call,
                trailers: headers(rng),
            }),
            11 => Kind::Cancel(CallCancel {
                call,
                reason: text(rng),
            }),
            _ => Kind::Credit(CallCredit {
                call,
                bytes: if rng.random() { u32::MAX } else { rng.random() },
            }),
        }
    }

    #[tokio::test]
    async fn random_frames_never_break_the_agent() {
        for seed in 0..SEQUENCES {
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut hub, server) = agent();
            for _ in 0..rng.random_range(1..=MAX_FRAMES) {
                hub.send(frame(&mut rng));
            }
            // Whatever ran is cancelled; the session serves the next call.
            for call in 1..=IDS {
                hub.send(Kind::Cancel(CallCancel {
                    call,
                    reason: "end of the sequence".into(),
                }));
            }
            tokio::time::timeout(WAIT, async {
                while server.calls() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: calls still running after their cancel"));
            assert!(!hub.session.is_finished(), "seed {seed}: the session ended");
            agent_echoes(&mut hub, 1000).await;
        }
    }

    #[tokio::test]
    async fn random_frames_never_break_the_hub() {
        for seed in 0..SEQUENCES {
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut agent, caller) = hub();
            // A real call for the random frames to hit, besides made-up ids.
            let (call, task) = begin(&mut agent, &caller).await;
            for _ in 0..rng.random_range(1..=MAX_FRAMES) {
                let mut kind = frame(&mut rng);
                if rng.random_range(0..3) == 0 {
                    retarget(&mut kind, call);
                }
                agent.send(kind);
            }
            agent.send(Kind::Cancel(CallCancel {
                call,
                reason: "end of the sequence".into(),
            }));
            // The caller's call ends one way or another, without hanging.
            let ended = tokio::time::timeout(WAIT, async {
                match task.await.expect("no panic") {
                    Ok(response) => drop(response.into_body().collect().await),
                    Err(_closed) => {}
                }
            })
            .await;
            assert!(ended.is_ok(), "seed {seed}: the call never ended");
            assert!(
                !agent.session.is_finished(),
                "seed {seed}: the session ended"
            );
            hub_calls(&mut agent, &caller).await;
        }
    }

    fn retarget(kind: &mut Kind, to: u64) {
        match kind {
            Kind::Start(f) => f.call = to,
            Kind::Response(f) => f.call = to,
            Kind::Data(f) => f.call = to,
            Kind::Trailers(f) => f.call = to,
            Kind::Cancel(f) => f.call = to,
            Kind::Credit(f) => f.call = to,
            _ => {}
        }
    }
}
