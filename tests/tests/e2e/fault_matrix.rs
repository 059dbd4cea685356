//! The fault matrix: every core flow, in both modes, with a network fault
//! injected at each RPC stage, on one agent (and hub) per mode that must
//! recover from every cell without a restart.
//!
//! - **Flows:** start, watch, cancel, complete, upload, download,
//!   capabilities, deploy.
//! - **Modes:** listening (the caller dials the agent through the fault
//!   proxy) and polling (the agent's tunnel to the hub runs through it).
//! - **Stages:** *connecting*: the fault is set and every connection is cut,
//!   so the call needs a new connection made through the fault; *in flight*:
//!   the fault hits an established connection while the call is under way
//!   (mid-stream for streaming calls, right after the connection was last
//!   used for unary ones).
//! - **Faults:** those of [`tentacle_tests::fault_proxy::Fault`].
//!
//! Each cell holds the fault for a window, then clears it, and asserts:
//! - the faulted call succeeded, or failed with a status that says why,
//!   within its deadline;
//! - after the fault, the flow completes: no script ran twice, every log
//!   line was seen exactly once in sequence, and files arrive whole;
//! - the same agent process (and in polling mode the same hub) serves
//!   the next cell.
//!
//! CI runs the quick tier: every fault in every mode at both stages, the
//! flows taking turns (24 cells). `TENTACLE_FULL_MATRIX=1` (set by
//! `tests/run.sh --full`) runs every cell (192) with longer windows.

mod cell;
mod flows;
mod rig;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tentacle_tests::Mode;
use tentacle_tests::fault_proxy::Fault;

use cell::{Outcome, run_cell};
use rig::Rig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Start,
    Watch,
    Cancel,
    Complete,
    Upload,
    Download,
    Capabilities,
    Deploy,
}

const FLOWS: [Flow; 8] = [
    Flow::Start,
    Flow::Watch,
    Flow::Cancel,
    Flow::Complete,
    Flow::Upload,
    Flow::Download,
    Flow::Capabilities,
    Flow::Deploy,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    InFlight,
}

fn faults() -> [Fault; 6] {
    [
        Fault::Pause,
        Fault::Kill,
        Fault::Refuse,
        Fault::Delay(Duration::from_millis(300)),
        // Longer than a TLS record header, shorter than most records.
        Fault::HoldBack(40),
        Fault::Bandwidth(128 * 1024),
    ]
}

/// How long each cell holds its fault, and the deadlines of its calls.
#[derive(Debug, Clone, Copy)]
struct Tier {
    name: &'static str,
    window: Duration,
    /// Unary calls, and the connect timeout of a new connection.
    unary_deadline: Duration,
    /// A streaming call (watch, upload, download) or a whole deploy.
    stream_deadline: Duration,
    full: bool,
}

impl Tier {
    fn from_env() -> Self {
        if std::env::var_os("TENTACLE_FULL_MATRIX").is_some_and(|v| v != "0") {
            Self {
                name: "full",
                window: Duration::from_secs(4),
                unary_deadline: Duration::from_secs(3),
                stream_deadline: Duration::from_secs(30),
                full: true,
            }
        } else {
            Self {
                name: "quick",
                window: Duration::from_secs(2),
                unary_deadline: Duration::from_secs(2),
                stream_deadline: Duration::from_secs(20),
                full: false,
            }
        }
    }

    /// The cells this tier runs in one mode.
    fn cells(&self, mode: Mode) -> Vec<(Flow, Stage, Fault)> {
        let mut cells = Vec::new();
        let mut turn = if mode == Mode::Polling { 4 } else { 0 };
        for fault in faults() {
            for stage in [Stage::Connecting, Stage::InFlight] {
                if self.full {
                    cells.extend(FLOWS.iter().map(|&flow| (flow, stage, fault)));
                } else {
                    cells.push((FLOWS[turn % FLOWS.len()], stage, fault));
                    turn += 1;
                }
            }
        }
        cells
    }
}

async fn matrix(mode: Mode) {
    let tier = Tier::from_env();
    let mut rig = Rig::start(mode, tier).await;
    let pid = rig.agent.pid();
    let cells = tier.cells(mode);
    let started = Instant::now();
    let mut succeeded = 0;
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines = Vec::new();
    for (index, &(flow, stage, fault)) in cells.iter().enumerate() {
        let cell_started = Instant::now();
        let outcome = run_cell(&mut rig, index, flow, stage, fault).await;
        let result = match &outcome {
            Outcome::Succeeded => {
                succeeded += 1;
                "succeeded".to_owned()
            }
            Outcome::Failed(reason) => {
                let code = reason.split(':').next().unwrap_or(reason).to_owned();
                *failed.entry(code).or_default() += 1;
                format!("failed cleanly ({reason})")
            }
        };
        let line = format!(
            "  {:?} {:<12} {:<10} {:<9} {result} in {:.1} s",
            mode,
            format!("{flow:?}"),
            format!("{stage:?}"),
            fault.name(),
            cell_started.elapsed().as_secs_f64()
        );
        // Straight to the stream as each cell ends: libtest captures
        // eprintln! of passing tests, and a stuck cell should be findable.
        let _ = writeln!(std::io::stderr(), "fault matrix cell{line}");
        lines.push(line);
    }
    assert_eq!(rig.agent.pid(), pid, "the agent was restarted");
    let summary = format!(
        "fault matrix ({} tier, {mode:?}): {} cells, {} faults, {} flows, 2 stages: all passed; \
         {succeeded} calls succeeded under their fault, {} failed cleanly {failed:?}; \
         {} connections through the proxy; {:.0} s",
        tier.name,
        cells.len(),
        faults().len(),
        cells
            .iter()
            .map(|c| format!("{:?}", c.0))
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        cells.len() - succeeded,
        rig.proxy.accepted(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(std::io::stderr(), "{summary}");
    record_summary(&summary, &lines);
    drop(rig.scratch);
}

/// Appends the summary where `tests/run.sh` prints it after the suite.
fn record_summary(summary: &str, lines: &[String]) {
    let Some(path) = std::env::var_os("TENTACLE_FAULT_MATRIX_SUMMARY") else {
        return;
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(&path))
        .expect("summary file");
    writeln!(file, "{summary}").expect("write summary");
    for line in lines {
        writeln!(file, "{line}").expect("write summary");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_flow_recovers_from_every_fault_listening() {
    matrix(Mode::Listening).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_flow_recovers_from_every_fault_polling() {
    matrix(Mode::Polling).await;
}
