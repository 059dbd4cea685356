//! Free disk space, checked before an upload writes anything.
//!
//! The check asks a [`FreeSpace`] probe rather than the file system
//! directly, so that many agents sharing one disk (the fleet simulator's
//! virtual agents) can each see a disk of their own while the agent's own
//! checks still run. A real agent always uses [`Statvfs`].

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Says how many bytes may still be written on the file system holding a
/// path.
pub trait FreeSpace: Debug + Send + Sync + 'static {
    fn available_bytes(&self, path: &Path) -> io::Result<u64>;
}

/// The file system's own answer (`statvfs`): what a real agent uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Statvfs;

impl FreeSpace for Statvfs {
    fn available_bytes(&self, path: &Path) -> io::Result<u64> {
        available_bytes(path)
    }
}

/// A disk that reports whatever it was last told, for simulated agents and
/// tests: shared by many agents, it can be filled or emptied at run time.
#[derive(Debug, Default)]
pub struct FakeFreeSpace {
    bytes: AtomicU64,
}

impl FakeFreeSpace {
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes: AtomicU64::new(bytes),
        }
    }

    /// Changes what every later check sees.
    pub fn set(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }
}

impl FreeSpace for FakeFreeSpace {
    fn available_bytes(&self, _path: &Path) -> io::Result<u64> {
        Ok(self.bytes.load(Ordering::Relaxed))
    }
}

/// Bytes available to this (unprivileged) process on the file system holding
/// `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let stats = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (
        u64::from(stats.blocks_available()),
        u64::from(stats.fragment_size()),
    );
    Ok(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_some_free_space_for_the_temp_dir() {
        let free = Statvfs
            .available_bytes(&std::env::temp_dir())
            .expect("statvfs");
        assert!(free > 0);
    }

    #[test]
    fn a_fake_disk_reports_what_it_was_told() {
        let disk = FakeFreeSpace::new(10);
        assert_eq!(disk.available_bytes(Path::new("/nowhere")).ok(), Some(10));
        disk.set(3);
        assert_eq!(disk.available_bytes(Path::new("/nowhere")).ok(), Some(3));
    }
}
