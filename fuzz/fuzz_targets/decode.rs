//! Feeds arbitrary bytes to the frame decoders of both directions.
//!
//! Run from the repository root: `cargo +nightly fuzz run decode`.

#![no_main]

use bytes::BytesMut;
use guest_proto::{
    GuestMessage, HostMessage, MAX_FRAME_BYTES, ProtoError, WireMessage, decode_frame, read_frame,
};
use libfuzzer_sys::fuzz_target;

fn streaming<M: WireMessage>(data: &[u8], max: usize) {
    let mut buf = BytesMut::from(data);
    let cap = buf.capacity();
    loop {
        match decode_frame::<M>(&mut buf, max) {
            Ok(Some(_)) => {}
            Ok(None) | Err(ProtoError::FrameTooLarge { .. } | ProtoError::FrameTooShort) => break,
            // Content errors consume the frame; the stream goes on.
            Err(_) => {}
        }
        assert!(buf.capacity() <= cap, "the decoder allocated");
    }
}

fn blocking<M: WireMessage>(data: &[u8], max: usize) {
    let mut reader = data;
    while let Ok(Some(_))
    | Err(ProtoError::UnknownType(_))
    | Err(ProtoError::VersionMismatch { .. })
    | Err(ProtoError::Malformed { .. }) = read_frame::<M, _>(&mut reader, max)
    {}
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks a small limit sometimes, so oversized prefixes are common.
    let max = match data.first() {
        Some(b) if b % 2 == 0 => 256,
        _ => MAX_FRAME_BYTES,
    };
    streaming::<HostMessage>(data, max);
    streaming::<GuestMessage>(data, max);
    blocking::<HostMessage>(data, max);
    blocking::<GuestMessage>(data, max);
});
