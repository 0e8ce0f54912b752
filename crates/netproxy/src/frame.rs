//! QEMU's `-netdev stream` framing: every Ethernet frame is preceded by its length as a
//! 4-byte big-endian integer.

use bytes::{Buf, BufMut, BytesMut};

use crate::error::NetProxyError;

/// Largest frame accepted on the stream (QEMU never sends more than 64 KiB; the guest MTU
/// is 1500).
pub const MAX_FRAME: usize = 65_535;

/// Smallest frame worth handing to the stack (an Ethernet header).
pub const MIN_FRAME: usize = 14;

/// Incremental decoder of length-prefixed frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// The buffer to read more stream bytes into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends stream bytes.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed, or an error when the
    /// stream announces an oversize frame (the stream cannot be resynchronised then).
    /// Frames shorter than an Ethernet header are skipped.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, NetProxyError> {
        loop {
            let Some(header) = self.buf.get(..4) else {
                return Ok(None);
            };
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if len > MAX_FRAME {
                return Err(NetProxyError::FrameTooLarge {
                    len,
                    max: MAX_FRAME,
                });
            }
            if self.buf.len() < 4 + len {
                self.buf.reserve(4 + len - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(4);
            let frame = self.buf.split_to(len);
            if len >= MIN_FRAME {
                return Ok(Some(frame.to_vec()));
            }
        }
    }
}

/// Appends `frame` with its length prefix to `out`.
pub fn encode_frame(frame: &[u8], out: &mut BytesMut) {
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    out.reserve(4 + frame.len());
    out.put_u32(len);
    out.put_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_split() {
        let mut out = BytesMut::new();
        encode_frame(&[1u8; 60], &mut out);
        encode_frame(&[2u8; 1514], &mut out);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in out.chunks(7) {
            d.extend(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![vec![1u8; 60], vec![2u8; 1514]]);
    }

    #[test]
    fn runt_frames_skipped_oversize_rejected() {
        let mut d = FrameDecoder::new();
        d.extend(&[0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.extend(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_frame(),
            Err(NetProxyError::FrameTooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let mut d = FrameDecoder::new();
            for c in chunks {
                d.extend(&c);
                while let Ok(Some(f)) = d.next_frame() {
                    prop_assert!(f.len() >= MIN_FRAME && f.len() <= MAX_FRAME);
                }
            }
        }
    }
}
