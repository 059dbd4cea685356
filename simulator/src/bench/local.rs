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
