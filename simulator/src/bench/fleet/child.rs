//! A process the fleet rows start: in a process group of its own, so that
//! stopping it reaches anything it started, and killed with its group when
//! dropped.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::bench::processes::ProcessError;

/// A running child and its process group (the child leads it).
#[derive(Debug)]
pub struct Group {
    child: Child,
    what: String,
    log: PathBuf,
    /// Set once the child is reaped: its group id may then be reused.
    status: Option<ExitStatus>,
}

impl Group {
    /// Starts `command` in a new process group, stdout and stderr appended
    /// to `log`.
    pub fn spawn(command: &mut Command, what: &str, log: &Path) -> Result<Self, ProcessError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Io {
                what: format!("opening {}", log.display()),
                source,
            })?;
        let stderr = file.try_clone().map_err(|source| ProcessError::Io {
            what: format!("opening {}", log.display()),
            source,
        })?;
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .map_err(|source| ProcessError::Io {
                what: format!("starting {what}"),
                source,
            })?;
        crate::bench::local::track_group(child.id());
        Ok(Self {
            child,
            what: what.to_owned(),
            log: log.to_owned(),
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
            if self.status.is_some() {
                crate::bench::local::forget_group(self.child.id());
            }
        }
        self.status
    }

    /// Its resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        super::parse::vm_rss_kib(&status)
    }

    /// How many files it holds open now.
    pub fn open_files(&self) -> Option<usize> {
        Some(
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .ok()?
                .count(),
        )
    }

    /// Its soft limit on open files.
    pub fn open_file_limit(&self) -> Option<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).ok()?;
        super::parse::max_open_files(&limits)
    }

    /// The last lines of its output, for messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 5)
    }

    /// Whether its output contains `needle` (read whole: bench logs are
    /// small).
    pub fn log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|text| text.contains(needle))
    }

    /// Why it stopped, if it has: its status and last lines.
    pub fn why_exited(&mut self) -> Option<String> {
        let status = self.exited()?;
        Some(format!(
            "{} exited with {status}: {}",
            self.what,
            self.log_tail()
        ))
    }

    /// SIGTERM to the group, then up to `grace` for the child to exit;
    /// SIGKILL after that. Returns how long it took and whether it needed
    /// the SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> (Duration, bool) {
        let started = Instant::now();
        if self.exited().is_some() {
            return (Duration::ZERO, false);
        }
        self.signal(Signal::SIGTERM);
        while started.elapsed() < grace {
            if self.exited().is_some() {
                return (started.elapsed(), false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        (started.elapsed(), true)
    }

    /// SIGKILL to the group, and the child reaped.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.signal(Signal::SIGKILL);
        self.status = self.child.wait().ok();
        crate::bench::local::forget_group(self.child.id());
    }

    fn signal(&self, signal: Signal) {
        // Only while the child is unreaped does its pid name its group.
        if self.status.is_none()
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            let _ = killpg(Pid::from_raw(pid), signal);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of the file at `path`, joined with " | ".
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Runs `command` to the end; its stdout if it succeeded.
pub fn output(command: &mut Command) -> Result<String, ProcessError> {
    let shown = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProcessError::Io {
            what: shown.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(ProcessError::Failed {
            command: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
