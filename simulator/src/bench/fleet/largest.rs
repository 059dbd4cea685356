//! Row 14: the largest fleet one hub process holds on this machine, and
//! what runs out first. A process may hold only so many files (the hard
//! limit here is typically 20,000, and cannot be raised), so the fleet is
//! split over several `tentacle-sim fleet` processes of [`STEP`] agents,
//! added one at a time until the count stops rising, something exits, or
//! the time bound is up.

use std::path::Path;
use std::time::{Duration, Instant};

use super::child::Group;
use super::hub::{Bounds, HubHome};
use super::{LARGEST, Rows, parse, start_fleet};
use crate::bench::processes::ProcessError;

/// Agents per fleet process.
pub const STEP: usize = 5_000;
/// The whole row's time bound.
const BUDGET: Duration = Duration::from_secs(180);
/// A step ends once the count has not risen for this long.
const STALL: Duration = Duration::from_secs(20);
/// At most this many fleet processes.
const MOST_FLEETS: usize = 8;
/// Open files a hub holds besides its agents' (listeners, logs, the
/// runtime); within this of its limit it has run out.
const FD_MARGIN: u64 = 100;

const GB: f64 = 1_000_000_000.0;

pub fn row(rows: &mut Rows, dir: &Path) {
    match measure(rows, &dir.join("largest")) {
        Ok((most, measure)) => rows.measured(LARGEST, measure, most as f64),
        Err(error) => rows.skip(&[LARGEST], &error.to_string()),
    }
}

fn measure(rows: &Rows, dir: &Path) -> Result<(u64, String), ProcessError> {
    let hub_binary = rows.binary("tentacle-hub")?;
    let sim = rows.binary("tentacle-sim")?;
    let home = HubHome::create(&hub_binary, &dir.join("hub"))?;
    let mut hub = home.start(&dir.join("hub.log"))?;
    let began = Instant::now();
    let mut fleets: Vec<Group> = Vec::new();
    let mut most = 0;
    let mut files_peak = None;
    let mut rss_at_most = None;
    let mut stopped = format!("all {} fleets connected", MOST_FLEETS);
    while fleets.len() < MOST_FLEETS {
        if began.elapsed() >= BUDGET {
            stopped = format!("the {} s bound", BUDGET.as_secs());
            break;
        }
        let prefix = format!("big{}", fleets.len());
        fleets.push(start_fleet(&sim, &home, STEP, &prefix, dir)?);
        let target = (fleets.len() * STEP) as u64;
        let mut others: Vec<&mut Group> = fleets.iter_mut().collect();
        let bounds = Bounds {
            timeout: BUDGET,
            stall: Some(STALL),
            track_hub: true,
        };
        let watch = hub.watch(&mut others, target, began, bounds);
        files_peak = files_peak.max(watch.hub_files_peak);
        if watch.most() > most {
            most = watch.most();
            rss_at_most = watch.hub_rss_at_most;
        }
        if watch.reached.is_none() {
            stopped = watch.ended.unwrap_or_default();
            break;
        }
    }
    let seconds = began.elapsed().as_secs_f64();

    // The hub's peak, and the rest now (a fleet that failed has exited).
    let hub_alive = hub.process.exited().is_none();
    let fds = files_peak;
    let limit = hub.process.open_file_limit();
    let hub_rss = rss_at_most;
    let fleets_rss: u64 = fleets.iter().filter_map(Group::rss_kib).sum();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = parse::kib_field(&meminfo, "MemAvailable");
    let total = parse::kib_field(&meminfo, "MemTotal");
    let emfile = |group: &Group| {
        group.log_contains("Too many open files") || group.log_contains("os error 24")
    };
    let hub_emfile = emfile(&hub.process);
    let fleet_emfile = fleets.iter().any(emfile);
    let hub_at_limit =
        matches!((fds, limit), (Some(fds), Some(limit)) if fds as u64 + FD_MARGIN >= limit);
    let memory_low = matches!((available, total), (Some(a), Some(t)) if a * 20 < t);

    let ran_out = if hub_emfile || hub_at_limit {
        "file descriptors, in the hub".to_owned()
    } else if fleet_emfile {
        "file descriptors, in a fleet process".to_owned()
    } else if memory_low {
        "memory".to_owned()
    } else if !hub_alive {
        "nothing recognised: the hub exited".to_owned()
    } else {
        "nothing seen".to_owned()
    };
    let gb =
        |kib: Option<u64>| kib.map_or("?".to_owned(), |k| format!("{:.2}", k as f64 * 1024.0 / GB));
    let show = |n: Option<u64>| n.map_or("?".to_owned(), |n| n.to_string());
    let measure = format!(
        "{}; ran out first: {ran_out}; stopped by: {stopped}, after {seconds:.0} s with {} fleet process(es); hub at its peak: {} open files of {}, VmRSS {} GB; at the end: fleets' VmRSS {} GB, machine MemAvailable {} of {} GB",
        super::describe(LARGEST, 0),
        fleets.len(),
        show(fds.map(|f| f as u64)),
        show(limit),
        gb(hub_rss),
        gb(Some(fleets_rss)),
        gb(available),
        gb(total),
    );
    Ok((most, measure))
}
