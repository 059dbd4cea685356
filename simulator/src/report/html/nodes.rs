//! The per-node section of a run against a hub cluster: a table of each
//! node's peaks, kills and restarts, then connected agents, CPU and
//! resident memory over time with one line per node, so that a killed
//! node's drop and the others' rise read side by side.

use maud::{Markup, html};

use super::charts::{marked_line_chart, series};
use super::format::{MIB, bytes, count};
use crate::report::{NodeSample, Report};

/// Nothing for a single hub: its figures are the "Hub resources".
pub(super) fn section(report: &Report) -> Markup {
    if report.hub_nodes.len() < 2 {
        return html! {};
    }
    let names: Vec<String> = report
        .hub_nodes
        .iter()
        .map(|n| format!("node {}", n.node))
        .collect();
    let per_node = |value: &dyn Fn(&NodeSample) -> Option<f64>| -> Vec<(&str, Vec<(f64, f64)>)> {
        names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let points = series(&report.timeline, |s| {
                    s.nodes.get(k).and_then(value).unwrap_or(f64::NAN)
                });
                (name.as_str(), points)
            })
            .collect()
    };
    let connected = per_node(&|n| Some(n.connected as f64));
    let hub_counted = per_node(&|n| n.hub_connected.map(|c| c as f64));
    let any_hub_count = hub_counted
        .iter()
        .any(|(_, points)| points.iter().any(|(_, y)| y.is_finite()));
    let cpu = per_node(&|n| Some(n.cpu_percent));
    let rss = per_node(&|n| Some(n.rss_bytes as f64 / MIB));
    let marks = marks(report);
    let chart = |title: &str, series: &[(&str, Vec<(f64, f64)>)], y_label: &str| {
        marked_line_chart(title, series, y_label, &marks)
    };
    html! {
        section #nodes {
            h2 { "Hub nodes" }
            p.muted {
                "Connected agents are counted from the agents' side: each holds its tunnel on one node "
                "and moves to the next when that node is lost. CPU and memory read 0 while a node is down, "
                "and after a restart only if its restart command execs the server."
            }
            div.charts {
                (chart("Connected agents by node", &connected, "agents"))
                @if any_hub_count {
                    (chart("Connected agents by node, as each node counts them", &hub_counted, "agents"))
                }
                (chart("CPU by node", &cpu, "% of one core"))
                (chart("Resident memory by node", &rss, "MiB"))
            }
            table.spaced {
                tr {
                    th.n { "Node" } th { "Address" } th.n { "pid at the end" }
                    th.n { "Most connected" } th.n { "Most CPU" } th.n { "Most memory" }
                    th.n { "Killed" } th.n { "Restarted" }
                }
                @for node in &report.hub_nodes {
                    @let figures = report.node_figures(node.node);
                    tr {
                        td.n { (node.node) }
                        td.name { code { (node.address) } }
                        td.n { (node.pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())) }
                        td.n { (count(figures.most_connected)) }
                        td.n { (format!("{:.0}%", figures.most_cpu_percent)) }
                        td.n { (bytes(figures.most_rss_bytes)) }
                        td.n { (node.kills) }
                        td.n { (node.restarts) }
                    }
                }
            }
        }
    }
}

/// A dashed line where each node was killed and where it was back.
fn marks(report: &Report) -> Vec<(f64, String)> {
    let mut marks = Vec::new();
    for node in &report.hub_nodes {
        for at in &node.killed_at_ms {
            marks.push((*at as f64 / 1000.0, format!("node {} killed", node.node)));
        }
        for at in &node.back_at_ms {
            marks.push((*at as f64 / 1000.0, format!("node {} back", node.node)));
        }
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::html::tests::assert_balanced;
    use crate::report::tests::{cluster_report, sample_report};

    #[test]
    fn a_cluster_run_gets_one_line_per_node_in_each_chart() {
        let report = cluster_report("1/1");
        let html = section(&report).into_string();
        assert_balanced(&html);
        for title in [
            "Connected agents by node",
            "as each node counts them",
            "CPU by node",
            "Resident memory by node",
        ] {
            assert!(html.contains(title), "{title}");
        }
        // Four charts of two nodes each; node 2 has no metrics, so the
        // hub's own count draws only node 1.
        assert_eq!(html.matches("<polyline").count(), 2 + 1 + 2 + 2, "{html}");
        assert!(html.contains(">node 1</text>") && html.contains(">node 2</text>"));
        assert!(html.contains("https://127.0.0.1:7002"));
        // Node 2's kill and return are marked on each of the four charts.
        assert_eq!(html.matches(">node 2 killed</text>").count(), 4, "{html}");
        assert_eq!(html.matches(">node 2 back</text>").count(), 4, "{html}");
        assert!(!html.contains("NaN"));
    }

    #[test]
    fn a_single_hub_has_no_node_section() {
        assert!(
            section(&sample_report("1/1", &[1]))
                .into_string()
                .is_empty()
        );
    }
}
