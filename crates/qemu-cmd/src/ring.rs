//! Bounded byte buffers that keep the most recent output.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Keeps the last `capacity` bytes written to it.
#[derive(Debug)]
pub struct ByteRing {
    buf: VecDeque<u8>,
    capacity: usize,
    total: u64,
}

impl ByteRing {
    /// An empty ring holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(capacity.min(64 * 1024)),
            capacity,
            total: 0,
        }
    }

    /// Appends `data`, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        if self.capacity == 0 {
            return;
        }
        let data = if data.len() > self.capacity {
            &data[data.len() - self.capacity..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.capacity);
        self.buf.drain(..overflow);
        self.buf.extend(data);
    }

    /// Bytes currently held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes ever written, including dropped ones.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The last `max` bytes held.
    pub fn last_bytes(&self, max: usize) -> Vec<u8> {
        let skip = self.buf.len().saturating_sub(max);
        self.buf.iter().skip(skip).copied().collect()
    }

    /// The last `max_lines` lines (of at most `max_bytes` bytes), as lossy UTF-8.
    pub fn tail(&self, max_lines: usize, max_bytes: usize) -> String {
        let bytes = self.last_bytes(max_bytes);
        let text = String::from_utf8_lossy(&bytes);
        let trimmed = text.trim_end_matches(['\n', '\r']);
        let lines: Vec<&str> = trimmed.lines().collect();
        let start = lines.len().saturating_sub(max_lines);
        lines[start..].join("\n")
    }
}

/// A [`ByteRing`] shared between a drain task and readers.
#[derive(Debug, Clone)]
pub struct SharedRing(Arc<Mutex<ByteRing>>);

impl SharedRing {
    /// A shared ring of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new(Mutex::new(ByteRing::new(capacity))))
    }

    /// Locks the ring (a poisoned lock still holds valid bytes).
    pub fn lock(&self) -> MutexGuard<'_, ByteRing> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Splits a byte stream into lines, bounding the length of each.
#[derive(Debug)]
pub(crate) struct LineSplitter {
    pending: Vec<u8>,
    max_line: usize,
}

impl LineSplitter {
    pub(crate) fn new(max_line: usize) -> Self {
        Self {
            pending: Vec::new(),
            max_line,
        }
    }

    /// Feeds bytes; calls `emit` with every complete line (without `\r\n`). Lines longer
    /// than the maximum are emitted in pieces.
    pub(crate) fn feed(&mut self, data: &[u8], mut emit: impl FnMut(String)) {
        for &b in data {
            if b == b'\n' {
                emit(self.take());
            } else {
                self.pending.push(b);
                if self.pending.len() >= self.max_line {
                    emit(self.take());
                }
            }
        }
    }

    /// Emits what is left (end of stream).
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(String)) {
        if !self.pending.is_empty() {
            emit(self.take());
        }
    }

    fn take(&mut self) -> String {
        let mut line = std::mem::take(&mut self.pending);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes() {
        let mut r = ByteRing::new(8);
        r.push(b"hello ");
        r.push(b"world");
        assert_eq!(r.last_bytes(100), b"lo world");
        assert_eq!(r.total(), 11);
        r.push(b"0123456789abc");
        assert_eq!(r.last_bytes(100), b"56789abc");
        assert_eq!(r.len(), 8);
        let mut z = ByteRing::new(0);
        z.push(b"x");
        assert!(z.is_empty());
    }

    #[test]
    fn tail_lines() {
        let mut r = ByteRing::new(1024);
        r.push(b"a\nb\nc\nd\n");
        assert_eq!(r.tail(2, 1024), "c\nd");
        assert_eq!(r.tail(10, 4), "c\nd");
    }

    #[test]
    fn splitter_bounds_lines() {
        let mut s = LineSplitter::new(4);
        let mut out = Vec::new();
        s.feed(b"ab\r\ncdefgh\nij", |l| out.push(l));
        s.finish(|l| out.push(l));
        assert_eq!(out, vec!["ab", "cdef", "gh", "ij"]);
    }
}
