//! Where an agent is: `https://host:port` (listening) or `poll://<agent id>`
//! (polling, reached through a hub's tunnels).

use std::fmt;
use std::str::FromStr;

use tentacle_proto::dial::ListeningAddress;

/// An agent address in either mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Listening(ListeningAddress),
    Polling(AgentId),
}

/// The name a polling agent is addressed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(String);

impl AgentId {
    pub fn parse(text: &str) -> Result<Self, ParseTargetError> {
        let valid = !text.is_empty()
            && text.len() <= 128
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(ParseTargetError(format!("poll://{text}")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Not a target.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "`{0}` is not an agent target: use https://HOST:PORT for a listening agent or poll://AGENT-ID for a polling one"
)]
pub struct ParseTargetError(String);

impl FromStr for Target {
    type Err = ParseTargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(id) = s.strip_prefix("poll://") {
            return AgentId::parse(id.trim_end_matches('/'))
                .map(Target::Polling)
                .map_err(|_| ParseTargetError(s.to_owned()));
        }
        s.parse()
            .map(Target::Listening)
            .map_err(|_| ParseTargetError(s.to_owned()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Listening(address) => address.fmt(f),
            Target::Polling(id) => write!(f, "poll://{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert_eq!(
            "poll://web-01".parse::<Target>(),
            Ok(Target::Polling(AgentId::parse("web-01").expect("id")))
        );
        assert!(matches!(
            "https://10.0.0.1:10933".parse::<Target>(),
            Ok(Target::Listening(_))
        ));
        for bad in ["poll://", "poll://a b", "ftp://x", "web-01"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
        assert_eq!(
            "poll://x".parse::<Target>().expect("t").to_string(),
            "poll://x"
        );
    }
}
