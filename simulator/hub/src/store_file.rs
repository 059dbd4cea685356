//! How the hub's files in its home (`agents.toml`, `credentials.toml`) are
//! changed safely when several processes write them: the running hub
//! (registrations, rotations, retirements) and the `tentacle-hub server`
//! verbs run from other shells.
//!
//! - [`StoreLock`]: an exclusive advisory `flock` on a sidecar file
//!   (`agents.toml.lock`), taken for every read-modify-write. The lock is on
//!   a file of its own because every write replaces the data file through a
//!   rename: a lock on the data file itself would be on the old inode, and a
//!   second writer that opened the new one would not see it. Taking it is
//!   bounded by a timeout, and failing names the lock file.
//! - [`replace`]: the one way a data file is written: a temporary file
//!   beside it, fsynced, renamed over it, and the directory fsynced, so a
//!   crash leaves the old file or the new one, never a torn or empty one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// How long a writer waits for another process's write by default. A write
/// holds the lock for milliseconds; seconds of waiting mean a stuck process.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "could not lock {} within {}: another tentacle-hub process is holding it; retry, or give it longer with --lock-timeout (TENTACLE_HUB_LOCK_TIMEOUT)",
        path.display(),
        humantime::format_duration(*timeout)
    )]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("could not open or lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The cross-process lock for one data file: `<file>.lock` beside it.
#[derive(Debug, Clone)]
pub struct StoreLock {
    path: PathBuf,
    timeout: Duration,
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct StoreLockGuard {
    _flock: Flock<File>,
}

impl StoreLock {
    /// The lock for `data`, waited for up to `timeout`.
    pub fn beside(data: &Path, timeout: Duration) -> Self {
        let mut name = data.as_os_str().to_owned();
        name.push(".lock");
        Self {
            path: PathBuf::from(name),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes the lock, waiting up to the timeout for another holder to let
    /// go. The directory is made if missing, so the first write to a new
    /// home can lock too.
    ///
    /// It polls a non-blocking `flock` rather than blocking in the kernel: a
    /// blocking wait cannot be given a timeout without a thread that would
    /// outlive a stuck holder. The polls start at a millisecond and back off
    /// to 20 ms, against holds that last milliseconds.
    pub fn acquire(&self) -> Result<StoreLockGuard, LockError> {
        let io = |source| LockError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(io)?;
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Ok(StoreLockGuard { _flock: flock }),
                Err((back, Errno::EINTR)) => file = back,
                Err((back, Errno::EWOULDBLOCK)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(LockError::Timeout {
                            path: self.path.clone(),
                            timeout: self.timeout,
                        });
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(20));
                    file = back;
                }
                Err((_, errno)) => return Err(io(errno.into())),
            }
        }
    }
}

/// Replaces `path` with `contents`: written to a temporary file beside it
/// (created with `mode`, before the umask), fsynced, renamed over `path`,
/// and the directory fsynced so the rename itself survives a crash. Call it
/// with the file's [`StoreLock`] held: the temporary name is per process.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    let temp = dir.join(name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_times_out_naming_the_lock_file_and_is_free_once_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("home").join("agents.toml");
        let lock = StoreLock::beside(&data, Duration::from_millis(150));
        assert_eq!(
            lock.path(),
            dir.path().join("home").join("agents.toml.lock")
        );
        let held = lock.acquire().expect("first");
        // Another open file description, as another process would have.
        let started = Instant::now();
        let error = lock.acquire().expect_err("held");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(matches!(error, LockError::Timeout { .. }), "{error:?}");
        let line = error.to_string();
        assert!(line.contains("agents.toml.lock"), "{line}");
        assert!(line.contains("150ms") && !line.contains('\n'), "{line}");
        drop(held);
        lock.acquire().expect("free again");
    }

    #[test]
    fn a_waiting_writer_gets_the_lock_when_the_holder_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lock = StoreLock::beside(&dir.path().join("credentials.toml"), Duration::from_secs(5));
        let held = lock.acquire().expect("first");
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || lock.acquire().map(drop))
        };
        std::thread::sleep(Duration::from_millis(100));
        drop(held);
        waiter
            .join()
            .expect("join")
            .expect("taken after the holder let go");
    }

    #[test]
    fn replace_writes_through_a_rename_and_leaves_no_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentials.toml");
        replace(&path, b"one", 0o600).expect("write");
        replace(&path, b"two", 0o600).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["credentials.toml"]);
    }
}
