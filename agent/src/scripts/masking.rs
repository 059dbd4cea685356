//! Masks sensitive values in script output before it is stored or sent.

use aho_corasick::AhoCorasick;

/// What a sensitive value is replaced with.
pub const MASK: &str = "********";

/// Replaces every occurrence of the sensitive values with [`MASK`].
#[derive(Clone, Default)]
pub struct Masker {
    matcher: Option<AhoCorasick>,
    /// Kept to hand to a detached script's host, through its stdin only.
    values: Vec<String>,
}

/// Never shows the values.
impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("values", &self.values.len())
            .finish()
    }
}

impl Masker {
    /// Empty values are ignored: masking them would mask nothing useful and
    /// break every line.
    pub fn new<I, S>(values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut values: Vec<String> = values
            .into_iter()
            .map(|v| v.as_ref().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        // Longest first, so a value containing another is masked whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        let matcher = if values.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&values)
                .ok()
        };
        Self { matcher, values }
    }

    /// The values masked, longest first.
    pub(crate) fn values(&self) -> &[String] {
        &self.values
    }

    pub fn mask(&self, text: String) -> String {
        match &self.matcher {
            Some(m) if m.is_match(&text) => {
                let replacements = vec![MASK; m.patterns_len()];
                m.replace_all(&text, &replacements)
            }
            _ => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_and_prefers_the_longest_value() {
        let masker = Masker::new(["secret", "secret-token", ""]);
        assert_eq!(
            masker.mask("a secret and a secret-token".to_owned()),
            format!("a {MASK} and a {MASK}")
        );
        assert_eq!(masker.mask("nothing here".to_owned()), "nothing here");
    }

    #[test]
    fn no_values_means_no_change() {
        assert_eq!(Masker::new(Vec::<String>::new()).mask("x".to_owned()), "x");
    }
}
