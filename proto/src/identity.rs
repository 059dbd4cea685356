//! A certificate and private key that identify one end of a connection.
//!
//! Identities are self-signed ECDSA P-256 certificates made with rcgen. Peers
//! never check them against a CA: they pin the certificate's [`Thumbprint`].

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Thumbprint;

/// Why an identity could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("could not generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "could not read the certificate at {path}: {source}; run `new-certificate` to create one"
    )]
    ReadCertificate {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "could not read the private key at {path}: {source}; run `new-certificate` to create one"
    )]
    ReadKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate with its private key.
pub struct Identity {
    certificate: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Identity")
            .field("thumbprint", &self.thumbprint())
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            certificate: self.certificate.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// A new self-signed ECDSA P-256 identity whose subject is `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, IdentityError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec!["tentacle".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let certificate = params.self_signed(&key_pair)?;
        Ok(Self {
            certificate: certificate.der().clone(),
            key: PrivateKeyDer::Pkcs8(key_pair.serialize_der().into()),
        })
    }

    /// A certificate and key already in DER, as they are. Nothing checks
    /// that they belong together: a handshake with a mismatched pair fails
    /// at the peer, which verifies our signature against the certificate.
    pub fn from_der(certificate: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Self {
        Self { certificate, key }
    }

    /// Reads a PEM certificate and a PEM private key.
    pub fn load(certificate_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let certificate = CertificateDer::from_pem_file(certificate_path).map_err(|source| {
            IdentityError::ReadCertificate {
                path: certificate_path.to_owned(),
                source,
            }
        })?;
        let key =
            PrivateKeyDer::from_pem_file(key_path).map_err(|source| IdentityError::ReadKey {
                path: key_path.to_owned(),
                source,
            })?;
        Ok(Self { certificate, key })
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600), each
    /// through a temporary file and a rename so a crash never leaves half a
    /// key behind.
    pub fn save(&self, certificate_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        write_atomically(certificate_path, self.certificate_pem().as_bytes(), 0o644)?;
        write_atomically(key_path, self.key_pem().as_bytes(), 0o600)?;
        Ok(())
    }

    pub fn thumbprint(&self) -> Thumbprint {
        Thumbprint::of_der(&self.certificate)
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn certificate_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.certificate)
    }

    pub fn key_pem(&self) -> String {
        pem_encode("PRIVATE KEY", self.key.secret_der())
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(err)
}
