//! How the page writes numbers, sizes, durations and dates.
//!
//! Everything here returns plain text, which the caller splices into the
//! page and maud escapes, except [`bytes`], which is [`Markup`] because a
//! large size carries its exact byte count as a hover title. Dates and
//! longer durations come from `humantime`, so no calendar arithmetic lives
//! here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use maud::{Markup, html};

pub(super) const MIB: f64 = 1024.0 * 1024.0;

/// `1234567` as `1,234,567`.
pub(super) fn count(n: u64) -> String {
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

/// A byte count in binary units; from a GiB up the exact count shows on
/// hover, since two decimals of a GiB hide megabytes.
pub(super) fn bytes(n: u64) -> Markup {
    let v = n as f64;
    html! {
        @if v < 1024.0 {
            (n) " B"
        } @else if v < MIB {
            (format!("{:.1} KiB", v / 1024.0))
        } @else if v < 1024.0 * MIB {
            (format!("{:.1} MiB", v / MIB))
        } @else {
            span title={ (count(n)) " bytes" } { (format!("{:.2} GiB", v / (1024.0 * MIB))) }
        }
    }
}

/// Microseconds as milliseconds for the latency table's fixed columns.
pub(super) fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// Microseconds in the unit that reads best: `850 µs`, `12.3 ms`, `1.2 s`.
/// Chart labels need three significant digits, which `humantime` (whole
/// units, every unit spelled out) does not give.
pub(super) fn micros(us: f64) -> String {
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
pub(super) fn tick_label(v: f64) -> String {
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

/// A span of milliseconds: `4.2 s` under a minute, where the tenth of a
/// second matters (humantime would say `4s 200ms`), then humantime's
/// `12m 5s` or `1h 2m 3s` to the second.
pub(super) fn duration(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

/// The last second `humantime` can write (the end of year 9999); its
/// `Display` fails beyond it, and a failing `Display` panics in
/// `to_string`, so a corrupt `started_unix_ms` must stop here.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// Unix milliseconds as an RFC 3339 UTC timestamp to the second,
/// `2023-11-14T22:13:20Z`; `None` past the year 9999, which only a
/// corrupt report has.
pub(super) fn timestamp(unix_ms: u64) -> Option<String> {
    let secs = unix_ms / 1000;
    if secs > LAST_RFC3339_SECOND {
        return None;
    }
    let time: SystemTime = UNIX_EPOCH.checked_add(Duration::from_secs(secs))?;
    Some(humantime::format_rfc3339_seconds(time).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_sizes_read_well() {
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(count(999), "999");
        assert_eq!(count(0), "0");
        assert_eq!(bytes(512).into_string(), "512 B");
        assert_eq!(bytes(3 << 10).into_string(), "3.0 KiB");
        assert_eq!(bytes(3 << 20).into_string(), "3.0 MiB");
        assert_eq!(
            bytes(5 << 30).into_string(),
            "<span title=\"5,368,709,120 bytes\">5.00 GiB</span>"
        );
        assert_eq!(ms(1_234), "1.23");
        assert_eq!(micros(850.0), "850 µs");
        assert_eq!(micros(12_340.0), "12.3 ms");
        assert_eq!(micros(1_500_000.0), "1.5 s");
        assert_eq!(tick_label(20_000.0), "20k");
        assert_eq!(tick_label(2_500_000.0), "2.5M");
        assert_eq!(tick_label(0.1 + 0.2), "0.3");
        assert_eq!(tick_label(f64::NAN), "0");
    }

    #[test]
    fn durations_switch_to_humantime_after_a_minute() {
        assert_eq!(duration(0), "0.0 s");
        assert_eq!(duration(23_849), "23.8 s");
        assert_eq!(duration(725_400), "12m 5s");
        assert_eq!(duration(3_723_000), "1h 2m 3s");
    }

    #[test]
    fn timestamps_are_rfc3339_and_never_panic() {
        assert_eq!(timestamp(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            timestamp(1_700_000_000_999).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(
            timestamp(951_782_400_000).as_deref(),
            Some("2000-02-29T00:00:00Z")
        );
        assert_eq!(
            timestamp(LAST_RFC3339_SECOND * 1000).as_deref(),
            Some("9999-12-31T23:59:59Z")
        );
        assert_eq!(timestamp((LAST_RFC3339_SECOND + 1) * 1000), None);
        assert_eq!(timestamp(u64::MAX), None);
    }
}
