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
}

impl ChaosKind {
    pub fn name(self) -> &'static str {
        match self {
            ChaosKind::Disconnect => "disconnect",
            ChaosKind::Latency => "latency",
            ChaosKind::Crash => "crash",
            ChaosKind::HubRestart => "hub_restart",
        }
    }
}

/// A fault at a time after chaos starts, for the agent with a global index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaosEvent {
    pub at: Duration,
    pub kind: ChaosKind,
    pub agent: usize,
}

/// Every event of a run, in time order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChaosSchedule {
    pub events: Vec<ChaosEvent>,
}

impl ChaosSchedule {
    /// The events for a fleet of `agents` over `window`, drawn from `seed`.
    pub fn generate(spec: &ChaosSpec, agents: usize, seed: u64, window: Duration) -> Self {
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
        assert!(
            ChaosSchedule::generate(&off, 100, 5, Duration::from_secs(60))
                .events
                .is_empty()
        );
    }
}
