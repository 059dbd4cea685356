use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::Uri;

use super::*;
use crate::v1::GetCapabilitiesRequest;
use crate::v1::capabilities_service_client::CapabilitiesServiceClient;

#[test]
fn the_default_is_what_the_listening_server_always_used() {
    let d = Http2Settings::default();
    assert_eq!(d.keepalive_interval, Some(Duration::from_secs(30)));
    assert_eq!(d.keepalive_timeout, Duration::from_secs(20));
    assert_eq!(d.stream_window_bytes, None);
    assert_eq!(d.connection_window_bytes, None);
    assert_eq!(d.max_frame_bytes, Some(256 * 1024));
    assert_eq!(d.validate(), Ok(()));
}

#[test]
fn tunnels_follow_the_heartbeat_and_get_large_windows() {
    let heartbeat = HeartbeatSettings {
        interval: Duration::from_secs(7),
        timeout: Duration::from_secs(11),
    };
    let t = Http2Settings::for_tunnels(&heartbeat);
    assert_eq!(t.keepalive_interval, Some(Duration::from_secs(7)));
    assert_eq!(t.keepalive_timeout, Duration::from_secs(11));
    assert_eq!(t.stream_window_bytes, Some(4 * 1024 * 1024));
    assert_eq!(t.connection_window_bytes, Some(8 * 1024 * 1024));
    assert_eq!(t.max_frame_bytes, Some(256 * 1024));
    assert_eq!(t.validate(), Ok(()));
}

#[test]
fn validation_names_the_value_and_the_allowed_range() {
    let d = Http2Settings::default();
    let frame = |f| Http2Settings {
        max_frame_bytes: Some(f),
        ..d
    };
    let window = |w| Http2Settings {
        stream_window_bytes: Some(w),
        ..d
    };
    assert_eq!(frame(MIN_FRAME_BYTES).validate(), Ok(()));
    assert_eq!(frame(MAX_FRAME_BYTES).validate(), Ok(()));
    assert_eq!(
        frame(16_383).validate(),
        Err(Http2SettingsError::FrameSize(16_383))
    );
    let too_big = frame(1 << 24).validate().expect_err("16 MiB is too big");
    assert!(too_big.to_string().contains("16 KiB"), "{too_big}");
    assert_eq!(window(MIN_WINDOW_BYTES).validate(), Ok(()));
    assert_eq!(window(MAX_WINDOW_BYTES).validate(), Ok(()));
    assert_eq!(
        window(0).validate(),
        Err(Http2SettingsError::Window {
            field: "stream_window_bytes",
            value: 0
        })
    );
    let connection = Http2Settings {
        connection_window_bytes: Some(1 << 31),
        ..d
    };
    let error = connection.validate().expect_err("2^31 is too big");
    assert!(
        error.to_string().contains("connection_window_bytes"),
        "{error}"
    );
    let zero = Http2Settings {
        keepalive_interval: Some(Duration::ZERO),
        ..d
    };
    assert_eq!(
        zero.validate(),
        Err(Http2SettingsError::ZeroDuration("keepalive_interval"))
    );
    let zero = Http2Settings {
        keepalive_timeout: Duration::ZERO,
        ..d
    };
    assert_eq!(
        zero.validate(),
        Err(Http2SettingsError::ZeroDuration("keepalive_timeout"))
    );
}

#[test]
fn clamping_leaves_valid_settings_alone_and_fixes_the_rest() {
    let valid = Http2Settings::for_tunnels(&HeartbeatSettings::default());
    assert_eq!(valid.clamped(), valid);
    let wild = Http2Settings {
        keepalive_interval: Some(Duration::ZERO),
        keepalive_timeout: Duration::ZERO,
        stream_window_bytes: Some(0),
        connection_window_bytes: Some(u32::MAX),
        max_frame_bytes: Some(u32::MAX),
        max_header_list_bytes: Some(u32::MAX),
    };
    assert!(wild.validate().is_err());
    let fixed = wild.clamped();
    assert_eq!(fixed.validate(), Ok(()));
    assert_eq!(fixed.stream_window_bytes, Some(MIN_WINDOW_BYTES));
    assert_eq!(fixed.connection_window_bytes, Some(MAX_WINDOW_BYTES));
    assert_eq!(fixed.max_frame_bytes, Some(MAX_FRAME_BYTES));
    assert_eq!(fixed.max_header_list_bytes, Some(MAX_HEADER_LIST_BYTES));
    let tiny = Http2Settings {
        max_frame_bytes: Some(1),
        ..valid
    };
    assert_eq!(tiny.clamped().max_frame_bytes, Some(MIN_FRAME_BYTES));
}

#[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
struct File {
    #[serde(default)]
    http2: Http2Settings,
}

#[test]
fn a_file_may_leave_out_any_key_and_may_not_invent_one() {
    let empty: File = toml::from_str("").expect("empty file");
    assert_eq!(empty.http2, Http2Settings::default());
    let partial: File =
        toml::from_str("[http2]\nkeepalive_interval = \"5s\"\nstream_window_bytes = 1048576\n")
            .expect("partial table");
    assert_eq!(
        partial.http2,
        Http2Settings {
            keepalive_interval: Some(Duration::from_secs(5)),
            stream_window_bytes: Some(1 << 20),
            ..Http2Settings::default()
        }
    );
    let unknown = toml::from_str::<File>("[http2]\nwindow = 1\n").expect_err("unknown key");
    assert!(unknown.to_string().contains("window"), "{unknown}");
    let frame = toml::from_str::<File>("[http2]\nmax_frame_bytes = 1024\n").expect_err("too small");
    assert!(frame.to_string().contains("16 KiB"), "{frame}");
}

#[test]
fn settings_survive_a_round_trip_through_a_file() {
    for http2 in [
        Http2Settings::default(),
        Http2Settings::for_tunnels(&HeartbeatSettings::default()),
    ] {
        let file = File { http2 };
        let text = toml::to_string(&file).expect("serialise");
        let back: File = toml::from_str(&text).expect("parse back");
        assert_eq!(back, file, "{text}");
    }
    let text = toml::to_string(&File {
        http2: Http2Settings::default(),
    })
    .expect("serialise");
    assert!(text.contains("keepalive_interval = \"30s\""), "{text}");
}

/// Settings h2 would panic on still make a working connection once the
/// helpers clamp them.
#[tokio::test]
async fn out_of_range_settings_are_clamped_before_they_reach_h2() {
    let wild = Http2Settings {
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_timeout: Duration::from_secs(20),
        stream_window_bytes: Some(u32::MAX),
        connection_window_bytes: Some(0),
        max_frame_bytes: Some(1),
        max_header_list_bytes: Some(0),
    };
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let incoming = tokio_stream::StreamExt::chain(
        tokio_stream::once(Ok::<_, std::io::Error>(server_io)),
        tokio_stream::pending(),
    );
    let server = tokio::spawn(
        wild.apply_to_server(Server::builder())
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming),
    );
    let mut client_io = Some(client_io);
    let channel = wild
        .apply_to_endpoint(Endpoint::from_static("http://in-memory"))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = client_io.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the pipe is already used"))
            }
        }))
        .await
        .expect("connect");
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        CapabilitiesServiceClient::new(channel).get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .expect("an answer")
    .expect_err("no capabilities service is mounted");
    // The server answered over HTTP/2: the connection itself is fine.
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    server.abort();
}

/// A call with `metadata_bytes` of metadata to a server with `server`'s
/// settings (no services mounted: a call that gets through is
/// UNIMPLEMENTED).
async fn call_with_metadata(server: Http2Settings, metadata_bytes: usize) -> tonic::Status {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let incoming = tokio_stream::StreamExt::chain(
        tokio_stream::once(Ok::<_, std::io::Error>(server_io)),
        tokio_stream::pending(),
    );
    let serving = tokio::spawn(
        server
            .apply_to_server(Server::builder())
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming),
    );
    let mut client_io = Some(client_io);
    let channel = Http2Settings {
        // The client accepts large answers; only the server's limit is tested.
        max_header_list_bytes: Some(MAX_HEADER_LIST_BYTES),
        ..Http2Settings::default()
    }
    .apply_to_endpoint(Endpoint::from_static("http://in-memory"))
    .connect_with_connector(tower::service_fn(move |_: Uri| {
        let io = client_io.take();
        async move {
            io.map(TokioIo::new)
                .ok_or_else(|| std::io::Error::other("the pipe is already used"))
        }
    }))
    .await
    .expect("connect");
    let mut request = tonic::Request::new(GetCapabilitiesRequest {});
    let value = "x".repeat(metadata_bytes);
    request.metadata_mut().insert(
        "x-padding",
        value.parse().expect("ASCII is a valid metadata value"),
    );
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        CapabilitiesServiceClient::new(channel).get_capabilities(request),
    )
    .await
    .expect("an answer")
    .expect_err("no capabilities service is mounted");
    serving.abort();
    status
}

#[tokio::test]
async fn metadata_beyond_the_header_list_limit_is_refused_and_the_limit_is_a_setting() {
    let default = Http2Settings::default();
    assert_eq!(default.max_header_list_bytes, Some(16 * 1024));
    let within = call_with_metadata(default, 8 * 1024).await;
    assert_eq!(within.code(), tonic::Code::Unimplemented, "{within:?}");
    let huge = call_with_metadata(default, 1024 * 1024).await;
    // Far beyond the limit: h2 closes the connection (GOAWAY
    // ENHANCE_YOUR_CALM), which tonic reports as RESOURCE_EXHAUSTED.
    assert_eq!(huge.code(), tonic::Code::ResourceExhausted, "{huge:?}");

    let small = Http2Settings {
        max_header_list_bytes: Some(4 * 1024),
        ..default
    };
    let refused = call_with_metadata(small, 8 * 1024).await;
    // Just beyond it: the stream is answered 431 Request Header Fields
    // Too Large.
    assert!(refused.message().contains("431"), "{refused:?}");
    let large = Http2Settings {
        max_header_list_bytes: Some(2 * 1024 * 1024),
        ..default
    };
    let admitted = call_with_metadata(large, 1024 * 1024).await;
    assert_eq!(admitted.code(), tonic::Code::Unimplemented, "{admitted:?}");
    let error = Http2Settings {
        max_header_list_bytes: Some(10),
        ..default
    }
    .validate()
    .expect_err("too small");
    assert!(error.to_string().contains("1 KiB"), "{error}");
}
