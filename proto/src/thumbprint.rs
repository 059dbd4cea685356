//! The thumbprint that names a peer: SHA-256 of its DER certificate.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// SHA-256 of a DER-encoded certificate. Shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Thumbprint([u8; 32]);

/// A string that is not a thumbprint.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "`{0}` is not a thumbprint: expected 64 hex characters (the SHA-256 of the certificate, as `show-thumbprint` prints it)"
)]
pub struct ParseThumbprintError(String);

impl Thumbprint {
    /// The thumbprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 hex characters, for log lines and span attributes.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({self})")
    }
}

impl FromStr for Thumbprint {
    type Err = ParseThumbprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let mut bytes = [0u8; 32];
        if trimmed.len() != 64 || hex::decode_to_slice(trimmed, &mut bytes).is_err() {
            return Err(ParseThumbprintError(s.to_owned()));
        }
        Ok(Self(bytes))
    }
}

impl serde::Serialize for Thumbprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Thumbprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_64_lowercase_hex_and_parses_back() {
        let tp = Thumbprint::of_der(b"certificate");
        let text = tp.to_string();
        assert_eq!(text.len(), 64);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(text.parse::<Thumbprint>(), Ok(tp));
        assert_eq!(text.to_uppercase().parse::<Thumbprint>(), Ok(tp));
        assert_eq!(tp.short(), text[..8]);
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        assert!("abc".parse::<Thumbprint>().is_err());
        assert!("g".repeat(64).parse::<Thumbprint>().is_err());
        let err = "a".repeat(40).parse::<Thumbprint>().expect_err("too short");
        assert!(err.to_string().contains("64 hex characters"));
    }
}
