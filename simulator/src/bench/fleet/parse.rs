//! What the fleet rows read from /proc, the hub's metrics and the operator
//! CLI's output, and the reconnection histogram: pure, so tested alone.

/// `VmRSS` from the text of /proc/PID/status, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    kib_field(status, "VmRSS")
}

/// The value of a `Field:   123 kB` line (/proc/PID/status, /proc/meminfo).
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(field))
        .find_map(|rest| rest.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// The value of an unlabelled sample `name value` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name))
        .find_map(|rest| rest.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

/// The soft "Max open files" from the text of /proc/PID/limits.
pub fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// How a `tentacle-hub deploy` went, from its stdout and stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeploySummary {
    /// "Deploying to N target(s)".
    pub targets: Option<u64>,
    pub succeeded: u64,
    pub failed: u64,
}

/// The last "S succeeded, F failed" line of stdout, and the target count
/// from stderr; `None` without the summary line (the command did not
/// finish).
pub fn deploy_summary(stdout: &str, stderr: &str) -> Option<DeploySummary> {
    let (succeeded, failed) = stdout.lines().rev().find_map(|line| {
        let (succeeded, rest) = line.trim().split_once(" succeeded, ")?;
        let failed = rest.strip_suffix(" failed")?;
        Some((succeeded.parse().ok()?, failed.parse().ok()?))
    })?;
    let targets = stderr.lines().find_map(|line| {
        line.trim()
            .strip_prefix("Deploying to ")?
            .split_once(" target(s)")?
            .0
            .parse()
            .ok()
    });
    Some(DeploySummary {
        targets,
        succeeded,
        failed,
    })
}

/// Why targets failed, from the summary table of a `tentacle-hub deploy`
/// (`NAME  failed  TIME  TARGET  REASON`): each reason with how many failed
/// for it, most first.
pub fn failure_reasons(stdout: &str) -> Vec<(String, usize)> {
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for line in stdout.lines() {
        let mut words = line.split_whitespace();
        let (Some(_name), Some("failed"), Some(time), Some(_target)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        if !time.ends_with('s') {
            continue;
        }
        // Names in backquotes (tickets, paths) differ per target.
        let reason = words
            .collect::<Vec<_>>()
            .join(" ")
            .split('`')
            .enumerate()
            .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
            .collect::<Vec<_>>()
            .join("`");
        match reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, count)) => *count += 1,
            None => reasons.push((reason, 1)),
        }
    }
    reasons.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    reasons
}

/// The connected count at the end of each whole second, from samples of
/// (seconds since the start, count) in time order: entry `k` is the last
/// sample at or before `k + 1` seconds (0 before the first sample).
pub fn connected_each_second(samples: &[(f64, u64)]) -> Vec<u64> {
    let Some(&(last, _)) = samples.last() else {
        return Vec::new();
    };
    let seconds = last.max(0.0).ceil() as usize;
    let mut counts = Vec::with_capacity(seconds.max(1));
    let mut at = 0;
    let mut count = 0;
    for second in 1..=seconds.max(1) {
        while at < samples.len() && samples[at].0 <= second as f64 {
            count = samples[at].1;
            at += 1;
        }
        counts.push(count);
    }
    counts
}

/// How many more were connected at the end of each second than at the end
/// of the one before (0 where the count fell): a per-second histogram of
/// (net) reconnections.
pub fn per_second(samples: &[(f64, u64)]) -> Vec<u64> {
    let mut before = 0;
    connected_each_second(samples)
        .into_iter()
        .map(|count| {
            let new = count.saturating_sub(before);
            before = count;
            new
        })
        .collect()
}
