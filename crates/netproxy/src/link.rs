//! The unix stream between QEMU and a stack: a reader task decoding frames, and batched
//! writes of outgoing frames.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::NetProxyError;
use crate::frame::{FrameDecoder, encode_frame};

/// Frames buffered between the reader task and the stack loop.
const FRAME_QUEUE: usize = 1024;

/// One connected stream.
#[derive(Debug)]
pub(crate) struct Link {
    /// Decoded frames; closed when the peer disconnects or misbehaves.
    pub(crate) frames: mpsc::Receiver<Vec<u8>>,
    writer: OwnedWriteHalf,
    reader: JoinHandle<Option<NetProxyError>>,
    out: BytesMut,
}

impl Link {
    pub(crate) fn new(stream: UnixStream) -> Self {
        let (mut rd, writer) = stream.into_split();
        let (tx, frames) = mpsc::channel(FRAME_QUEUE);
        let reader = tokio::spawn(async move {
            let mut dec = FrameDecoder::new();
            loop {
                loop {
                    match dec.next_frame() {
                        Ok(Some(f)) => {
                            if tx.send(f).await.is_err() {
                                return None;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Some(e),
                    }
                }
                let buf = dec.buffer();
                buf.reserve(64 * 1024);
                match rd.read_buf(buf).await {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(source) => {
                        return Some(NetProxyError::Io {
                            operation: "reading frames",
                            source,
                        });
                    }
                }
            }
        });
        Self {
            frames,
            writer,
            reader,
            out: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Writes frames, length-prefixed, in one batch.
    pub(crate) async fn send(&mut self, frames: Vec<Vec<u8>>) -> std::io::Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        self.out.clear();
        for f in &frames {
            encode_frame(f, &mut self.out);
        }
        self.writer.write_all(&self.out).await
    }

    /// Why the reader stopped, if it stopped on an error.
    pub(crate) async fn reader_error(&mut self) -> Option<NetProxyError> {
        if !self.reader.is_finished() {
            return None;
        }
        (&mut self.reader).await.ok().flatten()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
