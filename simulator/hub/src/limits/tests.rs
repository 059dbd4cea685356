use std::net::Ipv4Addr;

use super::*;

fn ip(last: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

/// 6 failures a minute (one every 10 s), 3 at once.
fn limiter() -> FailureLimiter {
    FailureLimiter::new(RegistrationLimits {
        failures_per_minute: 6,
        failure_burst: 3,
        max_sources: 4,
    })
}

#[test]
fn a_source_gets_its_burst_then_one_failure_per_refill() {
    let limiter = limiter();
    let start = Instant::now();
    for _ in 0..3 {
        limiter.check_at(ip(1), start).expect("within the burst");
        limiter.record_failure_at(ip(1), start);
    }
    let refused = limiter.check_at(ip(1), start).expect_err("burst spent");
    assert_eq!(refused.retry_after, Duration::from_secs(10));
    let line = refused.to_string();
    assert!(
        line.contains("127.0.0.1") && line.contains("try again in 10s") && !line.contains('\n'),
        "{line}"
    );
    // Refusals are not charged: waiting the time it said is enough.
    for _ in 0..100 {
        assert!(limiter.check_at(ip(1), start).is_err());
    }
    let later = start + Duration::from_secs(10);
    limiter
        .check_at(ip(1), later)
        .expect("one failure refilled");
    limiter.record_failure_at(ip(1), later);
    assert!(limiter.check_at(ip(1), later).is_err(), "and spent again");
    // Another source was never touched.
    limiter.check_at(ip(2), later).expect("another source");
}

#[test]
fn successes_are_never_counted() {
    let limiter = limiter();
    let now = Instant::now();
    // Checking is all a success does; any number of them spends nothing.
    for _ in 0..10_000 {
        limiter.check_at(ip(1), now).expect("never refused");
    }
    assert_eq!(limiter.tracked_sources(), 0);
}

#[test]
fn an_idle_source_is_forgotten_and_the_table_stays_bounded() {
    let limiter = limiter();
    let start = Instant::now();
    for last in 1..=4 {
        limiter.record_failure_at(ip(last), start);
    }
    assert_eq!(limiter.tracked_sources(), 4);
    // Full: a fifth source is not tracked while the others owe failures.
    limiter.record_failure_at(ip(5), start);
    assert_eq!(limiter.tracked_sources(), 4);
    // Paid back after one interval: swept at the next failure.
    let later = start + Duration::from_secs(11);
    limiter.record_failure_at(ip(5), later);
    assert_eq!(limiter.tracked_sources(), 1);
    limiter.check_at(ip(1), later).expect("forgotten, so free");
}

#[test]
fn a_refused_source_is_remembered_until_its_log_window_passes() {
    let limiter = limiter();
    let start = Instant::now();
    for _ in 0..3 {
        limiter.record_failure_at(ip(1), start);
    }
    assert!(limiter.check_at(ip(1), start).is_err());
    // Paid back at 30 s, but logged at 0 s: kept (so it is not logged
    // again at once) until the window passes.
    let paid = start + Duration::from_secs(31);
    limiter.record_failure_at(ip(2), paid + SWEEP_EVERY);
    assert_eq!(limiter.tracked_sources(), 2);
    limiter.record_failure_at(ip(2), start + LOG_WINDOW + SWEEP_EVERY * 2);
    assert_eq!(limiter.tracked_sources(), 1);
}

#[test]
fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
    let one: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
    let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
    let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
    assert_eq!(source_key(Some(one)), source_key(Some(same_64)));
    assert_ne!(source_key(Some(one)), source_key(Some(other_64)));
    let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
    assert_eq!(source_key(Some(mapped)), ip(1));
    assert_eq!(source_key(None), None);

    let limiter = limiter();
    let now = Instant::now();
    for _ in 0..3 {
        limiter.record_failure_at(Some(one), now);
    }
    let refused = limiter.check_at(Some(same_64), now).expect_err("same /64");
    assert!(refused.address.contains("2001:db8:1:2::/64"), "{refused}");
    limiter.check_at(Some(other_64), now).expect("another /64");
}

#[test]
fn out_of_range_settings_still_limit() {
    let limiter = FailureLimiter::new(RegistrationLimits {
        failures_per_minute: 0,
        failure_burst: 0,
        max_sources: 10,
    });
    let now = Instant::now();
    limiter.check_at(ip(1), now).expect("first");
    limiter.record_failure_at(ip(1), now);
    let refused = limiter.check_at(ip(1), now).expect_err("one at a time");
    assert_eq!(refused.retry_after, Duration::from_secs(60));
}

#[test]
fn a_refused_source_is_logged_once_per_window_with_the_count_since() {
    let start = Instant::now();
    let mut source = Source {
        repaid_at: start,
        refused: 0,
        logged_at: None,
    };
    assert_eq!(
        source.refused_at(start),
        Some(1),
        "the first refusal is logged"
    );
    let logged: Vec<_> = (1..=100)
        .filter_map(|i| source.refused_at(start + Duration::from_millis(i * 100)))
        .collect();
    assert!(logged.is_empty(), "no flood within the window: {logged:?}");
    assert_eq!(
        source.refused_at(start + LOG_WINDOW),
        Some(101),
        "the next window's line counts what was not logged"
    );
}
