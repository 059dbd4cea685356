//! The document around the sections: doctype, `<head>` with its
//! Content-Security-Policy and inline CSS, the order of the sections, and
//! the footer.
//!
//! Nothing on the page is fetched: no scripts, fonts, stylesheets or
//! images, and a policy that forbids them anyway, so a report opens the
//! same on an air-gapped laptop as in CI artefacts.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::sections;
use crate::report::Report;

/// Inline styles only; everything else, including fonts and images, is
/// refused even if something slipped into the page.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'";

/// The whole page for `report`.
pub(super) fn document(report: &Report) -> Markup {
    let verdict = if report.passed() { "PASS" } else { "FAIL" };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="Content-Security-Policy" content=(CONTENT_SECURITY_POLICY);
                title { (verdict) " · " (report.scenario) " · tentacle-sim" }
                // A constant of this module, never report data.
                style { (PreEscaped(STYLE)) }
            }
            body {
                (sections::header(report))
                main {
                    (sections::invariants(&report.invariants))
                    (sections::timeline(&report.timeline))
                    (sections::latency(&report.calls))
                    (sections::errors(&report.errors, &report.error_examples))
                    (sections::hub(&report.timeline))
                    (super::nodes::section(report))
                    (sections::totals(report))
                }
                footer {
                    "tentacle-sim report, schema " (report.schema_version)
                    ". This page loads nothing from the network."
                }
            }
        }
    }
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
table.spaced, .tables { margin-top: 16px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f1f5f9; font-weight: 600; }
td.name { white-space: nowrap; }
td.name code { word-break: normal; }
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
svg.chart .mark { stroke: #64748b; stroke-dasharray: 4 3; }
svg.chart text.mark { font-size: 10px; fill: #475569; stroke: #fff; stroke-width: 3px; stroke-dasharray: none; paint-order: stroke; }
details summary { cursor: pointer; }
footer { color: var(--muted); font-size: 12px; }
";
