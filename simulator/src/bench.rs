//! `tentacle-sim bench`: Tentacle measured beside what a user would
//! otherwise use on the same machine, in the same run: OpenSSH, the disk's
//! own fsynced write rate, and a raw rustls copy. It prints a table and
//! writes JSON in a stable schema ([`SCHEMA`]); it asserts nothing about
//! speed.
//!
//! Every row runs in rounds; a ratio is the median of per-round ratios
//! whose two sides ran back to back in alternating order (see
//! [`stats::alternate`]), with the spread beside it.

pub mod baselines;
pub mod calls;
pub mod etcd;
pub mod fleet;
pub mod local;
pub mod nodes;
pub mod processes;
pub mod sshd;
pub mod stats;
pub mod unary_peer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use stats::{Ratio, median};

/// The JSON schema's name and version; bump the version on any change that
/// could break a reader.
pub const SCHEMA: &str = "tentacle-bench/1";

/// What a bench run measures and how hard.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Rounds per row.
    pub rounds: usize,
    /// Bytes for the bulk rows (disk, copies, uploads).
    pub bulk_bytes: u64,
    /// Calls per round for the small-command rows (a new process each).
    pub calls: usize,
    /// Sequential small gRPC calls per round for the latency rows.
    pub small_calls: usize,
    /// Polling agents in the fleet rows.
    pub fleet_agents: usize,
    /// Whether `fleet-largest` runs without being named by `--only` (it
    /// grows a fleet until the hub runs out of something: minutes).
    pub largest: bool,
    /// Only the row with this name.
    pub only: Option<String>,
    /// Where files and the peer's keys go (on the filesystem being measured).
    pub dir: PathBuf,
}

impl Settings {
    /// The full bench: 1 GiB bulk rows, 5 rounds.
    pub fn full(dir: PathBuf) -> Self {
        Self {
            rounds: 5,
            bulk_bytes: 1 << 30,
            calls: 10,
            small_calls: 2000,
            fleet_agents: 10_000,
            largest: true,
            only: None,
            dir,
        }
    }

    /// Refuses an `--only` that names no row.
    pub fn check(&self) -> Result<(), BenchError> {
        match &self.only {
            Some(only) if !all_rows().any(|row| row == only) => {
                Err(BenchError::UnknownRow(only.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Whether the row `name` runs (all do without `--only`).
    pub fn wants(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == name)
    }

    /// `--quick`: small sizes and two rounds, so CI keeps the bench working.
    pub fn quick(dir: PathBuf) -> Self {
        Self {
            rounds: 2,
            bulk_bytes: 16 << 20,
            calls: 3,
            small_calls: 200,
            fleet_agents: 200,
            largest: false,
            only: None,
            dir,
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub measure: String,
    pub unit: &'static str,
    /// The median over rounds; `None` when skipped.
    pub value: Option<f64>,
    /// What `value` is compared with, when the row has a peer.
    pub peer: Option<Peer>,
    /// The per-round ratio, as `ratio_is` defines it.
    pub ratio: Option<Ratio>,
    /// What the ratio divides, e.g. "ssh-exec-master / exec" (how many
    /// times faster Tentacle is).
    pub ratio_is: Option<&'static str>,
    /// Why the row did not run.
    pub skipped: Option<String>,
    /// The goal for `ratio` (or for `value` when the row has no peer), as
    /// the performance targets state it, e.g. "<= 1.10".
    pub target: Option<&'static str>,
    /// Further comparisons measured in the same rounds, e.g. an upload
    /// against the disk's own fsynced write rate.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<Also>,
}

/// A second comparison of a row, measured in the same rounds as its value.
#[derive(Debug, Clone, Serialize)]
pub struct Also {
    pub peer: Peer,
    pub ratio: Option<Ratio>,
    pub ratio_is: &'static str,
    pub target: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub name: String,
    pub value: f64,
}

/// The whole run, as the JSON file holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub quick: bool,
    pub machine: Machine,
    pub rows: Vec<Row>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub os: String,
    pub version: &'static str,
}

impl Machine {
    fn here() -> Self {
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            os: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// The rows of this module, in the order the bench runs them; the call
/// rows follow ([`calls::ROWS`]), then those across hub nodes
/// ([`nodes::ROWS`]) and the fleet's.
pub const ROWS: [&str; 6] = [
    "disk-fsync",
    "rustls-copy",
    "ssh-exec",
    "ssh-exec-master",
    "scp-upload",
    "exec",
];

/// Every row `--only` accepts, in the order the bench runs them.
pub fn all_rows() -> impl Iterator<Item = &'static str> {
    ROWS.into_iter()
        .chain(calls::ROWS)
        .chain(nodes::ROWS)
        .chain(fleet::ROWS)
}

/// Why a bench run stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("no row is named `{0}`; the rows are: {rows}", rows = all_rows().collect::<Vec<_>>().join(", "))]
    UnknownRow(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn skipped(name: &'static str, measure: &str, unit: &'static str, why: String) -> Row {
    Row {
        name,
        measure: measure.to_owned(),
        unit,
        value: None,
        peer: None,
        ratio: None,
        ratio_is: None,
        skipped: Some(why),
        target: None,
        also: Vec::new(),
    }
}

pub(crate) fn measured(
    name: &'static str,
    measure: &str,
    unit: &'static str,
    samples: &[f64],
) -> Row {
    Row {
        name,
        measure: measure.to_owned(),
        unit,
        value: median(samples),
        peer: None,
        ratio: None,
        ratio_is: None,
        skipped: None,
        target: None,
        also: Vec::new(),
    }
}

pub(crate) const MB: f64 = 1_000_000.0;

/// Runs the rows `settings` selects, printing each as it finishes.
pub async fn run(settings: &Settings, quick: bool) -> Result<Report, BenchError> {
    settings.check()?;
    let wanted = |name: &str| settings.wants(name);
    std::fs::create_dir_all(&settings.dir).map_err(|source| BenchError::Io {
        what: format!("creating {}", settings.dir.display()),
        source,
    })?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let size = format!("{} MiB", settings.bulk_bytes >> 20);

    if wanted("disk-fsync") {
        let measure = format!("write {size} and fsync (dd bs=1M conv=fsync)");
        let mut samples = Vec::new();
        let mut failure = None;
        for _ in 0..settings.rounds {
            match baselines::disk_fsync(&settings.dir, settings.bulk_bytes) {
                Ok(rate) => samples.push(rate / MB),
                Err(error) => {
                    failure = Some(format!("writing to {}: {error}", settings.dir.display()));
                    break;
                }
            }
        }
        rows.push(match failure {
            Some(why) => skipped("disk-fsync", &measure, "MB/s", why),
            None => measured("disk-fsync", &measure, "MB/s", &samples),
        });
        print_row(rows.last().expect("a row"));
    }

    if wanted("rustls-copy") {
        let measure = format!("copy {size} over loopback TLS (rustls, pinned, no gRPC)");
        let mut samples = Vec::new();
        let mut failure = None;
        for _ in 0..settings.rounds {
            match baselines::rustls_copy(settings.bulk_bytes).await {
                Ok(rate) => samples.push(rate / MB),
                Err(error) => {
                    failure = Some(error.to_string());
                    break;
                }
            }
        }
        rows.push(match failure {
            Some(why) => skipped("rustls-copy", &measure, "MB/s", why),
            None => measured("rustls-copy", &measure, "MB/s", &samples),
        });
        print_row(rows.last().expect("a row"));
    }

    let ssh_rows = ["ssh-exec", "ssh-exec-master", "scp-upload", "exec"];
    if ssh_rows.iter().any(|name| wanted(name)) {
        let settings = settings.clone();
        let names: Vec<&'static str> = ssh_rows
            .into_iter()
            .filter(|name| settings.wants(name))
            .collect();
        let ssh = tokio::task::spawn_blocking(move || {
            ssh_rows_blocking(&settings.dir, &settings, &names)
        })
        .await
        .map_err(|error| BenchError::Io {
            what: "the SSH rows".to_owned(),
            source: std::io::Error::other(error),
        })?;
        for row in ssh {
            print_row(&row);
            rows.push(row);
        }
    }

    rows.extend(calls::rows(settings).await);
    rows.extend(nodes::rows(settings).await);

    let fleet_names: Vec<&'static str> = fleet::ROWS
        .into_iter()
        .filter(|name| wanted(name))
        .filter(|name| *name != fleet::LARGEST || settings.largest || settings.only.is_some())
        .collect();
    if !fleet_names.is_empty() {
        let (dir, agents) = (settings.dir.clone(), settings.fleet_agents);
        let fleet =
            tokio::task::spawn_blocking(move || fleet::fleet_rows(&dir, agents, &fleet_names))
                .await
                .map_err(|error| BenchError::Io {
                    what: "the fleet rows".to_owned(),
                    source: std::io::Error::other(error),
                })?;
        for row in fleet {
            print_row(&row);
            rows.push(row);
        }
    }

    Ok(Report {
        schema: SCHEMA,
        quick,
        machine: Machine::here(),
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `ssh` and `scp` against a private sshd; every row is skipped, with the
/// reason, when sshd cannot start.
fn ssh_rows_blocking(dir: &Path, settings: &Settings, names: &[&'static str]) -> Vec<Row> {
    let exec_measure = format!(
        "`ssh host 'echo hi'`, a new connection each time ({} calls a round)",
        settings.calls
    );
    let master_measure = format!(
        "`ssh host 'echo hi'` over an open ControlMaster connection ({} calls a round)",
        settings.calls
    );
    let scp_measure = format!(
        "`scp` of {} MiB to the same filesystem",
        settings.bulk_bytes >> 20
    );
    let tentacle_measure = format!(
        "`tentacle-hub exec --script 'echo hi'` to a listening agent, a new process and connection each time ({} calls a round)",
        settings.calls
    );
    let describe = |name: &'static str| match name {
        "ssh-exec" => (exec_measure.as_str(), "ms"),
        "ssh-exec-master" => (master_measure.as_str(), "ms"),
        "exec" => (tentacle_measure.as_str(), "ms"),
        _ => (scp_measure.as_str(), "MB/s"),
    };
    let all_skipped = |why: String| -> Vec<Row> {
        names
            .iter()
            .map(|name| {
                let (measure, unit) = describe(name);
                skipped(name, measure, unit, why.clone())
            })
            .collect()
    };
    let mut sshd = match sshd::Sshd::start(&dir.join("sshd")) {
        Ok(sshd) => sshd,
        Err(error) => {
            let why = error.to_string();
            let mut rows = all_skipped(why.clone());
            // Tentacle's own row still runs, without its peer.
            if let Some(row) = rows.iter_mut().find(|row| row.name == "exec") {
                *row = exec_row(dir, settings, None, row.measure.clone(), Some(why));
            }
            return rows;
        }
    };
    let mut rows = Vec::new();
    for name in names {
        let (measure, unit) = describe(name);
        if *name == "exec" {
            let peer = match sshd.open_master() {
                Ok(()) => Some(&sshd),
                Err(_) => None,
            };
            rows.push(exec_row(dir, settings, peer, measure.to_owned(), None));
            continue;
        }
        let result = match *name {
            "ssh-exec" | "ssh-exec-master" => {
                let shared = *name == "ssh-exec-master";
                if shared && let Err(error) = sshd.open_master() {
                    rows.push(skipped(name, measure, unit, error.to_string()));
                    continue;
                }
                time_calls(settings, || sshd.exec("echo hi", shared).map(drop))
            }
            _ => scp_rate(&sshd, dir, settings),
        };
        rows.push(match result {
            Ok(samples) => measured(name, measure, unit, &samples),
            Err(error) => skipped(name, measure, unit, error.to_string()),
        });
    }
    rows
}

/// Row 4: Tentacle's `exec` against `ssh` over an open ControlMaster
/// connection, in alternating rounds; the ratio is how many times faster
/// Tentacle is. Without `peer`, Tentacle is measured alone and the row says
/// why the peer is missing.
fn exec_row(
    dir: &Path,
    settings: &Settings,
    peer: Option<&sshd::Sshd>,
    measure: String,
    peer_missing: Option<String>,
) -> Row {
    let mut row = Row {
        name: "exec",
        measure,
        unit: "ms",
        value: None,
        peer: None,
        ratio: None,
        ratio_is: None,
        skipped: None,
        target: Some(">= 10"),
        also: Vec::new(),
    };
    let agent = match processes::ListeningAgent::start(&dir.join("tentacle")) {
        Ok(agent) => agent,
        Err(error) => {
            row.skipped = Some(error.to_string());
            return row;
        }
    };
    let ours = || mean_ms(settings.calls, || agent.exec("echo hi").map(drop));
    let result = match peer {
        Some(sshd) => stats::alternate(settings.rounds, ours, || {
            mean_ms(settings.calls, || {
                sshd.exec("echo hi", true)
                    .map(drop)
                    .map_err(|e| processes::ProcessError::Failed {
                        command: "ssh".to_owned(),
                        detail: e.to_string(),
                    })
            })
        }),
        None => (0..settings.rounds)
            .map(|_| ours().map(|x| (x, f64::NAN)))
            .collect(),
    };
    match result {
        Ok(pairs) => {
            let ours: Vec<f64> = pairs.iter().map(|p| p.0).collect();
            row.value = median(&ours);
            if peer.is_some() {
                let theirs: Vec<f64> = pairs.iter().map(|p| p.1).collect();
                row.peer = median(&theirs).map(|value| Peer {
                    name: "ssh with a ControlMaster connection open".to_owned(),
                    value,
                });
                let inverted: Vec<(f64, f64)> = pairs.iter().map(|(a, b)| (*b, *a)).collect();
                row.ratio = Ratio::of(&inverted);
                row.ratio_is = Some("ssh-exec-master / exec (times faster)");
            } else if let Some(why) = peer_missing {
                row.measure = format!("{} (no peer: {why})", row.measure);
            }
        }
        Err(error) => row.skipped = Some(error.to_string()),
    }
    row
}

/// The mean milliseconds of `calls` calls.
fn mean_ms<E>(calls: usize, mut call: impl FnMut() -> Result<(), E>) -> Result<f64, E> {
    let started = Instant::now();
    for _ in 0..calls {
        call()?;
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0 / calls as f64)
}

/// Per round, the mean milliseconds of `settings.calls` calls.
fn time_calls(
    settings: &Settings,
    mut call: impl FnMut() -> Result<(), sshd::SshError>,
) -> Result<Vec<f64>, sshd::SshError> {
    (0..settings.rounds)
        .map(|_| mean_ms(settings.calls, &mut call))
        .collect()
}

fn scp_rate(
    sshd: &sshd::Sshd,
    dir: &Path,
    settings: &Settings,
) -> Result<Vec<f64>, sshd::SshError> {
    let source = dir.join("scp-source.bin");
    let target = dir.join("scp-target.bin");
    write_file(&source, settings.bulk_bytes).map_err(|source| sshd::SshError::Io {
        what: "writing the file scp sends".to_owned(),
        source,
    })?;
    let mut samples = Vec::new();
    for _ in 0..settings.rounds {
        let started = Instant::now();
        sshd.upload(&source, &target)?;
        samples.push(settings.bulk_bytes as f64 / started.elapsed().as_secs_f64() / MB);
        let _ = std::fs::remove_file(&target);
    }
    let _ = std::fs::remove_file(&source);
    Ok(samples)
}

/// A file of `bytes` pseudo-random bytes (incompressible, so no transport
/// gains from compression).
pub(crate) fn write_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    use rand::RngCore;
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    let mut rng = rand::rng();
    let mut left = bytes;
    while left > 0 {
        rng.fill_bytes(&mut block);
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.flush()
}

/// Width of the name column.
const NAME: usize = 24;

/// One table block, as soon as the row is done: the value, then its peer
/// and ratio (and any further comparisons), each on a line of its own.
pub fn print_row(row: &Row) {
    let target =
        |target: Option<&str>| target.map(|t| format!(" (target {t})")).unwrap_or_default();
    match (&row.value, &row.skipped) {
        (Some(value), _) => println!(
            "{:<NAME$} {:>10.1} {:<5} {}{}",
            row.name,
            value,
            row.unit,
            row.measure,
            if row.ratio.is_none() {
                target(row.target)
            } else {
                String::new()
            }
        ),
        (None, Some(why)) => println!(
            "{:<NAME$} {:>10} {:<5} {} (skipped: {why})",
            row.name, "-", row.unit, row.measure
        ),
        (None, None) => println!(
            "{:<NAME$} {:>10} {:<5} {}",
            row.name, "-", row.unit, row.measure
        ),
    }
    let comparisons = row
        .peer
        .iter()
        .zip(row.ratio_is)
        .map(|(peer, is)| (peer, row.ratio.as_ref(), is, row.target))
        .chain(
            row.also
                .iter()
                .map(|also| (&also.peer, also.ratio.as_ref(), also.ratio_is, also.target)),
        );
    for (peer, ratio, is, goal) in comparisons {
        println!(
            "{:<NAME$} {:>10.1} {:<5} {}",
            "", peer.value, row.unit, peer.name
        );
        if let Some(ratio) = ratio {
            println!(
                "{:<NAME$} {:>10.2} {:<5} {is}{}, spread {:.2}..{:.2} over {} rounds",
                "",
                ratio.median,
                "",
                target(goal),
                ratio.min,
                ratio.max,
                ratio.rounds.len()
            );
        }
    }
}
