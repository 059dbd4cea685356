//! The one place hub errors become gRPC statuses, so a reader sees every
//! status a hub service can return and why.
//!
//! Each module says what went wrong in a typed error; this module decides
//! what the caller should do about it, by code:
//! - `INVALID_ARGUMENT`: the request is malformed; fix it, do not retry.
//! - `NOT_FOUND`: the caller (or what it names) is not registered.
//! - `UNAUTHENTICATED`: no client certificate, or no credential at all.
//! - `PERMISSION_DENIED`: the certificate or credential is not allowed to
//!   do this; retrying will not help.
//! - `ALREADY_EXISTS`: a name or thumbprint belongs to another agent.
//! - `FAILED_PRECONDITION`: allowed, but not in the current state; from a
//!   hub node, marked `tentacle-presence-stale`, a call that reached a
//!   node not holding the agent (the forwarding node tries the next).
//! - `UNAVAILABLE`: the agent is not connected, the connection broke, or
//!   the hub is going away: worth a retry.
//! - `DEADLINE_EXCEEDED`: the caller's own deadline ran out.
//! - `RESOURCE_EXHAUSTED`: the caller's address made too many failed
//!   registrations; retry after the time the message gives.
//! - `INTERNAL`: the hub's TLS configuration or store failed. Never
//!   `UNAVAILABLE`, which callers retry: a retry would fail the same way.
//!
//! A status received from elsewhere (an agent's stream) passes through.

use tonic::Status;

use crate::channel::CallError;
use crate::credentials::CredentialError;
use crate::hub::{HubError, RegisterError, RotateError};
use crate::peers::STALE_PRESENCE_HEADER;
use crate::proxy::ForwardError;
use crate::registration::RegistrationError;
use crate::rotation::PendingError;
use crate::store::StoreError;
use crate::tunnels::TunnelError;

/// A call reached a service without the peer information the accept loop
/// attaches to every authenticated connection.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no client certificate: connect with mutual TLS, using an identity this hub trusts")]
pub struct NoClientCertificate;

impl From<NoClientCertificate> for Status {
    fn from(error: NoClientCertificate) -> Self {
        Status::unauthenticated(error.to_string())
    }
}

/// A store that is out of reach now (etcd without a quorum) or changed
/// under a write may not be so on the next try; one that is broken would
/// fail the same way every time.
fn store_status(error: &StoreError, message: String) -> Status {
    match error {
        StoreError::EtcdUnavailable { .. } => Status::unavailable(message),
        StoreError::Contended { .. } => Status::aborted(message),
        StoreError::File(_) | StoreError::Corrupt { .. } => Status::internal(message),
    }
}

impl From<RegisterError> for Status {
    fn from(error: RegisterError) -> Self {
        let message = error.to_string();
        match error {
            RegisterError::NameTaken(_) => Status::already_exists(message),
            RegisterError::Store(error) => store_status(&error, message),
            RegisterError::Interrupted(_) => Status::unavailable(message),
        }
    }
}

impl From<RotateError> for Status {
    fn from(error: RotateError) -> Self {
        let message = error.to_string();
        match error {
            RotateError::NotRegistered(_) => Status::not_found(message),
            RotateError::AlreadyRotating(_) => Status::failed_precondition(message),
            RotateError::ThumbprintInUse(_) => Status::already_exists(message),
            RotateError::Store(error) | RotateError::Pending(PendingError::Shared(error)) => {
                store_status(&error, message)
            }
            RotateError::Pending(_) => Status::internal(message),
            RotateError::NoPendingStore => Status::unimplemented(message),
        }
    }
}

impl From<HubError> for Status {
    fn from(error: HubError) -> Self {
        let message = error.to_string();
        match error {
            // The agent is down or unreachable now; it may not be later.
            HubError::Dial(_) => Status::unavailable(message),
            HubError::Tls(_) | HubError::Serve(_) => Status::internal(message),
        }
    }
}

impl From<CredentialError> for Status {
    fn from(error: CredentialError) -> Self {
        let message = error.to_string();
        match error {
            CredentialError::Invalid => Status::permission_denied(message),
            CredentialError::Store { .. } => Status::internal(message),
            CredentialError::Shared(error) => store_status(&error, message),
        }
    }
}

impl From<RegistrationError> for Status {
    fn from(error: RegistrationError) -> Self {
        let message = error.to_string();
        match error {
            RegistrationError::NoClientCertificate(error) => error.into(),
            RegistrationError::NoHome => Status::unimplemented(message),
            RegistrationError::InvalidName(_)
            | RegistrationError::InvalidMode
            | RegistrationError::InvalidLabel { .. }
            | RegistrationError::UnknownAddress
            | RegistrationError::InvalidPort(_)
            | RegistrationError::InvalidCertificate => Status::invalid_argument(message),
            RegistrationError::NoCredential
            | RegistrationError::NoProof
            | RegistrationError::NoChannelBinding
            | RegistrationError::RotationNeedsApiKey => Status::unauthenticated(message),
            RegistrationError::BadProof(_) | RegistrationError::BadRotationApiKey => {
                Status::permission_denied(message)
            }
            RegistrationError::BadCredential(_) => Status::permission_denied(message),
            RegistrationError::CredentialStore(CredentialError::Shared(error)) => {
                store_status(&error, message)
            }
            RegistrationError::CredentialStore(_) => Status::internal(message),
            RegistrationError::Register(error) => error.into(),
            RegistrationError::NotRegistered(_) => Status::not_found(message),
            RegistrationError::Rotate(error) => error.into(),
            RegistrationError::NotOperator(_) => Status::permission_denied(message),
            RegistrationError::Throttled(_) => Status::resource_exhausted(message),
        }
    }
}

impl From<TunnelError> for Status {
    fn from(error: TunnelError) -> Self {
        let message = error.to_string();
        match error {
            TunnelError::NoClientCertificate(error) => error.into(),
            TunnelError::Closing | TunnelError::Fenced => Status::unavailable(message),
            TunnelError::NoHello => Status::deadline_exceeded(message),
            TunnelError::Protocol { .. } => Status::failed_precondition(message),
            TunnelError::Stream(status) => status,
            TunnelError::NotHello | TunnelError::InvalidAgentId(_) => {
                Status::invalid_argument(message)
            }
            TunnelError::Untrusted(_)
            | TunnelError::WrongAgentId { .. }
            | TunnelError::NotPolling { .. } => Status::permission_denied(message),
            TunnelError::ClosedDuringSetup => Status::internal(message),
        }
    }
}

impl From<ForwardError> for Status {
    fn from(error: ForwardError) -> Self {
        let message = error.to_string();
        match error {
            ForwardError::NoClientCertificate(error) => error.into(),
            ForwardError::NotOperator(_) => Status::permission_denied(message),
            ForwardError::NotForwardable(_) => Status::unimplemented(message),
            ForwardError::NoTarget
            | ForwardError::InvalidTarget(_)
            | ForwardError::NoThumbprint
            | ForwardError::InvalidThumbprint(_)
            | ForwardError::InvalidPickupTimeout { .. } => Status::invalid_argument(message),
            ForwardError::Channel(error) => error.into(),
            ForwardError::Unreachable { .. } | ForwardError::CallFailed { .. } => {
                Status::unavailable(message)
            }
            // Marked, so the node that forwarded the call tells it from an
            // agent's own FAILED_PRECONDITION and offers it elsewhere.
            ForwardError::NotThisNode { node, .. } | ForwardError::NotHeld { node, .. } => {
                let mut status = Status::failed_precondition(message);
                if let Ok(value) = node.as_str().parse() {
                    status.metadata_mut().insert(STALE_PRESENCE_HEADER, value);
                }
                status
            }
            ForwardError::Pickup(error) => error.into(),
            ForwardError::Peer(_) => Status::unavailable(message),
        }
    }
}

/// The `AgentChannel` invariant: a call that did not reach its agent
/// because of the connection is `UNAVAILABLE`, the code callers retry.
impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        use crate::registry::PickError;
        let message = error.to_string();
        match error {
            CallError::NoTunnel(PickError::NotConnected { .. } | PickError::Closing) => {
                Status::unavailable(message)
            }
            // Another certificate answers as this agent: retrying will not
            // change whose it is.
            CallError::NoTunnel(PickError::WrongThumbprint { .. }) => {
                Status::permission_denied(message)
            }
            CallError::CallerDeadline(_) => Status::deadline_exceeded(message),
            CallError::ConnectionLost(_) => Status::unavailable(message),
            // Already classified by a channel nested in this one: keep its
            // message rather than add a second prefix.
            CallError::BodyBroken(status) if status.code() == tonic::Code::Unavailable => status,
            CallError::BodyBroken(_) => Status::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests;
