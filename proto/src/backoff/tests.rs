use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;

fn rng() -> StdRng {
    StdRng::seed_from_u64(7)
}

#[test]
fn waits_stay_within_a_window_that_doubles_and_caps() {
    let initial = Duration::from_secs(1);
    let max = Duration::from_secs(60);
    let mut rng = rng();
    for attempt in 0..12u32 {
        let expected = initial.saturating_mul(1 << attempt).min(max);
        // 200 fresh loops at the same attempt, so the spread can be seen.
        let waits: Vec<Duration> = (0..200)
            .map(|_| {
                let mut backoff = Backoff::new(initial, max);
                for _ in 0..attempt {
                    backoff.next_delay(&mut rng);
                }
                assert_eq!(backoff.window(), expected, "attempt {attempt}");
                backoff.next_delay(&mut rng)
            })
            .collect();
        assert!(waits.iter().all(|w| *w <= expected), "attempt {attempt}");
        // Full jitter: waits spread over the window rather than bunching.
        let spread = waits.iter().max().copied().unwrap_or_default()
            - waits.iter().min().copied().unwrap_or_default();
        assert!(
            spread > expected / 2,
            "attempt {attempt}: spread {spread:?} of {expected:?}"
        );
    }
}

#[test]
fn the_window_doubles_after_each_wait_up_to_the_cap() {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
    let mut rng = rng();
    let mut windows = Vec::new();
    for _ in 0..7 {
        windows.push(backoff.window().as_millis());
        let wait = backoff.next_delay(&mut rng);
        assert!(wait <= Duration::from_millis(1000));
    }
    assert_eq!(windows, [100, 200, 400, 800, 1000, 1000, 1000]);
    assert_eq!(backoff.attempts(), 7);
}

#[test]
fn reset_returns_to_the_first_window() {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut rng = rng();
    for _ in 0..5 {
        backoff.next_delay(&mut rng);
    }
    assert_eq!(backoff.window(), Duration::from_millis(3200));
    backoff.reset();
    assert_eq!(backoff.window(), Duration::from_millis(100));
    assert_eq!(backoff.attempts(), 0);
    assert_eq!(
        backoff,
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    );
    assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
}

#[test]
fn a_thousand_attempts_never_overflow() {
    let mut rng = rng();
    for max in [Duration::from_secs(30), Duration::MAX] {
        let mut backoff = Backoff::new(Duration::from_millis(1), max);
        for _ in 0..1000 {
            let window = backoff.window();
            assert!(backoff.next_delay(&mut rng) <= window);
        }
        assert_eq!(backoff.window(), max);
        assert_eq!(backoff.attempts(), 1000);
    }
}

#[test]
fn a_zero_initial_window_never_waits() {
    let mut backoff = Backoff::new(Duration::ZERO, Duration::from_secs(5));
    let mut rng = rng();
    for _ in 0..10 {
        assert_eq!(backoff.next_delay(&mut rng), Duration::ZERO);
    }
    assert_eq!(backoff.window(), Duration::ZERO);
}

#[test]
fn a_cap_below_the_initial_window_wins() {
    let mut backoff = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
    assert_eq!(backoff.window(), Duration::from_secs(1));
    let mut rng = rng();
    assert!(backoff.next_delay(&mut rng) <= Duration::from_secs(1));
    assert_eq!(backoff.window(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn wait_sleeps_for_the_delay_it_reports() {
    let mut backoff = Backoff::new(Duration::from_secs(4), Duration::from_secs(8));
    let started = tokio::time::Instant::now();
    let first = backoff.wait().await;
    assert!(first <= Duration::from_secs(4));
    // The timer wheel rounds up to the next millisecond.
    let slept = started.elapsed();
    assert!(
        slept >= first && slept <= first + Duration::from_millis(1),
        "slept {slept:?} for {first:?}"
    );
    assert_eq!(backoff.window(), Duration::from_secs(8));
    assert_eq!(backoff.attempts(), 1);
}

#[test]
fn first_window_delays_stay_in_the_first_window_however_many() {
    let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
    let mut rng = rng();
    // Two ordinary failures doubled the window to 20 s.
    backoff.next_delay(&mut rng);
    backoff.next_delay(&mut rng);
    assert_eq!(backoff.window(), Duration::from_secs(20));
    let waits: Vec<Duration> = (0..200)
        .map(|_| backoff.first_window_delay(&mut rng))
        .collect();
    assert!(
        waits.iter().all(|w| *w <= Duration::from_secs(5)),
        "{waits:?}"
    );
    // Spread over the window, not bunched at one end.
    assert!(waits.iter().any(|w| *w < Duration::from_secs(2)));
    assert!(waits.iter().any(|w| *w > Duration::from_secs(3)));
    // The doubling window itself is left alone.
    assert_eq!(backoff.window(), Duration::from_secs(20));
    assert_eq!(backoff.attempts(), 202);
}
