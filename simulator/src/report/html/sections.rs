//! The page's content, one function per section in page order: the header
//! with the verdict, invariant results with their examples, the timeline,
//! latency and error charts with their tables, hub resources and totals.
//!
//! Everything taken from the report is spliced as text, which maud
//! escapes: invariant and error examples quote what agents sent, so they
//! are untrusted. Only [`Markup`] (built by maud here or in the sibling
//! modules) is inserted as HTML.

use std::collections::BTreeMap;

use maud::{Markup, html};

use super::charts::{bar_chart, latency_chart, line_chart, series};
use super::format::{MIB, bytes, count, duration, ms, timestamp};
use crate::report::{CallStats, InvariantResult, Report, Sample};

/// Scenario, seed with the command that replays it, fleet size, and the
/// verdict a person looks for first.
pub(super) fn header(report: &Report) -> Markup {
    let agents = &report.agents;
    let held = report.invariants.iter().filter(|i| i.passed).count();
    // `passed()` is vacuously true with no invariants; say so under the badge.
    let held = match report.invariants.len() {
        0 => "no invariants were checked".to_owned(),
        total => format!("{held} of {total} invariants held"),
    };
    html! {
        header {
            div {
                div {
                    div.kicker { "tentacle-sim scenario report" }
                    h1 { (report.scenario) }
                    dl.facts {
                        dt { "Seed" }
                        dd {
                            (report.seed) " · replay with "
                            code { "tentacle-sim run --scenario FILE --seed " (report.seed) }
                        }
                        dt { "Started" }
                        dd { (started(report.started_unix_ms)) }
                        dt { "Duration" }
                        dd { (duration(report.duration_ms)) }
                        dt { "Agents" }
                        dd {
                            (count(agents.polling + agents.listening))
                            " (" (count(agents.polling)) " polling, "
                            (count(agents.listening)) " listening)"
                        }
                        dt { "All connected after" }
                        dd {
                            @match agents.connect_all_ms {
                                Some(ms) => (duration(ms)),
                                None => span.bad { "never: some agents did not connect" },
                            }
                        }
                        dt { "Shards" }
                        dd { (shards(report)) }
                        dt { "Chaos schedule" }
                        dd { "sha256 " code { (report.chaos_schedule_sha256) } }
                    }
                }
                div.verdict {
                    @if report.passed() {
                        div.badge.pass { "PASS" }
                    } @else {
                        div.badge.fail { "FAIL" }
                    }
                    div.muted { (held) }
                }
            }
        }
    }
}

/// When the run started, in UTC: the exact RFC 3339 form is the `<time>`
/// element's machine-readable value, and the text spells the zone out.
fn started(unix_ms: u64) -> Markup {
    match timestamp(unix_ms) {
        Some(rfc3339) => {
            let shown = rfc3339.replacen('T', " ", 1).replace('Z', " UTC");
            html! { time datetime=(rfc3339) { (shown) } }
        }
        None => {
            html! { span.bad { "unknown (" (unix_ms) " ms after 1970 is past the year 9999)" } }
        }
    }
}

/// The shard list, folded away because a big run may have dozens.
fn shards(report: &Report) -> Markup {
    if report.shards.is_empty() {
        return html! { "none recorded" };
    }
    let names = report
        .shards
        .iter()
        .map(|s| s.shard.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    html! {
        details {
            summary { (report.shards.len()) " (" (names) ")" }
            table {
                tr { th { "Shard" } th.n { "Agents" } th.n { "Open file limit" } th { "Hub" } }
                @for s in &report.shards {
                    tr {
                        td { (s.shard) }
                        td.n { (count(s.agents)) }
                        td.n { (count(s.open_file_limit)) }
                        td { (s.hub) }
                    }
                }
            }
        }
    }
}

/// Every invariant with its counts; the examples of a broken one sit right
/// under it, since they are where a person starts debugging.
pub(super) fn invariants(invariants: &[InvariantResult]) -> Markup {
    html! {
        section #invariants {
            h2 { "Invariants" }
            @if invariants.is_empty() {
                p.muted { "No invariants were checked." }
            } @else {
                table {
                    tr {
                        th { "Invariant" } th { "Description" }
                        th.n { "Checked" } th.n { "Violations" } th { "Result" }
                    }
                    @for inv in invariants {
                        tr.failed[!inv.passed] {
                            td.name { code { (inv.name) } }
                            td { (inv.description) }
                            td.n { (count(inv.checked)) }
                            td.n { (count(inv.violations)) }
                            td {
                                @if inv.passed { span.ok { "pass" } } @else { span.bad { "FAIL" } }
                            }
                        }
                        @if !inv.passed && !inv.examples.is_empty() {
                            tr.examples {
                                td colspan="5" {
                                    (examples_note(inv))
                                    ul {
                                        @for example in &inv.examples {
                                            li { code { (example) } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// "Violations:", or "2 of 7 violations:" when only some are quoted.
fn examples_note(inv: &InvariantResult) -> String {
    let shown = u64::try_from(inv.examples.len()).unwrap_or(u64::MAX);
    if inv.violations > shown {
        format!("{} of {} violations:", count(shown), count(inv.violations))
    } else {
        "Violations:".to_owned()
    }
}

/// Connected agents, then call throughput with failures alongside, both
/// against seconds since the run started.
pub(super) fn timeline(timeline: &[Sample]) -> Markup {
    let connected = series(timeline, |s| s.connected as f64);
    let calls = series(timeline, |s| s.calls as f64);
    let errors = series(timeline, |s| s.errors as f64);
    html! {
        section #timeline {
            h2 { "Over time" }
            div.charts {
                (line_chart("Connected agents", &[("connected", connected)], "agents"))
                (line_chart("Calls per second", &[("calls", calls), ("errors", errors)], "calls / s"))
            }
        }
    }
}

/// The percentiles of each call type as a chart and exactly as a table.
pub(super) fn latency(calls: &BTreeMap<String, CallStats>) -> Markup {
    let groups: Vec<(&str, [u64; 4])> = calls
        .iter()
        .map(|(name, c)| (name.as_str(), [c.p50_us, c.p90_us, c.p99_us, c.max_us]))
        .collect();
    html! {
        section #latency {
            h2 { "Latency by call type" }
            @if calls.is_empty() {
                p.muted { "No calls were made." }
            } @else {
                (latency_chart("Latency percentiles of successful calls (log scale)", &groups))
                table.spaced {
                    tr {
                        th { "Call" } th.n { "Count" } th.n { "Errors" }
                        th.n { "p50 ms" } th.n { "p90 ms" } th.n { "p99 ms" }
                        th.n { "p99.9 ms" } th.n { "max ms" }
                    }
                    @for (name, c) in calls {
                        tr {
                            td.name { code { (name) } }
                            td.n { (count(c.count)) }
                            td.n {
                                @if c.errors > 0 { span.bad { (count(c.errors)) } } @else { "0" }
                            }
                            td.n { (ms(c.p50_us)) }
                            td.n { (ms(c.p90_us)) }
                            td.n { (ms(c.p99_us)) }
                            td.n { (ms(c.p999_us)) }
                            td.n { (ms(c.max_us)) }
                        }
                    }
                }
            }
        }
    }
}

/// Failed calls by gRPC status as bars, then a few quoted failures of each
/// status; the quotes hold agent names and messages, so they are escaped.
pub(super) fn errors(
    errors: &BTreeMap<String, u64>,
    examples: &BTreeMap<String, Vec<String>>,
) -> Markup {
    // Largest first: the kind that dominates is the one to look at.
    let mut bars: Vec<(&str, u64)> = errors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    bars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    html! {
        section #errors {
            h2 { "Errors by kind" }
            @if errors.values().all(|n| *n == 0) {
                p.ok { "No failed calls." }
            } @else {
                (bar_chart("Failed calls by gRPC status", &bars))
                @for (kind, list) in examples.iter().filter(|(_, l)| !l.is_empty()) {
                    h3 { "Examples: " (kind) }
                    ul.examples {
                        @for example in list {
                            li { code { (example) } }
                        }
                    }
                }
            }
        }
    }
}

/// The hub's CPU and memory over the run.
pub(super) fn hub(timeline: &[Sample]) -> Markup {
    let cpu = series(timeline, |s| s.hub_cpu_percent);
    let rss = series(timeline, |s| s.hub_rss_bytes as f64 / MIB);
    html! {
        section #hub {
            h2 { "Hub resources" }
            p.muted { "With an in-process hub these are the whole simulator's; for a hub cluster, the sums over its nodes." }
            div.charts {
                (line_chart("Hub CPU", &[("cpu", cpu)], "% of one core"))
                (line_chart("Hub resident memory", &[("rss", rss)], "MiB"))
            }
        }
    }
}

/// Stages, chaos, scripts and uploads: the counts behind the charts.
pub(super) fn totals(report: &Report) -> Markup {
    let chaos: Vec<(String, Markup)> = report
        .chaos
        .iter()
        .map(|(kind, n)| (kind.clone(), html! { (count(*n)) }))
        .collect();
    let s = &report.scripts;
    let scripts = [
        ("dispatched", s.dispatched),
        ("succeeded", s.succeeded),
        ("failed (exit code chosen by the model)", s.failed),
        ("canceled", s.canceled),
        ("ended by an agent crash", s.agent_restarted),
        ("abandoned by the caller", s.abandoned),
        ("log lines", s.log_lines),
    ]
    .map(|(k, v)| (k.to_owned(), html! { (count(v)) }));
    let u = &report.uploads;
    let uploads = [
        ("attempted".to_owned(), html! { (count(u.attempted)) }),
        ("verified".to_owned(), html! { (count(u.verified)) }),
        ("bytes".to_owned(), bytes(u.bytes)),
    ];
    html! {
        section #totals {
            h2 { "Totals" }
            // Stages get the full width: five columns do not fit beside the others.
            h3 { "Stages" }
            @if report.stages.is_empty() {
                p.muted { "No stages ran." }
            } @else {
                table {
                    tr {
                        th { "Stage" } th.n { "Start" } th.n { "Duration" }
                        th.n { "Operations" } th.n { "Failed" }
                    }
                    @for stage in &report.stages {
                        tr.failed[stage.failed > 0] {
                            td { (stage.name) }
                            td.n { (duration(stage.started_ms)) }
                            td.n { (duration(stage.duration_ms)) }
                            td.n { (count(stage.operations)) }
                            td.n { (count(stage.failed)) }
                        }
                    }
                }
            }
            div.tables {
                div {
                    h3 { "Chaos events" }
                    @if chaos.is_empty() {
                        p.muted { "No chaos was injected." }
                    } @else {
                        (key_value_table(Some(("Kind", "Events")), &chaos))
                    }
                }
                div {
                    h3 { "Scripts" }
                    (key_value_table(None, &scripts))
                }
                div {
                    h3 { "Uploads" }
                    (key_value_table(None, &uploads))
                }
            }
        }
    }
}

/// A two-column table of names (plain text, escaped here) and values
/// (markup built by the caller), with an optional heading row.
fn key_value_table(headings: Option<(&str, &str)>, rows: &[(String, Markup)]) -> Markup {
    html! {
        table {
            @if let Some((key, value)) = headings {
                tr { th { (key) } th.n { (value) } }
            }
            @for (key, value) in rows {
                tr { td { (key) } td.n { (value) } }
            }
        }
    }
}
