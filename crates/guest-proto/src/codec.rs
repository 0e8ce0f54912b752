//! Framing: encode and decode frames, blocking helpers and the tokio codec.

use std::io::{ErrorKind, Read, Write};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::{Frame, OpId};
use crate::wire::WireMessage;
use crate::{LEN_PREFIX_BYTES, MAX_FRAME_BYTES, MIN_FRAME_LEN, PROTOCOL_VERSION, ProtoError};

/// A frame whose header has been parsed but whose payload has not.
///
/// Useful when a decoding error must still be answered for the right operation: the op id
/// is known even when the version or payload is bad. Turn it into a message with
/// [`RawFrame::into_frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The version byte as received (not yet checked).
    pub version: u8,
    /// The type tag.
    pub tag: u8,
    /// The operation id.
    pub op_id: OpId,
    /// Everything after the op id.
    pub payload: Bytes,
}

impl RawFrame {
    /// Checks the version and decodes the payload.
    pub fn into_frame<M: WireMessage>(self) -> Result<Frame<M>, ProtoError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtoError::VersionMismatch {
                got: self.version,
                expected: PROTOCOL_VERSION,
            });
        }
        let msg = M::decode_payload(self.tag, self.payload)?;
        Ok(Frame {
            op_id: self.op_id,
            msg,
        })
    }

    /// Splits a frame body (everything after the length prefix, at least
    /// [`MIN_FRAME_LEN`] bytes) into header fields and payload.
    fn parse(mut body: BytesMut) -> Result<Self, ProtoError> {
        if body.len() < MIN_FRAME_LEN {
            return Err(ProtoError::FrameTooShort);
        }
        let version = body.get_u8();
        let tag = body.get_u8();
        let op_id = OpId(body.get_u64());
        Ok(Self {
            version,
            tag,
            op_id,
            payload: body.freeze(),
        })
    }
}

/// Reads and checks the length prefix at the start of `src`: `Ok(None)` when fewer than
/// four bytes are there.
fn frame_len(src: &[u8], max: usize) -> Result<Option<usize>, ProtoError> {
    let Some(prefix) = src.first_chunk::<LEN_PREFIX_BYTES>() else {
        return Ok(None);
    };
    check_len(*prefix, max).map(Some)
}

fn check_len(prefix: [u8; LEN_PREFIX_BYTES], max: usize) -> Result<usize, ProtoError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    if len < MIN_FRAME_LEN {
        return Err(ProtoError::FrameTooShort);
    }
    Ok(len)
}

/// Appends one frame to `dst`, refusing frames longer than [`MAX_FRAME_BYTES`].
///
/// On error `dst` is left as it was.
pub fn encode_frame<M: WireMessage>(
    frame: &Frame<M>,
    dst: &mut BytesMut,
) -> Result<(), ProtoError> {
    encode_frame_with_max(frame, dst, MAX_FRAME_BYTES)
}

/// Like [`encode_frame`] with a custom limit on the length prefix (clamped to `u32::MAX`).
pub fn encode_frame_with_max<M: WireMessage>(
    frame: &Frame<M>,
    dst: &mut BytesMut,
    max: usize,
) -> Result<(), ProtoError> {
    let max = max.min(u32::MAX as usize);
    if let Some(payload_len) = frame.msg.known_payload_len() {
        let len = payload_len.saturating_add(MIN_FRAME_LEN);
        if len > max {
            return Err(ProtoError::FrameTooLarge { len, max });
        }
        dst.reserve(LEN_PREFIX_BYTES + len);
    }
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(frame.msg.tag());
    dst.put_u64(frame.op_id.0);
    if let Err(err) = frame.msg.encode_payload(dst) {
        dst.truncate(start);
        return Err(err);
    }
    let len = dst.len() - start - LEN_PREFIX_BYTES;
    let prefix = match u32::try_from(len) {
        Ok(prefix) if len <= max => prefix,
        _ => {
            dst.truncate(start);
            return Err(ProtoError::FrameTooLarge { len, max });
        }
    };
    dst[start..start + LEN_PREFIX_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Makes room in `src` for the rest of the frame it starts with, so the next reads can
/// take the frame whole instead of a few KiB at a time. The length prefix is checked
/// against `max` first, so a peer can make this reserve at most `max + 4` bytes; nothing
/// happens while fewer than four bytes are there. Streaming readers call it after a
/// decode that needed more bytes.
pub fn reserve_frame(src: &mut BytesMut, max: usize) -> Result<(), ProtoError> {
    if let Some(len) = frame_len(src, max)? {
        let want = LEN_PREFIX_BYTES + len;
        if want > src.len() {
            src.reserve(want - src.len());
        }
    }
    Ok(())
}

/// Takes one frame off the front of `src` without decoding its payload.
///
/// `Ok(None)`: not a whole frame yet; `src` is untouched and nothing was allocated. The
/// length prefix is checked against `max` before anything else, so a peer cannot make the
/// caller buffer more than `max + 4` bytes for one frame. On
/// [`FrameTooLarge`](ProtoError::FrameTooLarge) and [`FrameTooShort`](ProtoError::FrameTooShort)
/// `src` is untouched and the stream cannot be resynchronised.
pub fn decode_raw_frame(src: &mut BytesMut, max: usize) -> Result<Option<RawFrame>, ProtoError> {
    let Some(len) = frame_len(src, max)? else {
        return Ok(None);
    };
    if src.len() - LEN_PREFIX_BYTES < len {
        return Ok(None);
    }
    let mut body = src.split_to(LEN_PREFIX_BYTES + len);
    body.advance(LEN_PREFIX_BYTES);
    RawFrame::parse(body).map(Some)
}

/// Takes one frame off the front of `src` and decodes it.
///
/// `Ok(None)` means more bytes are needed (`src` is untouched). Errors about the length
/// prefix ([`FrameTooLarge`](ProtoError::FrameTooLarge),
/// [`FrameTooShort`](ProtoError::FrameTooShort)) leave `src` untouched: close the
/// connection. Errors about one frame's content
/// ([`VersionMismatch`](ProtoError::VersionMismatch),
/// [`UnknownType`](ProtoError::UnknownType), [`Malformed`](ProtoError::Malformed)) consume
/// that frame, so the next call decodes the next one.
pub fn decode_frame<M: WireMessage>(
    src: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame<M>>, ProtoError> {
    match decode_raw_frame(src, max)? {
        Some(raw) => raw.into_frame().map(Some),
        None => Ok(None),
    }
}

/// Reads one frame from a blocking reader without decoding its payload.
///
/// `Ok(None)` on a clean end of stream before the first byte of a frame;
/// [`Truncated`](ProtoError::Truncated) when the stream ends inside one. At most `max`
/// bytes are allocated, and only after the length prefix has been checked.
pub fn read_raw_frame<R: Read>(r: &mut R, max: usize) -> Result<Option<RawFrame>, ProtoError> {
    let mut prefix = [0u8; LEN_PREFIX_BYTES];
    let mut filled = 0;
    while filled < LEN_PREFIX_BYTES {
        match r.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => filled += n,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    let len = check_len(prefix, max)?;
    let mut body = BytesMut::zeroed(len);
    r.read_exact(&mut body).map_err(|err| {
        if err.kind() == ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            ProtoError::Io(err)
        }
    })?;
    RawFrame::parse(body).map(Some)
}

/// Reads and decodes one frame from a blocking reader (the guest agent's side).
///
/// `Ok(None)` on a clean end of stream at a frame boundary;
/// [`Truncated`](ProtoError::Truncated) when the stream ends inside a frame. After a
/// content error (version, tag, payload) the frame has been consumed and reading can go on.
pub fn read_frame<M: WireMessage, R: Read>(
    r: &mut R,
    max: usize,
) -> Result<Option<Frame<M>>, ProtoError> {
    match read_raw_frame(r, max)? {
        Some(raw) => raw.into_frame().map(Some),
        None => Ok(None),
    }
}

/// Encodes one frame and writes it with a single `write_all`, then flushes.
///
/// Nothing is written when encoding fails (for example a frame over [`MAX_FRAME_BYTES`]).
pub fn write_frame<M: WireMessage, W: Write>(
    w: &mut W,
    frame: &Frame<M>,
) -> Result<(), ProtoError> {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

#[cfg(feature = "tokio")]
pub use self::tokio_codec::{Codec, GuestCodec, HostCodec};

#[cfg(feature = "tokio")]
mod tokio_codec {
    use std::fmt;
    use std::marker::PhantomData;

    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::{decode_frame, encode_frame_with_max, reserve_frame};
    use crate::message::{Frame, GuestMessage, HostMessage};
    use crate::wire::WireMessage;
    use crate::{MAX_FRAME_BYTES, ProtoError};

    /// A `tokio_util` codec that decodes `Frame<In>` and encodes `Frame<Out>`.
    ///
    /// Use [`HostCodec`] on the host and [`GuestCodec`] in the guest, for example with
    /// `tokio_util::codec::Framed`. Decoding follows [`decode_frame`]; when the input ends
    /// inside a frame, `decode_eof` returns [`ProtoError::Truncated`].
    pub struct Codec<In, Out> {
        max: usize,
        _marker: PhantomData<fn(Out) -> In>,
    }

    /// The host's codec: reads guest messages, writes host messages.
    pub type HostCodec = Codec<GuestMessage, HostMessage>;
    /// The guest's codec: reads host messages, writes guest messages.
    pub type GuestCodec = Codec<HostMessage, GuestMessage>;

    impl<In, Out> Codec<In, Out> {
        /// A codec limited to [`MAX_FRAME_BYTES`] in both directions.
        pub fn new() -> Self {
            Self::with_max(MAX_FRAME_BYTES)
        }

        /// A codec with another frame limit (the value of the length prefix), in both
        /// directions.
        pub fn with_max(max: usize) -> Self {
            Self {
                max,
                _marker: PhantomData,
            }
        }

        /// The frame limit.
        pub fn max(&self) -> usize {
            self.max
        }
    }

    impl<In, Out> Default for Codec<In, Out> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<In, Out> Clone for Codec<In, Out> {
        fn clone(&self) -> Self {
            *self
        }
    }

    impl<In, Out> Copy for Codec<In, Out> {}

    impl<In, Out> fmt::Debug for Codec<In, Out> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Codec").field("max", &self.max).finish()
        }
    }

    impl<In: WireMessage, Out> Decoder for Codec<In, Out> {
        type Item = Frame<In>;
        type Error = ProtoError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
            let frame = decode_frame(src, self.max)?;
            if frame.is_none() {
                reserve_frame(src, self.max)?;
            }
            Ok(frame)
        }

        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
            match self.decode(src)? {
                Some(frame) => Ok(Some(frame)),
                None if src.is_empty() => Ok(None),
                None => Err(ProtoError::Truncated),
            }
        }
    }

    impl<In, Out: WireMessage> Encoder<Frame<Out>> for Codec<In, Out> {
        type Error = ProtoError;

        fn encode(&mut self, item: Frame<Out>, dst: &mut BytesMut) -> Result<(), Self::Error> {
            encode_frame_with_max(&item, dst, self.max)
        }
    }
}
