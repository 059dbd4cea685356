//! What must hold at the end of every scenario run, checked from what the
//! control plane observed and what the virtual agents really did.
//!
//! The checks are pure functions of an [`Observations`] record, so a test
//! can plant a duplicate or a lost line and prove it is caught.

use std::collections::BTreeMap;

use tentacle_proto::exit_code;
use tonic::Code;

use crate::fleet::executor::parse_line_number;
use crate::report::InvariantResult;

/// At most this many examples are kept per invariant.
pub const MAX_EXAMPLES: usize = 10;

/// How one dispatched script ended, as the control plane saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptEnd {
    /// The agent reported a final exit code.
    Exited(i32),
    /// The caller gave up: the agent never reported an end.
    Abandoned(String),
}

/// One script whose `StartScript` the agent acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRecord {
    pub agent: String,
    pub ticket: String,
    /// Output lines the model planned, and the exit code it chose.
    pub planned_lines: u32,
    pub planned_exit: i32,
    /// Every log line received, in arrival order, duplicates included:
    /// (sequence, text).
    pub lines: Vec<(u64, String)>,
    pub end: ScriptEnd,
    /// Whether the run asked the agent to cancel it.
    pub cancel_requested: bool,
    /// Whether the agent crashed while it was dispatched.
    pub agent_crashed: bool,
    /// How many times the agent's executor started it.
    pub executions: u32,
}

/// One upload the agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub agent: String,
    pub sent_sha256: String,
    pub sent_size: u64,
    pub reply_sha256: String,
    pub reply_size: u64,
}

/// One failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedCall {
    pub call: String,
    pub agent: String,
    pub code: Code,
    pub message: String,
}

/// Everything the invariants are checked against.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    pub scripts: Vec<ScriptRecord>,
    pub uploads: Vec<UploadRecord>,
    pub failures: Vec<FailedCall>,
}

/// Statuses a call may fail with while agents crash, disconnect and the
/// hub restarts: the call did not reach a working agent or was cut off.
/// Anything else (Internal, InvalidArgument, DataLoss, ...) is a bug.
pub fn expected_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted
    )
}

/// Checks every invariant.
pub fn check(observations: &Observations) -> Vec<InvariantResult> {
    vec![
        ran_exactly_once(observations),
        lines_once_in_order(observations),
        uploads_match(observations),
        failures_expected(observations),
    ]
}

struct Tally {
    checked: u64,
    violations: u64,
    examples: Vec<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            checked: 0,
            violations: 0,
            examples: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, example: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.violations += 1;
            if self.examples.len() < MAX_EXAMPLES {
                self.examples.push(example());
            }
        }
    }

    fn result(self, name: &str, description: &str) -> InvariantResult {
        InvariantResult {
            name: name.into(),
            description: description.into(),
            passed: self.violations == 0,
            checked: self.checked,
            violations: self.violations,
            examples: self.examples,
        }
    }
}

fn ran_exactly_once(o: &Observations) -> InvariantResult {
    let mut tally = Tally::new();
    for s in &o.scripts {
        // A script may not have started only if it was cancelled or its
        // agent died before it could; then the agent must say so.
        let may_be_unstarted = matches!(
            s.end,
            ScriptEnd::Exited(code)
                if (code == exit_code::CANCELED && s.cancel_requested)
                    || (code == exit_code::AGENT_RESTARTED && s.agent_crashed)
        );
        let ok = match (&s.end, s.executions) {
            (ScriptEnd::Abandoned(_), _) => false,
            (_, 1) => true,
            (_, 0) => may_be_unstarted,
            _ => false,
        };
        tally.check(ok, || match &s.end {
            ScriptEnd::Abandoned(why) => {
                format!("{} on {}: lost, no end reported ({why})", s.ticket, s.agent)
            }
            ScriptEnd::Exited(code) => format!(
                "{} on {}: started {} times, ended with {code}",
                s.ticket, s.agent, s.executions
            ),
        });
    }
    tally.result(
        "scripts-ran-once",
        "every dispatched script ran exactly once and reported an end: none lost, none duplicated",
    )
}

fn lines_once_in_order(o: &Observations) -> InvariantResult {
    let mut tally = Tally::new();
    for s in &o.scripts {
        tally.check(log_problem(s).is_none(), || match log_problem(s) {
            Some(problem) => format!("{} on {}: {problem}", s.ticket, s.agent),
            None => String::new(),
        });
    }
    tally.result(
        "log-lines-once-in-order",
        "every log line arrived exactly once, in order, and a script that ran to its end delivered all its planned lines",
    )
}

/// What is wrong with a script's log as received, if anything.
pub fn log_problem(s: &ScriptRecord) -> Option<String> {
    let mut next_line = 1u32;
    for (expected_sequence, (sequence, text)) in (1u64..).zip(&s.lines) {
        if *sequence < expected_sequence {
            return Some(format!("sequence {sequence} arrived twice or out of order"));
        }
        if *sequence > expected_sequence {
            return Some(format!(
                "sequence {expected_sequence} is missing (next seen: {sequence})"
            ));
        }
        if let Some(line) = parse_line_number(&s.ticket, text) {
            if line != next_line {
                return Some(format!(
                    "output line {line} arrived where line {next_line} belongs"
                ));
            }
            next_line += 1;
        }
    }
    let delivered = next_line - 1;
    let ran_to_end = matches!(s.end, ScriptEnd::Exited(code) if code == s.planned_exit);
    if ran_to_end && delivered != s.planned_lines {
        return Some(format!(
            "{delivered} of {} output lines arrived",
            s.planned_lines
        ));
    }
    if delivered > s.planned_lines {
        return Some(format!(
            "{delivered} output lines arrived but only {} were written",
            s.planned_lines
        ));
    }
    None
}

fn uploads_match(o: &Observations) -> InvariantResult {
    let mut tally = Tally::new();
    for u in &o.uploads {
        tally.check(
            u.sent_sha256 == u.reply_sha256 && u.sent_size == u.reply_size,
            || {
                format!(
                    "upload to {}: sent {} bytes {}, agent stored {} bytes {}",
                    u.agent, u.sent_size, u.sent_sha256, u.reply_size, u.reply_sha256
                )
            },
        );
    }
    tally.result(
        "uploads-verified",
        "every upload the agent accepted has the size and SHA-256 that was sent",
    )
}

fn failures_expected(o: &Observations) -> InvariantResult {
    let mut tally = Tally::new();
    for f in &o.failures {
        tally.check(expected_failure(f.code), || {
            format!("{} to {}: {:?} {}", f.call, f.agent, f.code, f.message)
        });
    }
    // Exit codes are results too: only the model's, or the reserved codes
    // the run's own actions explain.
    for s in &o.scripts {
        if let ScriptEnd::Exited(code) = s.end {
            tally.check(
                code == s.planned_exit
                    || (code == exit_code::CANCELED && s.cancel_requested)
                    || (code == exit_code::AGENT_RESTARTED && s.agent_crashed),
                || {
                    format!(
                        "{} on {}: exit code {code}, but the model chose {} (cancel requested: {}, agent crashed: {})",
                        s.ticket, s.agent, s.planned_exit, s.cancel_requested, s.agent_crashed
                    )
                },
            );
        }
    }
    tally.result(
        "expected-failures-only",
        "every failed call failed with a status chaos explains (Unavailable, DeadlineExceeded, Cancelled, Aborted), and every exit code is the model's or explained by a cancel or crash",
    )
}

/// Counts failures by status name, for the report.
pub fn errors_by_kind(failures: &[FailedCall]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for f in failures {
        *counts.entry(format!("{:?}", f.code)).or_default() += 1;
    }
    counts
}

/// Up to [`MAX_EXAMPLES`] failures per status, each with a different
/// message (agents' names aside), for a person to start from.
pub fn error_examples(failures: &[FailedCall]) -> BTreeMap<String, Vec<String>> {
    let mut examples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for f in failures {
        let kind = format!("{:?}", f.code);
        let list = examples.entry(kind.clone()).or_default();
        if list.len() < MAX_EXAMPLES
            && seen.insert((kind, f.call.clone(), f.message.replace(&f.agent, "")))
        {
            list.push(format!("{} to {}: {}", f.call, f.agent, f.message));
        }
    }
    examples
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::executor::line_text;

    fn script(lines: u32) -> ScriptRecord {
        ScriptRecord {
            agent: "virtual-1".into(),
            ticket: "run-w0-1".into(),
            planned_lines: lines,
            planned_exit: 0,
            lines: (1..=lines)
                .map(|i| (u64::from(i), line_text("run-w0-1", i, lines, 40)))
                .collect(),
            end: ScriptEnd::Exited(0),
            cancel_requested: false,
            agent_crashed: false,
            executions: 1,
        }
    }

    fn failed(results: &[InvariantResult]) -> Vec<&str> {
        results
            .iter()
            .filter(|r| !r.passed)
            .map(|r| r.name.as_str())
            .collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let o = Observations {
            scripts: vec![script(5)],
            ..Observations::default()
        };
        assert!(failed(&check(&o)).is_empty());
    }

    #[test]
    fn crashes_and_cancels_explain_short_logs() {
        let mut s = script(5);
        s.lines.truncate(2);
        s.lines.push((3, "agent restarted".into()));
        s.end = ScriptEnd::Exited(exit_code::AGENT_RESTARTED);
        s.agent_crashed = true;
        let o = Observations {
            scripts: vec![s.clone()],
            ..Observations::default()
        };
        assert!(failed(&check(&o)).is_empty());
        // The same end without a crash is unexplained.
        s.agent_crashed = false;
        let o = Observations {
            scripts: vec![s.clone()],
            ..Observations::default()
        };
        assert_eq!(failed(&check(&o)), vec!["expected-failures-only"]);
        // A script that never started is lost unless a crash explains it.
        s.executions = 0;
        let o = Observations {
            scripts: vec![s],
            ..Observations::default()
        };
        assert_eq!(
            failed(&check(&o)),
            vec!["scripts-ran-once", "expected-failures-only"]
        );
    }

    #[test]
    fn duplicates_losses_and_bad_statuses_are_caught() {
        let mut twice = script(3);
        twice.executions = 2;
        let mut lost = script(3);
        lost.end = ScriptEnd::Abandoned("gave up".into());
        let o = Observations {
            scripts: vec![twice, lost],
            uploads: vec![UploadRecord {
                agent: "a".into(),
                sent_sha256: "aa".into(),
                sent_size: 1,
                reply_sha256: "bb".into(),
                reply_size: 1,
            }],
            failures: vec![FailedCall {
                call: "StartScript".into(),
                agent: "a".into(),
                code: Code::Internal,
                message: "boom".into(),
            }],
        };
        let results = check(&o);
        assert_eq!(
            failed(&results),
            vec![
                "scripts-ran-once",
                "uploads-verified",
                "expected-failures-only"
            ]
        );
        assert_eq!(results[0].violations, 2);
    }

    #[test]
    fn planted_duplicate_and_lost_lines_are_caught() {
        let mut duplicate = script(4);
        duplicate.lines.insert(2, duplicate.lines[1].clone());
        assert!(log_problem(&duplicate).is_some_and(|p| p.contains("twice")));
        let mut lost = script(4);
        lost.lines.remove(2);
        assert!(log_problem(&lost).is_some_and(|p| p.contains("missing")));
        let mut truncated = script(4);
        truncated.lines.pop();
        assert!(log_problem(&truncated).is_some_and(|p| p.contains("3 of 4")));
        let mut swapped = script(4);
        swapped.lines.swap(1, 2);
        assert!(log_problem(&swapped).is_some());
    }
}
