//! The [`GuestChannel`] port over the agent's virtio-serial port (a unix socket on the
//! host side).
//!
//! QEMU's socket chardev accepts a connection before the guest has opened its end of the
//! port and drops what it receives meanwhile, so the handshake sends `Ping` every
//! `ping_interval` (each under a fresh op id) until one `Pong` comes back; later Pongs for
//! the other pings are dropped as frames of unknown operations. The peer's uid is checked
//! with SO_PEERCRED before a single byte is sent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use guest_proto::{
    Frame, GuestErrorKind, GuestMessage, HostMessage, MAX_FRAME_BYTES, OpId, PROTOCOL_VERSION,
    ProtoError,
};
use sandbox_core::ports::{AgentInfo, GuestChannel, GuestConnection, OpStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::QemuError;
use crate::peer::{check_peer_uid, connect_with_retry};

/// Default interval between handshake pings.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_millis(50);

/// Default depth of each operation's reply queue.
pub const DEFAULT_OP_QUEUE: usize = 64;

/// Connects to guest agents over unix sockets.
#[derive(Debug, Clone)]
pub struct SerialGuestChannel {
    expected_uid: u32,
    ping_interval: Duration,
    op_queue: usize,
}

impl SerialGuestChannel {
    /// A channel that only talks to sockets whose peer runs as `expected_uid` (the uid
    /// QEMU runs as: see [`crate::QemuHypervisor::qemu_uid`]).
    pub fn new(expected_uid: u32) -> Self {
        Self {
            expected_uid,
            ping_interval: DEFAULT_PING_INTERVAL,
            op_queue: DEFAULT_OP_QUEUE,
        }
    }

    /// Interval between handshake pings.
    #[must_use]
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Depth of each operation's reply queue (back-pressure on the reader).
    #[must_use]
    pub fn with_op_queue(mut self, depth: usize) -> Self {
        self.op_queue = depth.max(1);
        self
    }

    /// Connects, verifies the peer and completes the handshake, returning the concrete
    /// connection.
    pub async fn open(
        &self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<(SerialGuestConnection, AgentInfo), QemuError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_with_retry(socket, deadline).await?;
        // Before any byte leaves this process.
        check_peer_uid(&stream, socket, self.expected_uid)?;
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared {
            socket: socket.to_path_buf(),
            routes: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            next_op: AtomicU64::new(1),
            writer: tokio::sync::Mutex::new(Some(write)),
        });
        let mut reader = FrameReader::new(read);
        let info = match self
            .handshake(&shared, &mut reader, deadline, timeout)
            .await
        {
            Ok(info) => info,
            Err(e) => {
                shared.shutdown().await;
                return Err(e);
            }
        };
        let task = tokio::spawn(read_loop(reader, shared.clone()));
        Ok((
            SerialGuestConnection {
                shared,
                reader: Mutex::new(Some(task)),
                op_queue: self.op_queue,
            },
            info,
        ))
    }

    async fn handshake(
        &self,
        shared: &Shared,
        reader: &mut FrameReader,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<AgentInfo, QemuError> {
        let mut pings: Vec<OpId> = Vec::new();
        let mut next_ping = Instant::now();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(QemuError::Timeout {
                    what: format!(
                        "guest agent handshake on {} ({} pings sent)",
                        shared.socket.display(),
                        pings.len()
                    ),
                    after: timeout,
                });
            }
            if now >= next_ping {
                let op = shared.alloc_op();
                pings.push(op);
                shared
                    .write_frame(Frame::new(
                        op,
                        HostMessage::Ping {
                            protocol_version: PROTOCOL_VERSION,
                        },
                    ))
                    .await
                    .map_err(|e| match e {
                        // Nothing was dispatched yet: the transport is simply gone.
                        QemuError::SendFailed(_) => QemuError::ChannelClosed,
                        other => other,
                    })?;
                next_ping = now + self.ping_interval;
            }
            let wake = next_ping.min(deadline);
            tokio::select! {
                frame = reader.next() => match frame {
                    Ok(Some(Frame { op_id, msg })) if pings.contains(&op_id) => match AgentInfo::from_pong(msg) {
                        Ok(info) => {
                            if info.protocol_version != PROTOCOL_VERSION {
                                return Err(QemuError::ProtocolVersion {
                                    guest: info.protocol_version,
                                    host: PROTOCOL_VERSION,
                                });
                            }
                            return Ok(info);
                        }
                        Err(GuestMessage::Error { kind, message }) => {
                            return Err(if kind == GuestErrorKind::Protocol {
                                QemuError::Handshake(format!("protocol error: {message}"))
                            } else {
                                QemuError::Handshake(format!("{kind}: {message}"))
                            });
                        }
                        Err(other) => tracing::debug!(msg = other.name(), "ignoring non-Pong reply to a ping"),
                    },
                    Ok(Some(frame)) => {
                        tracing::trace!(op = %frame.op_id, msg = frame.msg.name(), "dropping frame during handshake");
                    }
                    Ok(None) => return Err(QemuError::ChannelClosed),
                    Err(ProtoError::VersionMismatch { got, expected }) => {
                        return Err(QemuError::ProtocolVersion { guest: got, host: expected });
                    }
                    Err(e) if recoverable(&e) => {
                        tracing::debug!(%e, "undecodable frame during handshake");
                    }
                    Err(e) => return Err(e.into()),
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[async_trait]
impl GuestChannel for SerialGuestChannel {
    async fn connect(
        &self,
        socket: &Path,
        timeout: Duration,
    ) -> sandbox_core::Result<(Box<dyn GuestConnection>, AgentInfo)> {
        let (conn, info) = self
            .open(socket, timeout)
            .await
            .map_err(|e| sandbox_core::Error::from(e).with_operation("connect"))?;
        Ok((Box::new(conn), info))
    }
}

/// Content errors consume the bad frame; the stream stays usable.
fn recoverable(e: &ProtoError) -> bool {
    matches!(
        e,
        ProtoError::UnknownType(_)
            | ProtoError::Malformed { .. }
            | ProtoError::VersionMismatch { .. }
    )
}

/// Reads frames from the socket into a buffer (cancel-safe).
struct FrameReader {
    read: OwnedReadHalf,
    buf: BytesMut,
}

impl FrameReader {
    fn new(read: OwnedReadHalf) -> Self {
        Self {
            read,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Frame<GuestMessage>>, ProtoError> {
        loop {
            if let Some(frame) =
                guest_proto::decode_frame::<GuestMessage>(&mut self.buf, MAX_FRAME_BYTES)?
            {
                return Ok(Some(frame));
            }
            guest_proto::reserve_frame(&mut self.buf, MAX_FRAME_BYTES)?;
            let n = self.read.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
        }
    }
}

type Routes = HashMap<OpId, mpsc::Sender<GuestMessage>>;

#[derive(Debug)]
struct Shared {
    socket: PathBuf,
    routes: Mutex<Routes>,
    alive: AtomicBool,
    next_op: AtomicU64,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
}

impl Shared {
    fn alloc_op(&self) -> OpId {
        OpId(self.next_op.fetch_add(1, Ordering::Relaxed))
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the transport dead and ends every operation's stream (receivers get their
    /// buffered replies, then `None`).
    fn mark_dead(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.routes().clear();
    }

    async fn shutdown(&self) {
        self.mark_dead();
        if let Some(mut w) = self.writer.lock().await.take() {
            let _ = w.shutdown().await;
        }
    }

    async fn write_frame(&self, frame: Frame<HostMessage>) -> Result<(), QemuError> {
        let mut bytes = BytesMut::new();
        guest_proto::encode_frame(&frame, &mut bytes)?;
        let mut guard = self.writer.lock().await;
        let Some(w) = guard.as_mut() else {
            return Err(QemuError::ChannelClosed);
        };
        if let Err(e) = w.write_all(&bytes).await {
            guard.take();
            drop(guard);
            self.mark_dead();
            return Err(QemuError::SendFailed(e.to_string()));
        }
        Ok(())
    }
}

async fn read_loop(mut reader: FrameReader, shared: Arc<Shared>) {
    loop {
        match reader.next().await {
            Ok(Some(Frame { op_id, msg })) => {
                let terminal = msg.is_terminal();
                let route = shared.routes().get(&op_id).cloned();
                let Some(tx) = route else {
                    tracing::trace!(op = %op_id, msg = msg.name(), "dropping frame of an unknown operation");
                    continue;
                };
                if tx.send(msg).await.is_err() {
                    // The caller dropped its stream.
                    shared.routes().remove(&op_id);
                } else if terminal {
                    shared.routes().remove(&op_id);
                }
            }
            Ok(None) => {
                tracing::debug!(socket = %shared.socket.display(), "guest channel closed by peer");
                break;
            }
            Err(e) if recoverable(&e) => {
                tracing::warn!(%e, "dropping an undecodable frame from the guest");
            }
            Err(e) => {
                tracing::warn!(%e, "guest channel failed");
                break;
            }
        }
    }
    shared.mark_dead();
}

/// One connected guest agent.
#[derive(Debug)]
pub struct SerialGuestConnection {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    op_queue: usize,
}

impl SerialGuestConnection {
    /// Sends a request under a fresh op id.
    pub async fn start(&self, msg: HostMessage) -> Result<OpStream, QemuError> {
        if !self.is_up() {
            return Err(QemuError::ChannelClosed);
        }
        let op_id = self.shared.alloc_op();
        let (tx, rx) = mpsc::channel(self.op_queue);
        self.shared.routes().insert(op_id, tx);
        // The reader may have died between the check and the insert.
        if !self.is_up() {
            self.shared.routes().remove(&op_id);
            return Err(QemuError::ChannelClosed);
        }
        if let Err(e) = self.shared.write_frame(Frame::new(op_id, msg)).await {
            self.shared.routes().remove(&op_id);
            return Err(e);
        }
        Ok(OpStream { op_id, rx })
    }

    /// Sends a follow-up frame of an existing operation.
    pub async fn follow_up(&self, op_id: OpId, msg: HostMessage) -> Result<(), QemuError> {
        if !self.is_up() {
            return Err(QemuError::ChannelClosed);
        }
        self.shared.write_frame(Frame::new(op_id, msg)).await
    }

    /// True while the transport is up.
    pub fn is_up(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Closes the transport; every pending stream ends.
    pub async fn shut(&self) {
        let task = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
        }
        self.shared.shutdown().await;
    }
}

impl Drop for SerialGuestConnection {
    fn drop(&mut self) {
        self.shared.mark_dead();
        if let Some(task) = self
            .reader
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

#[async_trait]
impl GuestConnection for SerialGuestConnection {
    async fn request(&self, msg: HostMessage) -> sandbox_core::Result<OpStream> {
        self.start(msg)
            .await
            .map_err(|e| sandbox_core::Error::from(e).with_operation("request"))
    }

    async fn send(&self, op_id: OpId, msg: HostMessage) -> sandbox_core::Result<()> {
        self.follow_up(op_id, msg)
            .await
            .map_err(|e| sandbox_core::Error::from(e).with_operation("send"))
    }

    fn is_alive(&self) -> bool {
        self.is_up()
    }

    async fn close(&self) {
        self.shut().await;
    }
}
