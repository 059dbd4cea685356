//! `RegistrationService` (agents joining and leaving the fleet) and
//! `FleetService` (operators reading the registry).

use std::sync::Arc;
use std::time::Duration;

use tentacle_proto::incoming::PeerInfo;
use tentacle_proto::v1 as pb;
use tentacle_proto::v1::fleet_service_server::FleetService;
use tentacle_proto::v1::registration_service_server::RegistrationService;
use tonic::{Request, Response, Status};

use super::Hub;
use super::credentials::{CredentialError, CredentialKind};
use super::trust::{AgentMode, TrustedAgent};
use crate::target::AgentId;

/// The registry as agents and operators see it.
#[derive(Debug, Clone)]
pub struct RegistrationApi {
    hub: Arc<Hub>,
}

impl RegistrationApi {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

fn caller<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))
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

fn clean_labels(labels: Vec<String>, what: &str) -> Result<Vec<String>, Status> {
    let mut out = Vec::new();
    for label in labels {
        let label = label.trim().to_owned();
        if AgentId::parse(&label).is_err() {
            return Err(Status::invalid_argument(format!(
                "{what} `{label}` is not valid: use letters, digits, `-`, `_` or `.`"
            )));
        }
        if !out.contains(&label) {
            out.push(label);
        }
    }
    Ok(out)
}

#[tonic::async_trait]
impl RegistrationService for RegistrationApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let peer = caller(&request)?;
        let request = request.into_inner();
        let Some(store) = self.hub.store() else {
            return Err(Status::unimplemented(
                "this hub has no home, so it takes no registrations",
            ));
        };
        let name = AgentId::parse(request.name.trim())
            .map_err(|_| {
                Status::invalid_argument(format!(
                    "name `{}` is not valid: use 1-128 letters, digits, `-`, `_` or `.`",
                    request.name
                ))
            })?
            .to_string();
        let mode = match pb::AgentMode::try_from(request.mode) {
            Ok(pb::AgentMode::Polling) => AgentMode::Polling,
            Ok(pb::AgentMode::Listening) => AgentMode::Listening,
            _ => {
                return Err(Status::invalid_argument(
                    "mode must be polling or listening",
                ));
            }
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
                        .ok_or_else(|| {
                            Status::invalid_argument(
                                "give --public-hostname: the hub cannot tell where you are",
                            )
                        })?,
                    host => host.to_owned(),
                };
                let port = match request.port {
                    0 => tentacle_proto::dial::DEFAULT_LISTENING_PORT,
                    port => u16::try_from(port)
                        .map_err(|_| Status::invalid_argument("port must be 1-65535"))?,
                };
                let address = tentacle_proto::dial::ListeningAddress::new(host, port);
                Some(address.to_string())
            }
        };
        if let Some(existing) = self
            .hub
            .agents()
            .iter()
            .find(|a| a.name == name && !a.has_thumbprint(&peer.thumbprint))
        {
            return Err(Status::already_exists(format!(
                "the name `{name}` belongs to thumbprint {}; deregister that agent or choose another name",
                existing.thumbprint
            )));
        }
        // Check the credential last, so a bad request does not use up a token.
        let redeemed = match request.credential {
            Some(pb::register_request::Credential::Token(token)) => {
                store.credentials.redeem(&token, CredentialKind::Token)
            }
            Some(pb::register_request::Credential::ApiKey(key)) => {
                store.credentials.redeem(&key, CredentialKind::ApiKey)
            }
            None => Err(CredentialError::Invalid),
        };
        if let Err(error) = redeemed {
            tracing::warn!(%name, thumbprint = %peer.thumbprint, "refused a registration: bad credential");
            return Err(match error {
                CredentialError::Invalid => Status::permission_denied(format!(
                    "{error}; create a token with `tentacle-sim server token create`"
                )),
                CredentialError::Store { .. } => Status::internal(error.to_string()),
            });
        }
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
        // threads that pump every tunnel.
        super::grouped::register(&self.hub, agent.clone())
            .await
            .map_err(Status::internal)?;
        tracing::info!(%name, thumbprint = %peer.thumbprint, ?mode, "agent registered");
        Ok(Response::new(pb::RegisterResponse {
            agent: Some(registered(&agent)),
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let peer = caller(&request)?;
        if !self
            .hub
            .agents()
            .iter()
            .any(|a| a.thumbprint == peer.thumbprint)
        {
            return Err(Status::not_found(format!(
                "thumbprint {} is not registered with this hub",
                peer.thumbprint
            )));
        }
        // Removing the trust closes this very connection, so answer first and
        // apply the removal a moment later.
        let hub = self.hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match hub.deregister(&peer.thumbprint) {
                Ok(()) => tracing::info!(thumbprint = %peer.thumbprint, "agent deregistered"),
                Err(error) => tracing::error!(%error, "could not deregister an agent"),
            }
        });
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn rotate_certificate(
        &self,
        request: Request<pb::RotateCertificateRequest>,
    ) -> Result<Response<pb::RotateCertificateResponse>, Status> {
        let peer = caller(&request)?;
        let request = request.into_inner();
        if request.new_certificate.is_empty()
            || request.new_certificate.len() > MAX_CERTIFICATE_BYTES
        {
            return Err(Status::invalid_argument(format!(
                "new_certificate must be a DER certificate of 1 to {MAX_CERTIFICATE_BYTES} bytes"
            )));
        }
        let new = tentacle_proto::Thumbprint::of_der(&request.new_certificate);
        let overlap = match request.overlap_seconds {
            0 => self.hub.settings().rotation_overlap,
            seconds => Duration::from_secs(seconds),
        };
        let retire_at =
            self.hub
                .rotate(&peer.thumbprint, new, overlap)
                .map_err(|error| match error {
                    super::RotateError::NotRegistered(_) => Status::not_found(error.to_string()),
                    super::RotateError::AlreadyRotating(_) => {
                        Status::failed_precondition(error.to_string())
                    }
                    super::RotateError::Store(_) => Status::internal(error.to_string()),
                })?;
        tracing::info!(old = %peer.thumbprint, %new, retire_at, "agent certificate rotating");
        Ok(Response::new(pb::RotateCertificateResponse {
            new_thumbprint: new.to_string(),
            retire_old_at_unix: retire_at,
        }))
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
        if !self.hub.is_operator(&peer.thumbprint) {
            return Err(Status::permission_denied(
                "only operators may list the fleet",
            ));
        }
        let request = request.into_inner();
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
        Ok(Response::new(pb::ListAgentsResponse { agents, connected }))
    }
}
