//! Exponential backoff with full jitter, for every reconnect and retry loop.
//!
//! Each wait is drawn uniformly from `0..=window`; the window starts at
//! `initial` and doubles after every wait up to `max`. Full jitter spreads
//! thousands of clients that lost the same server at the same moment over
//! the whole window instead of bunching them at its end, so a restarted hub
//! or agent is not hit by all of them at once.

use std::time::Duration;

use rand::Rng;

/// The state of one retry loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    window: Duration,
    attempts: u32,
}

impl Backoff {
    /// A backoff whose first window is `initial` and whose window never
    /// exceeds `max` (when `max < initial`, `max` wins). A zero `initial`
    /// never waits.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            window: initial.min(max),
            attempts: 0,
        }
    }

    /// The window the next wait is drawn from.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Waits handed out since the start or the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next wait, uniform in `0..=window`; doubles the window.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let window = self.window;
        self.window = self.window.saturating_mul(2).min(self.max);
        self.attempts = self.attempts.saturating_add(1);
        // Nanosecond resolution; a window beyond u64 nanoseconds (584
        // years) is drawn from that many.
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// A wait uniform in the first window (`0..=initial`), leaving the
    /// window as it is: for retries that should not spread out further,
    /// such as reconnecting to a hub that said it is restarting.
    pub fn first_window_delay(&mut self, rng: &mut impl Rng) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        let first = self.initial.min(self.max);
        let nanos = u64::try_from(first.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Back to the first window, after a success.
    pub fn reset(&mut self) {
        self.window = self.initial.min(self.max);
        self.attempts = 0;
    }

    /// Sleeps for [`next_delay`](Self::next_delay) drawn from the thread's
    /// generator and returns how long that was.
    pub async fn wait(&mut self) -> Duration {
        // The generator is not `Send`; it is gone before the await.
        let delay = self.next_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
        delay
    }
}

#[cfg(test)]
mod tests;
