use super::*;

fn status(error: CallError) -> tonic::Status {
    error.into()
}

#[test]
fn pick_failures_map_to_statuses_callers_can_act_on() {
    let pickup = Duration::from_secs(10);
    let absent = || PickError::NotConnected {
        agent: "web-1".into(),
        waited: "10s".into(),
    };
    assert_eq!(
        status(CallError::no_tunnel(absent(), None, pickup)).code(),
        tonic::Code::Unavailable
    );
    assert_eq!(
        status(CallError::no_tunnel(
            absent(),
            Some(Duration::from_secs(2)),
            pickup
        ))
        .code(),
        tonic::Code::DeadlineExceeded
    );
    // A caller deadline longer than the pickup timeout did not end the wait.
    assert_eq!(
        status(CallError::no_tunnel(
            absent(),
            Some(Duration::from_secs(20)),
            pickup
        ))
        .code(),
        tonic::Code::Unavailable
    );
    assert_eq!(
        status(CallError::no_tunnel(PickError::Closing, None, pickup)).code(),
        tonic::Code::Unavailable
    );
    let wrong = PickError::WrongThumbprint {
        agent: "web-1".into(),
        actual: "aa".into(),
        expected: "bb".into(),
    };
    assert_eq!(
        status(CallError::no_tunnel(wrong, None, pickup)).code(),
        tonic::Code::PermissionDenied
    );
}

#[test]
fn a_broken_body_is_unavailable_and_named_once() {
    let broken = status(CallError::BodyBroken(tonic::Status::unknown(
        "stream closed because of a broken pipe",
    )));
    assert_eq!(broken.code(), tonic::Code::Unavailable);
    assert_eq!(
        broken.message(),
        "the connection to the agent broke: stream closed because of a broken pipe"
    );
    let again = status(CallError::BodyBroken(broken.clone()));
    assert_eq!(again.message(), broken.message());
}

#[test]
fn a_lost_connection_is_unavailable() {
    let lost = status(CallError::connection_lost(&std::io::Error::other(
        "connection reset",
    )));
    assert_eq!(lost.code(), tonic::Code::Unavailable);
    assert!(
        lost.message()
            .starts_with("the connection to the agent broke: "),
        "{}",
        lost.message()
    );
}

#[test]
fn parses_grpc_timeouts() {
    let mut headers = http::HeaderMap::new();
    assert_eq!(grpc_timeout(&headers), None);
    for (text, expected) in [
        ("5S", Duration::from_secs(5)),
        ("250m", Duration::from_millis(250)),
        ("2M", Duration::from_secs(120)),
        ("1H", Duration::from_secs(3600)),
        ("7u", Duration::from_micros(7)),
    ] {
        headers.insert("grpc-timeout", HeaderValue::from_static(text));
        assert_eq!(grpc_timeout(&headers), Some(expected), "{text}");
    }
    headers.insert("grpc-timeout", HeaderValue::from_static("5x"));
    assert_eq!(grpc_timeout(&headers), None);
}
