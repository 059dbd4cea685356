//! Loopback helpers for the peers the bench starts: a free port, and the
//! wait until a started process listens on it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A loopback port that is free now (the caller's process binds it next).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Why a started process is not listening.
#[derive(Debug)]
pub enum NotListening {
    /// It exited first.
    Exited(ExitStatus),
    /// Still nothing on the port after the timeout.
    TimedOut,
}

/// Waits until `address` accepts a connection, while `child` runs.
pub fn wait_until_listening(
    address: SocketAddr,
    child: &mut Child,
    timeout: Duration,
) -> Result<(), NotListening> {
    let started = Instant::now();
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotListening::Exited(status));
        }
        if started.elapsed() > timeout {
            return Err(NotListening::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Process groups the bench started and has not stopped yet, so an
/// interrupted run can stop them: each peer runs in a group of its own,
/// which Ctrl-C on the terminal does not reach.
static GROUPS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Remembers the group led by `pid` (a child spawned with `process_group(0)`).
pub fn track_group(pid: u32) {
    GROUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(pid);
}

/// Forgets the group once its leader is reaped, so its id is never
/// signalled after the system may have reused it.
pub fn forget_group(pid: u32) {
    GROUPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|&tracked| tracked != pid);
}

/// SIGKILL to every group still tracked; returns how many there were.
pub fn kill_groups() -> usize {
    let groups = std::mem::take(
        &mut *GROUPS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for &pid in &groups {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    groups.len()
}
