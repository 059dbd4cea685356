//! The page's charts: inline SVG built with maud, so chart titles, series
//! and bar names (call types and gRPC statuses come from the report) are
//! escaped like any other text on the page.
//!
//! Each chart is one `<svg>` sized by its viewBox, so it scales with the
//! page. Every coordinate goes through [`Axis::frac`] or [`LogAxis::frac`],
//! which never divide by zero and clamp to the plot, and is written by
//! [`Px`], so an attribute only ever holds a finite number. Elements are
//! always written with an end tag (`line … {}`, never maud's `line;`): in
//! HTML, SVG is foreign content, where `<line>` without `/>` or `</line>`
//! stays open and swallows what follows.

use std::fmt;

use maud::{Markup, html};

use super::format::{count, micros, tick_label};
use crate::report::Sample;

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
/// Wide charts (latency, errors) span the page.
const WIDE_W: f64 = 960.0;

/// A coordinate as an attribute value: one decimal is finer than a pixel,
/// and anything not finite (which the axes never produce) is written as 0
/// rather than `NaN`, which would make the element vanish.
#[derive(Debug, Clone, Copy)]
struct Px(f64);

impl fmt::Display for Px {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = if self.0.is_finite() { self.0 } else { 0.0 };
        write!(f, "{v:.1}")
    }
}

/// One chart series from the timeline: (seconds since start, value).
pub(super) fn series(timeline: &[Sample], value: impl Fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    timeline
        .iter()
        .map(|s| (s.t_ms as f64 / 1000.0, value(s)))
        .collect()
}

/// The `<svg>` element of a chart, with its title and accessible name.
fn frame(title: &str, width: f64, height: f64, body: Markup) -> Markup {
    let (w, h) = (width.round(), height.round());
    html! {
        svg class="chart" width=(w) height=(h) viewBox={ "0 0 " (w) " " (h) }
            role="img" aria-label=(title) {
            text class="title" x="12" y="20" { (title) }
            (body)
        }
    }
}

/// Centred grey text in place of a chart with nothing to draw.
fn empty_note(message: &str, width: f64, height: f64) -> Markup {
    html! {
        text class="empty" x=(Px(width / 2.0)) y=(Px(height / 2.0 + 10.0)) text-anchor="middle" {
            (message)
        }
    }
}

/// A line chart of `series` (name, points of (seconds, value)) against
/// seconds since the start, with the y axis from zero so that heights
/// compare honestly. Points that are not finite are skipped.
pub(super) fn line_chart(title: &str, series: &[(&str, Vec<(f64, f64)>)], y_label: &str) -> Markup {
    marked_line_chart(title, series, y_label, &[])
}

/// [`line_chart`] with dashed vertical marks at moments of the run (at
/// seconds since the start, each labelled), e.g. a hub node killed and
/// back. Marks outside the samples' span are clamped to its edges.
pub(super) fn marked_line_chart(
    title: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    y_label: &str,
    marks: &[(f64, String)],
) -> Markup {
    let (left, right, top, bottom) = (64.0, 16.0, 34.0, 40.0);
    let (plot_w, plot_h) = (LINE_W - left - right, LINE_H - top - bottom);

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
        return frame(
            title,
            LINE_W,
            LINE_H,
            empty_note("no samples", LINE_W, LINE_H),
        );
    };
    let x_hi = all().map(|p| p.0).fold(x_lo, f64::max);
    let y_max = all().map(|p| p.1).fold(0.0, f64::max);
    let x = Axis::spanning(x_lo, x_hi);
    let y = Axis::from_zero(y_max);
    let px = |v: f64| left + x.frac(v) * plot_w;
    let py = |v: f64| top + (1.0 - y.frac(v)) * plot_h;
    let base = top + plot_h;
    // The points attribute is numbers only, built here because maud has no
    // list syntax for it; it is still an escaped attribute value.
    let polyline = |points: &[(f64, f64)]| {
        points
            .iter()
            .map(|(vx, vy)| format!("{},{}", Px(px(*vx)), Px(py(*vy))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let names: Vec<&str> = series.iter().map(|(name, _)| *name).collect();

    let body = html! {
        @for tick in &y.ticks {
            @let ty = py(*tick);
            line class="grid" x1=(Px(left)) x2=(Px(left + plot_w)) y1=(Px(ty)) y2=(Px(ty)) {}
            text x=(Px(left - 6.0)) y=(Px(ty + 4.0)) text-anchor="end" { (tick_label(*tick)) }
        }
        @for tick in &x.ticks {
            @let tx = px(*tick);
            line class="axis" x1=(Px(tx)) x2=(Px(tx)) y1=(Px(base)) y2=(Px(base + 4.0)) {}
            text x=(Px(tx)) y=(Px(base + 16.0)) text-anchor="middle" { (tick_label(*tick)) }
        }
        line class="axis" x1=(Px(left)) x2=(Px(left)) y1=(Px(top)) y2=(Px(base)) {}
        line class="axis" x1=(Px(left)) x2=(Px(left + plot_w)) y1=(Px(base)) y2=(Px(base)) {}
        text x=(Px(left + plot_w / 2.0)) y=(Px(LINE_H - 6.0)) text-anchor="middle" {
            "seconds since start"
        }
        text transform="rotate(-90)" x=(Px(-(top + plot_h / 2.0))) y="14" text-anchor="middle" {
            (y_label)
        }
        @for (i, points) in clean.iter().enumerate() {
            @let colour = PALETTE[i % PALETTE.len()];
            @if let [(vx, vy)] = points.as_slice() {
                // A polyline of one point draws nothing; show a dot instead.
                circle cx=(Px(px(*vx))) cy=(Px(py(*vy))) r="3" fill=(colour) {}
            } @else if !points.is_empty() {
                polyline fill="none" stroke=(colour) stroke-width="1.8" stroke-linejoin="round"
                    points=(polyline(points)) {}
            }
        }
        @for (i, (at, label)) in marks.iter().filter(|(at, _)| at.is_finite()).enumerate() {
            @let mx = px(*at);
            // Alternate rows, so two marks close together stay legible.
            @let my = top + 10.0 + (i % 2) as f64 * 12.0;
            line class="mark" x1=(Px(mx)) x2=(Px(mx)) y1=(Px(top)) y2=(Px(base)) {}
            text class="mark" x=(Px(mx + 3.0)) y=(Px(my)) { (label) }
        }
        @if series.len() > 1 {
            (legend(&names, &PALETTE, LINE_W - right))
        }
    };
    frame(title, LINE_W, LINE_H, body)
}

/// A legend in the title row, right-aligned to `right_edge`: a swatch and
/// the name of each series.
fn legend(names: &[&str], colours: &[&str], right_edge: f64) -> Markup {
    // No font metrics here; 6.5px per character is close for 11px text.
    let widths: Vec<f64> = names
        .iter()
        .map(|n| 16.0 + 6.5 * n.chars().count() as f64 + 12.0)
        .collect();
    let mut x = right_edge - widths.iter().sum::<f64>();
    let mut entries = Vec::with_capacity(names.len());
    for (i, (name, width)) in names.iter().zip(&widths).enumerate() {
        let colour = colours.get(i % colours.len().max(1)).unwrap_or(&"#000");
        entries.push((x, *name, *colour));
        x += width;
    }
    html! {
        @for (x, name, colour) in entries {
            rect x=(Px(x)) y="11" width="12" height="10" rx="2" fill=(colour) {}
            text x=(Px(x + 16.0)) y="20" { (name) }
        }
    }
}

/// Room on the left for the longest bar name, within reason.
fn name_margin<'a>(names: impl Iterator<Item = &'a str>) -> f64 {
    let longest = names.map(|n| n.chars().count()).max().unwrap_or(0);
    (16.0 + 6.5 * longest as f64).clamp(80.0, 260.0)
}

/// Grouped horizontal bars of p50, p90, p99 and max per call type, on a log
/// scale: a tail 100x the median would flatten the median to a sliver on a
/// linear one. Values are microseconds; each bar is labelled, and its
/// hover title names the call and percentile.
pub(super) fn latency_chart(title: &str, groups: &[(&str, [u64; 4])]) -> Markup {
    const BAR: f64 = 11.0;
    const GAP: f64 = 2.0;
    const GROUP_GAP: f64 = 16.0;
    let group_h = 4.0 * BAR + 3.0 * GAP;
    let left = name_margin(groups.iter().map(|(name, _)| *name));
    let (right, top, bottom) = (72.0, 40.0, 30.0);
    let plot_w = WIDE_W - left - right;
    let plot_h = groups.len() as f64 * (group_h + GROUP_GAP);
    let height = top + plot_h + bottom;

    let values = || groups.iter().flat_map(|(_, v)| v.iter().copied());
    let Some(axis) = LogAxis::new(values().filter(|v| *v > 0).map(|v| v as f64)) else {
        let note = empty_note("no successful calls to time", WIDE_W, height.max(80.0));
        return frame(title, WIDE_W, height, note);
    };
    let names: Vec<&str> = LATENCY_SERIES.iter().map(|(n, _)| *n).collect();
    let colours: Vec<&str> = LATENCY_SERIES.iter().map(|(_, c)| *c).collect();
    let base = top + plot_h;
    // Keep a hairline so a value at the axis minimum is still seen.
    let bar_width = |value: u64| {
        if value > 0 {
            (axis.frac(value as f64) * plot_w).max(1.0)
        } else {
            0.0
        }
    };

    let body = html! {
        (legend(&names, &colours, WIDE_W - right))
        @for exp in axis.decades() {
            @let value = 10f64.powi(exp);
            @let tx = left + axis.frac(value) * plot_w;
            line class="grid" x1=(Px(tx)) x2=(Px(tx)) y1=(Px(top)) y2=(Px(base)) {}
            text x=(Px(tx)) y=(Px(base + 16.0)) text-anchor="middle" { (micros(value)) }
        }
        @for (g, (name, bars)) in groups.iter().enumerate() {
            @let gy = top + GROUP_GAP / 2.0 + g as f64 * (group_h + GROUP_GAP);
            text x=(Px(left - 8.0)) y=(Px(gy + group_h / 2.0 + 4.0)) text-anchor="end" { (name) }
            @for (i, (&value, (percentile, colour))) in bars.iter().zip(LATENCY_SERIES).enumerate() {
                @let by = gy + i as f64 * (BAR + GAP);
                @let w = bar_width(value);
                @let label = micros(value as f64);
                rect x=(Px(left)) y=(Px(by)) width=(Px(w)) height=(BAR) fill=(colour) {
                    title { (name) " " (percentile) ": " (label) }
                }
                text class="value" x=(Px(left + w + 4.0)) y=(Px(by + BAR - 2.0)) { (label) }
            }
        }
        line class="axis" x1=(Px(left)) x2=(Px(left)) y1=(Px(top)) y2=(Px(base)) {}
    };
    frame(title, WIDE_W, height, body)
}

/// Horizontal bars from zero, one per (name, count), each labelled with its
/// count and share of the total.
pub(super) fn bar_chart(title: &str, bars: &[(&str, u64)]) -> Markup {
    const ROW: f64 = 24.0;
    const BAR: f64 = 15.0;
    let left = name_margin(bars.iter().map(|(name, _)| *name));
    let (right, top, bottom) = (96.0, 34.0, 30.0);
    let plot_w = WIDE_W - left - right;
    let plot_h = bars.len() as f64 * ROW + 6.0;
    let height = top + plot_h + bottom;
    if bars.is_empty() {
        let note = empty_note("nothing to show", WIDE_W, height.max(80.0));
        return frame(title, WIDE_W, height, note);
    }
    let total: u64 = bars.iter().map(|(_, n)| *n).sum();
    let max = bars.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let axis = Axis::from_zero(max as f64);
    let base = top + plot_h;
    let share = |n: u64| {
        // `total` is at least `n`, so it is non-zero whenever `n` is.
        let share = if total > 0 {
            n as f64 * 100.0 / total as f64
        } else {
            0.0
        };
        // A small share keeps a decimal so it does not read as "0%".
        if share < 10.0 {
            format!("{share:.1}")
        } else {
            format!("{share:.0}")
        }
    };

    let body = html! {
        @for tick in &axis.ticks {
            @let tx = left + axis.frac(*tick) * plot_w;
            line class="grid" x1=(Px(tx)) x2=(Px(tx)) y1=(Px(top)) y2=(Px(base)) {}
            text x=(Px(tx)) y=(Px(base + 16.0)) text-anchor="middle" { (tick_label(*tick)) }
        }
        @for (i, (name, n)) in bars.iter().enumerate() {
            @let by = top + 6.0 + i as f64 * ROW;
            @let w = axis.frac(*n as f64) * plot_w;
            text x=(Px(left - 8.0)) y=(Px(by + BAR - 3.0)) text-anchor="end" { (name) }
            rect x=(Px(left)) y=(Px(by)) width=(Px(w)) height=(BAR) fill=(PALETTE[1]) {}
            text class="value" x=(Px(left + w + 4.0)) y=(Px(by + BAR - 4.0)) {
                (count(*n)) " (" (share(*n)) "%)"
            }
        }
        line class="axis" x1=(Px(left)) x2=(Px(left)) y1=(Px(top)) y2=(Px(base)) {}
    };
    frame(title, WIDE_W, height, body)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::html::tests::{assert_balanced, attribute_values};

    #[test]
    fn axes_handle_edge_values() {
        let zero = Axis::from_zero(0.0);
        assert_eq!((zero.lo, zero.hi), (0.0, 1.0));
        assert_eq!(zero.frac(0.5), 0.5);
        assert_eq!(Axis::from_zero(f64::NAN).hi, 1.0);
        let flat = Axis::spanning(3.0, 3.0);
        assert!(flat.hi > flat.lo && flat.frac(3.0) == 0.0);
        let big = Axis::from_zero(9_876.0);
        assert_eq!(big.hi, 10_000.0);
        assert_eq!(big.ticks.len(), 6);
        let log = LogAxis::new([1_000.0, 100_000.0].into_iter()).map(|a| (a.lo_exp, a.hi_exp));
        assert_eq!(log, Some((2, 5)));
        assert!(LogAxis::new([0.0].into_iter()).is_none());
        assert!(ticks_from(0.0, f64::INFINITY, 1.0).len() <= 21);
        assert_eq!(Px(f64::NAN).to_string(), "0.0");
        assert_eq!(Px(12.345).to_string(), "12.3");
    }

    #[test]
    fn a_line_chart_draws_each_series_inside_its_viewbox() {
        let connected: Vec<(f64, f64)> =
            (0..10).map(|i| (f64::from(i), f64::from(i * 30))).collect();
        let errors: Vec<(f64, f64)> = (0..10).map(|i| (f64::from(i), f64::from(i % 3))).collect();
        let svg = line_chart(
            "Calls <per> second",
            &[("calls", connected), ("errors", errors)],
            "calls / s",
        )
        .into_string();
        assert!(svg.starts_with("<svg class=\"chart\""), "{svg}");
        assert!(svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("viewBox=\"0 0 560 260\""), "{svg}");
        assert_balanced(&svg);
        assert!(svg.contains("Calls &lt;per&gt; second"), "title escaped");

        let lines = attribute_values(&svg, "points");
        assert_eq!(lines.len(), 2, "one polyline per series");
        for points in lines {
            let pairs: Vec<&str> = points.split(' ').collect();
            assert_eq!(pairs.len(), 10, "{points}");
            for pair in pairs {
                let (x, y) = pair.split_once(',').unwrap_or(("", ""));
                let (x, y): (f64, f64) = (x.parse().unwrap_or(-1.0), y.parse().unwrap_or(-1.0));
                assert!(
                    (0.0..=LINE_W).contains(&x) && (0.0..=LINE_H).contains(&y),
                    "{pair}"
                );
            }
        }
        // The legend names both series, in the palette's colours.
        assert!(svg.contains(">calls</text>") && svg.contains(">errors</text>"));
        assert!(svg.contains(&format!("fill=\"{}\"", PALETTE[1])));
    }

    #[test]
    fn bar_and_latency_charts_draw_one_bar_per_value() {
        let bars = bar_chart("Failed", &[("Unavailable", 30), ("Cancelled", 10)]).into_string();
        assert_balanced(&bars);
        assert_eq!(bars.matches("<rect ").count(), 2, "{bars}");
        assert!(
            bars.contains(">30 (75%)<") && bars.contains(">10 (25%)<"),
            "{bars}"
        );

        let latency = latency_chart(
            "Latency",
            &[
                ("StartScript", [900, 4_000, 20_000, 80_000]),
                ("GetHealth", [0, 0, 0, 0]),
            ],
        )
        .into_string();
        assert_balanced(&latency);
        // Four legend swatches plus four bars per call type.
        assert_eq!(latency.matches("<rect ").count(), 4 + 8, "{latency}");
        assert!(
            latency.contains("<title>StartScript p99: 20 ms</title>"),
            "{latency}"
        );
        let widths = attribute_values(&latency, "width");
        assert!(
            widths
                .iter()
                .all(|w| w.parse::<f64>().is_ok_and(f64::is_finite))
        );
    }

    #[test]
    fn charts_with_nothing_to_draw_say_so() {
        let empty = line_chart("Connected agents", &[("connected", vec![])], "agents");
        assert!(empty.0.contains(">no samples</text>"));
        assert!(!empty.0.contains("<polyline"));
        let nan = line_chart(
            "x",
            &[("y", vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)])],
            "y",
        );
        assert!(nan.0.contains(">no samples</text>"));
        let dot = line_chart("x", &[("y", vec![(0.0, 0.0)])], "y");
        assert!(dot.0.contains("<circle"), "one sample is a dot");
        let none = latency_chart("Latency", &[("WatchScript", [0; 4])]);
        assert!(none.0.contains("no successful calls to time"));
        let no_bars = bar_chart("Failed", &[]);
        assert!(no_bars.0.contains("nothing to show"));
        for svg in [empty, nan, dot, none, no_bars] {
            assert_balanced(&svg.0);
        }
    }
}
