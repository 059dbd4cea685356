//! The chaos schedule: which fault hits which agent when. It is drawn up
//! front from the seed alone (a Poisson process over the whole fleet, kinds
//! picked by weight), so a seed replays the same schedule whatever the
//! machine's speed, and every shard of a fleet draws the same one and
//! applies only the events for its own agents.

use std::fmt::Write as _;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ChaosSpec;

/// At most this many events are drawn, whatever the rate.
pub const MAX_EVENTS: usize = 1_000_000;

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChaosKind {
    /// Cut the agent's connection; it reconnects by itself.
    Disconnect,
    /// Slow the agent's connection for a while.
    Latency,
    /// Kill the agent and start it again over its workspace.
    Crash,
    /// Restart the in-process hub.
    HubRestart,
    /// Kill one node of an external hub cluster and start it again; the
    /// event's `agent` is the node's 0-based index. Scheduled at set times
    /// by `[[chaos.hub_node_kill]]`, not drawn.
    HubNodeKill,
}

impl ChaosKind {
    pub fn name(self) -> &'static str {
        match self {
            ChaosKind::Disconnect => "disconnect",
            ChaosKind::Latency => "latency",
            ChaosKind::Crash => "crash",
            ChaosKind::HubRestart => "hub_restart",
            ChaosKind::HubNodeKill => "hub_node_kill",
        }
    }
}

/// A fault at a time after chaos starts, for the agent with a global index
/// (or, for [`ChaosKind::HubNodeKill`], the hub node with this 0-based index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaosEvent {
    pub at: Duration,
    pub kind: ChaosKind,
    pub agent: usize,
}

/// How long a killed hub node stays down unless a scenario says.
pub const DEFAULT_NODE_DOWN_FOR: Duration = Duration::from_secs(5);

fn default_node_down_for() -> Duration {
    DEFAULT_NODE_DOWN_FOR
}

/// One hub node killed with SIGKILL (no drain, no goodbye, as a lost
/// machine) `at` after chaos starts, and started again `down_for` later
/// with the run's `--hub-restart-command`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HubNodeKill {
    /// 1-based, in the order of `--hub`.
    pub node: usize,
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    #[serde(with = "humantime_serde", default = "default_node_down_for")]
    pub down_for: Duration,
}

/// Every event of a run, in time order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChaosSchedule {
    pub events: Vec<ChaosEvent>,
}

impl ChaosSchedule {
    /// The events for a fleet of `agents` over `window`: the ones drawn
    /// from `seed`, and the hub node kills at their set times.
    pub fn generate(spec: &ChaosSpec, agents: usize, seed: u64, window: Duration) -> Self {
        let mut schedule = Self::draw(spec, agents, seed, window);
        for kill in &spec.hub_node_kills {
            if kill.at < window && kill.node > 0 {
                schedule.events.push(ChaosEvent {
                    at: kill.at,
                    kind: ChaosKind::HubNodeKill,
                    agent: kill.node - 1,
                });
            }
        }
        // Stable, so drawn events keep their order and a scenario without
        // kills keeps its digest.
        schedule.events.sort_by_key(|e| e.at);
        schedule
    }

    /// The Poisson part of the schedule.
    fn draw(spec: &ChaosSpec, agents: usize, seed: u64, window: Duration) -> Self {
        let per_second = spec.rate_per_agent_per_minute * agents as f64 / 60.0;
        let w = &spec.weights;
        let weights = [
            (ChaosKind::Disconnect, w.disconnect),
            (ChaosKind::Latency, w.latency),
            (ChaosKind::Crash, w.crash),
            (ChaosKind::HubRestart, w.hub_restart),
        ];
        let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut events = Vec::new();
        if per_second <= 0.0 || total == 0 || agents == 0 {
            return Self { events };
        }
        // Its own stream, so the scripts' plans (also from the seed) and
        // the chaos never shift each other.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6368_616f_735f_7631);
        let mut at = 0.0f64;
        let mut hub_restarts = 0u32;
        while events.len() < MAX_EVENTS {
            // Exponential gaps: a Poisson process at `per_second`.
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            at += -u.ln() / per_second;
            if at >= window.as_secs_f64() {
                break;
            }
            let mut pick = rng.random_range(0..total);
            let mut kind = ChaosKind::Disconnect;
            for (k, weight) in weights {
                if pick < u64::from(weight) {
                    kind = k;
                    break;
                }
                pick -= u64::from(weight);
            }
            let agent = rng.random_range(0..agents);
            if kind == ChaosKind::HubRestart {
                if hub_restarts >= spec.max_hub_restarts {
                    continue;
                }
                hub_restarts += 1;
            }
            events.push(ChaosEvent {
                at: Duration::from_secs_f64(at),
                kind,
                agent,
            });
        }
        Self { events }
    }

    /// A digest of the whole schedule: equal digests, equal chaos.
    pub fn sha256(&self) -> String {
        let mut text = String::new();
        for e in &self.events {
            let _ = writeln!(text, "{} {} {}", e.at.as_micros(), e.kind.name(), e.agent);
        }
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ChaosSpec {
        ChaosSpec {
            rate_per_agent_per_minute: 2.0,
            ..ChaosSpec::default()
        }
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        let window = Duration::from_secs(60);
        let a = ChaosSchedule::generate(&spec(), 300, 11, window);
        let b = ChaosSchedule::generate(&spec(), 300, 11, window);
        let c = ChaosSchedule::generate(&spec(), 300, 12, window);
        assert_eq!(a, b);
        assert_eq!(a.sha256(), b.sha256());
        assert_ne!(a.sha256(), c.sha256());
        // 2 per agent per minute over 300 agents for a minute: about 600.
        assert!((450..=750).contains(&a.events.len()), "{}", a.events.len());
        assert!(a.events.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(a.events.iter().all(|e| e.agent < 300 && e.at < window));
    }

    #[test]
    fn weights_shape_the_mix_and_hub_restarts_are_capped() {
        let mut spec = spec();
        spec.weights.disconnect = 1;
        spec.weights.latency = 0;
        spec.weights.crash = 0;
        spec.weights.hub_restart = 1;
        spec.max_hub_restarts = 2;
        let s = ChaosSchedule::generate(&spec, 100, 5, Duration::from_secs(60));
        let count = |k| s.events.iter().filter(|e| e.kind == k).count();
        assert_eq!(count(ChaosKind::HubRestart), 2);
        assert_eq!(count(ChaosKind::Latency) + count(ChaosKind::Crash), 0);
        assert!(count(ChaosKind::Disconnect) > 50);
        let off = ChaosSpec::default();
        assert!(off.hub_node_kills.is_empty());
        assert!(
            ChaosSchedule::generate(&off, 100, 5, Duration::from_secs(60))
                .events
                .is_empty()
        );
    }

    #[test]
    fn hub_node_kills_land_at_their_times_without_moving_the_drawn_events() {
        let window = Duration::from_secs(60);
        let drawn = ChaosSchedule::generate(&spec(), 50, 3, window);
        let mut with_kills = spec();
        with_kills.hub_node_kills = vec![
            HubNodeKill {
                node: 3,
                at: Duration::from_secs(10),
                down_for: Duration::from_secs(2),
            },
            HubNodeKill {
                node: 1,
                at: Duration::from_secs(90),
                down_for: Duration::from_secs(2),
            },
        ];
        let s = ChaosSchedule::generate(&with_kills, 50, 3, window);
        let kills: Vec<_> = s
            .events
            .iter()
            .filter(|e| e.kind == ChaosKind::HubNodeKill)
            .collect();
        // The second kill is past the window.
        assert_eq!(kills.len(), 1);
        assert_eq!((kills[0].at, kills[0].agent), (Duration::from_secs(10), 2));
        let others: Vec<_> = s
            .events
            .iter()
            .filter(|e| e.kind != ChaosKind::HubNodeKill)
            .copied()
            .collect();
        assert_eq!(others, drawn.events);
        assert!(s.events.windows(2).all(|w| w[0].at <= w[1].at));
        assert_ne!(s.sha256(), drawn.sha256());
    }
}
