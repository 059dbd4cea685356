//! `RegistrationService` (agents joining and leaving the fleet) and
//! `FleetService` (operators reading the registry).

use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::Thumbprint;
use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::fleet_service_server::FleetService;
use tentacle_proto::v1::registration_service_server::RegistrationService;
use tonic::{Request, Response, Status};

use crate::credentials::{CredentialError, CredentialKind};
use crate::errors::NoClientCertificate;
use crate::hub::{Hub, RegisterError, RotateError, Rotated, RotationApproval};
use crate::limits::{FailureLimiter, Throttled};
use crate::rotation::{RotationOutcome, audit};
use crate::target::AgentId;
use crate::trust::{AgentMode, TrustedAgent};

/// The registry as agents and operators see it.
#[derive(Debug, Clone)]
pub struct RegistrationApi {
    hub: Arc<Hub>,
    /// Failed registrations by source address (`HubSettings::registration_limits`).
    failures: Arc<FailureLimiter>,
}

impl RegistrationApi {
    pub fn new(hub: Arc<Hub>) -> Self {
        let failures = Arc::new(FailureLimiter::new(hub.settings().registration_limits));
        Self { hub, failures }
    }
}

/// Why a call to the registration or fleet service was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(transparent)]
    NoClientCertificate(#[from] NoClientCertificate),
    #[error(
        "this hub has no home, so it takes no registrations; run `tentacle-hub server` to serve one that does"
    )]
    NoHome,
    #[error("name `{0}` is not valid: use 1-128 letters, digits, `-`, `_` or `.`")]
    InvalidName(String),
    #[error("mode must be polling or listening")]
    InvalidMode,
    #[error("{what} `{label}` is not valid: use letters, digits, `-`, `_` or `.`")]
    InvalidLabel { what: &'static str, label: String },
    #[error("give --public-hostname: the hub cannot tell where you are")]
    UnknownAddress,
    #[error("port {0} is not valid: use 1-65535")]
    InvalidPort(u32),
    #[error(
        "no registration token or API key was given; pass one, created with `tentacle-hub server token create`"
    )]
    NoCredential,
    #[error("{0}; create a token with `tentacle-hub server token create`")]
    BadCredential(CredentialError),
    #[error("could not check the registration token or API key: {0}")]
    CredentialStore(CredentialError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("thumbprint {0} is not registered with this hub; there is nothing to deregister")]
    NotRegistered(Thumbprint),
    #[error("new_certificate must be a DER certificate of 1 to {MAX_CERTIFICATE_BYTES} bytes")]
    InvalidCertificate,
    #[error(
        "the announcement carries no proof of possession of the new key; sign it with the new key (`tentacle rotate-certificate` does)"
    )]
    NoProof,
    #[error(
        "this connection has no TLS channel binding to check a rotation's proof against; connect to the hub directly over TLS"
    )]
    NoChannelBinding,
    #[error("the proof of possession of the new key was refused: {0}; nothing was changed")]
    BadProof(tentacle_proto::rotation::ProofError),
    #[error(
        "this hub asks for an API key to rotate a certificate; pass one with `tentacle rotate-certificate --api-key` (or TENTACLE_API_KEY), created with `tentacle-hub server api-key create`"
    )]
    RotationNeedsApiKey,
    #[error(
        "the API key for this rotation is not valid (unknown or expired); create one with `tentacle-hub server api-key create`"
    )]
    BadRotationApiKey,
    #[error(transparent)]
    Rotate(#[from] RotateError),
    #[error(
        "only operators may list the fleet, and thumbprint {0} is not one; use the hub's own identity or one it trusts as an operator"
    )]
    NotOperator(Thumbprint),
    #[error(transparent)]
    Throttled(#[from] Throttled),
}

impl RegistrationError {
    /// Whether this refusal counts against the caller's budget of failed
    /// registrations: the credential was missing or wrong.
    fn is_failed_credential(&self) -> bool {
        matches!(self, Self::NoCredential | Self::BadCredential(_))
    }
}

impl From<CredentialError> for RegistrationError {
    fn from(error: CredentialError) -> Self {
        match error {
            CredentialError::Invalid => Self::BadCredential(error),
            CredentialError::Store { .. } | CredentialError::Shared(_) => {
                Self::CredentialStore(error)
            }
        }
    }
}

fn caller<T>(request: &Request<T>) -> Result<PeerInfo, NoClientCertificate> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or(NoClientCertificate)
}

/// The wire form of a registry entry.
pub fn registered(agent: &TrustedAgent) -> pb::RegisteredAgent {
    let (mode, target) = match agent.mode {
        AgentMode::Polling => (pb::AgentMode::Polling, format!("poll://{}", agent.name)),
        AgentMode::Listening => (
            pb::AgentMode::Listening,
            agent.address.clone().unwrap_or_default(),
        ),
    };
    pb::RegisteredAgent {
        name: agent.name.clone(),
        thumbprint: agent.thumbprint.to_string(),
        mode: mode as i32,
        target,
        roles: agent.roles.clone(),
        environments: agent.environments.clone(),
    }
}

fn clean_labels(labels: Vec<String>, what: &'static str) -> Result<Vec<String>, RegistrationError> {
    let mut out = Vec::new();
    for label in labels {
        let label = label.trim().to_owned();
        if AgentId::parse(&label).is_err() {
            return Err(RegistrationError::InvalidLabel { what, label });
        }
        if !out.contains(&label) {
            out.push(label);
        }
    }
    Ok(out)
}

impl RegistrationApi {
    async fn register_agent(
        &self,
        peer: PeerInfo,
        request: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, RegistrationError> {
        let store = self.hub.store().ok_or(RegistrationError::NoHome)?;
        let name = AgentId::parse(request.name.trim())
            .map_err(|_| RegistrationError::InvalidName(request.name.clone()))?
            .to_string();
        let mode = match pb::AgentMode::try_from(request.mode) {
            Ok(pb::AgentMode::Polling) => AgentMode::Polling,
            Ok(pb::AgentMode::Listening) => AgentMode::Listening,
            _ => return Err(RegistrationError::InvalidMode),
        };
        let roles = clean_labels(request.roles, "role")?;
        let environments = clean_labels(request.environments, "environment")?;
        let address = match mode {
            AgentMode::Polling => None,
            AgentMode::Listening => {
                let host = match request.public_hostname.trim() {
                    "" => peer
                        .remote_addr
                        .map(|a| a.ip().to_string())
                        .ok_or(RegistrationError::UnknownAddress)?,
                    host => host.to_owned(),
                };
                let port = match request.port {
                    0 => tentacle_proto::dial::DEFAULT_LISTENING_PORT,
                    port => {
                        u16::try_from(port).map_err(|_| RegistrationError::InvalidPort(port))?
                    }
                };
                let address = tentacle_proto::dial::ListeningAddress::new(host, port);
                Some(address.to_string())
            }
        };
        // The credential is checked after the request, so a bad request
        // does not use up a token, and before the name, so only a caller
        // with a credential learns who holds a name.
        let (secret, kind) = match &request.credential {
            Some(pb::register_request::Credential::Token(token)) => (token, CredentialKind::Token),
            Some(pb::register_request::Credential::ApiKey(key)) => (key, CredentialKind::ApiKey),
            None => return Err(RegistrationError::NoCredential),
        };
        let redeemed = store.redeem(secret.clone(), kind).await.inspect_err(|error| {
            tracing::warn!(%name, thumbprint = %peer.thumbprint, %error, "refused a registration's credential");
        })?;
        let agent = TrustedAgent {
            thumbprint: peer.thumbprint,
            name: name.clone(),
            mode,
            address,
            roles,
            environments,
            previous_thumbprint: None,
            retire_previous_at: None,
        };
        // Storing rewrites the registry file, which grows with the fleet:
        // registrations arriving together share one write, made off the
        // threads that pump every tunnel. The name check happens there,
        // under the registry's write lock.
        if let Err(error) = self.hub.register_grouped(agent.clone()).await {
            tracing::warn!(%name, thumbprint = %peer.thumbprint, %error, "refused a registration");
            // A token is given back only if nothing was stored: after an
            // interrupted write the agent may be registered, and a token
            // must never register two agents.
            if error.stored_nothing()
                && let Err(restore) = store.restore(redeemed).await
            {
                tracing::error!(%restore, "could not give back the token of a refused registration");
            }
            return Err(error.into());
        }
        tracing::info!(%name, thumbprint = %peer.thumbprint, ?mode, "agent registered");
        Ok(pb::RegisterResponse {
            agent: Some(registered(&agent)),
        })
    }

    fn deregister_agent(
        &self,
        peer: PeerInfo,
    ) -> Result<pb::DeregisterResponse, RegistrationError> {
        if !self
            .hub
            .agents()
            .iter()
            .any(|a| a.thumbprint == peer.thumbprint)
        {
            return Err(RegistrationError::NotRegistered(peer.thumbprint));
        }
        // Removing the trust closes this very connection, so answer first and
        // apply the removal a moment later.
        let hub = self.hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match hub.deregister(&peer.thumbprint).await {
                Ok(()) => tracing::info!(thumbprint = %peer.thumbprint, "agent deregistered"),
                Err(error) => tracing::error!(%error, "could not deregister an agent"),
            }
        });
        Ok(pb::DeregisterResponse {})
    }

    /// A rotation announcement, checked and applied, with its audit event
    /// whatever the outcome.
    async fn rotate(
        &self,
        peer: PeerInfo,
        request: pb::RotateCertificateRequest,
    ) -> Result<pb::RotateCertificateResponse, RegistrationError> {
        let new = Thumbprint::of_der(&request.new_certificate);
        let agent = self.hub.agent_name(&peer.thumbprint);
        let outcome = self.rotate_checked(&peer, new, &request).await;
        match &outcome {
            Ok(Rotated::Trusted { retire_old_at }) => audit(
                RotationOutcome::Announced,
                &agent,
                &peer.thumbprint,
                &new,
                &format!("the old certificate retires at {retire_old_at} (Unix seconds)"),
            ),
            Ok(Rotated::Pending) => audit(
                RotationOutcome::Pending,
                &agent,
                &peer.thumbprint,
                &new,
                "waits for `tentacle-hub server rotations approve`",
            ),
            Err(error) => audit(
                RotationOutcome::Refused,
                &agent,
                &peer.thumbprint,
                &new,
                &error.to_string(),
            ),
        }
        let (retire_old_at_unix, pending_approval) = match outcome? {
            Rotated::Trusted { retire_old_at } => (retire_old_at, false),
            Rotated::Pending => (0, true),
        };
        Ok(pb::RotateCertificateResponse {
            new_thumbprint: new.to_string(),
            retire_old_at_unix,
            pending_approval,
        })
    }

    /// The checks, cheapest and most telling first: the certificate, the
    /// proof of possession of its key, the hub's approval policy.
    async fn rotate_checked(
        &self,
        peer: &PeerInfo,
        new: Thumbprint,
        request: &pb::RotateCertificateRequest,
    ) -> Result<Rotated, RegistrationError> {
        if request.new_certificate.is_empty()
            || request.new_certificate.len() > MAX_CERTIFICATE_BYTES
        {
            return Err(RegistrationError::InvalidCertificate);
        }
        if request.proof_signature.is_empty() {
            return Err(RegistrationError::NoProof);
        }
        let binding = peer
            .channel_binding
            .ok_or(RegistrationError::NoChannelBinding)?;
        let message = tentacle_proto::rotation::proof_message(
            &peer.thumbprint,
            &new,
            &self.hub.identity().thumbprint(),
            &binding,
        );
        tentacle_proto::rotation::verify(
            &request.new_certificate,
            request.proof_scheme,
            &request.proof_signature,
            &message,
        )
        .map_err(RegistrationError::BadProof)?;
        let settings = self.hub.settings();
        if settings.rotation_approval == RotationApproval::ApiKey {
            let key = request.api_key.trim();
            if key.is_empty() {
                return Err(RegistrationError::RotationNeedsApiKey);
            }
            let store = self.hub.store().ok_or(RegistrationError::NoHome)?;
            store
                .redeem(key.to_owned(), CredentialKind::ApiKey)
                .await
                .map_err(|error| match error {
                    CredentialError::Invalid => RegistrationError::BadRotationApiKey,
                    CredentialError::Store { .. } | CredentialError::Shared(_) => {
                        RegistrationError::CredentialStore(error)
                    }
                })?;
        }
        let overlap = match request.overlap_seconds {
            0 => settings.rotation_overlap,
            // The agent's wish, within bounds: a retired certificate
            // trusted for years is one nobody retired.
            seconds => Duration::from_secs(seconds).min(settings.max_rotation_overlap),
        };
        Ok(self
            .hub
            .request_rotation(&peer.thumbprint, new, overlap)
            .await?)
    }

    fn list(
        &self,
        peer: PeerInfo,
        request: pb::ListAgentsRequest,
    ) -> Result<pb::ListAgentsResponse, RegistrationError> {
        if !self.hub.is_operator(&peer.thumbprint) {
            return Err(RegistrationError::NotOperator(peer.thumbprint));
        }
        let agents: Vec<pb::RegisteredAgent> = self
            .hub
            .agents()
            .iter()
            .filter(|a| a.matches(&request.role, &request.environment))
            .map(registered)
            .collect();
        let connected = self
            .hub
            .registry()
            .tunnels()
            .iter()
            .map(|t| t.agent_id.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(pb::ListAgentsResponse { agents, connected })
    }
}

#[tonic::async_trait]
impl RegistrationService for RegistrationApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = caller(&request)?;
        // A source that spent its budget of failures is refused before its
        // credential is looked at (crate::limits); successes never count.
        let source = peer.remote_addr.map(|a| a.ip());
        self.failures
            .check(source)
            .map_err(RegistrationError::from)?;
        let registered = self.register_agent(peer, request.into_inner()).await;
        if let Err(error) = &registered
            && error.is_failed_credential()
        {
            tentacle_proto::metrics::METRICS
                .hub_registration_failures
                .inc();
            self.failures.record_failure(source);
        }
        Ok(Response::new(registered?))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let peer = caller(&request)?;
        Ok(Response::new(self.deregister_agent(peer)?))
    }

    async fn rotate_certificate(
        &self,
        request: Request<pb::RotateCertificateRequest>,
    ) -> Result<Response<pb::RotateCertificateResponse>, Status> {
        let peer = caller(&request)?;
        Ok(Response::new(
            self.rotate(peer, request.into_inner()).await?,
        ))
    }
}

/// The largest certificate a rotation may announce.
const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

#[tonic::async_trait]
impl FleetService for RegistrationApi {
    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let peer = caller(&request)?;
        Ok(Response::new(self.list(peer, request.into_inner())?))
    }
}

#[cfg(test)]
mod tests;
