use std::convert::Infallible;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;

use super::*;
use crate::v1::{CallData, CallStart};

type Handler =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// A hub's caller and an agent's server wired in memory, serving
/// `handler`; `max_calls` 0 is the agent's default limit.
fn connected(
    handler: Handler,
    max_calls: u32,
) -> (TunnelCaller, TunnelServer<Handler>, CancellationToken) {
    let settings = ServerSettings {
        max_concurrent_calls: if max_calls == 0 { 1024 } else { max_calls },
        side: "agent",
    };
    memory::connect(handler, settings)
}

fn grpc_ok() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// Answers with the request's bytes, then OK trailers; the response starts
/// before the request ends, so both directions stream at once.
fn echo() -> Handler {
    tower::util::BoxCloneSyncService::new(tower::service_fn(
        |request: http::Request<Body>| async move {
            let mut body = request.into_body();
            let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, tonic::Status>>(4);
            tokio::spawn(async move {
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Ok(data) = frame.into_data()
                                && tx.send(Ok(http_body::Frame::data(data))).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    }
                }
                let _ = tx.send(Ok(http_body::Frame::trailers(grpc_ok()))).await;
            });
            let body = http_body_util::StreamBody::new(ReceiverStream::new(rx));
            Ok::<_, Infallible>(http::Response::new(Body::new(body)))
        },
    ))
}

fn request(path: &str, body: Body) -> http::Request<Body> {
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = format!("http://agent{path}").parse().expect("uri");
    request
}

async fn read_all(response: http::Response<Body>) -> (Vec<u8>, Option<http::HeaderMap>) {
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the body streams");
        match frame.into_data() {
            Ok(data) => bytes.extend_from_slice(&data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (bytes, trailers)
}

#[tokio::test]
async fn a_call_streams_megabytes_both_ways_within_its_window() {
    let (caller, server, stop) = connected(echo(), 0);
    let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, tonic::Status>>(2);
    let sent = payload.clone();
    tokio::spawn(async move {
        for chunk in sent.chunks(100_000) {
            let _ = tx
                .send(Ok(http_body::Frame::data(Bytes::copy_from_slice(chunk))))
                .await;
        }
    });
    let body = Body::new(http_body_util::StreamBody::new(ReceiverStream::new(rx)));
    let response = caller
        .call(request("/echo/Big", body))
        .await
        .expect("answered");
    let (got, trailers) = read_all(response).await;
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "the bytes arrive whole and in order");
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    assert_eq!(caller.calls(), 0, "the call is forgotten once it ended");
    assert!(server.wait_idle(Duration::from_secs(5)).await);
    stop.cancel();
}

#[tokio::test]
async fn concurrent_calls_keep_their_own_bytes() {
    let (caller, _server, stop) = connected(echo(), 0);
    let calls = (0..32u8).map(|i| {
        let caller = caller.clone();
        async move {
            let payload = vec![i; 200_000 + usize::from(i) * 1000];
            let body = Body::new(http_body_util::Full::new(Bytes::from(payload.clone())));
            let response = caller
                .call(request("/echo/Each", body))
                .await
                .expect("answered");
            let (got, trailers) = read_all(response).await;
            assert_eq!(trailers.expect("trailers")["grpc-status"], "0", "call {i}");
            assert_eq!(got.len(), payload.len(), "call {i}");
            assert!(got == payload, "call {i} got its own bytes");
        }
    });
    futures::future::join_all(calls).await;
    stop.cancel();
}

#[tokio::test]
async fn metadata_and_the_method_reach_the_handler_and_the_peer_is_known() {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let handler = {
        let seen = seen.clone();
        tower::util::BoxCloneSyncService::new(tower::service_fn(
            move |request: http::Request<Body>| {
                let seen = seen.clone();
                async move {
                    *seen.lock().expect("lock") = Some((
                        request.uri().path().to_owned(),
                        request.headers().get("x-role").cloned(),
                    ));
                    let mut response = http::Response::new(Body::empty());
                    *response.headers_mut() = grpc_ok();
                    Ok::<_, Infallible>(response)
                }
            },
        ))
    };
    let (caller, _server, stop) = connected(handler, 0);
    let mut call = request(
        "/tentacle.v1.CapabilitiesService/GetCapabilities",
        Body::empty(),
    );
    call.headers_mut()
        .insert("x-role", http::HeaderValue::from_static("web"));
    let response = caller.call(call).await.expect("answered");
    assert_eq!(
        response.headers()["grpc-status"],
        "0",
        "a trailers-only answer"
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        Some((
            "/tentacle.v1.CapabilitiesService/GetCapabilities".to_owned(),
            Some(http::HeaderValue::from_static("web"))
        ))
    );
    stop.cancel();
}

/// A handler whose response never ends; counts how many of its bodies were
/// dropped, which is how a handler sees a cancelled call.
fn endless(dropped: Arc<AtomicUsize>) -> Handler {
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |_request: http::Request<Body>| {
            let counted = Counted(dropped.clone());
            async move {
                let stream = futures::stream::unfold(counted, |counted| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Some((
                        Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from_static(
                            b"line\n",
                        ))),
                        counted,
                    ))
                });
                Ok::<_, Infallible>(http::Response::new(Body::new(
                    http_body_util::StreamBody::new(stream),
                )))
            }
        },
    ))
}

#[tokio::test]
async fn a_caller_that_lets_go_cancels_the_call_at_the_agent() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let (caller, server, stop) = connected(endless(dropped.clone()), 0);
    let response = caller
        .call(request("/watch/Forever", Body::empty()))
        .await
        .expect("answered");
    let mut body = response.into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from_static(b"line\n")
    );
    assert_eq!(server.calls(), 1);
    drop(body);
    assert!(
        server.wait_idle(Duration::from_secs(5)).await,
        "the agent stopped the call"
    );
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the handler's stream was dropped"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_deadline_ends_a_call_the_agent_is_still_serving() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let (caller, server, stop) = connected(endless(dropped.clone()), 0);
    let mut call = request("/watch/Forever", Body::empty());
    call.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("100m"));
    let response = caller.call(call).await.expect("answered");
    let (_, trailers) = read_all(response).await;
    assert_eq!(
        trailers.expect("trailers")["grpc-status"],
        "4",
        "DEADLINE_EXCEEDED"
    );
    assert!(server.wait_idle(Duration::from_secs(5)).await);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    stop.cancel();
}

#[tokio::test]
async fn a_closed_tunnel_fails_running_calls_and_refuses_new_ones() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let (caller, _server, stop) = connected(endless(dropped), 0);
    let response = caller
        .call(request("/watch/Forever", Body::empty()))
        .await
        .expect("answered");
    caller.close();
    let mut body = response.into_body();
    let failed = loop {
        match body.frame().await {
            Some(Ok(_)) => {}
            Some(Err(status)) => break status,
            None => panic!("the body ended without an error"),
        }
    };
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(
        caller
            .call(request("/echo/After", Body::empty()))
            .await
            .is_err()
    );
    stop.cancel();
}

#[tokio::test]
async fn calls_beyond_the_agents_limit_wait_their_turn() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let (caller, server, stop) = connected(endless(dropped), 2);
    let first = caller
        .call(request("/watch/A", Body::empty()))
        .await
        .expect("answered");
    let _second = caller
        .call(request("/watch/B", Body::empty()))
        .await
        .expect("answered");
    let third = tokio::spawn({
        let caller = caller.clone();
        async move {
            caller
                .call(request("/watch/C", Body::empty()))
                .await
                .map(|_| ())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!third.is_finished(), "the third waits for a turn");
    assert_eq!(server.calls(), 2);
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third got a turn")
        .expect("task")
        .expect("answered");
    stop.cancel();
}

/// An agent's server fed frames by hand, and the queue of what it answers.
fn lone_server() -> (TunnelServer<Handler>, OutboundFrames) {
    let (out, frames) = outbound();
    let settings = ServerSettings {
        max_concurrent_calls: 8,
        side: "agent",
    };
    (TunnelServer::new(echo(), out, None, settings), frames)
}

#[tokio::test]
async fn a_peer_that_overruns_a_window_has_its_call_cancelled() {
    let (server, mut frames) = lone_server();
    server.receive(Kind::Start(CallStart {
        call: 9,
        path: "/echo/Flood".into(),
        headers: Vec::new(),
    }));
    let chunk = Bytes::from(vec![0u8; MAX_CHUNK]);
    let chunks = usize::try_from(CALL_WINDOW).expect("fits") / MAX_CHUNK + 1;
    for _ in 0..chunks {
        server.receive(Kind::Data(CallData {
            call: 9,
            data: chunk.clone(),
            end: false,
        }));
    }
    let cancel = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match frames.next().await.map(|f| f.kind) {
                Some(Some(Kind::Cancel(cancel))) => break cancel,
                Some(_) => {}
                None => panic!("the queue ended"),
            }
        }
    })
    .await
    .expect("a cancel");
    assert_eq!(cancel.call, 9);
    assert!(cancel.reason.contains("window"), "{}", cancel.reason);
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn a_start_with_metadata_http2_would_refuse_is_answered_with_a_status() {
    let (server, mut frames) = lone_server();
    server.receive(Kind::Start(CallStart {
        call: 3,
        path: "/echo/Bad".into(),
        headers: vec![crate::v1::CallHeader {
            name: "x-bad".into(),
            value: b"a\r\nb".to_vec(),
        }],
    }));
    let frame = tokio::time::timeout(Duration::from_secs(5), frames.next())
        .await
        .expect("an answer")
        .expect("a frame");
    let Some(Kind::Trailers(trailers)) = frame.kind else {
        panic!("expected trailers, got {frame:?}");
    };
    let status = trailers
        .trailers
        .iter()
        .find(|h| h.name == "grpc-status")
        .map(|h| h.value.clone());
    assert_eq!(status, Some(b"3".to_vec()), "INVALID_ARGUMENT");
    assert_eq!(server.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn silence_ends_a_session_after_the_heartbeat_timeout() {
    let (out, _frames) = outbound();
    let heartbeat = HeartbeatSettings {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
    };
    let silent = futures::stream::pending::<Result<TunnelFrame, tonic::Status>>();
    let caller = TunnelCaller::new(out.clone(), 0);
    let end = run_session(
        silent,
        out,
        Arc::new(caller),
        heartbeat,
        SessionSignals::default(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(end, SessionEnd::HeartbeatTimeout);
}

#[tokio::test]
async fn pings_are_answered_and_drains_are_signalled() {
    let (out, mut sent) = outbound();
    let (peer, frames) = mpsc::channel(8);
    let signals = SessionSignals::default();
    let stop = CancellationToken::new();
    let caller = TunnelCaller::new(out.clone(), 0);
    let session = tokio::spawn(run_session(
        ReceiverStream::new(frames).map(Ok),
        out,
        Arc::new(caller),
        HeartbeatSettings::default(),
        signals.clone(),
        stop.clone(),
    ));
    peer.send(TunnelFrame {
        kind: Some(Kind::Ping(7)),
    })
    .await
    .expect("send");
    loop {
        let frame = sent.next().await.expect("a reply");
        if frame.kind == Some(Kind::Pong(7)) {
            break;
        }
    }
    peer.send(TunnelFrame {
        kind: Some(Kind::Drain(crate::v1::TunnelDrain {
            reason: "restart".into(),
        })),
    })
    .await
    .expect("send");
    tokio::time::timeout(Duration::from_secs(5), signals.drained.cancelled())
        .await
        .expect("drain signalled");
    drop(peer);
    assert_eq!(session.await.expect("session"), SessionEnd::PeerClosed);
}

/// A unary request's start, message and end are queued by the call itself,
/// back to back, so they leave in one write rather than after a task switch.
#[tokio::test]
async fn a_unary_request_is_queued_whole_with_its_start() {
    let (out, mut frames) = outbound();
    let caller = TunnelCaller::new(out, 0);
    let body = Body::new(http_body_util::Full::new(Bytes::from_static(
        b"\0\0\0\0\x02hi",
    )));
    let call = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call(request("/echo/Unary", body)).await.map(|_| ()) }
    });
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next())
            .await
            .expect("a frame")
            .expect("queued");
        kinds.push(frame.kind);
    }
    assert!(matches!(kinds[0], Some(Kind::Start(_))), "{kinds:?}");
    assert!(
        matches!(&kinds[1], Some(Kind::Data(d)) if d.data.len() == 7 && !d.end),
        "{kinds:?}"
    );
    assert!(
        matches!(&kinds[2], Some(Kind::Data(d)) if d.data.is_empty() && d.end),
        "{kinds:?}"
    );
    caller.close();
    assert!(
        call.await.expect("task").is_err(),
        "no answer: the tunnel closed"
    );
}

/// An in-memory tunnel whose hub answers the agent's drain the way the
/// hub's tunnel service does: no new reservations, then `drain_ack` once
/// every reserved call's start is queued.
fn acknowledging_pair() -> memory::Pair<Handler> {
    let pair = memory::pair(
        echo(),
        ServerSettings {
            max_concurrent_calls: 16,
            side: "agent",
        },
    );
    let (caller, drained) = (pair.caller.clone(), pair.hub_signals.drained.clone());
    tokio::spawn(async move {
        drained.cancelled().await;
        caller.acknowledge_drain(Duration::from_secs(60)).await;
    });
    pair
}

/// The agent's replacement drain of `pair`, in a task; its bound for the
/// ack and its grace for running calls are both `bound`.
fn start_replacement_drain(
    pair: &memory::Pair<Handler>,
    bound: Duration,
) -> tokio::task::JoinHandle<ReplacedDrain> {
    let server = pair.server.clone();
    let outbound = pair.agent_outbound.clone();
    let signals = pair.agent_signals.clone();
    tokio::spawn(async move {
        drain_replaced(&server, &outbound, &signals, "replaced", bound, bound).await
    })
}

#[tokio::test(start_paused = true)]
async fn a_call_picked_before_the_drain_is_served_however_late_it_starts() {
    let pair = acknowledging_pair();
    // The hub picked this tunnel for a call just before the agent drained it.
    let reservation = pair.caller.reserve().expect("picked");
    let drain = start_replacement_drain(&pair, Duration::from_secs(30));
    pair.hub_signals.drained.cancelled().await;
    assert!(
        pair.caller.reserve().is_none(),
        "a drained tunnel is picked for no new call"
    );
    // Longer than the fixed settle time the agent used to allow.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !pair.agent_signals.drain_acknowledged.is_cancelled() && !drain.is_finished(),
        "no ack while a picked call has not started, and the agent keeps serving"
    );
    let body = Body::new(http_body_util::Full::new(Bytes::from_static(b"late")));
    let response = pair
        .caller
        .call_reserved(reservation, request("/echo/Late", body))
        .await
        .expect("answered");
    let (got, trailers) = read_all(response).await;
    assert_eq!(got, b"late");
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    assert_eq!(drain.await.expect("drain"), ReplacedDrain::Acknowledged);
    pair.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_idle_tunnel_closes_as_soon_as_the_hub_acknowledges() {
    let pair = acknowledging_pair();
    let started = tokio::time::Instant::now();
    let drain = start_replacement_drain(&pair, Duration::from_secs(30));
    assert_eq!(drain.await.expect("drain"), ReplacedDrain::Acknowledged);
    // Paused time only moves when something waits for it: no fixed wait.
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    assert!(pair.agent_signals.drain_acknowledged.is_cancelled());
    pair.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_hub_that_never_acknowledges_is_waited_for_up_to_the_bound() {
    // The hub hears the drain but, like one that predates the ack, never
    // answers it.
    let pair = memory::pair(
        echo(),
        ServerSettings {
            max_concurrent_calls: 16,
            side: "agent",
        },
    );
    let started = tokio::time::Instant::now();
    let drain = start_replacement_drain(&pair, Duration::from_secs(5));
    assert_eq!(drain.await.expect("drain"), ReplacedDrain::Unacknowledged);
    assert!(pair.hub_signals.drained.is_cancelled());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    pair.stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn the_hub_does_not_acknowledge_while_a_picked_call_is_stuck() {
    let pair = memory::pair(
        echo(),
        ServerSettings {
            max_concurrent_calls: 16,
            side: "agent",
        },
    );
    let _stuck = pair.caller.reserve().expect("picked");
    // An ack now could be followed by that call's start.
    assert!(!pair.caller.acknowledge_drain(Duration::from_secs(2)).await);
    assert!(pair.caller.is_draining());
    tokio::task::yield_now().await;
    assert!(!pair.agent_signals.drain_acknowledged.is_cancelled());
    pair.stop.cancel();
}
