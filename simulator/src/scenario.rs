//! Scenario files: what `tentacle-sim run --scenario FILE` does. A TOML
//! document with the fleet, the stages run against it in order, and the
//! chaos applied meanwhile. `simulator/scenarios/` holds documented
//! examples; [`Scenario::parse`] rejects unknown keys so a typo is an
//! error, not a silently ignored setting.

pub mod chaos;

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fleet::ScriptModel;
pub use chaos::{ChaosEvent, ChaosKind, ChaosSchedule, HubNodeKill};

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Names the run in its report.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Replays a run; `--seed` overrides it, and a random one is drawn
    /// (and printed) when neither is given.
    pub seed: Option<u64>,
    /// The whole run is stopped, and fails, after this long.
    #[serde(with = "humantime_serde", default = "default_time_limit")]
    pub time_limit: Duration,
    pub fleet: FleetSpec,
    #[serde(default, rename = "stage")]
    pub stages: Vec<Stage>,
    #[serde(default)]
    pub chaos: ChaosSpec,
}

fn default_time_limit() -> Duration {
    Duration::from_secs(600)
}

/// The virtual tentacles.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSpec {
    /// How many agents in all (before sharding).
    pub agents: usize,
    /// The share of agents that listen instead of polling, 0.0 to 1.0.
    #[serde(default)]
    pub listening_fraction: f64,
    /// Agent starts are spread evenly over this long.
    #[serde(with = "humantime_serde", default)]
    pub connect_ramp: Duration,
    /// How long the fleet may take to be fully connected.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Polling agents dial from 127.0.0.1 up to 127.0.0.N.
    #[serde(default = "default_source_addresses")]
    pub source_addresses: u8,
    /// Registrations in flight at once.
    #[serde(default = "default_registration_parallelism")]
    pub registration_parallelism: usize,
    /// What simulated scripts do.
    #[serde(default)]
    pub scripts: ScriptModel,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_source_addresses() -> u8 {
    8
}

fn default_registration_parallelism() -> usize {
    64
}

/// One step of the run; stages run one after another.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    /// Calls `GetHealth` on every agent.
    Health {
        #[serde(default = "default_concurrency")]
        concurrency: usize,
    },
    /// Uploads a package of `size_mib` to a share of the agents; each
    /// upload is verified by SHA-256 on the agent.
    Upload {
        size_mib: f64,
        #[serde(default = "one")]
        fraction: f64,
        #[serde(default = "default_concurrency")]
        concurrency: usize,
    },
    /// Runs `waves` deployment waves; each starts a script on a share of
    /// the agents, at most `concurrency` at once, follows its log to the
    /// end, and cancels `cancel_fraction` of them part-way.
    Scripts {
        #[serde(default = "one_wave")]
        waves: u32,
        #[serde(default = "one")]
        fraction: f64,
        #[serde(default = "default_concurrency")]
        concurrency: usize,
        #[serde(default)]
        cancel_fraction: f64,
    },
    /// Leaves the fleet idle (heartbeats only, chaos still on).
    Soak {
        #[serde(with = "humantime_serde")]
        duration: Duration,
    },
}

fn default_concurrency() -> usize {
    200
}

fn one() -> f64 {
    1.0
}

fn one_wave() -> u32 {
    1
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Health { .. } => "health",
            Stage::Upload { .. } => "upload",
            Stage::Scripts { .. } => "scripts",
            Stage::Soak { .. } => "soak",
        }
    }
}

/// Faults applied while the stages run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosSpec {
    /// Chaos events per agent per minute, over all kinds.
    pub rate_per_agent_per_minute: f64,
    /// How the events split between kinds.
    pub weights: ChaosWeights,
    /// Latency added to an agent's connection by a `latency` event...
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// ...plus up to this much more per write...
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// ...for this long.
    #[serde(with = "humantime_serde")]
    pub latency_for: Duration,
    /// A crashed agent starts again after this long.
    #[serde(with = "humantime_serde")]
    pub restart_after: Duration,
    /// An in-process hub stays down this long when restarted.
    #[serde(with = "humantime_serde")]
    pub hub_down_for: Duration,
    /// At most this many hub restarts in one run.
    pub max_hub_restarts: u32,
    /// No chaos before this long into the stages.
    #[serde(with = "humantime_serde")]
    pub start_after: Duration,
    /// Hub nodes killed (SIGKILL) and started again at set times, for a
    /// run against an external hub cluster: `[[chaos.hub_node_kill]]`.
    #[serde(rename = "hub_node_kill")]
    pub hub_node_kills: Vec<HubNodeKill>,
}

impl Default for ChaosSpec {
    fn default() -> Self {
        Self {
            rate_per_agent_per_minute: 0.0,
            weights: ChaosWeights::default(),
            latency: Duration::from_millis(50),
            jitter: Duration::from_millis(50),
            latency_for: Duration::from_secs(5),
            restart_after: Duration::from_secs(2),
            hub_down_for: Duration::from_secs(1),
            max_hub_restarts: 1,
            start_after: Duration::ZERO,
            hub_node_kills: Vec::new(),
        }
    }
}

/// Relative weights of the chaos kinds; 0 turns one off.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosWeights {
    pub disconnect: u32,
    pub latency: u32,
    pub crash: u32,
    pub hub_restart: u32,
}

impl Default for ChaosWeights {
    fn default() -> Self {
        Self {
            disconnect: 10,
            latency: 5,
            crash: 2,
            hub_restart: 0,
        }
    }
}

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("could not read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid: {message}")]
    Invalid { path: String, message: String },
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and checks scenario text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let scenario: Scenario = toml::from_str(text).map_err(|e| {
            // One line: where, and what; toml's own text spans several.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().trim().replace('\n', " ");
            invalid(match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            })
        })?;
        scenario.validate().map_err(|problem| invalid(problem.0))?;
        Ok(scenario)
    }

    fn validate(&self) -> Result<(), Problem> {
        let fraction = |name: &str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(Problem(format!(
                    "{name} is {value}; give a number from 0.0 to 1.0"
                )))
            }
        };
        if self.fleet.agents == 0 {
            return Err("fleet.agents is 0; give at least one agent".into());
        }
        fraction("fleet.listening_fraction", self.fleet.listening_fraction)?;
        fraction(
            "fleet.scripts.failure_probability",
            self.fleet.scripts.failure_probability,
        )?;
        if self.fleet.scripts.min_duration > self.fleet.scripts.max_duration {
            return Err("fleet.scripts.min_duration is longer than max_duration".into());
        }
        if self.fleet.scripts.min_lines > self.fleet.scripts.max_lines {
            return Err("fleet.scripts.min_lines is more than max_lines".into());
        }
        if self.fleet.scripts.failure_exit_code <= 0 {
            return Err("fleet.scripts.failure_exit_code must be positive; negative codes are reserved for the agent".into());
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let at = format!("stage {} ({})", i + 1, stage.name());
            match stage {
                Stage::Health { concurrency } => positive(&at, *concurrency)?,
                Stage::Upload {
                    size_mib,
                    fraction: share,
                    concurrency,
                } => {
                    fraction(&format!("{at} fraction"), *share)?;
                    positive(&at, *concurrency)?;
                    if !(*size_mib > 0.0 && *size_mib <= 1024.0) {
                        return Err(format!(
                            "{at} size_mib is {size_mib}; give more than 0 and at most 1024"
                        )
                        .into());
                    }
                }
                Stage::Scripts {
                    fraction: share,
                    concurrency,
                    cancel_fraction,
                    ..
                } => {
                    fraction(&format!("{at} fraction"), *share)?;
                    fraction(&format!("{at} cancel_fraction"), *cancel_fraction)?;
                    positive(&at, *concurrency)?;
                }
                Stage::Soak { .. } => {}
            }
        }
        let rate = self.chaos.rate_per_agent_per_minute;
        if !(0.0..=60.0).contains(&rate) {
            return Err(format!(
                "chaos.rate_per_agent_per_minute is {rate}; give 0 (off) up to 60"
            )
            .into());
        }
        let w = &self.chaos.weights;
        if rate > 0.0 && w.disconnect + w.latency + w.crash + w.hub_restart == 0 {
            return Err("chaos is on but every chaos weight is 0".into());
        }
        for (i, kill) in self.chaos.hub_node_kills.iter().enumerate() {
            let at = format!("chaos.hub_node_kill {}", i + 1);
            if kill.node == 0 {
                return Err(
                    format!("{at} node is 0; nodes count from 1, in the order of --hub").into(),
                );
            }
            if self.chaos.start_after + kill.at + kill.down_for >= self.time_limit {
                return Err(format!(
                    "{at} brings node {} back after the run's time_limit of {}; kill it earlier or raise time_limit",
                    kill.node,
                    humantime::format_duration(self.time_limit)
                )
                .into());
            }
        }
        Ok(())
    }
}

/// What is wrong with a scenario that parsed, in one sentence that names
/// the key and the values it takes.
#[derive(Debug)]
struct Problem(String);

impl From<String> for Problem {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for Problem {
    fn from(message: &str) -> Self {
        Self(message.to_owned())
    }
}

fn positive(at: &str, concurrency: usize) -> Result<(), Problem> {
    if concurrency == 0 {
        Err(format!("{at} concurrency is 0; give at least 1").into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("scenarios directory") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "found {seen} scenarios");
    }

    #[test]
    fn mistakes_are_named() {
        let base = "name = \"x\"\n[fleet]\nagents = 10\n";
        assert!(Scenario::parse("t", base).is_ok());
        let typo = format!("{base}ramp = \"1s\"\n");
        let error = Scenario::parse("t", &typo)
            .expect_err("unknown key")
            .to_string();
        assert!(error.contains("ramp"), "{error}");
        let bad = format!("{base}listening_fraction = 2.0\n");
        let error = Scenario::parse("t", &bad).expect_err("range").to_string();
        assert!(error.contains("listening_fraction"), "{error}");
        let stage = format!("{base}[[stage]]\nkind = \"dance\"\n");
        assert!(Scenario::parse("t", &stage).is_err());
    }

    #[test]
    fn hub_node_kills_parse_and_are_checked() {
        let base = "name = \"x\"\ntime_limit = \"1m\"\n[fleet]\nagents = 10\n";
        let kills = format!(
            "{base}[[chaos.hub_node_kill]]\nnode = 2\nat = \"5s\"\ndown_for = \"3s\"\n\
             [[chaos.hub_node_kill]]\nnode = 1\nat = \"20s\"\n"
        );
        let scenario = Scenario::parse("t", &kills).expect("parses");
        assert_eq!(
            scenario.chaos.hub_node_kills,
            vec![
                HubNodeKill {
                    node: 2,
                    at: Duration::from_secs(5),
                    down_for: Duration::from_secs(3),
                },
                HubNodeKill {
                    node: 1,
                    at: Duration::from_secs(20),
                    down_for: chaos::DEFAULT_NODE_DOWN_FOR,
                },
            ]
        );
        let zero = format!("{base}[[chaos.hub_node_kill]]\nnode = 0\nat = \"5s\"\n");
        let error = Scenario::parse("t", &zero).expect_err("node 0").to_string();
        assert!(error.contains("nodes count from 1"), "{error}");
        let late = format!("{base}[[chaos.hub_node_kill]]\nnode = 1\nat = \"58s\"\n");
        let error = Scenario::parse("t", &late)
            .expect_err("too late")
            .to_string();
        assert!(error.contains("time_limit"), "{error}");
        let typo = format!("{base}[[chaos.hub_node_kill]]\nnode = 1\nat = \"5s\"\ndown = \"1s\"\n");
        assert!(
            Scenario::parse("t", &typo).is_err(),
            "unknown keys are refused"
        );
    }
}
