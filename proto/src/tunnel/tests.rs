use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;

use super::*;

/// Two sessions whose outer streams are wired to each other in memory.
fn connected(heartbeat: HeartbeatSettings) -> (TunnelIo, TunnelIo, CancellationToken) {
    let stop = CancellationToken::new();
    let (io_a, ends_a) = pipe(None);
    let (io_b, ends_b) = pipe(None);
    let (a_out, a_to_b) = mpsc::channel(8);
    let (b_out, b_to_a) = mpsc::channel(8);
    let ok = |rx| ReceiverStream::new(rx).map(Ok::<_, tonic::Status>);
    tokio::spawn(run_session(
        ok(b_to_a),
        a_out,
        ends_a,
        heartbeat.clone(),
        SessionSignals::default(),
        stop.clone(),
    ));
    tokio::spawn(run_session(
        ok(a_to_b),
        b_out,
        ends_b,
        heartbeat,
        SessionSignals::default(),
        stop.clone(),
    ));
    (io_a, io_b, stop)
}

#[tokio::test]
async fn bytes_cross_in_both_directions_in_order() {
    let (mut a, mut b, stop) = connected(HeartbeatSettings::default());
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        a.write_all(&sent).await.expect("write");
        a
    });
    let mut got = vec![0u8; payload.len()];
    b.read_exact(&mut got).await.expect("read");
    assert_eq!(got, payload);
    let mut a = writer.await.expect("writer");
    b.write_all(b"reply").await.expect("write back");
    let mut reply = [0u8; 5];
    a.read_exact(&mut reply).await.expect("read back");
    assert_eq!(&reply, b"reply");
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn silence_ends_a_session_after_the_heartbeat_timeout() {
    let (_io, ends) = pipe(None);
    let (outgoing, mut sent) = mpsc::channel(8);
    tokio::spawn(async move { while sent.recv().await.is_some() {} });
    let heartbeat = HeartbeatSettings {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
    };
    let silent = futures::stream::pending::<Result<TunnelFrame, tonic::Status>>();
    let end = run_session(
        silent,
        outgoing,
        ends,
        heartbeat,
        SessionSignals::default(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(end, SessionEnd::HeartbeatTimeout);
}

#[tokio::test]
async fn pings_are_answered_and_drains_are_signalled() {
    let (_io, ends) = pipe(None);
    let (outgoing, mut sent) = mpsc::channel(8);
    let (peer, frames) = mpsc::channel(8);
    let signals = SessionSignals::default();
    let stop = CancellationToken::new();
    let session = tokio::spawn(run_session(
        ReceiverStream::new(frames).map(Ok),
        outgoing,
        ends,
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
        let frame = sent.recv().await.expect("a reply");
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

/// Writes `len` bytes into a fresh pipe and returns the chunk sizes the
/// session would send.
async fn chunk_sizes(settings: PipeSettings, len: usize) -> Vec<usize> {
    let (mut io, mut ends) = pipe_with(None, settings);
    let reader = tokio::spawn(async move {
        let mut sizes = Vec::new();
        while let Some(bytes) = ends.from_inner.recv().await {
            sizes.push(bytes.len());
        }
        sizes
    });
    io.write_all(&vec![7u8; len]).await.expect("write");
    io.shutdown().await.expect("shutdown");
    drop(io);
    reader.await.expect("reader")
}

#[tokio::test]
async fn writes_are_cut_into_chunks_of_the_configured_size() {
    let small = PipeSettings {
        chunk_bytes: 1000,
        chunks: 2,
    };
    let sizes = chunk_sizes(small, 4500).await;
    assert_eq!(sizes, [1000, 1000, 1000, 1000, 500]);
    let default = chunk_sizes(PipeSettings::default(), 2 * MAX_CHUNK + 1).await;
    assert_eq!(default, [MAX_CHUNK, MAX_CHUNK, 1]);
}

#[tokio::test]
async fn chunks_never_exceed_what_the_peer_decodes_and_zero_is_raised() {
    let huge = PipeSettings {
        chunk_bytes: 10 * MAX_CHUNK,
        chunks: 0,
    };
    let sizes = chunk_sizes(huge, 3 * MAX_CHUNK).await;
    assert_eq!(sizes, [MAX_CHUNK; 3]);
    let zero = PipeSettings {
        chunk_bytes: 0,
        chunks: 1,
    };
    assert_eq!(chunk_sizes(zero, 3).await, [1, 1, 1]);
}
