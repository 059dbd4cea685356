//! What the control plane saw during a run: every call's latency and
//! outcome, every script's log as received, every upload's reply. The
//! invariants and the report are computed from it at the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use tonic::Status;

use crate::invariants::{FailedCall, Observations, ScriptRecord, UploadRecord};
use crate::report::Latencies;

/// Successful calls slower than this are logged at debug level, so a stall
/// can be traced to an agent and a call.
const SLOW_CALL: std::time::Duration = std::time::Duration::from_secs(5);

/// Shared by every task of a run.
#[derive(Debug)]
pub struct Recorder {
    calls: Mutex<BTreeMap<&'static str, Latencies>>,
    observations: Mutex<Observations>,
    /// Calls and failures since the sampler last looked.
    pub window_calls: AtomicU64,
    pub window_errors: AtomicU64,
    pub total_calls: AtomicU64,
    pub total_errors: AtomicU64,
    /// Scripts finished, for progress.
    pub scripts_done: AtomicU64,
    /// Crashes per agent name: a script whose agent's count changed while
    /// it was dispatched may end as "agent restarted".
    crashes: HashMap<String, AtomicU32>,
}

impl Recorder {
    pub fn new(agents: impl IntoIterator<Item = String>) -> Self {
        Self {
            calls: Mutex::default(),
            observations: Mutex::default(),
            window_calls: AtomicU64::new(0),
            window_errors: AtomicU64::new(0),
            total_calls: AtomicU64::new(0),
            total_errors: AtomicU64::new(0),
            scripts_done: AtomicU64::new(0),
            crashes: agents
                .into_iter()
                .map(|name| (name, AtomicU32::new(0)))
                .collect(),
        }
    }

    /// Records one finished call.
    pub fn call<T>(
        &self,
        call: &'static str,
        agent: &str,
        started: Instant,
        result: &Result<T, Status>,
    ) {
        self.window_calls.fetch_add(1, Ordering::Relaxed);
        self.total_calls.fetch_add(1, Ordering::Relaxed);
        let elapsed = started.elapsed();
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        let latencies = calls.entry(call).or_default();
        match result {
            Ok(_) => {
                latencies.record(elapsed);
                if elapsed > SLOW_CALL {
                    tracing::debug!(call, agent, ?elapsed, "slow call");
                }
            }
            Err(status) => {
                latencies.record_error();
                drop(calls);
                tracing::debug!(call, agent, ?elapsed, code = ?status.code(), message = status.message(), "call failed");
                self.window_errors.fetch_add(1, Ordering::Relaxed);
                self.total_errors.fetch_add(1, Ordering::Relaxed);
                self.observations
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .failures
                    .push(FailedCall {
                        call: call.to_owned(),
                        agent: agent.to_owned(),
                        code: status.code(),
                        message: status.message().chars().take(200).collect(),
                    });
            }
        }
    }

    pub fn script(&self, record: ScriptRecord) {
        self.scripts_done.fetch_add(1, Ordering::Relaxed);
        self.observations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .scripts
            .push(record);
    }

    pub fn upload(&self, record: UploadRecord) {
        self.observations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .uploads
            .push(record);
    }

    pub fn crashed(&self, agent: &str) {
        if let Some(count) = self.crashes.get(agent) {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn crashes(&self, agent: &str) -> u32 {
        self.crashes
            .get(agent)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// Latency statistics per call type.
    pub fn call_stats(&self) -> BTreeMap<String, crate::report::CallStats> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, latencies)| ((*name).to_owned(), latencies.stats()))
            .collect()
    }

    /// Everything observed so far.
    pub fn take_observations(&self) -> Observations {
        std::mem::take(
            &mut *self
                .observations
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}
