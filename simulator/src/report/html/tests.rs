//! Tests of the whole page, and the markup checks the chart tests share.

use super::render;
use crate::report::tests::sample_report;
use crate::report::{InvariantResult, Latencies, Report, Sample, ShardInfo};

/// HTML elements that have no end tag; the page only uses `meta`.
const VOID: [&str; 6] = ["meta", "br", "hr", "img", "input", "link"];

/// Every tag in `markup`, in order, as (name, is an end tag). maud escapes
/// `<` and `>` in text and attribute values, so each `<` starts a tag.
fn tags(markup: &str) -> Vec<(&str, bool)> {
    let mut out = Vec::new();
    let mut rest = markup;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let end = after.find('>').unwrap_or(after.len());
        let tag = &after[..end];
        rest = after.get(end + 1..).unwrap_or("");
        if tag.starts_with('!') {
            continue;
        }
        let (closing, body) = match tag.strip_prefix('/') {
            Some(body) => (true, body),
            None => (false, tag),
        };
        let name = body
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or("");
        out.push((name, closing));
    }
    out
}

/// Panics unless every element in `markup` is closed, in order, by its own
/// end tag. This matters most for SVG: inside `<svg>` the HTML parser does
/// not close `<line>` by itself, so an unclosed element nests the rest of
/// the chart inside it.
pub(super) fn assert_balanced(markup: &str) {
    let mut open: Vec<&str> = Vec::new();
    for (name, closing) in tags(markup) {
        if closing {
            let top = open.pop();
            assert_eq!(top, Some(name), "</{name}> closes {top:?} in\n{markup}");
        } else if !VOID.contains(&name) {
            open.push(name);
        }
    }
    assert!(open.is_empty(), "left open: {open:?}");
}

/// Every value of attribute `name` in `markup`, in order.
pub(super) fn attribute_values<'a>(markup: &'a str, name: &str) -> Vec<&'a str> {
    let needle = format!(" {name}=\"");
    markup
        .match_indices(&needle)
        .filter_map(|(i, _)| {
            let value = &markup[i + needle.len()..];
            value.find('"').map(|end| &value[..end])
        })
        .collect()
}

/// The shared sample with a second call type and invariant.
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
    assert!(html.starts_with("<!DOCTYPE html><html lang=\"en\">"));
    assert!(html.contains("<h1>smoke</h1>"));
    assert!(html.contains("tentacle-sim run --scenario FILE --seed 7"));
    assert!(html.contains("<div class=\"badge pass\">PASS"));
    assert!(html.contains("<title>PASS · smoke · tentacle-sim</title>"));
    assert!(
        html.contains("<time datetime=\"1970-01-01T00:00:01Z\">1970-01-01 00:00:01 UTC</time>")
    );
    assert!(html.contains("default-src 'none'; style-src 'unsafe-inline'"));
    let charts = html.matches("<svg").count();
    assert!(charts >= 6, "{charts} charts");
    assert_eq!(attribute_values(&html, "viewBox").len(), charts);
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
    assert!(html.contains("<td>disconnect</td><td class=\"n\">2</td>"));
    assert!(html.contains("<td>dispatched</td><td class=\"n\">10</td>"));
    assert_eq!(external_references(&html), Vec::<&str>::new());
    assert!(!html.contains("NaN"));
    assert_balanced(&html);
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
        "<footer>",
    ];
    let positions: Vec<usize> = order.iter().filter_map(|s| html.find(s)).collect();
    assert_eq!(positions.len(), order.len(), "a section is missing");
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
}

#[test]
fn text_from_agents_and_the_report_is_escaped() {
    let hostile = "<script>alert(1)</script> \"&'";
    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &quot;&amp;'";
    let mut report = normal_report();
    report.scenario = hostile.into();
    report.chaos_schedule_sha256 = hostile.into();
    report.shards.push(ShardInfo {
        shard: hostile.into(),
        agents: 1,
        open_file_limit: 1,
        hub: hostile.into(),
    });
    if let Some(stats) = report.calls.get("StartScript").cloned() {
        report.calls.insert(format!("Call{hostile}"), stats);
    }
    report.errors.insert(format!("Status{hostile}"), 3);
    report.chaos.insert(format!("chaos{hostile}"), 1);
    report.stages[0].name = format!("stage{hostile}");
    report.invariants[0].passed = false;
    report.invariants[0].name = format!("invariant{hostile}");
    report.invariants[0].description = format!("described{hostile}");
    report.invariants[0].examples = vec![format!("agent virtual-1{hostile} said {hostile}")];
    report.error_examples.insert(
        format!("Status{hostile}"),
        vec![
            format!("GetHealth to virtual-2{hostile}: {hostile}"),
            "could not connect to https://127.0.0.1:10933: connection refused".into(),
        ],
    );
    let html = render(&report);
    // A quoted error may name an address; it stays text, never a link.
    assert!(html.contains("could not connect to https://127.0.0.1:10933"));
    assert_eq!(external_references(&html), Vec::<&str>::new());

    assert!(!html.contains("<script"), "raw script tag");
    assert!(!html.contains("\"&'"), "raw quote and ampersand");
    assert!(html.contains(&format!("agent virtual-1{escaped} said {escaped}")));
    assert!(html.contains(&format!("GetHealth to virtual-2{escaped}: {escaped}")));
    for prefix in [
        "<h1>",
        "<title>FAIL · ",
        "<code>",
        "invariant",
        "described",
        "Call",
        "Status",
        "chaos",
        "stage",
    ] {
        assert!(
            html.contains(&format!("{prefix}{escaped}")),
            "{prefix} not escaped"
        );
    }
    // Scenario (title, h1), sha, shard twice, hub, call name in the table,
    // the chart and its bar titles, status in the chart and examples, ...
    let places = html.matches(escaped).count();
    assert!(places >= 20, "escaped in only {places} places");
    // The hostile text opened no element: the page's structure is intact.
    assert_balanced(&html);
    assert_eq!(html.matches("<tr class=\"examples\">").count(), 1);
}

#[test]
fn an_empty_report_renders_without_nan_or_infinity() {
    let mut report = sample_report("1/1", &[]);
    report.timeline.clear();
    report.calls.clear();
    report.errors.clear();
    report.error_examples.clear();
    report.stages.clear();
    report.chaos.clear();
    report.shards.clear();
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
        assert_balanced(html);
    }
    assert_eq!(empty.matches(">no samples</text>").count(), 4);
    assert!(empty.contains("No calls were made"));
    assert!(empty.contains("No failed calls"));
    assert!(empty.contains("never: some agents did not connect"));
    assert!(empty.contains("no invariants were checked"));
    assert!(empty.contains("No stages ran"));
    assert!(empty.contains("No chaos was injected"));
    assert!(empty.contains("none recorded"));
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
    assert!(html.contains("<div class=\"badge fail\">FAIL"));
    assert!(!html.contains("class=\"badge pass\""));
    assert!(html.contains("<title>FAIL · smoke"));
    assert!(html.contains("1 of 2 invariants held"));
    assert!(html.contains("<tr class=\"failed\"><td class=\"name\"><code>uploads-verified"));
    assert!(html.contains("<span class=\"bad\">FAIL</span>"));
    assert!(html.contains("2 of 7 violations:"));
    let row = html.find("uploads-verified").unwrap_or(usize::MAX);
    let example = html.find("agent-0042: digest mismatch").unwrap_or(0);
    assert!(row < example, "examples follow their invariant");
    assert!(html.contains("<li><code>agent-0077: digest mismatch</code></li>"));
}

#[test]
fn a_corrupt_start_time_is_shown_not_panicked_on() {
    let mut report = normal_report();
    report.started_unix_ms = u64::MAX;
    let html = render(&report);
    assert!(
        html.contains("past the year 9999"),
        "start time not flagged"
    );
    assert!(!html.contains("<time"));
}

/// The ways a page could make a browser fetch something: the report must
/// open offline, so none may appear.
fn external_references(html: &str) -> Vec<&'static str> {
    ["src=", "href=", "<script", "<link", "url(", "@import"]
        .into_iter()
        .filter(|marker| html.contains(marker))
        .collect()
}
