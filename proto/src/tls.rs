//! rustls configurations that authenticate both ends by pinned thumbprint.
//!
//! There is no CA chain and no hostname check: a peer is trusted exactly when
//! the SHA-256 of its end-entity certificate is in the [`TrustStore`].
//! Signatures are still verified, so a peer must hold the private key of the
//! certificate it presents. TLS 1.2 and 1.3 only, ALPN `h2`, and the `ring`
//! provider passed explicitly so no process-wide default is needed.
//!
//! Validity dates are ignored unless the trust store says to enforce them
//! ([`crate::trust::CertificateValidity`]): pinning, not expiry, decides
//! who is trusted.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::trust::CertificateValidity;
use crate::{Identity, Thumbprint, TrustStore};

/// The ALPN protocol every Tentacle endpoint speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// A TLS configuration could not be built from the identity.
#[derive(Debug, thiserror::Error)]
#[error("could not build the TLS configuration: {0}")]
pub struct TlsConfigError(#[from] rustls::Error);

/// The crypto provider Tentacle uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This side's identity, replaceable at run time (certificate rotation).
/// Servers built from it present whatever it holds at each handshake.
#[derive(Debug)]
pub struct IdentityCell {
    current: arc_swap::ArcSwap<Loaded>,
    changes: tokio::sync::watch::Sender<Thumbprint>,
}

#[derive(Debug)]
struct Loaded {
    identity: Identity,
    certified: Arc<CertifiedKey>,
}

impl Loaded {
    fn new(identity: Identity) -> Result<Self, TlsConfigError> {
        let key = provider()
            .key_provider
            .load_private_key(identity.key().clone_key())?;
        let certified = Arc::new(CertifiedKey::new(vec![identity.certificate().clone()], key));
        Ok(Self {
            identity,
            certified,
        })
    }
}

impl IdentityCell {
    pub fn new(identity: Identity) -> Result<Arc<Self>, TlsConfigError> {
        let thumbprint = identity.thumbprint();
        Ok(Arc::new(Self {
            current: arc_swap::ArcSwap::from_pointee(Loaded::new(identity)?),
            changes: tokio::sync::watch::Sender::new(thumbprint),
        }))
    }

    pub fn current(&self) -> Identity {
        self.current.load().identity.clone()
    }

    pub fn thumbprint(&self) -> Thumbprint {
        self.current.load().identity.thumbprint()
    }

    /// Switches to `identity`; returns whether it differs from the current one.
    pub fn replace(&self, identity: Identity) -> Result<bool, TlsConfigError> {
        let thumbprint = identity.thumbprint();
        if thumbprint == self.thumbprint() {
            return Ok(false);
        }
        self.current.store(Arc::new(Loaded::new(identity)?));
        self.changes.send_replace(thumbprint);
        Ok(true)
    }

    /// Wakes whenever the identity is replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Thumbprint> {
        self.changes.subscribe()
    }
}

#[derive(Debug)]
struct CellResolver(Arc<IdentityCell>);

impl ResolvesServerCert for CellResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().certified.clone())
    }
}

/// Server side: requires a client certificate whose thumbprint is trusted.
pub fn server_config(
    identity: Arc<IdentityCell>,
    trust: Arc<TrustStore>,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    build_server_config(identity, trust, false)
}

/// Server side for a hub that takes registrations: a client certificate is
/// still required and its signature checked, but an unknown thumbprint
/// completes the handshake. Every request must then be authorised by the
/// application from the caller's thumbprint (see `incoming::PeerInfo`).
pub fn server_config_open_to_registration(
    identity: Arc<IdentityCell>,
    trust: Arc<TrustStore>,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    build_server_config(identity, trust, true)
}

fn build_server_config(
    identity: Arc<IdentityCell>,
    trust: Arc<TrustStore>,
    accept_unknown_clients: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = provider();
    let mut verifier = PinnedVerifier::new(trust, provider.clone());
    verifier.accept_unknown_clients = accept_unknown_clients;
    let verifier = Arc::new(verifier);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CellResolver(identity)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // A resumed session skips certificate verification, which would let a
    // peer whose trust was removed back in. Every handshake is a full one.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side: presents `identity` and accepts only a server whose
/// thumbprint is trusted.
pub fn client_config(
    identity: &Identity,
    trust: Arc<TrustStore>,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier::new(trust, provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![identity.certificate().clone()],
            identity.key().clone_key(),
        )?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption would skip the pinned check against a changed trust list.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The thumbprint of the first certificate a peer presented.
pub fn peer_thumbprint(certificates: Option<&[CertificateDer<'_>]>) -> Option<Thumbprint> {
    certificates
        .and_then(|certs| certs.first())
        .map(|cert| Thumbprint::of_der(cert))
}

/// Verifies a peer's certificate by thumbprint, for either side.
#[derive(Debug)]
struct PinnedVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    /// Lets an untrusted client finish the handshake (server side only).
    accept_unknown_clients: bool,
}

impl PinnedVerifier {
    fn new(trust: Arc<TrustStore>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            trust,
            provider,
            accept_unknown_clients: false,
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        role: &str,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let thumbprint = Thumbprint::of_der(end_entity);
        if self.trust.contains(&thumbprint) {
            if self.trust.certificate_validity() == CertificateValidity::Enforced {
                check_dates(end_entity, now).inspect_err(|error| {
                    // The accepting side logs; a dialling side reports it.
                    if role == "client" {
                        tracing::warn!(
                            %thumbprint,
                            %error,
                            "refused a TLS handshake: the client's trusted certificate is outside its validity dates (certificate_validity = \"enforced\"); issue it a new certificate"
                        );
                    }
                })?;
            }
            Ok(())
        } else if role == "client" && self.accept_unknown_clients {
            tracing::debug!(%thumbprint, "an unknown client connected; only registration is open to it");
            Ok(())
        } else {
            // The accepting side has nobody else to tell; a dialling side
            // returns the error to its caller, which reports it.
            if role == "client" {
                tracing::warn!(
                    %thumbprint,
                    "refused a TLS handshake: the client's certificate thumbprint is not trusted"
                );
            } else {
                tracing::debug!(%thumbprint, "the server's certificate thumbprint is not the pinned one");
            }
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether `now` is within the certificate's `notBefore`..=`notAfter`. A
/// certificate whose dates cannot be read is refused: under enforcement
/// there is no date to trust.
fn check_dates(certificate: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(certificate) else {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ));
    };
    let validity = parsed.validity();
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now_secs < validity.not_before.timestamp() {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ))
    } else if now_secs > validity.not_after.timestamp() {
        Err(rustls::Error::InvalidCertificate(CertificateError::Expired))
    } else {
        Ok(())
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, "client", now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, "server", now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

#[cfg(test)]
mod tests;
