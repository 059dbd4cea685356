use tonic::Code;

use super::*;
use crate::grouped::Interrupted;
use crate::testing::thumbprint;
use crate::trust::{NameTaken, TrustFileError};

fn write_failed() -> TrustFileError {
    TrustFileError::Write {
        path: "/hub/agents.toml".into(),
        source: std::io::Error::other("no space left on device"),
    }
}

fn tls_failed() -> HubError {
    HubError::Tls(tokio_rustls::rustls::Error::General("no usable key".into()).into())
}

fn credential_store_failed() -> CredentialError {
    CredentialError::Store {
        path: "/hub/credentials.toml".into(),
        message: "permission denied".into(),
    }
}

fn name_taken() -> RegisterError {
    RegisterError::NameTaken(NameTaken {
        name: "web-01".into(),
        owner: thumbprint("first"),
    })
}

/// Every mapping, so a change to one is a deliberate change to this table.
#[test]
fn each_error_has_the_status_its_caller_can_act_on() {
    let who = thumbprint("caller");
    let cases: Vec<(Status, Code)> = vec![
        (NoClientCertificate.into(), Code::Unauthenticated),
        (name_taken().into(), Code::AlreadyExists),
        (
            RegisterError::Store(write_failed().into()).into(),
            Code::Internal,
        ),
        (
            RegisterError::Interrupted(Interrupted).into(),
            Code::Unavailable,
        ),
        (RotateError::NotRegistered(who).into(), Code::NotFound),
        (
            RotateError::AlreadyRotating(who).into(),
            Code::FailedPrecondition,
        ),
        (
            RotateError::ThumbprintInUse(who).into(),
            Code::AlreadyExists,
        ),
        (
            RotateError::Store(write_failed().into()).into(),
            Code::Internal,
        ),
        (RotateError::NoPendingStore.into(), Code::Unimplemented),
        (RegistrationError::NoProof.into(), Code::Unauthenticated),
        (
            RegistrationError::NoChannelBinding.into(),
            Code::Unauthenticated,
        ),
        (
            RegistrationError::BadProof(tentacle_proto::rotation::ProofError::BadSignature).into(),
            Code::PermissionDenied,
        ),
        (
            RegistrationError::RotationNeedsApiKey.into(),
            Code::Unauthenticated,
        ),
        (
            RegistrationError::BadRotationApiKey.into(),
            Code::PermissionDenied,
        ),
        (tls_failed().into(), Code::Internal),
        (CredentialError::Invalid.into(), Code::PermissionDenied),
        (credential_store_failed().into(), Code::Internal),
        (RegistrationError::NoHome.into(), Code::Unimplemented),
        (
            RegistrationError::InvalidName("a b".into()).into(),
            Code::InvalidArgument,
        ),
        (RegistrationError::InvalidMode.into(), Code::InvalidArgument),
        (
            RegistrationError::InvalidLabel {
                what: "role",
                label: "a b".into(),
            }
            .into(),
            Code::InvalidArgument,
        ),
        (
            RegistrationError::UnknownAddress.into(),
            Code::InvalidArgument,
        ),
        (
            RegistrationError::InvalidPort(70000).into(),
            Code::InvalidArgument,
        ),
        (
            RegistrationError::InvalidCertificate.into(),
            Code::InvalidArgument,
        ),
        (
            RegistrationError::NoCredential.into(),
            Code::Unauthenticated,
        ),
        (
            RegistrationError::from(CredentialError::Invalid).into(),
            Code::PermissionDenied,
        ),
        (
            RegistrationError::from(credential_store_failed()).into(),
            Code::Internal,
        ),
        (
            RegistrationError::Register(name_taken()).into(),
            Code::AlreadyExists,
        ),
        (RegistrationError::NotRegistered(who).into(), Code::NotFound),
        (
            RegistrationError::Rotate(RotateError::AlreadyRotating(who)).into(),
            Code::FailedPrecondition,
        ),
        (
            RegistrationError::NotOperator(who).into(),
            Code::PermissionDenied,
        ),
        (
            RegistrationError::Throttled(crate::limits::Throttled {
                address: "127.0.0.1".into(),
                retry_after: std::time::Duration::from_secs(6),
            })
            .into(),
            Code::ResourceExhausted,
        ),
        (TunnelError::Closing.into(), Code::Unavailable),
        (TunnelError::NoHello.into(), Code::DeadlineExceeded),
        (TunnelError::NotHello.into(), Code::InvalidArgument),
        (
            TunnelError::InvalidAgentId("a b".into()).into(),
            Code::InvalidArgument,
        ),
        (TunnelError::Untrusted(who).into(), Code::PermissionDenied),
        (
            TunnelError::WrongAgentId {
                thumbprint: who,
                asked: "web-02".into(),
                registered: "web-01".into(),
            }
            .into(),
            Code::PermissionDenied,
        ),
        (
            TunnelError::NotPolling {
                name: "web-01".into(),
            }
            .into(),
            Code::PermissionDenied,
        ),
        (TunnelError::ClosedDuringSetup.into(), Code::Internal),
        (
            ForwardError::NotOperator(who).into(),
            Code::PermissionDenied,
        ),
        (
            ForwardError::NotForwardable("/grpc.health.v1.Health/Check".into()).into(),
            Code::Unimplemented,
        ),
        (ForwardError::NoTarget.into(), Code::InvalidArgument),
        (ForwardError::NoThumbprint.into(), Code::InvalidArgument),
        (
            ForwardError::InvalidPickupTimeout {
                text: "soon".into(),
                reason: "expected number".into(),
            }
            .into(),
            Code::InvalidArgument,
        ),
        (ForwardError::Channel(tls_failed()).into(), Code::Internal),
        (
            ForwardError::NotThisNode {
                named: "hub-2".into(),
                node: node("hub-1"),
            }
            .into(),
            Code::FailedPrecondition,
        ),
        (
            ForwardError::NotHeld {
                node: node("hub-1"),
                agent: crate::testing::agent_id("web-01"),
            }
            .into(),
            Code::FailedPrecondition,
        ),
        (
            ForwardError::Pickup(crate::channel::CallError::NoTunnel(
                crate::registry::PickError::NotConnected {
                    agent: "web-01".into(),
                    waited: "2m".into(),
                },
            ))
            .into(),
            Code::Unavailable,
        ),
        (
            ForwardError::Peer(crate::peers::PeerError::Spent {
                node: node("hub-2"),
            })
            .into(),
            Code::Unavailable,
        ),
    ];
    for (status, code) in cases {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            !status.message().is_empty() && !status.message().contains('\n'),
            "one line that says what was wrong: {status:?}"
        );
    }
}

fn node(id: &str) -> crate::cluster::NodeId {
    id.parse().expect("node id")
}

/// A hub node's stale-presence refusals carry the marker the forwarding
/// node tells them by; no other status does.
#[test]
fn stale_presence_refusals_are_marked_for_the_forwarding_node() {
    use crate::peers::STALE_PRESENCE_HEADER;
    let refusals: [Status; 2] = [
        ForwardError::NotThisNode {
            named: "hub-2".into(),
            node: node("hub-1"),
        }
        .into(),
        ForwardError::NotHeld {
            node: node("hub-1"),
            agent: crate::testing::agent_id("web-01"),
        }
        .into(),
    ];
    for status in refusals {
        assert_eq!(
            status
                .metadata()
                .get(STALE_PRESENCE_HEADER)
                .map(|v| v.to_str().ok()),
            Some(Some("hub-1")),
            "{status:?}"
        );
    }
    let other: Status = RotateError::AlreadyRotating(thumbprint("web-01")).into();
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert!(other.metadata().get(STALE_PRESENCE_HEADER).is_none());
}

/// Callers retry `UNAVAILABLE`; a broken store or TLS configuration would
/// fail the same way every time.
#[test]
fn broken_configuration_is_never_unavailable() {
    let statuses: Vec<Status> = vec![
        tls_failed().into(),
        ForwardError::Channel(tls_failed()).into(),
        RegisterError::Store(write_failed().into()).into(),
        RegistrationError::from(credential_store_failed()).into(),
        RotateError::Store(write_failed().into()).into(),
        RotateError::Store(
            TrustFileError::Lock(crate::store_file::LockError::Timeout {
                path: "/hub/agents.toml.lock".into(),
                timeout: std::time::Duration::from_secs(10),
            })
            .into(),
        )
        .into(),
    ];
    for status in statuses {
        assert_ne!(status.code(), Code::Unavailable, "{status:?}");
    }
}

#[test]
fn a_name_taken_says_whose_it_is_and_what_to_do() {
    let status: Status = RegistrationError::Register(name_taken()).into();
    let message = status.message();
    assert!(
        message.contains("`web-01`") && message.contains(&thumbprint("first").to_string()),
        "{message}"
    );
    assert!(
        message.contains("pick another name") && message.contains("deregister"),
        "{message}"
    );
}

/// A status the agent's end of a tunnel sent is the agent's to give.
#[test]
fn a_failed_tunnel_stream_keeps_its_status() {
    let status: Status = TunnelError::Stream(Status::cancelled("the agent stopped")).into();
    assert_eq!(status.code(), Code::Cancelled);
    assert_eq!(status.message(), "the agent stopped");
}
