//! A script executor that only pretends: each script sleeps for a random
//! duration, writes a number of output lines, and exits with 0 or, with
//! some probability, a failure code. Everything is drawn from a seed and
//! the ticket, so a run replays exactly.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rand::{Rng, SeedableRng};
use tentacle_agent::scripts::{Executor, Job, Outcome, OutputSink, Stream};
use tokio_util::sync::CancellationToken;

/// What simulated scripts do.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScriptModel {
    #[serde(with = "humantime_serde")]
    pub min_duration: Duration,
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Output lines per script (inclusive range).
    pub min_lines: u32,
    pub max_lines: u32,
    /// Bytes per output line.
    pub line_bytes: usize,
    /// Chance that a script fails.
    pub failure_probability: f64,
    /// The exit code of a failed script.
    pub failure_exit_code: i32,
}

impl Default for ScriptModel {
    fn default() -> Self {
        Self {
            min_duration: Duration::from_millis(50),
            max_duration: Duration::from_millis(500),
            min_lines: 1,
            max_lines: 20,
            line_bytes: 60,
            failure_probability: 0.0,
            failure_exit_code: 1,
        }
    }
}

/// What one simulated script will do, decided before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub duration: Duration,
    pub lines: u32,
    pub exit_code: i32,
}

impl ScriptModel {
    /// The plan for `ticket` under `seed`: the same inputs, the same plan.
    pub fn plan(&self, seed: u64, ticket: &str) -> Plan {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut hasher);
        ticket.hash(&mut hasher);
        let mut rng = rand::rngs::StdRng::seed_from_u64(hasher.finish());
        let (min, max) = (
            self.min_duration.as_millis() as u64,
            self.max_duration.as_millis() as u64,
        );
        let duration = Duration::from_millis(rng.random_range(min.min(max)..=max.max(min)));
        let lines = rng
            .random_range(self.min_lines.min(self.max_lines)..=self.max_lines.max(self.min_lines));
        let failed = rng.random_bool(self.failure_probability.clamp(0.0, 1.0));
        Plan {
            duration,
            lines,
            exit_code: if failed { self.failure_exit_code } else { 0 },
        }
    }
}

/// How many times each script really started, across every agent of a
/// fleet and across their simulated restarts: the ground truth for the
/// "ran exactly once" invariant.
#[derive(Debug, Default)]
pub struct ExecutionLedger {
    starts: Mutex<HashMap<(String, String), u32>>,
}

impl ExecutionLedger {
    fn started(&self, agent: &str, ticket: &str) {
        *self
            .starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((agent.to_owned(), ticket.to_owned()))
            .or_default() += 1;
    }

    /// How many times `agent` started `ticket`.
    pub fn starts(&self, agent: &str, ticket: &str) -> u32 {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(agent.to_owned(), ticket.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

/// The simulated executor.
#[derive(Debug, Clone)]
pub struct SimulatedExecutor {
    model: ScriptModel,
    seed: u64,
    ledger: Option<(Arc<ExecutionLedger>, String)>,
}

impl SimulatedExecutor {
    pub fn new(model: ScriptModel, seed: u64) -> Self {
        Self {
            model,
            seed,
            ledger: None,
        }
    }

    /// Records every start in `ledger` under `agent`.
    pub fn with_ledger(mut self, ledger: Arc<ExecutionLedger>, agent: String) -> Self {
        self.ledger = Some((ledger, agent));
        self
    }
}

/// The text of line `line` (1-based) of `lines` for `ticket`, padded to
/// `line_bytes`: what a watcher must receive, in this order.
pub fn line_text(ticket: &str, line: u32, lines: u32, line_bytes: usize) -> String {
    let mut text = format!("{ticket} line {line} of {lines}");
    if text.len() < line_bytes {
        text.push_str(&".".repeat(line_bytes - text.len()));
    }
    text
}

/// The line number in a simulated script's output line, if it is one.
pub fn parse_line_number(ticket: &str, text: &str) -> Option<u32> {
    let rest = text.strip_prefix(ticket)?.strip_prefix(" line ")?;
    rest.split(' ').next()?.parse().ok()
}

impl Executor for SimulatedExecutor {
    fn execute(
        &self,
        job: Job,
        output: OutputSink,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Outcome> {
        let plan = self.model.plan(self.seed, &job.ticket);
        let line_bytes = self.model.line_bytes;
        if let Some((ledger, agent)) = &self.ledger {
            ledger.started(agent, &job.ticket);
        }
        async move {
            // Output is spread over the script's run, as a real one's would be.
            let step = plan.duration / plan.lines.max(1);
            for line in 1..=plan.lines {
                tokio::select! {
                    () = tokio::time::sleep(step) => {}
                    () = stop.cancelled() => return Outcome::Stopped,
                }
                let text = line_text(&job.ticket, line, plan.lines, line_bytes);
                output.write([(Stream::Stdout, text)]);
            }
            Outcome::Exited(plan.exit_code)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_replay_from_the_seed_and_respect_the_model() {
        let model = ScriptModel {
            failure_probability: 0.5,
            failure_exit_code: 7,
            ..ScriptModel::default()
        };
        let a: Vec<Plan> = (0..100).map(|i| model.plan(42, &format!("t{i}"))).collect();
        let b: Vec<Plan> = (0..100).map(|i| model.plan(42, &format!("t{i}"))).collect();
        let c: Vec<Plan> = (0..100).map(|i| model.plan(43, &format!("t{i}"))).collect();
        assert_eq!(a, b, "the same seed replays");
        assert_ne!(a, c, "another seed differs");
        assert!(
            a.iter()
                .all(|p| p.duration >= model.min_duration && p.duration <= model.max_duration)
        );
        assert!(
            a.iter()
                .all(|p| (model.min_lines..=model.max_lines).contains(&p.lines))
        );
        let failed = a.iter().filter(|p| p.exit_code == 7).count();
        assert!((25..=75).contains(&failed), "about half fail: {failed}");
    }
}
