//! The HTML page of a scenario run: [`render`] turns a [`Report`] into one
//! self-contained file that a person opens from disk.
//!
//! The page is built with maud, so it escapes by construction: text from
//! the report (scenario, shard, call and stage names, and invariant and
//! error examples, which quote whatever the agents sent back) is spliced
//! as a string and escaped; only [`maud::Markup`] built by these modules,
//! and the page's own constant CSS, is inserted as HTML. There is no
//! escaping function to forget to call.
//!
//! - `page`: the document skeleton, its Content-Security-Policy and CSS.
//! - `sections`: the header and verdict, tables, invariant results and
//!   errors, in page order.
//! - `nodes`: the per-node figures of a run against a hub cluster.
//! - `charts`: the inline SVG charts and their axes.
//! - `format`: numbers, sizes, durations and dates as text.

mod charts;
mod format;
mod nodes;
mod page;
mod sections;
#[cfg(test)]
mod tests;

use super::Report;

/// Renders `report` as one self-contained HTML page.
pub fn render(report: &Report) -> String {
    page::document(report).into_string()
}
