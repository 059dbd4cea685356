//! What a script's output does when its log cannot be written, usually
//! because the disk is full: the agent says so once in the log, counts the
//! lines it could not keep instead of writing them, and says how many at
//! the end, so the caller learns the output is incomplete instead of
//! reading a log that silently stops.
//!
//! A small reserve file in the workspace, made when the script starts and
//! deleted at the first failure, keeps room on a full disk for those two
//! notices and for the script's exit record.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::workspace::RESERVED_PREFIX;

/// Room kept for the notices and the exit record.
const RESERVE_BYTES: usize = 64 * 1024;

/// The log's health for one script run.
#[derive(Debug, Default)]
pub struct LogSpace {
    /// Why the log could not be written; set at the first failure.
    failure: Mutex<Option<String>>,
    /// Lines not kept since that failure.
    dropped: AtomicU64,
    reserve: Mutex<Option<PathBuf>>,
}

impl LogSpace {
    /// Makes the reserve in `workspace`. Without one (the disk is already
    /// full) the notices may not fit, and nothing else changes.
    pub fn reserve_in(&self, workspace: &Path) {
        let path = workspace.join(format!("{RESERVED_PREFIX}reserve"));
        let made = std::fs::File::create(&path).and_then(|mut file| {
            // Written, not just sized: a sparse file frees nothing.
            file.write_all(&[0u8; RESERVE_BYTES])?;
            file.sync_data()
        });
        match made {
            Ok(()) => {
                *self.reserve.lock().unwrap_or_else(PoisonError::into_inner) = Some(path);
            }
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(%error, workspace = %workspace.display(), "could not reserve room for the script's final notices");
            }
        }
    }

    /// Whether output is being counted rather than written.
    pub fn is_failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Records the first failure; frees the reserve and returns the notice
    /// to write, or `None` when the log had already failed.
    pub fn fail(&self, error: &io::Error, lines: u64) -> Option<String> {
        self.dropped.fetch_add(lines, Ordering::Relaxed);
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_some() {
            return None;
        }
        *failure = Some(error.to_string());
        drop(failure);
        self.release();
        Some(format!(
            "The script's output can no longer be written to its log ({error}); \
             from here on its lines are counted, not kept. The script keeps running."
        ))
    }

    /// Counts lines not kept.
    pub fn drop_lines(&self, lines: u64) {
        self.dropped.fetch_add(lines, Ordering::Relaxed);
    }

    /// The closing notice, when lines were lost; frees the reserve either
    /// way, so the exit record has room.
    pub fn finish(&self) -> Option<String> {
        self.release();
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        let dropped = self.dropped.load(Ordering::Relaxed);
        Some(format!(
            "{dropped} line(s) of the script's output were not kept because its log could not be \
             written ({failure}). Free space in the agent's work directory."
        ))
    }

    fn release(&self) {
        if let Some(path) = self
            .reserve
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_frees_the_reserve_and_the_end_counts_what_was_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = LogSpace::default();
        space.reserve_in(dir.path());
        let reserve = dir.path().join("tentacle-reserve");
        assert_eq!(
            std::fs::metadata(&reserve).expect("reserve").len(),
            RESERVE_BYTES as u64
        );
        assert!(!space.is_failed());

        let full = io::Error::from_raw_os_error(28);
        let notice = space.fail(&full, 3).expect("a first notice");
        assert!(notice.contains("No space left on device"), "{notice}");
        assert!(
            !reserve.exists(),
            "the reserve is freed at the first failure"
        );
        assert!(space.is_failed());
        assert_eq!(space.fail(&full, 2), None, "one notice only");
        space.drop_lines(5);

        let end = space.finish().expect("a closing notice");
        assert!(end.starts_with("10 line(s)"), "{end}");
    }

    #[test]
    fn a_healthy_log_ends_without_a_notice_and_without_its_reserve() {
        let dir = tempfile::tempdir().expect("tempdir");
        let space = LogSpace::default();
        space.reserve_in(dir.path());
        assert_eq!(space.finish(), None);
        assert!(!dir.path().join("tentacle-reserve").exists());
    }
}
