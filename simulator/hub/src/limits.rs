//! The budget of failed registrations per source address, so a one-time
//! token or an API key cannot be found by trying: [`FailureLimiter`].
//!
//! Only failures are counted (a bad, used or expired token, an unknown or
//! removed API key, no credential at all). Successful registrations are
//! never counted and never consume anything: a fleet of 10,000 agents
//! registering from a handful of addresses (`tentacle-sim fleet` uses
//! 127.0.0.1-16, real agents sit behind NAT) is not slowed by its own
//! success.
//!
//! Each source has a budget of `failure_burst` failures that refills at
//! `failures_per_minute` (the generic cell rate algorithm: one number per
//! source, the time its failures are paid back). A source that has spent
//! its budget is refused with `RESOURCE_EXHAUSTED` before its credential is
//! looked at, until one failure's worth has refilled (60 s /
//! `failures_per_minute`), and the message says when.
//!
//! The trade-off: while a source is refused, a good credential from it is
//! refused too. That is unavoidable: checking it would tell a guesser
//! whether the guess was right, which is what the budget withholds. It
//! only bites agents that share an address with a guesser (or with many
//! misconfigured agents), and only after the burst is spent; such an agent
//! gets in at its next retry after the refill. Attempts already being
//! checked when a source's budget runs out still count, so a guesser that
//! sends many at once is blocked for correspondingly longer: over time no
//! source gets more than `failures_per_minute` checks of bad credentials.
//!
//! IPv6 sources are counted by their /64, the block one host usually
//! holds; IPv4-mapped addresses as the IPv4 address.
//!
//! Memory is bounded: a source whose failures are paid back is forgotten
//! (it is then the same as one never seen), and at most `max_sources` are
//! tracked; beyond that, failures from new sources are not counted until
//! entries expire (a guesser with that many addresses gets a burst from
//! each anyway). A refused source is logged once per minute, with how many
//! attempts were refused since, and every refusal is counted in
//! `tentacle_hub_registrations_throttled`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How many failed registrations a source may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationLimits {
    /// How fast a source's budget refills; at least 1.
    pub failures_per_minute: u32,
    /// How many failures a source may make at once, its budget when idle;
    /// at least 1.
    pub failure_burst: u32,
    /// How many sources with failures outstanding are tracked at most.
    pub max_sources: usize,
}

impl Default for RegistrationLimits {
    fn default() -> Self {
        Self {
            failures_per_minute: 10,
            failure_burst: 20,
            max_sources: 65_536,
        }
    }
}

/// A registration refused unchecked because its source spent its budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "too many failed registrations from {address}; try again in {}s (only a bad token or API key counts against an address)",
    retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)
)]
pub struct Throttled {
    /// The address as counted (an IPv6 /64), or "an unknown address".
    pub address: String,
    pub retry_after: Duration,
}

/// How often one refused source is logged at most.
const LOG_WINDOW: Duration = Duration::from_secs(60);
/// How often forgotten sources are swept out while failures arrive.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Failed registrations by source, within [`RegistrationLimits`].
#[derive(Debug)]
pub struct FailureLimiter {
    /// The time one failure takes to be paid back.
    interval: Duration,
    /// How far ahead a source's debt may reach and still be checked.
    tolerance: Duration,
    max_sources: usize,
    table: Mutex<Table>,
}

#[derive(Debug)]
struct Table {
    sources: HashMap<Option<IpAddr>, Source>,
    next_sweep: Option<Instant>,
    full_logged_at: Option<Instant>,
}

#[derive(Debug)]
struct Source {
    /// When every failure so far is paid back.
    repaid_at: Instant,
    /// Attempts refused since the last log line.
    refused: u64,
    logged_at: Option<Instant>,
}

impl Source {
    /// Counts a refusal; returns how many to report when a log line is due
    /// (the first refusal, then at most once per [`LOG_WINDOW`]).
    fn refused_at(&mut self, now: Instant) -> Option<u64> {
        self.refused += 1;
        if self.logged_at.is_some_and(|at| now < at + LOG_WINDOW) {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.refused))
    }

    fn forgettable(&self, now: Instant) -> bool {
        self.repaid_at <= now && self.logged_at.is_none_or(|at| now >= at + LOG_WINDOW)
    }
}

/// What failures are counted under: the IPv4 address, an IPv6 /64, or
/// `None` for a connection whose address is not known.
pub fn source_key(address: Option<IpAddr>) -> Option<IpAddr> {
    match address? {
        IpAddr::V4(v4) => Some(IpAddr::V4(v4)),
        IpAddr::V6(v6) => Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        }),
    }
}

fn describe(key: Option<IpAddr>) -> String {
    match key {
        Some(IpAddr::V6(v6)) => format!("{v6}/64"),
        Some(ip) => ip.to_string(),
        None => "an unknown address".to_owned(),
    }
}

impl FailureLimiter {
    pub fn new(limits: RegistrationLimits) -> Self {
        let interval = Duration::from_secs(60) / limits.failures_per_minute.max(1);
        Self {
            interval,
            tolerance: interval * (limits.failure_burst.max(1) - 1),
            max_sources: limits.max_sources,
            table: Mutex::new(Table {
                sources: HashMap::new(),
                next_sweep: None,
                full_logged_at: None,
            }),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a registration from `address` may have its credential
    /// checked now. Changes nothing unless it is refused.
    pub fn check(&self, address: Option<IpAddr>) -> Result<(), Throttled> {
        self.check_at(address, Instant::now())
    }

    /// Counts a failed registration from `address`.
    pub fn record_failure(&self, address: Option<IpAddr>) {
        self.record_failure_at(address, Instant::now());
    }

    /// How many sources are tracked now.
    pub fn tracked_sources(&self) -> usize {
        self.table().sources.len()
    }

    fn check_at(&self, address: Option<IpAddr>, now: Instant) -> Result<(), Throttled> {
        let key = source_key(address);
        let mut table = self.table();
        let Some(source) = table.sources.get_mut(&key) else {
            return Ok(());
        };
        let Some(retry_after) = source
            .repaid_at
            .checked_duration_since(now)
            .and_then(|debt| debt.checked_sub(self.tolerance))
            .filter(|wait| !wait.is_zero())
        else {
            return Ok(());
        };
        tentacle_proto::metrics::METRICS
            .hub_registrations_throttled
            .inc();
        if let Some(refused) = source.refused_at(now) {
            tracing::warn!(
                source = %describe(key),
                refused,
                retry_after = ?retry_after,
                "refusing registrations from a source that spent its budget of failures"
            );
        }
        Err(Throttled {
            address: describe(key),
            retry_after,
        })
    }

    fn record_failure_at(&self, address: Option<IpAddr>, now: Instant) {
        let key = source_key(address);
        let mut table = self.table();
        if table.next_sweep.is_none_or(|at| now >= at) {
            Self::sweep(&mut table, now);
        }
        if !table.sources.contains_key(&key) && table.sources.len() >= self.max_sources {
            Self::sweep(&mut table, now);
            if table.sources.len() >= self.max_sources {
                if table.full_logged_at.is_none_or(|at| now >= at + LOG_WINDOW) {
                    tracing::warn!(
                        sources = table.sources.len(),
                        "too many addresses with failed registrations to track; failures from new ones are not counted until older ones are paid back"
                    );
                    table.full_logged_at = Some(now);
                }
                return;
            }
        }
        let source = table.sources.entry(key).or_insert(Source {
            repaid_at: now,
            refused: 0,
            logged_at: None,
        });
        source.repaid_at = source.repaid_at.max(now) + self.interval;
    }

    fn sweep(table: &mut Table, now: Instant) {
        table.sources.retain(|_, source| !source.forgettable(now));
        table.next_sweep = Some(now + SWEEP_EVERY);
    }
}

#[cfg(test)]
mod tests;
