//! Exit codes the agent reports itself instead of a script's own, shared by
//! the agent (which sets them) and every caller (which explains them).
//! `ReservedExitCode` in `tentacle/v1/scripts.proto` is the contract.

use crate::v1::ReservedExitCode;

/// The agent could not run the script.
pub const FATAL: i32 = ReservedExitCode::ExitCodeFatal as i32;
/// The script was cancelled.
pub const CANCELED: i32 = ReservedExitCode::ExitCodeCanceled as i32;
/// The script, or its wait for an isolation mutex, timed out.
pub const TIMED_OUT: i32 = ReservedExitCode::ExitCodeTimedOut as i32;
/// The agent does not know the ticket.
pub const UNKNOWN_TICKET: i32 = ReservedExitCode::ExitCodeUnknownTicket as i32;
/// The agent restarted before the script finished.
pub const AGENT_RESTARTED: i32 = ReservedExitCode::ExitCodeAgentRestarted as i32;
