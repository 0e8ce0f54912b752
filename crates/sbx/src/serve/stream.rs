//! `application/x-ndjson` answers: output chunks as they arrive, then the result.
//!
//! The output callbacks of the core feed an unbounded channel (the core caps output, so
//! the channel is bounded in practice). [`ExecStream`] drives the operation's future
//! itself: dropping the stream (the client went away) drops the future, which for a run
//! destroys the VM and for a session exec cancels the exec in the guest.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use sandbox_core::{Error, ExecutionResult, OutputCallbacks};
use tokio::sync::mpsc;

use super::api::{RunResult, StreamEvent};
use super::error::ApiError;
use super::metrics::Metrics;

/// The NDJSON media type.
pub const NDJSON: &str = "application/x-ndjson";

/// A chunk of output from a callback.
#[derive(Debug)]
pub enum Chunk {
    /// Standard output bytes.
    Stdout(Vec<u8>),
    /// Standard error bytes.
    Stderr(Vec<u8>),
}

/// Callbacks that forward output to the returned receiver.
pub fn channel_callbacks() -> (OutputCallbacks, mpsc::UnboundedReceiver<Chunk>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tx2 = tx.clone();
    let cbs = OutputCallbacks {
        on_stdout: Some(Arc::new(move |b: &[u8]| {
            let _ = tx.send(Chunk::Stdout(b.to_vec()));
        })),
        on_stderr: Some(Arc::new(move |b: &[u8]| {
            let _ = tx2.send(Chunk::Stderr(b.to_vec()));
        })),
    };
    (cbs, rx)
}

/// The future of a run or exec.
pub type ExecFuture = Pin<Box<dyn Future<Output = Result<ExecutionResult, Error>> + Send>>;

/// One item of an [`ExecStream`].
#[derive(Debug)]
pub enum Item {
    /// Output, in arrival order.
    Chunk(Chunk),
    /// The outcome (always last).
    Done(Result<ExecutionResult, Error>),
}

/// Output chunks of an operation, then its outcome. Polling the stream drives the
/// operation; dropping it cancels the operation.
pub struct ExecStream {
    fut: Option<ExecFuture>,
    rx: mpsc::UnboundedReceiver<Chunk>,
    done: Option<Result<ExecutionResult, Error>>,
    finished: bool,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream")
            .field("running", &self.fut.is_some())
            .field("finished", &self.finished)
            .finish()
    }
}

impl ExecStream {
    /// A stream over `fut`, whose callbacks feed `rx`.
    pub fn new(fut: ExecFuture, rx: mpsc::UnboundedReceiver<Chunk>) -> Self {
        Self {
            fut: Some(fut),
            rx,
            done: None,
            finished: false,
        }
    }
}

impl Stream for ExecStream {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(fut) = this.fut.as_mut()
            && let Poll::Ready(r) = fut.as_mut().poll(cx)
        {
            // Dropping the future drops the callbacks and so the senders.
            this.fut = None;
            this.done = Some(r);
        }
        if this.fut.is_none() {
            // Everything the operation sent is already queued.
            return match this.rx.try_recv() {
                Ok(c) => Poll::Ready(Some(Item::Chunk(c))),
                Err(_) => {
                    this.finished = true;
                    Poll::Ready(this.done.take().map(Item::Done))
                }
            };
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(c)) => Poll::Ready(Some(Item::Chunk(c))),
            _ => Poll::Pending,
        }
    }
}

/// Length of an incomplete UTF-8 sequence at the end of `b` (0–3).
fn incomplete_tail(b: &[u8]) -> usize {
    for i in 1..=b.len().min(3) {
        let byte = b[b.len() - i];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let need = match byte {
            0xF0..=0xFF => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if need > i { i } else { 0 };
    }
    0
}

/// Told the kind of an error emitted mid-stream.
pub type ErrorHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Turns items into NDJSON lines, keeping multi-byte characters split across chunks whole.
pub struct Encoder {
    out: Vec<u8>,
    err: Vec<u8>,
    metrics: Option<ErrorHook>,
}

fn line(ev: &StreamEvent) -> Vec<u8> {
    let mut v = serde_json::to_vec(ev).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

fn take_text(carry: &mut Vec<u8>, data: &[u8], flush: bool) -> String {
    carry.extend_from_slice(data);
    let cut = if flush {
        carry.len()
    } else {
        carry.len() - incomplete_tail(carry)
    };
    let s = String::from_utf8_lossy(&carry[..cut]).into_owned();
    carry.drain(..cut);
    s
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("pending_stdout", &self.out.len())
            .field("pending_stderr", &self.err.len())
            .finish()
    }
}

impl Encoder {
    /// An encoder; `on_error` is told the kind of an error emitted mid-stream.
    pub fn new(on_error: Option<ErrorHook>) -> Self {
        Self {
            out: Vec::new(),
            err: Vec::new(),
            metrics: on_error,
        }
    }

    /// The NDJSON bytes of `item` (`None` when all of it waits for more bytes).
    pub fn encode(&mut self, item: Item) -> Option<Bytes> {
        let mut buf = Vec::new();
        match item {
            Item::Chunk(Chunk::Stdout(b)) => {
                let data = take_text(&mut self.out, &b, false);
                if !data.is_empty() {
                    buf.extend(line(&StreamEvent::Stdout { data }));
                }
            }
            Item::Chunk(Chunk::Stderr(b)) => {
                let data = take_text(&mut self.err, &b, false);
                if !data.is_empty() {
                    buf.extend(line(&StreamEvent::Stderr { data }));
                }
            }
            Item::Done(r) => {
                let data = take_text(&mut self.out, &[], true);
                if !data.is_empty() {
                    buf.extend(line(&StreamEvent::Stdout { data }));
                }
                let data = take_text(&mut self.err, &[], true);
                if !data.is_empty() {
                    buf.extend(line(&StreamEvent::Stderr { data }));
                }
                let ev = match r {
                    Ok(r) => StreamEvent::Result(RunResult::from(&r)),
                    Err(e) => {
                        let e = ApiError::from(&e);
                        if let Some(m) = &self.metrics {
                            m(e.kind());
                        }
                        StreamEvent::Error {
                            error: e.detail().clone(),
                        }
                    }
                };
                buf.extend(line(&ev));
            }
        }
        (!buf.is_empty()).then(|| Bytes::from(buf))
    }
}

/// True when the client asked for NDJSON.
pub fn wants_ndjson(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)))
}

/// The streamed answer of an operation. The headers wait for the first event, so an
/// operation that fails before any output gets a plain error answer with its status.
pub async fn respond(mut stream: ExecStream, metrics: Arc<Metrics>) -> Response {
    let first = stream.next().await;
    let first = match first {
        Some(Item::Done(Err(e))) => return ApiError::from(e).into_response(),
        other => other,
    };
    let on_error: ErrorHook = Arc::new(move |k: &str| metrics.error(k));
    let mut enc = Encoder::new(Some(on_error));
    let body = futures::stream::iter(first)
        .chain(stream)
        .filter_map(move |item| std::future::ready(enc.encode(item).map(Ok::<_, Infallible>)));
    let mut resp = (StatusCode::OK, Body::from_stream(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_stay_whole() {
        let mut enc = Encoder::new(None);
        let text = "héllo €uro 🎉";
        let bytes = text.as_bytes();
        let mut got = String::new();
        for chunk in bytes.chunks(1) {
            if let Some(b) = enc.encode(Item::Chunk(Chunk::Stdout(chunk.to_vec()))) {
                for l in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                    let ev: StreamEvent = serde_json::from_slice(l).unwrap();
                    match ev {
                        StreamEvent::Stdout { data } => got.push_str(&data),
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
        assert_eq!(got, text);
        // An invalid byte is replaced, a dangling lead byte is flushed at the end.
        let b = enc
            .encode(Item::Chunk(Chunk::Stderr(vec![b'a', 0xFF, b'b', 0xE2])))
            .unwrap();
        assert!(String::from_utf8_lossy(&b).contains("a\u{fffd}b"));
        let b = enc
            .encode(Item::Done(Ok(ExecutionResult::default())))
            .unwrap();
        let lines: Vec<&[u8]> = b.split(|c| *c == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 2);
        let last: StreamEvent = serde_json::from_slice(lines[1]).unwrap();
        assert!(matches!(last, StreamEvent::Result(_)));
    }

    #[tokio::test]
    async fn output_is_delivered_while_the_operation_runs() {
        let (cbs, rx) = channel_callbacks();
        let fut = async move {
            if let Some(cb) = &cbs.on_stdout {
                cb(b"early\n");
            }
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            Ok(ExecutionResult::default())
        };
        let started = std::time::Instant::now();
        let mut s = ExecStream::new(Box::pin(fut), rx);
        match s.next().await {
            Some(Item::Chunk(Chunk::Stdout(b))) => assert_eq!(b, b"early\n"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_millis(300));
        assert!(matches!(s.next().await, Some(Item::Done(Ok(_)))));
        assert!(started.elapsed() >= std::time::Duration::from_millis(400));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_stream_drops_the_operation() {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        let (_cbs, rx) = channel_callbacks();
        let fut = async move {
            let _flag = flag;
            futures::future::pending::<()>().await;
            Ok(ExecutionResult::default())
        };
        let mut s = ExecStream::new(Box::pin(fut), rx);
        let poll = tokio::time::timeout(std::time::Duration::from_millis(50), s.next()).await;
        assert!(poll.is_err());
        drop(s);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn tail_lengths() {
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&[0xE2, 0x82]), 2);
        assert_eq!(incomplete_tail(&[0xE2, 0x82, 0xAC]), 0);
        assert_eq!(incomplete_tail(&[0xF0]), 1);
    }

    #[test]
    fn accept_header_detection() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!wants_ndjson(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/json, application/x-ndjson;q=0.9"),
        );
        assert!(wants_ndjson(&h));
    }
}
