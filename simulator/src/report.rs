//! The result of a scenario run: what `tentacle-sim run` writes as JSON,
//! renders as one HTML page ([`html`]) and prints as a terminal summary.
//!
//! The JSON schema is stable: fields are only ever added, and
//! [`SCHEMA_VERSION`] changes if one ever changes meaning. Latencies are
//! kept as whole HdrHistograms (V2 format, base64), so shard reports merge
//! exactly ([`Report::merge`]) rather than by averaging percentiles.

pub mod html;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

/// The version of the JSON layout below.
pub const SCHEMA_VERSION: u32 = 1;

/// Latencies are recorded in microseconds, up to this many (one hour).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// One run, or the merge of several shards' runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema_version: u32,
    /// The scenario's `name`.
    pub scenario: String,
    /// Replays the run: `tentacle-sim run --scenario FILE --seed SEED`.
    pub seed: u64,
    /// SHA-256 of the chaos schedule; the same seed gives the same digest.
    pub chaos_schedule_sha256: String,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    /// One entry per shard that contributed.
    pub shards: Vec<ShardInfo>,
    pub agents: AgentCounts,
    /// Stages in the order they ran.
    pub stages: Vec<StageResult>,
    /// Chaos events applied, by kind (`disconnect`, `latency`, `crash`,
    /// `hub_restart`).
    pub chaos: BTreeMap<String, u64>,
    /// One sample per second.
    pub timeline: Vec<Sample>,
    /// Per call type (`StartScript`, `WatchScript`, `UploadFile`, ...).
    pub calls: BTreeMap<String, CallStats>,
    /// Failed calls by gRPC status (`Unavailable`, ...).
    pub errors: BTreeMap<String, u64>,
    /// A few distinct failures per status: "CALL to AGENT: message".
    #[serde(default)]
    pub error_examples: BTreeMap<String, Vec<String>>,
    pub scripts: ScriptTotals,
    pub uploads: UploadTotals,
    pub invariants: Vec<InvariantResult>,
    /// The nodes of an external hub (one, or each node of a cluster), in
    /// the order of `--hub`; their figures are in each sample's `nodes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hub_nodes: Vec<HubNodeInfo>,
}

/// One node of an external hub.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HubNodeInfo {
    /// 1-based, as in `[[chaos.hub_node_kill]]`.
    pub node: usize,
    pub address: String,
    /// Its process id at the end of the run (a restart gives a new one),
    /// if known.
    pub pid: Option<u32>,
    /// Times chaos killed it, and started it again.
    pub kills: u64,
    pub restarts: u64,
    /// When it was killed, and when it accepted connections again:
    /// milliseconds since the run started, like a sample's `t_ms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub killed_at_ms: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_at_ms: Vec<u64>,
}

/// One hub node at one second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeSample {
    /// Polling agents with a connection open to this node, as the agents
    /// see it (each holds its tunnel on one node of a cluster).
    pub connected: u64,
    /// `tentacle_hub_connected_agents` from the node's own metrics, when
    /// `--hub-metrics` names them and the node answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_connected: Option<u64>,
    /// CPU use (100 = one core) and resident memory, when its pid is known
    /// and it runs; zero while it is down.
    pub cpu_percent: f64,
    pub rss_bytes: u64,
}

/// Which slice of the fleet a process ran.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShardInfo {
    /// `K/N`, 1-based.
    pub shard: String,
    pub agents: u64,
    /// The soft `RLIMIT_NOFILE` after raising it to the hard limit.
    pub open_file_limit: u64,
    /// `in-process` or the external hub's address.
    pub hub: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentCounts {
    pub polling: u64,
    pub listening: u64,
    /// Seconds from the first agent starting until all were connected (or
    /// `null` if some never were).
    pub connect_all_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StageResult {
    pub name: String,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// Operations the stage attempted (health checks, uploads, scripts).
    pub operations: u64,
    pub failed: u64,
}

/// The state of the run at one second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// Milliseconds since the run started.
    pub t_ms: u64,
    /// Agents with an open tunnel (polling) or a serving listener.
    pub connected: u64,
    /// Calls finished in this second, and how many of them failed.
    pub calls: u64,
    pub errors: u64,
    /// The hub process's CPU use in this second (100 = one core), and its
    /// resident memory. With an in-process hub this is the whole simulator.
    pub hub_cpu_percent: f64,
    pub hub_rss_bytes: u64,
    /// Per hub node, in the order of [`Report::hub_nodes`]; the hub figures
    /// above are then their sums.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSample>,
}

/// Latency and outcome of one call type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CallStats {
    pub count: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Every successful call's latency: HdrHistogram V2, base64.
    pub histogram: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScriptTotals {
    pub dispatched: u64,
    pub succeeded: u64,
    /// Completed with a non-zero exit code the model chose.
    pub failed: u64,
    pub canceled: u64,
    /// Ended by a simulated agent crash.
    pub agent_restarted: u64,
    /// The caller gave up on them (an unexpected end).
    pub abandoned: u64,
    pub log_lines: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadTotals {
    pub attempted: u64,
    pub verified: u64,
    pub bytes: u64,
}

/// One invariant as checked at the end of the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InvariantResult {
    pub name: String,
    pub description: String,
    pub passed: bool,
    /// How many things were checked, and how many broke it.
    pub checked: u64,
    pub violations: u64,
    /// A few of the violations, for a person to start from.
    pub examples: Vec<String>,
}

/// Why a report could not be read or merged.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0} is not a tentacle-sim report: {1}")]
    Parse(String, serde_json::Error),
    #[error("{0} has report schema {1}; this tentacle-sim reads schema {SCHEMA_VERSION}")]
    Schema(String, u32),
    #[error("the {0} latency histogram is corrupt: {1}")]
    Histogram(String, String),
    #[error("reports from different scenarios cannot be merged: `{0}` and `{1}`")]
    Mismatch(String, String),
    #[error("nothing to merge: give at least one report")]
    Empty,
}

/// Latency histogram for one call type while the run goes on.
#[derive(Debug, Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
    errors: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            // Three significant digits: 0.1% resolution at any latency.
            histogram: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
            errors: 0,
        }
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram
            .saturating_record(micros.clamp(1, MAX_LATENCY_US));
    }

    pub fn record_error(&mut self) {
        self.errors += 1;
    }

    pub fn stats(&self) -> CallStats {
        let h = &self.histogram;
        CallStats {
            count: h.len() + self.errors,
            errors: self.errors,
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            histogram: encode(h),
        }
    }

    fn from_stats(name: &str, stats: &CallStats) -> Result<Self, ReportError> {
        Ok(Self {
            histogram: decode(name, &stats.histogram)?,
            errors: stats.errors,
        })
    }
}

fn encode(histogram: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    // Writing to a Vec cannot fail; an empty string reads back as empty.
    let _ = V2Serializer::new().serialize(histogram, &mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode(name: &str, text: &str) -> Result<Histogram<u64>, ReportError> {
    if text.is_empty() {
        return Ok(Latencies::default().histogram);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| ReportError::Histogram(name.to_owned(), e.to_string()))?;
    Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| ReportError::Histogram(name.to_owned(), format!("{e:?}")))
}

impl Report {
    /// Reads a report written by `tentacle-sim run`.
    pub fn parse(origin: &str, text: &str) -> Result<Self, ReportError> {
        let report: Self =
            serde_json::from_str(text).map_err(|e| ReportError::Parse(origin.to_owned(), e))?;
        if report.schema_version != SCHEMA_VERSION {
            return Err(ReportError::Schema(
                origin.to_owned(),
                report.schema_version,
            ));
        }
        Ok(report)
    }

    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.invariants.iter().all(|i| i.passed)
    }

    /// Combines shard reports of one scenario into one: counts add up,
    /// histograms merge exactly, timelines align on time since each
    /// shard's start, invariants hold only if they held everywhere.
    pub fn merge(reports: Vec<Report>) -> Result<Report, ReportError> {
        let mut reports = reports.into_iter();
        let mut merged = reports.next().ok_or(ReportError::Empty)?;
        for other in reports {
            if other.scenario != merged.scenario {
                return Err(ReportError::Mismatch(merged.scenario, other.scenario));
            }
            merged.absorb(other)?;
        }
        Ok(merged)
    }

    fn absorb(&mut self, other: Report) -> Result<(), ReportError> {
        self.started_unix_ms = self.started_unix_ms.min(other.started_unix_ms);
        self.duration_ms = self.duration_ms.max(other.duration_ms);
        self.shards.extend(other.shards);
        self.agents.polling += other.agents.polling;
        self.agents.listening += other.agents.listening;
        self.agents.connect_all_ms = match (self.agents.connect_all_ms, other.agents.connect_all_ms)
        {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        for stage in other.stages {
            match self.stages.iter_mut().find(|s| s.name == stage.name) {
                Some(mine) => {
                    mine.duration_ms = mine.duration_ms.max(stage.duration_ms);
                    mine.operations += stage.operations;
                    mine.failed += stage.failed;
                }
                None => self.stages.push(stage),
            }
        }
        add_counts(&mut self.chaos, other.chaos);
        add_counts(&mut self.errors, other.errors);
        for (kind, examples) in other.error_examples {
            let mine = self.error_examples.entry(kind).or_default();
            mine.extend(examples);
            mine.truncate(crate::invariants::MAX_EXAMPLES);
        }
        for (i, sample) in other.timeline.into_iter().enumerate() {
            match self.timeline.get_mut(i) {
                Some(mine) => {
                    mine.connected += sample.connected;
                    mine.calls += sample.calls;
                    mine.errors += sample.errors;
                    // Shards of an external hub all watch the same process.
                    mine.hub_cpu_percent = mine.hub_cpu_percent.max(sample.hub_cpu_percent);
                    mine.hub_rss_bytes = mine.hub_rss_bytes.max(sample.hub_rss_bytes);
                    for (k, node) in sample.nodes.into_iter().enumerate() {
                        match mine.nodes.get_mut(k) {
                            Some(m) => {
                                // Each shard counts its own agents; the
                                // node's process and metrics are shared.
                                m.connected += node.connected;
                                m.hub_connected = m.hub_connected.max(node.hub_connected);
                                m.cpu_percent = m.cpu_percent.max(node.cpu_percent);
                                m.rss_bytes = m.rss_bytes.max(node.rss_bytes);
                            }
                            None => mine.nodes.push(node),
                        }
                    }
                }
                None => self.timeline.push(sample),
            }
        }
        for (name, stats) in other.calls {
            let mut combined = match self.calls.get(&name) {
                Some(mine) => Latencies::from_stats(&name, mine)?,
                None => Latencies::default(),
            };
            let theirs = Latencies::from_stats(&name, &stats)?;
            combined
                .histogram
                .add(&theirs.histogram)
                .map_err(|e| ReportError::Histogram(name.clone(), format!("{e:?}")))?;
            combined.errors += theirs.errors;
            self.calls.insert(name, combined.stats());
        }
        let s = &mut self.scripts;
        let o = other.scripts;
        s.dispatched += o.dispatched;
        s.succeeded += o.succeeded;
        s.failed += o.failed;
        s.canceled += o.canceled;
        s.agent_restarted += o.agent_restarted;
        s.abandoned += o.abandoned;
        s.log_lines += o.log_lines;
        self.uploads.attempted += other.uploads.attempted;
        self.uploads.verified += other.uploads.verified;
        self.uploads.bytes += other.uploads.bytes;
        for node in other.hub_nodes {
            match self.hub_nodes.iter_mut().find(|n| n.node == node.node) {
                Some(mine) => {
                    mine.kills += node.kills;
                    mine.restarts += node.restarts;
                    mine.killed_at_ms.extend(node.killed_at_ms);
                    mine.back_at_ms.extend(node.back_at_ms);
                    mine.pid = mine.pid.or(node.pid);
                }
                None => self.hub_nodes.push(node),
            }
        }
        for invariant in other.invariants {
            match self
                .invariants
                .iter_mut()
                .find(|i| i.name == invariant.name)
            {
                Some(mine) => {
                    mine.passed &= invariant.passed;
                    mine.checked += invariant.checked;
                    mine.violations += invariant.violations;
                    mine.examples.extend(invariant.examples);
                    mine.examples.truncate(crate::invariants::MAX_EXAMPLES);
                }
                None => self.invariants.push(invariant),
            }
        }
        Ok(())
    }

    /// What a person reads at the end of a run in a terminal.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let shards = self
            .shards
            .iter()
            .map(|s| s.shard.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "scenario {} · seed {} · {:.1}s · shards {shards}",
            self.scenario,
            self.seed,
            self.duration_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "agents: {} polling, {} listening; all connected after {}",
            self.agents.polling,
            self.agents.listening,
            self.agents
                .connect_all_ms
                .map_or("never".to_owned(), |ms| format!(
                    "{:.1}s",
                    ms as f64 / 1000.0
                ))
        );
        let s = &self.scripts;
        let _ = writeln!(
            out,
            "scripts: {} dispatched, {} succeeded, {} failed by the model, {} canceled, {} ended by crashes, {} abandoned; {} log lines",
            s.dispatched,
            s.succeeded,
            s.failed,
            s.canceled,
            s.agent_restarted,
            s.abandoned,
            s.log_lines
        );
        let _ = writeln!(
            out,
            "uploads: {} of {} verified, {:.1} MiB",
            self.uploads.verified,
            self.uploads.attempted,
            self.uploads.bytes as f64 / (1024.0 * 1024.0)
        );
        for node in &self.hub_nodes {
            let figures = self.node_figures(node.node);
            let _ = writeln!(
                out,
                "hub node {} {}: at most {} agents connected, CPU at most {:.0}%, memory at most {:.1} MiB; killed {}, restarted {}",
                node.node,
                node.address,
                figures.most_connected,
                figures.most_cpu_percent,
                figures.most_rss_bytes as f64 / (1024.0 * 1024.0),
                node.kills,
                node.restarts
            );
        }
        if !self.chaos.is_empty() {
            let chaos = self
                .chaos
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(out, "chaos: {chaos}");
        }
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9}",
            "call", "count", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for (name, c) in &self.calls {
            let ms = |us: u64| us as f64 / 1000.0;
            let _ = writeln!(
                out,
                "{:<16} {:>8} {:>7} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                name,
                c.count,
                c.errors,
                ms(c.p50_us),
                ms(c.p90_us),
                ms(c.p99_us),
                ms(c.max_us)
            );
        }
        if !self.errors.is_empty() {
            let errors = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(out, "errors by status: {errors}");
            for (kind, examples) in &self.error_examples {
                for example in examples.iter().take(3) {
                    let _ = writeln!(out, "  {kind}: {example}");
                }
            }
        }
        for invariant in &self.invariants {
            let _ = writeln!(
                out,
                "[{}] {}: {} checked, {} violations",
                if invariant.passed { "pass" } else { "FAIL" },
                invariant.name,
                invariant.checked,
                invariant.violations
            );
            for example in &invariant.examples {
                let _ = writeln!(out, "       {example}");
            }
        }
        out
    }
}

/// The peaks of one hub node over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodeFigures {
    pub most_connected: u64,
    pub most_cpu_percent: f64,
    pub most_rss_bytes: u64,
}

impl Report {
    /// The peaks of hub node `node` (1-based) over the timeline.
    pub fn node_figures(&self, node: usize) -> NodeFigures {
        let samples = self
            .timeline
            .iter()
            .filter_map(|s| s.nodes.get(node.wrapping_sub(1)));
        let mut figures = NodeFigures::default();
        for s in samples {
            figures.most_connected = figures.most_connected.max(s.connected);
            figures.most_cpu_percent = figures.most_cpu_percent.max(s.cpu_percent);
            figures.most_rss_bytes = figures.most_rss_bytes.max(s.rss_bytes);
        }
        figures
    }
}

fn add_counts(mine: &mut BTreeMap<String, u64>, theirs: BTreeMap<String, u64>) {
    for (key, value) in theirs {
        *mine.entry(key).or_default() += value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_report(shard: &str, latencies_ms: &[u64]) -> Report {
        let mut latencies = Latencies::default();
        for ms in latencies_ms {
            latencies.record(Duration::from_millis(*ms));
        }
        latencies.record_error();
        Report {
            schema_version: SCHEMA_VERSION,
            scenario: "smoke".into(),
            seed: 7,
            chaos_schedule_sha256: "00".into(),
            started_unix_ms: 1_000,
            duration_ms: 3_000,
            shards: vec![ShardInfo {
                shard: shard.into(),
                agents: 10,
                open_file_limit: 20_000,
                hub: "in-process".into(),
            }],
            agents: AgentCounts {
                polling: 10,
                listening: 0,
                connect_all_ms: Some(500),
            },
            stages: vec![StageResult {
                name: "scripts".into(),
                started_ms: 0,
                duration_ms: 1_000,
                operations: 10,
                failed: 1,
            }],
            chaos: BTreeMap::from([("disconnect".into(), 2)]),
            timeline: (0..3)
                .map(|i| Sample {
                    t_ms: i * 1000,
                    connected: 10,
                    calls: 5,
                    errors: 1,
                    hub_cpu_percent: 50.0,
                    hub_rss_bytes: 1 << 20,
                    nodes: Vec::new(),
                })
                .collect(),
            calls: BTreeMap::from([("StartScript".into(), latencies.stats())]),
            errors: BTreeMap::from([("Unavailable".into(), 1)]),
            error_examples: BTreeMap::from([(
                "Unavailable".into(),
                vec!["StartScript to virtual-1: the agent is not connected".into()],
            )]),
            scripts: ScriptTotals {
                dispatched: 10,
                succeeded: 9,
                failed: 1,
                ..ScriptTotals::default()
            },
            uploads: UploadTotals::default(),
            invariants: vec![InvariantResult {
                name: "scripts-ran-once".into(),
                description: "every dispatched script ran exactly once".into(),
                passed: true,
                checked: 10,
                violations: 0,
                examples: vec![],
            }],
            hub_nodes: Vec::new(),
        }
    }

    #[test]
    fn reports_round_trip_through_json_and_merge_exactly() {
        let a = sample_report("1/2", &[1, 2, 3, 4]);
        let b = sample_report("2/2", &[100, 200]);
        let text = serde_json::to_string(&a).expect("serialise");
        assert_eq!(Report::parse("a.json", &text).expect("parse"), a);

        let merged = Report::merge(vec![a, b]).expect("merge");
        assert_eq!(merged.agents.polling, 20);
        assert_eq!(merged.shards.len(), 2);
        assert_eq!(merged.timeline[0].connected, 20);
        assert_eq!(merged.scripts.dispatched, 20);
        assert_eq!(merged.chaos["disconnect"], 4);
        let start = &merged.calls["StartScript"];
        // Six successes and two errors; the slowest is the other shard's.
        assert_eq!((start.count, start.errors), (8, 2));
        assert!(
            start.max_us >= 199_000 && start.max_us <= 201_000,
            "{start:?}"
        );
        assert!(start.p50_us < 5_000, "{start:?}");
        assert!(merged.passed());
    }

    #[test]
    fn merge_refuses_other_scenarios_and_bad_histograms() {
        let a = sample_report("1/2", &[1]);
        let mut b = sample_report("2/2", &[1]);
        b.scenario = "other".into();
        assert!(matches!(
            Report::merge(vec![a.clone(), b]),
            Err(ReportError::Mismatch(..))
        ));
        let mut c = sample_report("2/2", &[1]);
        if let Some(stats) = c.calls.get_mut("StartScript") {
            stats.histogram = "not base64!".into();
        }
        assert!(matches!(
            Report::merge(vec![a, c]),
            Err(ReportError::Histogram(..))
        ));
        let mut d = sample_report("1/1", &[1]);
        d.schema_version = 99;
        let text = serde_json::to_string(&d).expect("serialise");
        assert!(matches!(
            Report::parse("d.json", &text),
            Err(ReportError::Schema(_, 99))
        ));
    }

    /// A report of a run against a two-node cluster: node 2 was killed at
    /// the second sample.
    pub(crate) fn cluster_report(shard: &str) -> Report {
        let mut report = sample_report(shard, &[1, 2]);
        report.hub_nodes = (1..=2)
            .map(|node| HubNodeInfo {
                node,
                address: format!("https://127.0.0.1:{}", 7000 + node),
                pid: Some(100 + node as u32),
                kills: u64::from(node == 2),
                restarts: u64::from(node == 2),
                killed_at_ms: if node == 2 { vec![1_000] } else { vec![] },
                back_at_ms: if node == 2 { vec![2_000] } else { vec![] },
            })
            .collect();
        for (i, sample) in report.timeline.iter_mut().enumerate() {
            let down = i == 1;
            sample.nodes = vec![
                NodeSample {
                    connected: if down { 10 } else { 5 },
                    hub_connected: Some(if down { 10 } else { 5 }),
                    cpu_percent: 20.0,
                    rss_bytes: 30 << 20,
                },
                NodeSample {
                    connected: if down { 0 } else { 5 },
                    hub_connected: None,
                    cpu_percent: if down { 0.0 } else { 10.0 },
                    rss_bytes: if down { 0 } else { 20 << 20 },
                },
            ];
        }
        report
    }

    #[test]
    fn per_node_figures_round_trip_merge_and_summarise() {
        let a = cluster_report("1/2");
        let text = serde_json::to_string(&a).expect("serialise");
        assert!(text.contains("\"hub_nodes\""), "{text}");
        assert_eq!(Report::parse("a.json", &text).expect("parse"), a);
        let figures = a.node_figures(1);
        assert_eq!(figures.most_connected, 10);
        assert_eq!(a.node_figures(2).most_rss_bytes, 20 << 20);
        assert_eq!(a.node_figures(3), NodeFigures::default());

        let mut b = cluster_report("2/2");
        b.hub_nodes.iter_mut().for_each(|n| n.kills = 0);
        let merged = Report::merge(vec![a, b]).expect("merge");
        assert_eq!(merged.hub_nodes.len(), 2);
        assert_eq!(merged.hub_nodes[1].kills, 1, "only one shard kills");
        // Agents add up over shards; the node's own figures do not.
        assert_eq!(merged.timeline[1].nodes[0].connected, 20);
        assert_eq!(merged.timeline[1].nodes[0].hub_connected, Some(10));
        assert_eq!(merged.timeline[0].nodes[1].rss_bytes, 20 << 20);
        let summary = merged.summary();
        assert!(
            summary.contains("hub node 2 https://127.0.0.1:7002: at most 10 agents connected"),
            "{summary}"
        );

        // A report without nodes writes no node fields, as before.
        let plain = serde_json::to_string(&sample_report("1/1", &[1])).expect("serialise");
        assert!(!plain.contains("hub_nodes") && !plain.contains("\"nodes\""));
    }
}
