//! Listeners: a unix socket or stdio on a development host, the virtio-serial port in the VM.
//!
//! The virtio-serial port named [`VIRTIO_PORT_NAME`] is found by scanning
//! `/sys/class/virtio-ports/*/name` and opened as `/dev/<vportNpM>`. While no host is
//! connected, `poll` reports `POLLHUP` and reads return EOF; the agent then waits with a
//! backoff (1 ms doubling to 1 s) and serves the next connection on the same port. REPLs
//! live in the [`Engine`], so they survive reconnects.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::engine::Engine;
use crate::server::{ConnectionEnd, serve_connection};

/// Name of the agent's virtio-serial port.
pub const VIRTIO_PORT_NAME: &str = guest_proto::contract::AGENT_PORT_NAME;

/// Serves connections on a unix socket, one at a time, until a host asks for shutdown.
pub async fn serve_unix(engine: Arc<Engine>, path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(path)?;
    info!(path = %path.display(), "listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let (r, w) = stream.into_split();
        if let ConnectionEnd::Shutdown = serve_connection(engine.clone(), r, w).await {
            return Ok(());
        }
    }
}

/// Serves one connection on stdin/stdout.
pub async fn serve_stdio(engine: Arc<Engine>) -> ConnectionEnd {
    serve_connection(engine, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Finds the `/dev` node of the virtio-serial port called `name`.
pub fn find_virtio_port(name: &str) -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// A non-blocking character device as an async byte stream.
#[derive(Debug)]
pub struct PortStream {
    fd: AsyncFd<File>,
}

impl PortStream {
    /// Wraps an open device (switched to non-blocking mode).
    pub fn new(file: File) -> io::Result<Self> {
        crate::process::set_nonblocking(&file)?;
        Ok(Self {
            // SAFETY: the File moves into the AsyncFd and stays open for its whole lifetime.
            fd: unsafe { AsyncFd::register(file) }?,
        })
    }
}

impl AsyncRead for PortStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| {
                let mut file: &File = inner.get_ref();
                file.read(unfilled)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| {
                let mut file: &File = inner.get_ref();
                file.write(data)
            }) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// True when a host is connected to the port (no `POLLHUP`, or data waiting).
fn host_connected(file: &File) -> bool {
    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            revents.contains(PollFlags::POLLIN) || !revents.contains(PollFlags::POLLHUP)
        }
        Err(_) => false,
    }
}

/// Serves the virtio-serial port `name` forever (reconnects included) until a host asks
/// for shutdown.
pub async fn serve_virtio(engine: Arc<Engine>, name: &str) -> io::Result<()> {
    let mut backoff = Duration::from_millis(1);
    let max_backoff = Duration::from_secs(1);
    loop {
        let Some(dev) = find_virtio_port(name) else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max_backoff);
            continue;
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&dev)
        {
            Ok(file) => file,
            Err(err) => {
                warn!(dev = %dev.display(), %err, "cannot open the agent port");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        loop {
            if !host_connected(&file) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
            backoff = Duration::from_millis(1);
            let stream = match file.try_clone().and_then(PortStream::new) {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(%err, "cannot use the agent port");
                    break;
                }
            };
            let (r, w) = tokio::io::split(stream);
            match serve_connection(engine.clone(), r, w).await {
                ConnectionEnd::Shutdown => return Ok(()),
                ConnectionEnd::Closed => debug!("host disconnected"),
            }
        }
        tokio::time::sleep(backoff).await;
    }
}
