//! Which hub node a polling agent's tunnels go to.
//!
//! Servers pinned to the same thumbprint are nodes of one hub cluster: they
//! share one identity and one registry, and any of them can reach the
//! agent. The agent therefore holds a group's tunnels on ONE member at a
//! time, so that a fleet costs each cluster one set of connections rather
//! than one per node. Servers pinned to different thumbprints are
//! independent hubs and each gets its own tunnels.
//!
//! A group starts on member `sha256(agent_id) % n`, which spreads a fleet
//! evenly over the nodes, and moves to the next member (in configured
//! order, wrapping around) when the current one cannot be reached or says
//! it is going away. This module owns that choice; `polling` owns the
//! tunnels and decides when to ask for a move.

use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tentacle_proto::Thumbprint;
use tokio::sync::watch;

use super::HubEndpoint;

/// Servers sharing one pinned thumbprint: one hub, or the nodes of one
/// cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubGroup {
    pub thumbprint: Thumbprint,
    /// In configured order, each address once.
    pub members: Vec<HubEndpoint>,
}

/// Groups `hubs` by thumbprint, in the order each thumbprint first appears.
/// The same address given twice for one thumbprint is one member.
pub fn group_by_thumbprint(hubs: &[HubEndpoint]) -> Vec<HubGroup> {
    let mut groups: Vec<HubGroup> = Vec::new();
    for hub in hubs {
        match groups.iter_mut().find(|g| g.thumbprint == hub.thumbprint) {
            Some(group) => {
                if !group.members.iter().any(|m| m.address == hub.address) {
                    group.members.push(hub.clone());
                }
            }
            None => groups.push(HubGroup {
                thumbprint: hub.thumbprint,
                members: vec![hub.clone()],
            }),
        }
    }
    groups
}

/// The member an agent starts on: a stable hash of its id, so that a fleet
/// spreads evenly over a cluster's nodes and each agent comes back to the
/// same node after a restart. `members` of zero is treated as one.
pub fn first_member(agent_id: &str, members: usize) -> usize {
    let digest = Sha256::digest(agent_id.as_bytes());
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    let members = u64::try_from(members.max(1)).unwrap_or(u64::MAX);
    // The remainder is below `members`, which came from a usize.
    usize::try_from(u64::from_be_bytes(prefix) % members).unwrap_or(0)
}

/// The member after `current`, wrapping around: the failover order visits
/// every member before coming back.
pub fn next_member(current: usize, members: usize) -> usize {
    (current + 1) % members.max(1)
}

/// Where a tunnel attempt went: the member, and the placement's epoch at
/// that moment, so that reports about an old member cannot move the group
/// a second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    pub member: usize,
    pub epoch: u64,
}

/// Why a group left a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveReason {
    /// The node sent `drain`: it is going away.
    Drained,
    /// No tunnel of the group was open there and an attempt failed.
    Unreachable(String),
}

impl std::fmt::Display for MoveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Drained => f.write_str("the node is draining"),
            Self::Unreachable(error) => write!(f, "the node cannot be reached: {error}"),
        }
    }
}

/// A group leaving one member for the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub left: HubEndpoint,
    pub reason: MoveReason,
    pub trying: HubEndpoint,
}

impl Move {
    /// The one line a move is logged with.
    pub fn log(&self, agent_id: &str) {
        tracing::warn!(
            agent_id = %agent_id,
            left = %self.left.address,
            reason = %self.reason,
            trying = %self.trying.address,
            "moving this agent's tunnels to another node of the hub cluster"
        );
    }
}

#[derive(Debug)]
struct State {
    member: usize,
    epoch: u64,
    /// Tunnels of the group open on `member` in `epoch`.
    open: u32,
}

/// The member a group's tunnels are on, shared by the group's tunnel
/// tasks. Every move bumps the epoch; tunnels still on the old member see
/// that through [`Self::subscribe`] and retire.
#[derive(Debug)]
pub struct Placement {
    group: HubGroup,
    state: Mutex<State>,
    epochs: watch::Sender<u64>,
}

impl Placement {
    /// A placement for `group` starting on [`first_member`] of `agent_id`.
    pub fn new(group: HubGroup, agent_id: &str) -> Self {
        let member = first_member(agent_id, group.members.len());
        Self {
            group,
            state: Mutex::new(State {
                member,
                epoch: 0,
                open: 0,
            }),
            epochs: watch::Sender::new(0),
        }
    }

    pub fn group(&self) -> &HubGroup {
        &self.group
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic: every change is one
        // assignment under the lock.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where the next tunnel attempt goes.
    pub fn current(&self) -> Seat {
        let state = self.state();
        Seat {
            member: state.member,
            epoch: state.epoch,
        }
    }

    /// The endpoint of `seat`'s member.
    pub fn endpoint(&self, seat: Seat) -> &HubEndpoint {
        // `member` is always below the group's size, which is at least one.
        &self.group.members[seat.member % self.group.members.len()]
    }

    /// Changes whenever the group moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.epochs.subscribe()
    }

    /// Whether the group has moved since `seat` was taken.
    pub fn has_moved_from(&self, seat: Seat) -> bool {
        self.state().epoch != seat.epoch
    }

    /// Counts a tunnel open at `seat` until the guard drops: while one is,
    /// a failed attempt there does not move the group.
    pub fn opened(&self, seat: Seat) -> OpenTunnel<'_> {
        let mut state = self.state();
        if state.epoch == seat.epoch {
            state.open += 1;
        }
        OpenTunnel {
            placement: self,
            epoch: seat.epoch,
        }
    }

    /// An attempt at `seat` failed: if no tunnel of the group is open on
    /// that member and the group has not moved since, move to the next one.
    pub fn failed(&self, seat: Seat, error: &str) -> Option<Move> {
        let mut state = self.state();
        if state.open > 0 {
            return None;
        }
        self.advance(&mut state, seat, MoveReason::Unreachable(error.to_owned()))
    }

    /// The member at `seat` sent `drain`: unless the group has moved since,
    /// move to the next one now, whatever else is open there.
    pub fn drained(&self, seat: Seat) -> Option<Move> {
        let mut state = self.state();
        self.advance(&mut state, seat, MoveReason::Drained)
    }

    fn advance(&self, state: &mut State, seat: Seat, reason: MoveReason) -> Option<Move> {
        let members = self.group.members.len();
        // A group of one has nowhere to go: its tunnels redial the same
        // address (which a load balancer may send to another node).
        if state.epoch != seat.epoch || members < 2 {
            return None;
        }
        let left = self.group.members[state.member].clone();
        state.member = next_member(state.member, members);
        state.epoch += 1;
        state.open = 0;
        self.epochs.send_replace(state.epoch);
        Some(Move {
            left,
            reason,
            trying: self.group.members[state.member].clone(),
        })
    }
}

/// A tunnel counted open by [`Placement::opened`].
#[derive(Debug)]
pub struct OpenTunnel<'a> {
    placement: &'a Placement,
    epoch: u64,
}

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        let mut state = self.placement.state();
        if state.epoch == self.epoch {
            state.open = state.open.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests;
