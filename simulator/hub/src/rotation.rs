//! Certificate rotations: the approval policy a hub applies to them, the
//! rotations waiting for an operator (`rotations.toml` in the hub's home),
//! and the audit event every rotation leaves.
//!
//! Every rotation's outcome is one structured log line (target
//! `tentacle_hub::audit`, naming the agent and both thumbprints) and one
//! increment of `tentacle_hub_certificate_rotations_total{outcome}`, through
//! [`audit`] only, so a rotation cannot happen unrecorded.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tentacle_proto::Thumbprint;

use crate::hub::RotateError;
use crate::store_file::{self, StoreLock};
use crate::trust::TrustedAgent;

/// What besides the current certificate and the proof of possession of the
/// new key a rotation needs before the hub trusts the new certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RotationApproval {
    /// Nothing: the agent's current certificate vouches for the new one.
    /// The default, so fleets that rotate unattended keep doing so; a stolen
    /// current key is already as good as the agent, and the proof keeps it
    /// from naming a key it does not hold.
    #[default]
    None,
    /// The request must also carry a valid hub API key: a stolen
    /// certificate alone cannot rotate itself into a new one.
    ApiKey,
    /// The rotation waits until an operator runs `tentacle-hub server
    /// rotations approve`.
    Operator,
}

/// A policy name that is none of `none`, `api-key`, `operator`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a rotation approval policy: use none, api-key or operator")]
pub struct ParseApprovalError(String);

impl FromStr for RotationApproval {
    type Err = ParseApprovalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "none" => Ok(Self::None),
            "api-key" => Ok(Self::ApiKey),
            "operator" => Ok(Self::Operator),
            other => Err(ParseApprovalError(other.to_owned())),
        }
    }
}

impl fmt::Display for RotationApproval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::ApiKey => "api-key",
            Self::Operator => "operator",
        })
    }
}

/// What happened to a rotation, as audit events and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationOutcome {
    /// The new certificate is trusted beside the old one.
    Announced,
    /// Recorded, waiting for an operator.
    Pending,
    /// An operator approved a pending rotation; the new certificate is
    /// trusted.
    Approved,
    /// Refused (no proof, bad credential, name clash...).
    Refused,
    /// The old certificate's overlap ended; it is no longer trusted.
    Retired,
}

impl RotationOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Announced => "announced",
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Refused => "refused",
            Self::Retired => "retired",
        }
    }
}

/// Records one rotation event: a log line at INFO (WARN when refused) and
/// the outcome's counter. `detail` says why, for refusals.
pub fn audit(
    outcome: RotationOutcome,
    agent: &str,
    old: &Thumbprint,
    new: &Thumbprint,
    detail: &str,
) {
    tentacle_proto::metrics::METRICS.certificate_rotation(outcome.as_str());
    let outcome = outcome.as_str();
    if outcome == RotationOutcome::Refused.as_str() {
        tracing::warn!(target: AUDIT_TARGET, event = "certificate_rotation", outcome, %agent, %old, %new, %detail, "certificate rotation refused");
    } else {
        tracing::info!(target: AUDIT_TARGET, event = "certificate_rotation", outcome, %agent, %old, %new, %detail, "certificate rotation {outcome}");
    }
}

/// The `tracing` target of audit events, for filters and log shippers.
pub const AUDIT_TARGET: &str = "tentacle_hub::audit";

/// A rotation an operator has yet to approve (or has approved and the hub
/// has yet to apply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingRotation {
    pub agent: String,
    pub current: Thumbprint,
    pub new: Thumbprint,
    pub overlap_seconds: u64,
    /// Unix seconds.
    pub requested_unix: u64,
    #[serde(default)]
    pub approved: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PendingFile {
    #[serde(default, rename = "rotation")]
    rotations: Vec<PendingRotation>,
}

/// Why the pending rotations could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error("could not read or write {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error(
        "no pending rotation matches `{0}`; `tentacle-hub server rotations list` shows them by agent and thumbprint"
    )]
    NoMatch(String),
    #[error(transparent)]
    Shared(crate::store::StoreError),
}

/// `rotations.toml`: pending rotations, at most one per agent. The hub
/// writes requests; `tentacle-hub server rotations approve` marks one
/// approved; the hub applies approved ones on its next registry check and
/// removes them. Every read-modify-write holds this process's mutex and the
/// file's [`StoreLock`], since the hub and the CLI are different processes.
#[derive(Debug)]
pub struct PendingRotationFile {
    path: PathBuf,
    lock: Mutex<()>,
    file_lock: StoreLock,
}

impl PendingRotationFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            file_lock: StoreLock::beside(&path, store_file::DEFAULT_LOCK_TIMEOUT),
            path,
            lock: Mutex::new(()),
        }
    }

    /// Waits up to `timeout` for another process's write.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.file_lock = StoreLock::beside(&self.path, timeout);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, message: impl fmt::Display) -> PendingError {
        PendingError::Store {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Every rotation waiting, in the order requested.
    pub fn load(&self) -> Result<Vec<PendingRotation>, PendingError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str::<PendingFile>(&text)
                .map(|f| f.rotations)
                .map_err(|e| self.error(e.message())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.error(e)),
        }
    }

    fn save(&self, rotations: Vec<PendingRotation>) -> Result<(), PendingError> {
        let text = toml::to_string_pretty(&PendingFile { rotations }).map_err(|e| self.error(e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.error(e))?;
        }
        store_file::replace(&self.path, text.as_bytes(), 0o600).map_err(|e| self.error(e))
    }

    fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<PendingRotation>) -> Result<T, PendingError>,
    ) -> Result<T, PendingError> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _processes = self.file_lock.acquire().map_err(|e| self.error(e))?;
        let mut rotations = self.load()?;
        let before = rotations.clone();
        let outcome = change(&mut rotations)?;
        if rotations != before {
            self.save(rotations)?;
        }
        Ok(outcome)
    }

    /// Records `rotation`, replacing any earlier one of its agent: the
    /// agent's latest announcement is the one an operator approves. An
    /// approval of the same new certificate is kept.
    pub fn request(&self, rotation: PendingRotation) -> Result<(), PendingError> {
        self.update(|rotations| {
            let rotation = merge_request(
                rotations.iter().find(|r| r.agent == rotation.agent),
                rotation,
            );
            rotations.retain(|r| r.agent != rotation.agent);
            rotations.push(rotation);
            Ok(())
        })
    }

    /// Marks the rotation of the agent named `selector`, or with
    /// `selector` as its current or new thumbprint, approved.
    pub fn approve(&self, selector: &str) -> Result<PendingRotation, PendingError> {
        self.update(|rotations| {
            let found = rotations
                .iter_mut()
                .find(|r| selects(selector, r))
                .ok_or_else(|| PendingError::NoMatch(selector.trim().to_owned()))?;
            found.approved = true;
            Ok(found.clone())
        })
    }

    /// Removes and returns the approved rotations.
    pub fn take_approved(&self) -> Result<Vec<PendingRotation>, PendingError> {
        self.update(|rotations| {
            let (approved, waiting) = std::mem::take(rotations)
                .into_iter()
                .partition(|r| r.approved);
            *rotations = waiting;
            Ok(approved)
        })
    }
}

/// The rule of a rotation, for any store: trusts `new` for the agent in
/// `agents` holding `current`, keeping `current` until `overlap` after
/// `now`. `agents` must hold every entry with `current` or `new`. Returns
/// when `current` retires (Unix seconds).
pub fn rotate_in(
    agents: &mut [TrustedAgent],
    current: &Thumbprint,
    new: Thumbprint,
    overlap: Duration,
    now: u64,
) -> Result<u64, RotateError> {
    if agents
        .iter()
        .any(|a| a.has_thumbprint(&new) && !a.has_thumbprint(current))
    {
        return Err(RotateError::ThumbprintInUse(new));
    }
    let agent = agents
        .iter_mut()
        .find(|a| a.has_thumbprint(current))
        .ok_or(RotateError::NotRegistered(*current))?;
    if agent.thumbprint == new {
        // Announced twice: nothing changes.
        return Ok(agent.retire_previous_at.unwrap_or(now));
    }
    if agent.thumbprint != *current {
        return Err(RotateError::AlreadyRotating(*current));
    }
    let retire_at = now.saturating_add(overlap.as_secs());
    agent.previous_thumbprint = Some(agent.thumbprint);
    agent.thumbprint = new;
    agent.retire_previous_at = Some(retire_at);
    Ok(retire_at)
}

/// The end of a rotation's overlap, for any store: drops `retired` from
/// `expected`'s entry if the entry is still exactly `expected`. Returns
/// whether it changed anything.
pub fn retire_in(
    agents: &mut [TrustedAgent],
    expected: &TrustedAgent,
    retired: &Thumbprint,
) -> bool {
    let Some(agent) = agents.iter_mut().find(|a| *a == expected) else {
        return false;
    };
    if agent.previous_thumbprint.as_ref() != Some(retired) {
        return false;
    }
    agent.previous_thumbprint = None;
    agent.retire_previous_at = None;
    true
}

/// A new announcement of `rotation`'s agent, given the one waiting
/// (`old`): the latest announcement is the one an operator approves, and
/// an approval of the same new certificate is kept.
pub fn merge_request(
    old: Option<&PendingRotation>,
    mut rotation: PendingRotation,
) -> PendingRotation {
    if let Some(old) = old {
        rotation.approved = old.approved && old.new == rotation.new;
        if old.new == rotation.new {
            rotation.requested_unix = old.requested_unix;
        }
    }
    rotation
}

/// Whether an operator's `selector` (an agent's name, or its current or
/// new thumbprint) picks `rotation`.
pub fn selects(selector: &str, rotation: &PendingRotation) -> bool {
    let selector = selector.trim();
    rotation.agent == selector
        || selector
            .parse::<Thumbprint>()
            .is_ok_and(|t| t == rotation.current || t == rotation.new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(agent: &str, new: &str) -> PendingRotation {
        PendingRotation {
            agent: agent.into(),
            current: Thumbprint::of_der(agent.as_bytes()),
            new: Thumbprint::of_der(new.as_bytes()),
            overlap_seconds: 60,
            requested_unix: 1,
            approved: false,
        }
    }

    /// The hub and `rotations approve` are different processes; handles of
    /// their own stand in for them here.
    #[test]
    fn writers_with_their_own_handles_lose_no_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rotations.toml");
        std::thread::scope(|scope| {
            for writer in 0..8 {
                let path = path.clone();
                scope.spawn(move || {
                    let file = PendingRotationFile::new(path);
                    for n in 0..10 {
                        file.request(pending(&format!("agent-{writer}-{n}"), "new"))
                            .expect("request");
                    }
                });
            }
        });
        let rotations = PendingRotationFile::new(&path).load().expect("load");
        assert_eq!(rotations.len(), 80, "every request is kept");
        let lock = dir.path().join("rotations.toml.lock");
        assert!(lock.exists(), "writes took the file lock beside it");
    }

    #[test]
    fn policies_parse_by_name_and_the_default_is_none() {
        assert_eq!(RotationApproval::default(), RotationApproval::None);
        for policy in [
            RotationApproval::None,
            RotationApproval::ApiKey,
            RotationApproval::Operator,
        ] {
            assert_eq!(
                policy.to_string().parse::<RotationApproval>().ok(),
                Some(policy)
            );
        }
        let error = "maybe".parse::<RotationApproval>().expect_err("bad");
        assert!(
            error.to_string().contains("none, api-key or operator"),
            "{error}"
        );
    }

    #[test]
    fn an_approval_by_agent_or_thumbprint_is_taken_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = PendingRotationFile::new(dir.path().join("rotations.toml"));
        file.request(pending("web-01", "new-1")).expect("request");
        file.request(pending("web-02", "new-2")).expect("request");
        // A second announcement replaces the first.
        file.request(pending("web-01", "newer-1")).expect("request");
        assert_eq!(file.load().expect("load").len(), 2);
        assert!(matches!(
            file.approve("web-03"),
            Err(PendingError::NoMatch(_))
        ));
        let approved = file.approve("web-01").expect("approve");
        assert_eq!(approved.new, Thumbprint::of_der(b"newer-1"));
        let by_thumbprint = Thumbprint::of_der(b"new-2").to_string();
        file.approve(&by_thumbprint).expect("approve by thumbprint");
        // Announcing the approved certificate again keeps the approval.
        file.request(pending("web-01", "newer-1")).expect("request");
        let taken = file.take_approved().expect("take");
        assert_eq!(taken.len(), 2);
        assert!(file.load().expect("load").is_empty());
        assert!(file.take_approved().expect("take").is_empty());
    }
}
