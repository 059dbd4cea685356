//! Proof that an agent announcing a new certificate holds its private key.
//!
//! `RegistrationService.RotateCertificate` runs over a connection
//! authenticated with the agent's current certificate, so the hub knows who
//! announces; this proof tells it that the announcer also holds the key of
//! the certificate it announces. Without it, whoever held the current key
//! could make the hub trust any certificate, one whose key lives elsewhere
//! included.
//!
//! The signed message names both thumbprints and the hub, and carries TLS
//! exported keying material of the connection the announcement travels on
//! ([`channel_binding`]): both ends derive the same 32 bytes from the
//! handshake, and no other connection has them, so a recorded proof is
//! worthless on any other connection (no replay), and no hub but this one
//! could use it.

use rustls::SignatureScheme;
use rustls_pki_types::CertificateDer;

use crate::{Identity, Thumbprint};

/// 32 bytes of TLS exported keying material of one connection.
pub type ChannelBinding = [u8; 32];

/// The exporter label both ends use (RFC 5705 / RFC 8446 section 7.5).
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-tentacle-rotation";

/// Where the signed message starts; names the purpose and its version, so
/// a signature made for anything else never verifies here.
const CONTEXT: &[u8] = b"tentacle rotation proof v1\0";

/// The schemes a proof may use, strongest first among those our keys have.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// The channel binding of a rustls connection after its handshake.
pub fn channel_binding<D>(connection: &rustls::ConnectionCommon<D>) -> Option<ChannelBinding> {
    connection
        .export_keying_material([0u8; 32], CHANNEL_BINDING_LABEL, None)
        .ok()
}

/// What the new key signs.
pub fn proof_message(
    current: &Thumbprint,
    new: &Thumbprint,
    hub: &Thumbprint,
    binding: &ChannelBinding,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTEXT.len() + 4 * 32);
    message.extend_from_slice(CONTEXT);
    for part in [current.as_bytes(), new.as_bytes(), hub.as_bytes(), binding] {
        message.extend_from_slice(part);
    }
    message
}

/// A signature and its scheme, as `RotateCertificateRequest` carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The TLS `SignatureScheme` code.
    pub scheme: u16,
    pub signature: Vec<u8>,
}

/// Why a proof could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("the key cannot sign: {0}")]
    Key(rustls::Error),
    #[error("the key signs with none of ECDSA P-256/P-384, Ed25519 or RSA-PSS")]
    UnsupportedKey,
    #[error("signature scheme {0:#06x} is not accepted; sign with ECDSA P-256 (0x0403)")]
    UnsupportedScheme(u32),
    #[error("the new certificate cannot be read: {0}")]
    Certificate(webpki::Error),
    #[error("the signature does not verify with the new certificate's public key")]
    BadSignature,
}

/// Signs `message` with `identity`'s key.
pub fn sign(identity: &Identity, message: &[u8]) -> Result<Proof, ProofError> {
    let key =
        rustls::crypto::ring::sign::any_supported_type(identity.key()).map_err(ProofError::Key)?;
    let signer = key
        .choose_scheme(SCHEMES)
        .ok_or(ProofError::UnsupportedKey)?;
    let signature = signer.sign(message).map_err(ProofError::Key)?;
    Ok(Proof {
        scheme: u16::from(signer.scheme()),
        signature,
    })
}

/// Checks that `proof` over `message` was made with the key of the DER
/// `certificate`.
pub fn verify(
    certificate: &[u8],
    scheme: u32,
    signature: &[u8],
    message: &[u8],
) -> Result<(), ProofError> {
    let code = u16::try_from(scheme).map_err(|_| ProofError::UnsupportedScheme(scheme))?;
    let scheme_named = SignatureScheme::from(code);
    if !SCHEMES.contains(&scheme_named) {
        return Err(ProofError::UnsupportedScheme(scheme));
    }
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme_named)
        .map(|(_, algorithms)| *algorithms)
        .ok_or(ProofError::UnsupportedScheme(scheme))?;
    let der = CertificateDer::from(certificate);
    let certificate = webpki::EndEntityCert::try_from(&der).map_err(ProofError::Certificate)?;
    if algorithms.iter().any(|algorithm| {
        certificate
            .verify_signature(*algorithm, message, signature)
            .is_ok()
    }) {
        Ok(())
    } else {
        Err(ProofError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message_for(current: &Identity, new: &Identity, binding: &ChannelBinding) -> Vec<u8> {
        let hub = Thumbprint::of_der(b"hub");
        proof_message(&current.thumbprint(), &new.thumbprint(), &hub, binding)
    }

    #[test]
    fn a_proof_by_the_new_key_verifies_and_no_other_does() {
        let current = Identity::generate("current").expect("identity");
        let new = Identity::generate("new").expect("identity");
        let message = message_for(&current, &new, &[7; 32]);
        let proof = sign(&new, &message).expect("sign");
        assert_eq!(proof.scheme, 0x0403);
        verify(
            new.certificate(),
            proof.scheme.into(),
            &proof.signature,
            &message,
        )
        .expect("the new key's proof");

        // Signed by the current key instead of the new one.
        let theirs = sign(&current, &message).expect("sign");
        let refused = verify(
            new.certificate(),
            theirs.scheme.into(),
            &theirs.signature,
            &message,
        );
        assert!(
            matches!(refused, Err(ProofError::BadSignature)),
            "{refused:?}"
        );

        // Made for another connection: a replay.
        let elsewhere = message_for(&current, &new, &[8; 32]);
        let refused = verify(
            new.certificate(),
            proof.scheme.into(),
            &proof.signature,
            &elsewhere,
        );
        assert!(
            matches!(refused, Err(ProofError::BadSignature)),
            "{refused:?}"
        );

        let refused = verify(new.certificate(), 0x0201, &proof.signature, &message);
        assert!(
            matches!(refused, Err(ProofError::UnsupportedScheme(0x0201))),
            "{refused:?}"
        );
        let refused = verify(
            b"not a certificate",
            proof.scheme.into(),
            &proof.signature,
            &message,
        );
        assert!(
            matches!(refused, Err(ProofError::Certificate(_))),
            "{refused:?}"
        );
    }
}
