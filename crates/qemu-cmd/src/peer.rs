//! Unix socket helpers: connect with retry, and the SO_PEERCRED check.

use std::path::Path;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::error::QemuError;

/// The uid of the process at the other end of `stream` (SO_PEERCRED: the credentials of
/// whoever called `listen`/`connect`, fixed at that time, so there is no TOCTOU window).
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(cred.uid())
}

/// Fails unless the peer of `stream` runs as `expected`.
pub fn check_peer_uid(stream: &UnixStream, socket: &Path, expected: u32) -> Result<(), QemuError> {
    let actual = peer_uid(stream)
        .map_err(|e| QemuError::io(format!("SO_PEERCRED on {}", socket.display()), e))?;
    if actual != expected {
        return Err(QemuError::PeerUid {
            socket: socket.to_path_buf(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Connects to `socket`, retrying while it does not exist yet or refuses (QEMU creates
/// it a moment after it starts), until `deadline`.
pub async fn connect_with_retry(socket: &Path, deadline: Instant) -> Result<UnixStream, QemuError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        let attempt = tokio::time::timeout_at(deadline, UnixStream::connect(socket)).await;
        match attempt {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Ok(Err(e)) => {
                return Err(QemuError::io(
                    format!("connecting to {}", socket.display()),
                    e,
                ));
            }
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(QemuError::Timeout {
                what: format!("connecting to {}", socket.display()),
                after: now.saturating_duration_since(started),
            });
        }
        tokio::time::sleep_until((now + delay).min(deadline)).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}
