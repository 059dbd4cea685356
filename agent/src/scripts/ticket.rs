//! The caller-chosen name of one script run.

use std::fmt;

/// A validated ticket: 1-128 characters of `[A-Za-z0-9._-]`, not starting
/// with a dot, so it is always safe as a directory name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(String);

/// A ticket that breaks the rules above.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "ticket `{0}` is not valid: use 1-128 characters of letters, digits, `.`, `_` or `-`, not starting with `.`"
)]
pub struct InvalidTicket(pub String);

impl Ticket {
    pub const MAX_LEN: usize = 128;

    pub fn parse(text: &str) -> Result<Self, InvalidTicket> {
        let valid = !text.is_empty()
            && text.len() <= Self::MAX_LEN
            && !text.starts_with('.')
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidTicket(
                text.chars().take(Self::MAX_LEN + 8).collect(),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_safe_names_only() {
        for good in ["a", "deploy-42", "A.b_c-9", &"x".repeat(128)] {
            assert!(Ticket::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(129),
            "a\0",
        ] {
            assert!(Ticket::parse(bad).is_err(), "{bad:?}");
        }
    }
}
