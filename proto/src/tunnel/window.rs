//! Per-call flow control: how much a side may still send, and how much it
//! has received but not yet given back as credit.

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

use super::{CALL_WINDOW, MAX_CHUNK};

/// The sender's view: bytes it may still send on one call.
#[derive(Debug)]
pub struct SendWindow {
    available: AtomicI64,
    opened: Notify,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self {
            available: AtomicI64::new(i64::from(CALL_WINDOW)),
            opened: Notify::new(),
        }
    }
}

impl SendWindow {
    /// Waits for room, then takes up to `want` bytes of it (at least one).
    pub async fn reserve(&self, want: usize) -> usize {
        let want = i64::try_from(want).unwrap_or(i64::MAX).max(1);
        loop {
            let available = self.available.load(Ordering::Acquire);
            if available > 0 {
                let take = available.min(want);
                if self
                    .available
                    .compare_exchange(
                        available,
                        available - take,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    // `take` is positive and at most `want`, a usize.
                    return usize::try_from(take).unwrap_or(1);
                }
                continue;
            }
            // A grant between the load and here leaves a permit in the
            // Notify, so this wakes at once.
            self.opened.notified().await;
        }
    }

    /// The receiver consumed `bytes`: that much more may be sent. Never
    /// more than a whole window: an honest receiver only credits bytes it
    /// was sent, so credit beyond that (a peer repeating `u32::MAX`) is
    /// ignored rather than let the window grow, or wrap, without end.
    pub fn grant(&self, bytes: u32) {
        let window = i64::from(CALL_WINDOW);
        let _ = self
            .available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |available| {
                Some(available.saturating_add(i64::from(bytes)).min(window))
            });
        self.opened.notify_one();
    }
}

/// The receiver's view: bytes received on one call and not yet credited.
#[derive(Debug, Default)]
pub struct RecvWindow {
    outstanding: AtomicI64,
}

/// A peer sent more than the protocol allows on a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Overrun {
    #[error("the peer sent more than the call's {CALL_WINDOW}-byte window without credit")]
    Window,
    #[error("the peer sent a {0}-byte data frame; the most one frame carries is {MAX_CHUNK}")]
    Chunk(usize),
}

impl RecvWindow {
    /// Counts `bytes` that arrived in one `data` frame.
    pub fn received(&self, bytes: usize) -> Result<(), Overrun> {
        if bytes > MAX_CHUNK {
            return Err(Overrun::Chunk(bytes));
        }
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        let now = self
            .outstanding
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        if now > i64::from(CALL_WINDOW) {
            Err(Overrun::Window)
        } else {
            Ok(())
        }
    }

    /// `bytes` were credited back to the sender.
    pub fn credited(&self, bytes: u32) {
        self.outstanding
            .fetch_sub(i64::from(bytes), Ordering::AcqRel);
    }
}

/// Consumed bytes waiting to be credited; a credit goes out once a
/// quarter window has gathered, so bulk transfers send few credit frames
/// and small calls none.
#[derive(Debug, Default)]
pub struct Consumed(u32);

impl Consumed {
    /// Adds `bytes`; returns the credit to send now, if one is due.
    pub fn add(&mut self, bytes: usize) -> Option<u32> {
        self.0 = self
            .0
            .saturating_add(u32::try_from(bytes).unwrap_or(u32::MAX));
        (self.0 >= CALL_WINDOW / 4).then(|| std::mem::take(&mut self.0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_sender_waits_for_credit_once_its_window_is_spent() {
        let window = Arc::new(SendWindow::default());
        let full = usize::try_from(CALL_WINDOW).expect("fits");
        assert_eq!(window.reserve(full + 10).await, full);
        let waiting = tokio::spawn({
            let window = window.clone();
            async move { window.reserve(100).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no room, so it waits");
        window.grant(40);
        assert_eq!(waiting.await.expect("task"), 40);
    }

    #[test]
    fn a_receiver_refuses_bytes_beyond_the_window() {
        let window = RecvWindow::default();
        let full = usize::try_from(CALL_WINDOW).expect("fits");
        for _ in 0..full / MAX_CHUNK {
            assert_eq!(window.received(MAX_CHUNK), Ok(()));
        }
        assert_eq!(window.received(1), Err(Overrun::Window));
        window.credited(CALL_WINDOW);
        assert_eq!(window.received(MAX_CHUNK - 1), Ok(()));
    }

    #[test]
    fn a_receiver_refuses_a_frame_larger_than_a_chunk() {
        let window = RecvWindow::default();
        assert_eq!(
            window.received(MAX_CHUNK + 1),
            Err(Overrun::Chunk(MAX_CHUNK + 1))
        );
        assert_eq!(window.received(MAX_CHUNK), Ok(()), "nothing was counted");
    }

    #[tokio::test]
    async fn repeated_huge_credit_never_grows_the_window_past_one_window() {
        let window = SendWindow::default();
        let full = usize::try_from(CALL_WINDOW).expect("fits");
        for _ in 0..10_000 {
            window.grant(u32::MAX);
        }
        assert_eq!(
            window.reserve(usize::MAX).await,
            full,
            "one window, no more"
        );
        let after = tokio::time::timeout(Duration::from_millis(20), window.reserve(1)).await;
        assert!(after.is_err(), "the window is spent: the sender waits");
    }

    #[test]
    fn credit_gathers_to_a_quarter_window() {
        let mut consumed = Consumed::default();
        let quarter = usize::try_from(CALL_WINDOW / 4).expect("fits");
        assert_eq!(consumed.add(quarter - 1), None);
        assert_eq!(consumed.add(1), Some(CALL_WINDOW / 4));
        assert_eq!(consumed.add(5), None);
    }
}
