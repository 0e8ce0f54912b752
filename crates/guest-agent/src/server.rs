//! One host connection: decode frames, dispatch requests concurrently by op id, send
//! replies through one writer.
//!
//! Every request runs in its own task (file reads and writes on blocking threads), so a
//! long exec does not hold up a file transfer or a ping. All replies go through one
//! bounded queue to the writer, which gives back-pressure to output producers. When the
//! connection ends, in-flight executions run to completion (their output is dropped) so
//! the REPLs keep their state for the next connection; unfinished file writes are
//! discarded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use guest_proto::{
    Frame, GuestCodec, GuestErrorKind, GuestMessage, HostMessage, MAX_FRAME_BYTES, OpId,
    PROTOCOL_VERSION, ProtoError, RawFrame,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::AGENT_VERSION;
use crate::engine::{Engine, error};
use crate::files::{self, WriteMsg};
use crate::hardening;

/// Frames queued for the writer.
const OUT_QUEUE: usize = 64;
/// Chunks queued for one file write.
const WRITE_QUEUE: usize = 16;

/// Where an operation sends its messages: the connection's writer, tagged with the op id.
#[derive(Debug, Clone)]
pub struct Outbox {
    op_id: OpId,
    tx: mpsc::Sender<Frame<GuestMessage>>,
}

impl Outbox {
    /// An outbox for `op_id` feeding `tx`.
    pub fn new(op_id: OpId, tx: mpsc::Sender<Frame<GuestMessage>>) -> Self {
        Self { op_id, tx }
    }

    /// An outbox whose messages go nowhere useful (op id 0).
    pub fn detached(tx: mpsc::Sender<Frame<GuestMessage>>) -> Self {
        Self::new(OpId::CONNECTION, tx)
    }

    /// The op id messages are tagged with.
    pub fn op_id(&self) -> OpId {
        self.op_id
    }

    /// Sends a message, waiting for queue space. False when the connection is gone (the
    /// message is dropped).
    pub async fn send(&self, msg: GuestMessage) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        self.tx.send(Frame::new(self.op_id, msg)).await.is_ok()
    }

    /// Blocking [`send`](Self::send), for blocking threads only.
    pub fn blocking_send(&self, msg: GuestMessage) -> bool {
        self.tx.blocking_send(Frame::new(self.op_id, msg)).is_ok()
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The host closed the stream (or it broke).
    Closed,
    /// The host asked to power off; `ShuttingDown` has been sent.
    Shutdown,
}

/// Splits frames without decoding payloads, so a bad payload can be answered with its op id.
#[derive(Debug, Default)]
struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = RawFrame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, ProtoError> {
        let frame = guest_proto::decode_raw_frame(src, MAX_FRAME_BYTES)?;
        if frame.is_none() {
            guest_proto::reserve_frame(src, MAX_FRAME_BYTES)?;
        }
        Ok(frame)
    }
}

enum WriteState {
    Active(mpsc::Sender<WriteMsg>),
    /// Failed or refused: later chunks are dropped silently until `WriteEnd`.
    Dead,
}

type Ops = Arc<Mutex<HashMap<OpId, CancellationToken>>>;

fn ops_lock(ops: &Ops) -> std::sync::MutexGuard<'_, HashMap<OpId, CancellationToken>> {
    ops.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Queues `frame` on the connection; false when the connection is unusable.
///
/// A reply too large for one frame (a listing of a directory with very many or very long
/// names, which ordinary user code can create) is not written at all (the codec refuses
/// it before writing anything) and becomes an error for that operation alone, so the
/// connection stays healthy and the host's call fails instead of waiting forever.
async fn feed_or_refuse<W>(
    sink: &mut FramedWrite<W, GuestCodec>,
    frame: Frame<GuestMessage>,
) -> bool
where
    W: AsyncWrite + Unpin,
{
    let op_id = frame.op_id;
    let name = frame.msg.name();
    match sink.feed(frame).await {
        Ok(()) => true,
        Err(guest_proto::ProtoError::FrameTooLarge { len, max }) => {
            warn!(
                op = name,
                len, max, "reply too large for one frame; answered with an error"
            );
            let refusal = Frame::new(
                op_id,
                error(
                    GuestErrorKind::Request,
                    format!(
                        "the {name} reply would be {len} bytes, over the {max}-byte frame limit \
                         (a directory with too many entries?)"
                    ),
                ),
            );
            match sink.feed(refusal).await {
                Ok(()) => true,
                Err(err) => {
                    debug!(%err, "writing to the host failed");
                    false
                }
            }
        }
        Err(err) => {
            debug!(%err, "writing to the host failed");
            false
        }
    }
}

/// Serves one host connection until it closes or the host asks for shutdown.
pub async fn serve_connection<R, W>(engine: Arc<Engine>, reader: R, writer: W) -> ConnectionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Frame<GuestMessage>>(OUT_QUEUE);
    let writer_task = tokio::spawn(async move {
        let mut sink = FramedWrite::new(writer, GuestCodec::new());
        while let Some(frame) = rx.recv().await {
            if !feed_or_refuse(&mut sink, frame).await {
                return;
            }
            while let Ok(frame) = rx.try_recv() {
                if !feed_or_refuse(&mut sink, frame).await {
                    return;
                }
            }
            if let Err(err) = sink.flush().await {
                debug!(%err, "flushing to the host failed");
                return;
            }
        }
    });

    let ops: Ops = Arc::new(Mutex::new(HashMap::new()));
    let mut writes: HashMap<OpId, WriteState> = HashMap::new();
    let mut frames = FramedRead::new(reader, RawDecoder);
    let end = loop {
        let raw = match frames.next().await {
            None => break ConnectionEnd::Closed,
            Some(Err(err)) => {
                warn!(%err, "unreadable frame stream; closing the connection");
                let _ = tx
                    .send(Frame::new(
                        OpId::CONNECTION,
                        error(GuestErrorKind::Protocol, err.to_string()),
                    ))
                    .await;
                break ConnectionEnd::Closed;
            }
            Some(Ok(raw)) => raw,
        };
        let op_id = raw.op_id;
        let out = Outbox::new(op_id, tx.clone());
        let msg = match raw.into_frame::<HostMessage>() {
            Ok(frame) => frame.msg,
            Err(err) => {
                out.send(error(GuestErrorKind::Protocol, err.to_string()))
                    .await;
                continue;
            }
        };
        match msg {
            HostMessage::Ping { protocol_version } => {
                let reply = if protocol_version == PROTOCOL_VERSION {
                    GuestMessage::Pong {
                        protocol_version: PROTOCOL_VERSION,
                        agent_version: AGENT_VERSION.to_owned(),
                        boot_ms: engine.config().boot_ms,
                        setup_us: engine.config().setup_us,
                        crng_reseeds: engine.config().reseed_crng.then(hardening::crng_reseeds),
                    }
                } else {
                    error(
                        GuestErrorKind::Protocol,
                        format!(
                            "host speaks protocol {protocol_version}, agent speaks {PROTOCOL_VERSION}"
                        ),
                    )
                };
                out.send(reply).await;
            }
            HostMessage::Exec(req) => {
                let engine = engine.clone();
                let token = register(&ops, op_id);
                let ops = ops.clone();
                tokio::spawn(async move {
                    let done = engine.exec(req, &out, token).await;
                    ops_lock(&ops).remove(&op_id);
                    out.send(done).await;
                });
            }
            HostMessage::WarmUp { language } => {
                let engine = engine.clone();
                let token = register(&ops, op_id);
                let ops = ops.clone();
                tokio::spawn(async move {
                    let done = engine.warm_up(language, token).await;
                    ops_lock(&ops).remove(&op_id);
                    out.send(done).await;
                });
            }
            HostMessage::InstallPackages {
                language,
                packages,
                timeout_secs,
            } => {
                let engine = engine.clone();
                let token = register(&ops, op_id);
                let ops = ops.clone();
                tokio::spawn(async move {
                    let done = crate::packages::install(
                        engine.config(),
                        language,
                        &packages,
                        timeout_secs,
                        token,
                    )
                    .await;
                    ops_lock(&ops).remove(&op_id);
                    out.send(done).await;
                });
            }
            HostMessage::WriteFile { path, executable } => {
                let (wtx, wrx) = mpsc::channel(WRITE_QUEUE);
                if let Some(earlier) = writes.insert(op_id, WriteState::Active(wtx)) {
                    // Drop the earlier write (its temp file is removed) and refuse both.
                    drop(earlier);
                    writes.insert(op_id, WriteState::Dead);
                    out.send(error(GuestErrorKind::Request, "duplicate write op id"))
                        .await;
                    continue;
                }
                let engine = engine.clone();
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || {
                        files::write_file_blocking(engine.config(), &path, executable, wrx)
                    })
                    .await;
                    match result {
                        Ok(Some(done)) => {
                            out.send(done).await;
                        }
                        Ok(None) => {}
                        Err(err) => {
                            out.send(error(
                                GuestErrorKind::Io,
                                format!("write task failed: {err}"),
                            ))
                            .await;
                        }
                    }
                });
            }
            HostMessage::WriteChunk(data) => match writes.get(&op_id) {
                Some(WriteState::Active(wtx)) => {
                    if wtx.send(WriteMsg::Chunk(data)).await.is_err() {
                        // The writer already answered (error); drop the rest quietly.
                        writes.insert(op_id, WriteState::Dead);
                    }
                }
                Some(WriteState::Dead) => {}
                None => {
                    writes.insert(op_id, WriteState::Dead);
                    out.send(error(
                        GuestErrorKind::Request,
                        "no file write in progress for this op id",
                    ))
                    .await;
                }
            },
            HostMessage::WriteEnd { size, sha256 } => match writes.remove(&op_id) {
                Some(WriteState::Active(wtx)) => {
                    let _ = wtx.send(WriteMsg::End { size, sha256 }).await;
                }
                Some(WriteState::Dead) => {}
                None => {
                    out.send(error(
                        GuestErrorKind::Request,
                        "no file write in progress for this op id",
                    ))
                    .await;
                }
            },
            HostMessage::ReadFile { path } => {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let chunks = out.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        files::read_file_blocking(engine.config(), &path, &chunks)
                    })
                    .await;
                    let done = result.unwrap_or_else(|err| {
                        error(GuestErrorKind::Io, format!("read task failed: {err}"))
                    });
                    out.send(done).await;
                });
            }
            HostMessage::ListDir { path } => {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let result = tokio::task::spawn_blocking(move || {
                        files::list_dir(engine.config(), &path)
                    })
                    .await;
                    let done = result.unwrap_or_else(|err| {
                        error(GuestErrorKind::Io, format!("list task failed: {err}"))
                    });
                    out.send(done).await;
                });
            }
            HostMessage::Cancel => {
                if let Some(token) = ops_lock(&ops).get(&op_id) {
                    token.cancel();
                }
                if let Some(WriteState::Active(_)) = writes.get(&op_id) {
                    writes.insert(op_id, WriteState::Dead);
                    out.send(error(GuestErrorKind::Request, "file write cancelled"))
                        .await;
                }
            }
            HostMessage::Resume {
                unix_time_ns,
                entropy,
            } => {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let done = engine.resume(unix_time_ns, &entropy).await;
                    out.send(done).await;
                });
            }
            HostMessage::Shutdown => {
                for token in ops_lock(&ops).values() {
                    token.cancel();
                }
                engine.shutdown().await;
                out.send(GuestMessage::ShuttingDown).await;
                break ConnectionEnd::Shutdown;
            }
        }
    };
    drop(writes);
    drop(tx);
    match end {
        ConnectionEnd::Shutdown => {
            // Let the writer flush ShuttingDown (other senders may still hold the queue).
            let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        }
        ConnectionEnd::Closed => writer_task.abort(),
    }
    end
}

fn register(ops: &Ops, op_id: OpId) -> CancellationToken {
    let token = CancellationToken::new();
    ops_lock(ops).insert(op_id, token.clone());
    token
}
