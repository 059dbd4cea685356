//! The HTML page of a scenario run: [`render`] turns a [`Report`] into one
//! self-contained file that a person opens from disk.
//!
//! This module owns the page's layout, its inline CSS and its charts, which
//! are inline SVG drawn here. Nothing on the page is fetched: no scripts,
//! fonts, stylesheets or images, and a Content-Security-Policy that forbids
//! them anyway, so a report opens the same on an air-gapped laptop as in CI
//! artefacts. Every string that comes from the report (scenario, call and
//! stage names, invariant examples) goes through [`escape`], because
//! invariant examples quote whatever the agents sent back.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{CallStats, InvariantResult, Report, Sample};

/// Renders `report` as one self-contained HTML page.
pub fn render(report: &Report) -> String {
    let verdict = if report.passed() { "PASS" } else { "FAIL" };
    let mut page = String::with_capacity(64 * 1024);
    let _ = writeln!(
        page,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>{verdict} · {} · tentacle-sim</title>\n<style>{STYLE}</style>\n</head>\n<body>",
        escape(&report.scenario)
    );
    page.push_str(&header(report));
    page.push_str("<main>\n");
    page.push_str(&invariants_section(&report.invariants));
    page.push_str(&timeline_section(&report.timeline));
    page.push_str(&latency_section(&report.calls));
    page.push_str(&errors_section(&report.errors, &report.error_examples));
    page.push_str(&hub_section(&report.timeline));
    page.push_str(&totals_section(report));
    let _ = writeln!(
        page,
        "</main>\n<footer>tentacle-sim report, schema {}. This page loads nothing from the network.</footer>\n</body>\n</html>",
        report.schema_version
    );
    page
}

/// Light, print-friendly styling. Kept free of `url(...)` so the page never
/// asks for anything.
const STYLE: &str = "
:root { --pass: #15803d; --fail: #b91c1c; --muted: #64748b; --line: #e2e8f0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #0f172a; background: #f8fafc; }
header { background: #fff; border-bottom: 1px solid var(--line); }
header > div, main, footer { max-width: 1120px; margin: 0 auto; padding: 16px 24px; }
header > div { display: flex; gap: 24px; justify-content: space-between; align-items: flex-start; }
h1 { font-size: 24px; margin: 0 0 10px; word-break: break-word; }
h2 { font-size: 17px; margin: 32px 0 10px; }
h3 { font-size: 14px; margin: 0 0 6px; }
.kicker { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .08em; }
.verdict { text-align: center; flex: none; }
.badge { display: inline-block; font-size: 40px; font-weight: 800; letter-spacing: .08em; padding: 8px 30px; border-radius: 12px; color: #fff; }
.badge.pass { background: var(--pass); }
.badge.fail { background: var(--fail); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f5f9; padding: 1px 5px; border-radius: 4px; word-break: break-all; }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; }
.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed > td { background: #fef2f2; }
tr.examples > td { background: #fff7f7; }
tr.examples ul { margin: 0; padding-left: 20px; }
.ok { color: var(--pass); font-weight: 600; }
.bad { color: var(--fail); font-weight: 700; }
.muted { color: var(--muted); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 16px; }
.tables { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 20px 28px; align-items: start; }
svg.chart { display: block; max-width: 100%; height: auto; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
svg.chart text { font-family: system-ui, sans-serif; font-size: 11px; fill: #334155; }
svg.chart text.title { font-size: 13px; font-weight: 600; fill: #0f172a; }
svg.chart text.value { font-size: 10px; }
svg.chart text.empty { font-size: 14px; fill: #64748b; }
svg.chart .grid { stroke: #e2e8f0; }
svg.chart .axis { stroke: #94a3b8; }
details summary { cursor: pointer; }
footer { color: var(--muted); font-size: 12px; }
";

/// Escapes text for use in HTML content and in quoted attribute values
/// (SVG text included).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Sections, in page order.
// ---------------------------------------------------------------------------

/// Scenario, seed with the command that replays it, fleet size, and the
/// verdict a person looks for first.
fn header(report: &Report) -> String {
    let mut out = String::new();
    let passed = report.passed();
    let held = report.invariants.iter().filter(|i| i.passed).count();
    let _ = writeln!(
        out,
        "<header><div>\n<div>\n<div class=\"kicker\">tentacle-sim scenario report</div>\n<h1>{}</h1>\n<dl class=\"facts\">",
        escape(&report.scenario)
    );
    let _ = writeln!(
        out,
        "<dt>Seed</dt><dd>{seed} · replay with <code>tentacle-sim run --scenario FILE --seed {seed}</code></dd>",
        seed = report.seed
    );
    let _ = writeln!(
        out,
        "<dt>Started</dt><dd>{}</dd>\n<dt>Duration</dt><dd>{}</dd>",
        utc_datetime(report.started_unix_ms),
        duration(report.duration_ms)
    );
    let agents = &report.agents;
    let _ = writeln!(
        out,
        "<dt>Agents</dt><dd>{} ({} polling, {} listening)</dd>",
        count(agents.polling + agents.listening),
        count(agents.polling),
        count(agents.listening)
    );
    let connect_all = match agents.connect_all_ms {
        Some(ms) => duration(ms),
        None => "<span class=\"bad\">never: some agents did not connect</span>".to_owned(),
    };
    let _ = writeln!(out, "<dt>All connected after</dt><dd>{connect_all}</dd>");
    let _ = writeln!(out, "<dt>Shards</dt><dd>{}</dd>", shards(report));
    let _ = writeln!(
        out,
        "<dt>Chaos schedule</dt><dd>sha256 <code>{}</code></dd>\n</dl>\n</div>",
        escape(&report.chaos_schedule_sha256)
    );
    let (class, word) = if passed {
        ("pass", "PASS")
    } else {
        ("fail", "FAIL")
    };
    // `passed()` is vacuously true with no invariants; say so under the badge.
    let held = match report.invariants.len() {
        0 => "no invariants were checked".to_owned(),
        total => format!("{held} of {total} invariants held"),
    };
    let _ = writeln!(
        out,
        "<div class=\"verdict\"><div class=\"badge {class}\">{word}</div><div class=\"muted\">{held}</div></div>\n</div></header>"
    );
    out
}

/// The shard list, folded away because a big run may have dozens.
fn shards(report: &Report) -> String {
    if report.shards.is_empty() {
        return "none recorded".to_owned();
    }
    let names = report
        .shards
        .iter()
        .map(|s| escape(&s.shard))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = format!(
        "<details><summary>{} ({names})</summary>\n<table><tr><th>Shard</th><th class=\"n\">Agents</th><th class=\"n\">Open file limit</th><th>Hub</th></tr>\n",
        report.shards.len()
    );
    for s in &report.shards {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&s.shard),
            count(s.agents),
            count(s.open_file_limit),
            escape(&s.hub)
        );
    }
    out.push_str("</table></details>");
    out
}

/// Every invariant with its counts; the examples of a broken one sit right
/// under it, since they are where a person starts debugging.
fn invariants_section(invariants: &[InvariantResult]) -> String {
    let mut out = String::from("<section id=\"invariants\">\n<h2>Invariants</h2>\n");
    if invariants.is_empty() {
        out.push_str("<p class=\"muted\">No invariants were checked.</p>\n</section>\n");
        return out;
    }
    out.push_str(
        "<table>\n<tr><th>Invariant</th><th>Description</th><th class=\"n\">Checked</th><th class=\"n\">Violations</th><th>Result</th></tr>\n",
    );
    for inv in invariants {
        let (row, result) = if inv.passed {
            ("", "<span class=\"ok\">pass</span>")
        } else {
            (" class=\"failed\"", "<span class=\"bad\">FAIL</span>")
        };
        let _ = writeln!(
            out,
            "<tr{row}><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{result}</td></tr>",
            escape(&inv.name),
            escape(&inv.description),
            count(inv.checked),
            count(inv.violations)
        );
        if !inv.passed && !inv.examples.is_empty() {
            let shown = u64::try_from(inv.examples.len()).unwrap_or(u64::MAX);
            let note = if inv.violations > shown {
                format!("{} of {} violations:", count(shown), count(inv.violations))
            } else {
                "Violations:".to_owned()
            };
            let _ = writeln!(out, "<tr class=\"examples\"><td colspan=\"5\">{note}<ul>");
            for example in &inv.examples {
                let _ = writeln!(out, "<li><code>{}</code></li>", escape(example));
            }
            out.push_str("</ul></td></tr>\n");
        }
    }
    out.push_str("</table>\n</section>\n");
    out
}

/// Connected agents, then call throughput with failures alongside, both
/// against seconds since the run started.
fn timeline_section(timeline: &[Sample]) -> String {
    let connected = series(timeline, |s| s.connected as f64);
    let calls = series(timeline, |s| s.calls as f64);
    let errors = series(timeline, |s| s.errors as f64);
    let mut out =
        String::from("<section id=\"timeline\">\n<h2>Over time</h2>\n<div class=\"charts\">\n");
    out.push_str(&line_chart(
        "Connected agents",
        &[("connected", connected)],
        "agents",
    ));
    out.push_str(&line_chart(
        "Calls per second",
        &[("calls", calls), ("errors", errors)],
        "calls / s",
    ));
    out.push_str("</div>\n</section>\n");
    out
}

/// The percentiles of each call type as a chart and exactly as a table.
fn latency_section(calls: &BTreeMap<String, CallStats>) -> String {
    let mut out = String::from("<section id=\"latency\">\n<h2>Latency by call type</h2>\n");
    if calls.is_empty() {
        out.push_str("<p class=\"muted\">No calls were made.</p>\n</section>\n");
        return out;
    }
    let groups: Vec<(&str, [u64; 4])> = calls
        .iter()
        .map(|(name, c)| (name.as_str(), [c.p50_us, c.p90_us, c.p99_us, c.max_us]))
        .collect();
    out.push_str(&latency_chart(
        "Latency percentiles of successful calls (log scale)",
        &groups,
    ));
    out.push_str(
        "<p></p><table>\n<tr><th>Call</th><th class=\"n\">Count</th><th class=\"n\">Errors</th><th class=\"n\">p50 ms</th><th class=\"n\">p90 ms</th><th class=\"n\">p99 ms</th><th class=\"n\">p99.9 ms</th><th class=\"n\">max ms</th></tr>\n",
    );
    for (name, c) in calls {
        let errors = if c.errors > 0 {
            format!("<span class=\"bad\">{}</span>", count(c.errors))
        } else {
            "0".to_owned()
        };
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{errors}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(name),
            count(c.count),
            ms(c.p50_us),
            ms(c.p90_us),
            ms(c.p99_us),
            ms(c.p999_us),
            ms(c.max_us)
        );
    }
    out.push_str("</table>\n</section>\n");
    out
}

fn errors_section(
    errors: &BTreeMap<String, u64>,
    examples: &BTreeMap<String, Vec<String>>,
) -> String {
    let mut out = String::from("<section id=\"errors\">\n<h2>Errors by kind</h2>\n");
    if errors.values().all(|n| *n == 0) {
        out.push_str("<p class=\"ok\">No failed calls.</p>\n</section>\n");
        return out;
    }
    // Largest first: the kind that dominates is the one to look at.
    let mut bars: Vec<(&str, u64)> = errors.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    bars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    out.push_str(&bar_chart("Failed calls by gRPC status", &bars));
    for (kind, list) in examples.iter().filter(|(_, l)| !l.is_empty()) {
        let _ = write!(
            out,
            "<h3>Examples: {}</h3>\n<ul class=\"examples\">\n",
            escape(kind)
        );
        for example in list {
            let _ = writeln!(out, "<li><code>{}</code></li>", escape(example));
        }
        out.push_str("</ul>\n");
    }
    out.push_str("</section>\n");
    out
}

fn hub_section(timeline: &[Sample]) -> String {
    let cpu = series(timeline, |s| s.hub_cpu_percent);
    let rss = series(timeline, |s| s.hub_rss_bytes as f64 / MIB);
    let mut out = String::from(
        "<section id=\"hub\">\n<h2>Hub resources</h2>\n<p class=\"muted\">With an in-process hub these are the whole simulator's.</p>\n<div class=\"charts\">\n",
    );
    out.push_str(&line_chart("Hub CPU", &[("cpu", cpu)], "% of one core"));
    out.push_str(&line_chart("Hub resident memory", &[("rss", rss)], "MiB"));
    out.push_str("</div>\n</section>\n");
    out
}

/// Stages, chaos, scripts and uploads: the counts behind the charts.
fn totals_section(report: &Report) -> String {
    let mut out = String::from("<section id=\"totals\">\n<h2>Totals</h2>\n");

    // Stages get the full width: five columns do not fit beside the others.
    out.push_str("<h3>Stages</h3>\n");
    if report.stages.is_empty() {
        out.push_str("<p class=\"muted\">No stages ran.</p>\n");
    } else {
        out.push_str(
            "<table>\n<tr><th>Stage</th><th class=\"n\">Start</th><th class=\"n\">Duration</th><th class=\"n\">Operations</th><th class=\"n\">Failed</th></tr>\n",
        );
        for stage in &report.stages {
            let row = if stage.failed > 0 {
                " class=\"failed\""
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "<tr{row}><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&stage.name),
                duration(stage.started_ms),
                duration(stage.duration_ms),
                count(stage.operations),
                count(stage.failed)
            );
        }
        out.push_str("</table>\n");
    }

    out.push_str("<p></p><div class=\"tables\">\n<div>\n<h3>Chaos events</h3>\n");
    if report.chaos.is_empty() {
        out.push_str("<p class=\"muted\">No chaos was injected.</p>\n");
    } else {
        let rows: Vec<(String, String)> = report
            .chaos
            .iter()
            .map(|(kind, n)| (escape(kind), count(*n)))
            .collect();
        out.push_str(&key_value_table("Kind", "Events", &rows));
    }
    out.push_str("</div>\n");

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
    .map(|(k, v)| (k.to_owned(), count(v)));
    out.push_str("<div>\n<h3>Scripts</h3>\n");
    out.push_str(&key_value_table("", "", &scripts));
    out.push_str("</div>\n");

    let u = &report.uploads;
    let uploads = [
        ("attempted".to_owned(), count(u.attempted)),
        ("verified".to_owned(), count(u.verified)),
        ("bytes".to_owned(), bytes(u.bytes)),
    ];
    out.push_str("<div>\n<h3>Uploads</h3>\n");
    out.push_str(&key_value_table("", "", &uploads));
    out.push_str("</div>\n</div>\n</section>\n");
    out
}

/// A two-column table; `rows` are HTML, already escaped. Empty headings mean no
/// heading row.
fn key_value_table(key: &str, value: &str, rows: &[(String, String)]) -> String {
    let mut out = String::from("<table>\n");
    if !key.is_empty() || !value.is_empty() {
        let _ = writeln!(out, "<tr><th>{key}</th><th class=\"n\">{value}</th></tr>");
    }
    for (k, v) in rows {
        let _ = writeln!(out, "<tr><td>{k}</td><td class=\"n\">{v}</td></tr>");
    }
    out.push_str("</table>\n");
    out
}

/// One chart series from the timeline: (seconds since start, value).
fn series(timeline: &[Sample], value: impl Fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    timeline
        .iter()
        .map(|s| (s.t_ms as f64 / 1000.0, value(s)))
        .collect()
}

// ---------------------------------------------------------------------------
// Charts. Each returns one `<svg>` sized by its viewBox, so it scales with
// the page; every coordinate goes through `Axis::frac` or `LogAxis::frac`,
// which never divide by zero and clamp to the plot.
// ---------------------------------------------------------------------------

const MIB: f64 = 1024.0 * 1024.0;

/// Line colours, in series order; the second is red because the second
/// series of the calls chart is its errors.
const PALETTE: [&str; 5] = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed"];

/// Percentile bars light to dark, so "worse" reads as "darker".
const LATENCY_SERIES: [(&str, &str); 4] = [
    ("p50", "#93c5fd"),
    ("p90", "#3b82f6"),
    ("p99", "#1d4ed8"),
    ("max", "#1e293b"),
];

const LINE_W: f64 = 560.0;
const LINE_H: f64 = 260.0;

/// Opens a chart's `<svg>` and writes its title.
fn open_svg(out: &mut String, title: &str, width: f64, height: f64) {
    let title = escape(title);
    let _ = writeln!(
        out,
        "<svg class=\"chart\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" role=\"img\" aria-label=\"{title}\">\n\
         <text class=\"title\" x=\"12\" y=\"20\">{title}</text>"
    );
}

/// Centred grey text in place of a chart with nothing to draw.
fn empty_note(out: &mut String, message: &str, width: f64, height: f64) {
    let _ = writeln!(
        out,
        "<text class=\"empty\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n</svg>",
        width / 2.0,
        height / 2.0 + 10.0,
        escape(message)
    );
}

/// A line chart of `series` (name, points of (seconds, value)) against
/// seconds since the start, with the y axis from zero so that heights
/// compare honestly. Points that are not finite are skipped.
fn line_chart(title: &str, series: &[(&str, Vec<(f64, f64)>)], y_label: &str) -> String {
    let (left, right, top, bottom) = (64.0, 16.0, 34.0, 40.0);
    let (plot_w, plot_h) = (LINE_W - left - right, LINE_H - top - bottom);
    let mut out = String::new();
    open_svg(&mut out, title, LINE_W, LINE_H);

    let clean: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, points)| {
            points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let all = || clean.iter().flatten();
    let Some(x_lo) = all().map(|p| p.0).reduce(f64::min) else {
        empty_note(&mut out, "no samples", LINE_W, LINE_H);
        return out;
    };
    let x_hi = all().map(|p| p.0).fold(x_lo, f64::max);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max);
    let x = Axis::spanning(x_lo, x_hi);
    let y = Axis::from_zero(y_max);
    let px = |v: f64| left + x.frac(v) * plot_w;
    let py = |v: f64| top + (1.0 - y.frac(v)) * plot_h;

    for tick in &y.ticks {
        let ty = py(*tick);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{left}\" x2=\"{:.1}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left + plot_w,
            left - 6.0,
            ty + 4.0,
            tick_label(*tick)
        );
    }
    let base = top + plot_h;
    for tick in &x.ticks {
        let tx = px(*tick);
        let _ = writeln!(
            out,
            "<line class=\"axis\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{base:.1}\" y2=\"{:.1}\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            base + 4.0,
            base + 16.0,
            tick_label(*tick)
        );
    }
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{base:.1}\"/>\
         <line class=\"axis\" x1=\"{left}\" x2=\"{:.1}\" y1=\"{base:.1}\" y2=\"{base:.1}\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since start</text>\n\
         <text transform=\"rotate(-90)\" x=\"{:.1}\" y=\"14\" text-anchor=\"middle\">{}</text>",
        left + plot_w,
        left + plot_w / 2.0,
        LINE_H - 6.0,
        -(top + plot_h / 2.0),
        escape(y_label)
    );

    for (i, points) in clean.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        if let [(vx, vy)] = points.as_slice() {
            // A polyline of one point draws nothing; show a dot instead.
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                px(*vx),
                py(*vy)
            );
        } else if !points.is_empty() {
            let _ = write!(
                out,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\" stroke-linejoin=\"round\" points=\""
            );
            for (vx, vy) in points {
                let _ = write!(out, "{:.1},{:.1} ", px(*vx), py(*vy));
            }
            out.push_str("\"/>\n");
        }
    }
    if series.len() > 1 {
        let names: Vec<&str> = series.iter().map(|(name, _)| *name).collect();
        out.push_str(&legend(&names, &PALETTE, LINE_W - right));
    }
    out.push_str("</svg>\n");
    out
}

/// A legend in the title row, right-aligned to `right_edge`: a swatch and
/// the name of each series.
fn legend(names: &[&str], colours: &[&str], right_edge: f64) -> String {
    let mut out = String::new();
    // No font metrics here; 6.5px per character is close for 11px text.
    let widths: Vec<f64> = names
        .iter()
        .map(|n| 16.0 + 6.5 * n.chars().count() as f64 + 12.0)
        .collect();
    let mut x = right_edge - widths.iter().sum::<f64>();
    for (i, name) in names.iter().enumerate() {
        let colour = colours.get(i % colours.len().max(1)).unwrap_or(&"#000");
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"11\" width=\"12\" height=\"10\" rx=\"2\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"20\">{}</text>",
            x + 16.0,
            escape(name)
        );
        x += widths.get(i).copied().unwrap_or(0.0);
    }
    out
}

/// Grouped horizontal bars of p50, p90, p99 and max per call type, on a log
/// scale: a tail 100x the median would flatten the median to a sliver on a
/// linear one. Values are microseconds; each bar is labelled.
fn latency_chart(title: &str, groups: &[(&str, [u64; 4])]) -> String {
    const BAR: f64 = 11.0;
    const GAP: f64 = 2.0;
    const GROUP_GAP: f64 = 16.0;
    let group_h = 4.0 * BAR + 3.0 * GAP;
    let width = 960.0;
    let left = name_margin(groups.iter().map(|(name, _)| *name));
    let (right, top, bottom) = (72.0, 40.0, 30.0);
    let plot_w = width - left - right;
    let plot_h = groups.len() as f64 * (group_h + GROUP_GAP);
    let height = top + plot_h + bottom;
    let mut out = String::new();
    open_svg(&mut out, title, width, height);

    let values = || groups.iter().flat_map(|(_, v)| v.iter().copied());
    let Some(axis) = LogAxis::new(values().filter(|v| *v > 0).map(|v| v as f64)) else {
        empty_note(
            &mut out,
            "no successful calls to time",
            width,
            height.max(80.0),
        );
        return out;
    };
    let names: Vec<&str> = LATENCY_SERIES.iter().map(|(n, _)| *n).collect();
    let colours: Vec<&str> = LATENCY_SERIES.iter().map(|(_, c)| *c).collect();
    out.push_str(&legend(&names, &colours, width - right));

    let base = top + plot_h;
    for exp in axis.decades() {
        let value = 10f64.powi(exp);
        let tx = left + axis.frac(value) * plot_w;
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{top}\" y2=\"{base:.1}\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            base + 16.0,
            micros(value)
        );
    }
    for (g, (name, bars)) in groups.iter().enumerate() {
        let gy = top + GROUP_GAP / 2.0 + g as f64 * (group_h + GROUP_GAP);
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            gy + group_h / 2.0 + 4.0,
            escape(name)
        );
        for (i, (&value, (series, colour))) in bars.iter().zip(LATENCY_SERIES).enumerate() {
            let by = gy + i as f64 * (BAR + GAP);
            let v = value as f64;
            // Keep a hairline so a value at the axis minimum is still seen.
            let w = if value > 0 {
                (axis.frac(v) * plot_w).max(1.0)
            } else {
                0.0
            };
            let label = micros(v);
            let _ = writeln!(
                out,
                "<rect x=\"{left:.1}\" y=\"{by:.1}\" width=\"{w:.1}\" height=\"{BAR}\" fill=\"{colour}\"><title>{} {series}: {label}</title></rect>\
                 <text class=\"value\" x=\"{:.1}\" y=\"{:.1}\">{label}</text>",
                escape(name),
                left + w + 4.0,
                by + BAR - 2.0
            );
        }
    }
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{left:.1}\" x2=\"{left:.1}\" y1=\"{top}\" y2=\"{base:.1}\"/>\n</svg>"
    );
    out
}

/// Horizontal bars from zero, one per (name, count), each labelled with its
/// count and share of the total.
fn bar_chart(title: &str, bars: &[(&str, u64)]) -> String {
    const ROW: f64 = 24.0;
    const BAR: f64 = 15.0;
    let width = 960.0;
    let left = name_margin(bars.iter().map(|(name, _)| *name));
    let (right, top, bottom) = (96.0, 34.0, 30.0);
    let plot_w = width - left - right;
    let plot_h = bars.len() as f64 * ROW + 6.0;
    let height = top + plot_h + bottom;
    let mut out = String::new();
    open_svg(&mut out, title, width, height);
    if bars.is_empty() {
        empty_note(&mut out, "nothing to show", width, height.max(80.0));
        return out;
    }
    let total: u64 = bars.iter().map(|(_, n)| *n).sum();
    let max = bars.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let axis = Axis::from_zero(max as f64);
    let base = top + plot_h;
    for tick in &axis.ticks {
        let tx = left + axis.frac(*tick) * plot_w;
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{top}\" y2=\"{base:.1}\"/>\
             <text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            base + 16.0,
            tick_label(*tick)
        );
    }
    for (i, (name, n)) in bars.iter().enumerate() {
        let by = top + 6.0 + i as f64 * ROW;
        let w = axis.frac(*n as f64) * plot_w;
        // `total` is at least `n`, so it is non-zero whenever `n` is.
        let share = if total > 0 {
            *n as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        // A small share keeps a decimal so it does not read as "0%".
        let share = if share < 10.0 {
            format!("{share:.1}")
        } else {
            format!("{share:.0}")
        };
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{left:.1}\" y=\"{by:.1}\" width=\"{w:.1}\" height=\"{BAR}\" fill=\"{}\"/>\
             <text class=\"value\" x=\"{:.1}\" y=\"{:.1}\">{} ({share}%)</text>",
            left - 8.0,
            by + BAR - 3.0,
            escape(name),
            PALETTE[1],
            left + w + 4.0,
            by + BAR - 4.0,
            count(*n)
        );
    }
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{left:.1}\" x2=\"{left:.1}\" y1=\"{top}\" y2=\"{base:.1}\"/>\n</svg>"
    );
    out
}

/// Room on the left for the longest bar name, within reason.
fn name_margin<'a>(names: impl Iterator<Item = &'a str>) -> f64 {
    let longest = names.map(|n| n.chars().count()).max().unwrap_or(0);
    (16.0 + 6.5 * longest as f64).clamp(80.0, 260.0)
}

/// A linear axis: the range it shows and where its tick labels go.
#[derive(Debug)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// From zero to a round number at or above `max`; all-zero (or no)
    /// data gets 0..1 rather than an empty range.
    fn from_zero(max: f64) -> Self {
        let max = if max.is_finite() && max > 0.0 {
            max
        } else {
            1.0
        };
        let step = nice_step(max, 5);
        let hi = (max / step).ceil() * step;
        Self {
            lo: 0.0,
            hi,
            ticks: ticks_from(0.0, hi, step),
        }
    }

    /// Exactly `lo..hi`, so a line fills the plot, with ticks at round
    /// numbers inside; a single instant is widened to one unit.
    fn spanning(lo: f64, hi: f64) -> Self {
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let step = nice_step(hi - lo, 6);
        Self {
            lo,
            hi,
            ticks: ticks_from((lo / step).ceil() * step, hi, step),
        }
    }

    /// Where `v` falls between `lo` (0.0) and `hi` (1.0), clamped.
    fn frac(&self, v: f64) -> f64 {
        let span = self.hi - self.lo;
        if span > 0.0 && v.is_finite() {
            ((v - self.lo) / span).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// A round step (1, 2 or 5 times a power of ten) giving about `target`
/// ticks over `range`.
fn nice_step(range: f64, target: u32) -> f64 {
    let raw = range / f64::from(target.max(1));
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let norm = raw / magnitude;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// `first`, `first + step`, ... up to `last`; bounded so odd input cannot
/// make a huge list.
fn ticks_from(first: f64, last: f64, step: f64) -> Vec<f64> {
    let n = ((last - first) / step + 1e-9).floor();
    if !(n.is_finite() && n >= 0.0 && step > 0.0) {
        return Vec::new();
    }
    (0..=(n as usize).min(20))
        .map(|i| first + step * i as f64)
        .collect()
}

/// A log10 axis over whole decades.
#[derive(Debug)]
struct LogAxis {
    lo_exp: i32,
    hi_exp: i32,
}

impl LogAxis {
    /// Spans the positive `values`, or `None` if there are none. The lower
    /// bound sits at least half a decade below the smallest value so that
    /// its bar is visible.
    fn new(values: impl Iterator<Item = f64>) -> Option<Self> {
        let (mut min, mut max) = (f64::MAX, 0.0f64);
        for v in values.filter(|v| v.is_finite() && *v > 0.0) {
            min = min.min(v);
            max = max.max(v);
        }
        if max <= 0.0 {
            return None;
        }
        let lo_exp = (min.log10() - 0.5).floor() as i32;
        let hi_exp = (max.log10().ceil() as i32).max(lo_exp + 1);
        Some(Self { lo_exp, hi_exp })
    }

    fn decades(&self) -> impl Iterator<Item = i32> {
        self.lo_exp..=self.hi_exp
    }

    fn frac(&self, v: f64) -> f64 {
        if !(v.is_finite() && v > 0.0) {
            return 0.0;
        }
        let span = f64::from(self.hi_exp - self.lo_exp);
        ((v.log10() - f64::from(self.lo_exp)) / span).clamp(0.0, 1.0)
    }
}

// ---------------------------------------------------------------------------
// Number and time formatting.
// ---------------------------------------------------------------------------

/// `1234567` as `1,234,567`.
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count in binary units; the exact count shows on hover.
fn bytes(n: u64) -> String {
    let v = n as f64;
    if v < 1024.0 {
        format!("{n} B")
    } else if v < MIB {
        format!("{:.1} KiB", v / 1024.0)
    } else if v < 1024.0 * MIB {
        format!("{:.1} MiB", v / MIB)
    } else {
        format!(
            "<span title=\"{} bytes\">{:.2} GiB</span>",
            count(n),
            v / (1024.0 * MIB)
        )
    }
}

/// Microseconds as milliseconds for the latency table's fixed columns.
fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// Microseconds in the unit that reads best: `850 µs`, `12.3 ms`, `1.2 s`.
fn micros(us: f64) -> String {
    if us < 1_000.0 {
        format!("{} µs", three_digits(us))
    } else if us < 1_000_000.0 {
        format!("{} ms", three_digits(us / 1_000.0))
    } else {
        format!("{} s", three_digits(us / 1_000_000.0))
    }
}

/// About three significant digits, without trailing zeros.
fn three_digits(v: f64) -> String {
    let text = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    trim_zeros(text)
}

/// A tick label: short, with k/M/G for large values.
fn tick_label(v: f64) -> String {
    if !v.is_finite() || v.abs() < 1e-9 {
        return "0".to_owned();
    }
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    format!("{}{suffix}", trim_zeros(format!("{scaled:.2}")))
}

fn trim_zeros(text: String) -> String {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// A run-length in milliseconds: `4.2 s`, or `12 min 5 s` once it is long.
fn duration(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        let secs = ms / 1000;
        format!("{} min {} s", secs / 60, secs % 60)
    }
}

/// Unix milliseconds as a UTC date and time, computed here (civil-from-days)
/// rather than pulling in a date crate for one line.
fn utc_datetime(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm, eras of 400 years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latencies;
    use crate::report::tests::sample_report;

    /// The shared sample with a second call type and a hub that grows.
    fn normal_report() -> Report {
        let mut report = sample_report("1/1", &[1, 2, 3, 40, 150]);
        if let Some(stats) = report.calls.get("StartScript").cloned() {
            report.calls.insert("UploadFile".into(), stats);
        }
        report.invariants.push(InvariantResult {
            name: "uploads-verified".into(),
            description: "every upload's digest matched".into(),
            passed: true,
            checked: 4,
            violations: 0,
            examples: vec![],
        });
        report
    }

    #[test]
    fn a_normal_report_renders_every_section_with_nothing_external() {
        let html = render(&normal_report());
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.contains("<h1>smoke</h1>"));
        assert!(html.contains("tentacle-sim run --scenario FILE --seed 7"));
        assert!(html.contains("class=\"badge pass\">PASS"));
        let charts = html.matches("<svg").count();
        assert!(charts >= 6, "{charts} charts");
        for name in [
            "StartScript",
            "UploadFile",
            "scripts-ran-once",
            "uploads-verified",
        ] {
            assert!(html.contains(name), "{name} missing");
        }
        assert!(html.contains("Unavailable"));
        assert!(
            html.contains(">1 (100%)<"),
            "error bar labelled with count and share"
        );
        assert!(html.contains("disconnect"));
        for external in ["http://", "https://", "<script", "<link", "url("] {
            assert!(!html.contains(external), "page contains {external}");
        }
        assert!(!html.contains("NaN"));
        // Sections come in the promised order.
        let order = [
            "id=\"invariants\"",
            "Connected agents",
            "Calls per second",
            "id=\"latency\"",
            "id=\"errors\"",
            "Hub CPU",
            "Hub resident memory",
            "<h3>Stages</h3>",
        ];
        let positions: Vec<usize> = order.iter().filter_map(|s| html.find(s)).collect();
        assert_eq!(positions.len(), order.len(), "a section is missing");
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    }

    #[test]
    fn strings_from_the_report_are_escaped() {
        let hostile = "<script>alert(1)</script> & \"double\" 'single'";
        let mut report = normal_report();
        report.scenario = hostile.into();
        if let Some(stats) = report.calls.get("StartScript").cloned() {
            report.calls.insert(format!("Call{hostile}"), stats);
        }
        report.errors.insert(format!("Status{hostile}"), 3);
        report.stages[0].name = format!("stage{hostile}");
        report.invariants[0].passed = false;
        report.invariants[0].examples = vec![format!("agent-1 said {hostile}")];
        report.error_examples.insert(
            "Unavailable".into(),
            vec![format!("GetStatus to agent-2: {hostile}")],
        );
        let html = render(&report);
        assert!(!html.contains("<script>"), "raw script tag");
        assert!(!html.contains("\"double\""));
        assert!(!html.contains("'single'"));
        assert!(!html.contains(" & "));
        assert!(html.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;double&quot; &#39;single&#39;"
        ));
        assert!(html.contains("agent-1 said &lt;script&gt;"));
        assert!(html.contains("GetStatus to agent-2: &lt;script&gt;"));
    }

    #[test]
    fn empty_data_renders_without_nan_or_infinity() {
        let mut report = sample_report("1/1", &[]);
        report.timeline.clear();
        report.calls.clear();
        report.errors.clear();
        report.stages.clear();
        report.chaos.clear();
        report.invariants.clear();
        report.agents.connect_all_ms = None;
        let empty = render(&report);

        // One sample, all zeros, and a call type with only failures.
        report.timeline = vec![Sample::default()];
        let mut failing = Latencies::default();
        failing.record_error();
        report.calls.insert("WatchScript".into(), failing.stats());
        report.errors.insert("Unavailable".into(), 0);
        let degenerate = render(&report);

        for html in [&empty, &degenerate] {
            for bad in ["NaN", "inf"] {
                assert!(!html.contains(bad), "page contains {bad}:\n{html}");
            }
        }
        assert!(empty.contains("no samples"));
        assert!(empty.contains("No calls were made"));
        assert!(empty.contains("No failed calls"));
        assert!(empty.contains("never"));
        assert!(empty.contains("no invariants were checked"));
        assert!(
            degenerate.contains("<circle"),
            "a single sample is drawn as a dot"
        );
        assert!(degenerate.contains("no successful calls to time"));
    }

    #[test]
    fn a_failing_invariant_shows_fail_and_its_examples() {
        let mut report = normal_report();
        report.invariants[1].passed = false;
        report.invariants[1].violations = 7;
        report.invariants[1].examples = vec![
            "agent-0042: digest mismatch".into(),
            "agent-0077: digest mismatch".into(),
        ];
        let html = render(&report);
        assert!(html.contains("class=\"badge fail\">FAIL"));
        assert!(!html.contains("class=\"badge pass\""));
        assert!(html.contains("1 of 2 invariants held"));
        assert!(html.contains("<span class=\"bad\">FAIL</span>"));
        assert!(html.contains("2 of 7 violations"));
        let row = html.find("uploads-verified").unwrap_or(usize::MAX);
        let example = html.find("agent-0042: digest mismatch").unwrap_or(0);
        assert!(row < example, "examples follow their invariant");
        assert!(html.contains("agent-0077: digest mismatch"));
    }

    #[test]
    fn axes_and_formatting_handle_edge_values() {
        let zero = Axis::from_zero(0.0);
        assert_eq!((zero.lo, zero.hi), (0.0, 1.0));
        assert_eq!(zero.frac(0.5), 0.5);
        let flat = Axis::spanning(3.0, 3.0);
        assert!(flat.hi > flat.lo && flat.frac(3.0) == 0.0);
        let big = Axis::from_zero(9_876.0);
        assert_eq!(big.hi, 10_000.0);
        assert_eq!(big.ticks.len(), 6);
        let log = LogAxis::new([1_000.0, 100_000.0].into_iter()).map(|a| (a.lo_exp, a.hi_exp));
        assert_eq!(log, Some((2, 5)));
        assert!(LogAxis::new([0.0].into_iter()).is_none());
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(999), "999");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(
            bytes(5 << 30),
            "<span title=\"5,368,709,120 bytes\">5.00 GiB</span>"
        );
        assert_eq!(micros(850.0), "850 µs");
        assert_eq!(micros(12_340.0), "12.3 ms");
        assert_eq!(micros(1_500_000.0), "1.5 s");
        assert_eq!(tick_label(20_000.0), "20k");
        assert_eq!(tick_label(0.1 + 0.2), "0.3");
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_datetime(1_700_000_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_datetime(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }
}
