//! Decoder robustness: arbitrary input, truncation, oversized and malformed frames.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod common;

use std::io::Read;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use guest_proto::{
    ExecRequest, Frame, GuestMessage, HostMessage, Language, MAX_FRAME_BYTES, MAX_PAYLOAD_BYTES,
    OpId, PROTOCOL_VERSION, ProtoError, WireMessage, decode_frame, decode_raw_frame, encode_frame,
    read_frame, read_raw_frame, write_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Builds a frame by hand: length prefix computed from the rest.
fn raw(version: u8, tag: u8, op: u64, payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32((10 + payload.len()) as u32);
    buf.put_u8(version);
    buf.put_u8(tag);
    buf.put_u64(op);
    buf.put_slice(payload);
    buf
}

/// Feeds `input` to the streaming decoder the way a connection would, checking that the
/// buffer never grows past what was fed and that decoding never panics.
fn drain_streaming<M: WireMessage>(input: &[u8], max: usize) {
    let mut buf = BytesMut::from(input);
    let cap = buf.capacity();
    loop {
        match decode_frame::<M>(&mut buf, max) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(ProtoError::FrameTooLarge { len, max: m }) => {
                assert!(len > m);
                break;
            }
            Err(ProtoError::FrameTooShort) => break,
            Err(
                ProtoError::UnknownType(_)
                | ProtoError::VersionMismatch { .. }
                | ProtoError::Malformed { .. },
            ) => {}
            Err(other) => panic!("unexpected error from a pure decoder: {other}"),
        }
        assert!(buf.capacity() <= cap, "decoder allocated");
    }
}

#[cfg(feature = "tokio")]
fn drain_codec<In: WireMessage>(input: &[u8], max: usize, chunk: usize) {
    use tokio_util::codec::Decoder;
    let mut codec = guest_proto::Codec::<In, HostMessage>::with_max(max);
    let mut buf = BytesMut::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(ProtoError::FrameTooLarge { .. } | ProtoError::FrameTooShort) => return,
                Err(_) => {}
            }
        }
        // Reserving is bounded by the frame limit (plus what a reserve may round up to).
        assert!(buf.capacity() <= 2 * (max + 4) + input.len());
    }
    let _ = codec.decode_eof(&mut buf);
}

fn drain_blocking<M: WireMessage>(input: &[u8], max: usize) {
    let mut reader = input;
    loop {
        match read_frame::<M, _>(&mut reader, max) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(
                ProtoError::UnknownType(_)
                | ProtoError::VersionMismatch { .. }
                | ProtoError::Malformed { .. },
            ) => {}
            Err(ProtoError::Truncated) => {
                assert!(reader.is_empty());
                break;
            }
            Err(ProtoError::FrameTooLarge { .. } | ProtoError::FrameTooShort) => break,
            Err(ProtoError::Io(err)) => panic!("a slice reader does not fail: {err}"),
        }
    }
}

fn fuzz_one(input: &[u8], max: usize) {
    drain_streaming::<HostMessage>(input, max);
    drain_streaming::<GuestMessage>(input, max);
    drain_blocking::<HostMessage>(input, max);
    drain_blocking::<GuestMessage>(input, max);
    #[cfg(feature = "tokio")]
    {
        drain_codec::<HostMessage>(input, max, 7);
        drain_codec::<GuestMessage>(input, max, 64);
    }
}

/// Arbitrary bytes, and valid streams with a few bytes overwritten.
fn fuzz_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..512),
        (
            vec(host_frame(), 1..4),
            vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)
        )
            .prop_map(|(frames, edits)| {
                let mut buf = BytesMut::new();
                for frame in &frames {
                    encode_frame(frame, &mut buf).unwrap();
                }
                mutate(buf.to_vec(), &edits)
            }),
        (
            vec(guest_frame(), 1..4),
            vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)
        )
            .prop_map(|(frames, edits)| {
                let mut buf = BytesMut::new();
                for frame in &frames {
                    encode_frame(frame, &mut buf).unwrap();
                }
                mutate(buf.to_vec(), &edits)
            }),
        // A valid header with an arbitrary payload for every tag.
        (any::<u8>(), vec(any::<u8>(), 0..64)).prop_map(|(tag, payload)| raw(
            PROTOCOL_VERSION,
            tag % 15,
            1,
            &payload
        )
        .to_vec()),
    ]
}

fn mutate(mut bytes: Vec<u8>, edits: &[(prop::sample::Index, u8)]) -> Vec<u8> {
    for (at, value) in edits {
        let i = at.index(bytes.len());
        bytes[i] = *value;
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn decoder_never_panics(input in fuzz_input(), small in any::<bool>()) {
        fuzz_one(&input, if small { 64 } else { MAX_FRAME_BYTES });
    }
}

/// The long search the crate docs mention:
/// `cargo test -p guest-proto --release -- --ignored decoder_fuzz_long`.
#[test]
#[ignore = "long: a million decoder cases; run with --release -- --ignored"]
fn decoder_fuzz_long() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(1_000_000));
    runner
        .run(&(fuzz_input(), any::<bool>()), |(input, small)| {
            fuzz_one(&input, if small { 64 } else { MAX_FRAME_BYTES });
            Ok(())
        })
        .unwrap();
}

fn sample_frames() -> Vec<Frame<HostMessage>> {
    vec![
        Frame::new(
            OpId(1),
            HostMessage::Ping {
                protocol_version: 1,
            },
        ),
        Frame::new(
            OpId(2),
            HostMessage::Exec(ExecRequest {
                language: Language::Python,
                code: "print('hi')".into(),
                timeout_secs: 30,
                env: vec![("K".into(), "v".into())],
            }),
        ),
        Frame::new(
            OpId(3),
            HostMessage::WriteChunk(Bytes::from(vec![9u8; 1000])),
        ),
        Frame::new(OpId(4), HostMessage::Shutdown),
    ]
}

#[test]
fn truncated_frames_need_more_bytes_when_streaming() {
    let mut whole = BytesMut::new();
    for frame in sample_frames() {
        encode_frame(&frame, &mut whole).unwrap();
    }
    for cut in 0..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        let mut got = 0;
        while let Some(_frame) = decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES).unwrap() {
            got += 1;
        }
        assert!(got < 4, "cut {cut}");
    }
}

#[test]
fn truncated_frames_are_an_error_when_blocking() {
    for frame in sample_frames() {
        let mut whole = BytesMut::new();
        encode_frame(&frame, &mut whole).unwrap();
        for cut in 1..whole.len() {
            let mut reader = &whole[..cut];
            let err = read_frame::<HostMessage, _>(&mut reader, MAX_FRAME_BYTES).unwrap_err();
            assert!(matches!(err, ProtoError::Truncated), "cut {cut}: {err}");
        }
        let mut empty: &[u8] = &[];
        assert!(
            read_frame::<HostMessage, _>(&mut empty, MAX_FRAME_BYTES)
                .unwrap()
                .is_none()
        );
    }
}

#[cfg(feature = "tokio")]
#[test]
fn codec_reports_truncation_at_eof() {
    use tokio_util::codec::Decoder;
    let mut whole = BytesMut::new();
    encode_frame(&sample_frames()[1], &mut whole).unwrap();
    let mut codec = guest_proto::GuestCodec::new();
    for cut in 1..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(ProtoError::Truncated)
        ));
    }
    let mut empty = BytesMut::new();
    assert!(codec.decode_eof(&mut empty).unwrap().is_none());
}

#[test]
fn oversized_length_prefix_is_refused_before_allocating() {
    for claimed in [
        u32::MAX,
        (MAX_FRAME_BYTES + 1) as u32,
        (MAX_FRAME_BYTES * 4) as u32,
    ] {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u32(claimed);
        buf.put_slice(&[PROTOCOL_VERSION, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        let before = buf.clone();
        let cap = buf.capacity();
        let err = decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES).unwrap_err();
        match err {
            ProtoError::FrameTooLarge { len, max } => {
                assert_eq!(len, claimed as usize);
                assert_eq!(max, MAX_FRAME_BYTES);
            }
            other => panic!("expected FrameTooLarge, got {other}"),
        }
        assert_eq!(buf.capacity(), cap);
        assert!(buf.capacity() < claimed as usize);
        assert_eq!(buf, before, "buffer left untouched");
    }
    // Exactly at the limit is accepted (and needs more bytes).
    let mut buf = BytesMut::new();
    buf.put_u32(MAX_FRAME_BYTES as u32);
    assert!(
        decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES)
            .unwrap()
            .is_none()
    );
    // A custom limit applies.
    let mut small = raw(PROTOCOL_VERSION, 5, 1, &[0; 100]);
    assert!(matches!(
        decode_frame::<HostMessage>(&mut small, 50),
        Err(ProtoError::FrameTooLarge { len: 110, max: 50 })
    ));
}

#[cfg(feature = "tokio")]
#[test]
fn codec_refuses_oversized_prefix_without_reserving() {
    use tokio_util::codec::Decoder;
    let mut codec = guest_proto::HostCodec::new();
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u32(u32::MAX);
    let cap = buf.capacity();
    assert!(matches!(
        codec.decode(&mut buf),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert_eq!(buf.capacity(), cap);

    // A legitimate large frame reserves at most its own size.
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u32(1_000_000);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(buf.capacity() >= 1_000_004);
    assert!(buf.capacity() <= 2 * 1_000_004);
}

/// Counts the bytes a reader hands out, to show the blocking reader stops at the prefix.
struct Counting<R> {
    inner: R,
    read: usize,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

#[test]
fn blocking_reader_refuses_oversized_prefix_before_reading_on() {
    let endless = std::io::repeat(0xff);
    let mut reader = Counting {
        inner: endless,
        read: 0,
    };
    let err = read_frame::<GuestMessage, _>(&mut reader, MAX_FRAME_BYTES).unwrap_err();
    assert!(
        matches!(err, ProtoError::FrameTooLarge { len, .. } if len == u32::MAX as usize),
        "{err}"
    );
    assert_eq!(reader.read, 4);
}

#[test]
fn too_short_length_prefix() {
    for len in 0u32..10 {
        let mut buf = BytesMut::new();
        buf.put_u32(len);
        buf.put_slice(&[0; 16]);
        assert!(matches!(
            decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES),
            Err(ProtoError::FrameTooShort)
        ));
        let mut reader = &buf[..];
        assert!(matches!(
            read_frame::<HostMessage, _>(&mut reader, MAX_FRAME_BYTES),
            Err(ProtoError::FrameTooShort)
        ));
    }
}

#[test]
fn unknown_tag_is_typed_and_the_stream_goes_on() {
    for tag in [0u8, 13, 14, 200, 255] {
        let mut buf = raw(PROTOCOL_VERSION, tag, 7, b"{}");
        encode_frame(&Frame::new(OpId(8), HostMessage::Cancel), &mut buf).unwrap();
        assert!(matches!(
            decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES),
            Err(ProtoError::UnknownType(t)) if t == tag
        ));
        let next = decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(next, Frame::new(OpId(8), HostMessage::Cancel));
    }
    // Guest tags stop at 13; 14 is unknown there.
    let mut buf = raw(PROTOCOL_VERSION, 14, 1, b"");
    assert!(matches!(
        decode_frame::<GuestMessage>(&mut buf, MAX_FRAME_BYTES),
        Err(ProtoError::UnknownType(14))
    ));
    let mut reader = &raw(PROTOCOL_VERSION, 99, 1, b"")[..];
    assert!(matches!(
        read_frame::<GuestMessage, _>(&mut reader, MAX_FRAME_BYTES),
        Err(ProtoError::UnknownType(99))
    ));
}

#[test]
fn other_protocol_version_is_a_mismatch_with_op_id_available() {
    let mut buf = raw(2, 1, 42, br#"{"protocol_version":2}"#);
    let copy = buf.clone();
    assert!(matches!(
        decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES),
        Err(ProtoError::VersionMismatch {
            got: 2,
            expected: PROTOCOL_VERSION
        })
    ));
    assert!(buf.is_empty(), "the bad frame is consumed");

    let mut buf = copy.clone();
    let raw_frame = decode_raw_frame(&mut buf, MAX_FRAME_BYTES)
        .unwrap()
        .unwrap();
    assert_eq!(raw_frame.op_id, OpId(42));
    assert_eq!(raw_frame.version, 2);
    assert!(matches!(
        raw_frame.into_frame::<HostMessage>(),
        Err(ProtoError::VersionMismatch { got: 2, .. })
    ));

    let mut reader = &copy[..];
    let raw_frame = read_raw_frame(&mut reader, MAX_FRAME_BYTES)
        .unwrap()
        .unwrap();
    assert_eq!(raw_frame.op_id, OpId(42));
    let mut reader = &copy[..];
    assert!(matches!(
        read_frame::<HostMessage, _>(&mut reader, MAX_FRAME_BYTES),
        Err(ProtoError::VersionMismatch { got: 2, .. })
    ));
}

#[test]
fn bad_payloads_are_malformed() {
    use guest_proto::tags::{guest, host};
    let host_cases: &[(u8, &[u8])] = &[
        (host::PING, b""),
        (host::PING, b"{"),
        (host::PING, b"not json"),
        (host::PING, br#"{"protocol_version":256}"#),
        (host::PING, br#"{"protocol_version":1,"extra":true}"#),
        (host::PING, br#"{"protocol_version":1} trailing"#),
        (
            host::EXEC,
            br#"{"language":"ruby","code":"","timeout_secs":1,"env":[]}"#,
        ),
        (
            host::EXEC,
            br#"{"language":"python","code":"","timeout_secs":-1,"env":[]}"#,
        ),
        (
            host::EXEC,
            br#"{"language":"python","code":"x","timeout_secs":1}"#,
        ),
        (
            host::EXEC,
            br#"{"language":"Python","code":"x","timeout_secs":1,"env":[]}"#,
        ),
        (host::WRITE_END, br#"{"size":1,"sha256":"abc"}"#),
        (host::WRITE_END, br#"{"size":1,"sha256":[1,2,3]}"#),
        (host::READ_FILE, br#"{"path":1}"#),
        (host::READ_FILE, b"\xff\xfe"),
        (host::CANCEL, b"{}"),
        (host::SHUTDOWN, b" "),
    ];
    for (tag, payload) in host_cases {
        let mut buf = raw(PROTOCOL_VERSION, *tag, 1, payload);
        match decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES) {
            Err(ProtoError::Malformed { tag: t, reason }) => {
                assert_eq!(t, *tag);
                assert!(!reason.is_empty());
            }
            other => panic!(
                "tag {tag} payload {:?}: expected Malformed, got {other:?}",
                String::from_utf8_lossy(payload)
            ),
        }
        let mut reader = &raw(PROTOCOL_VERSION, *tag, 1, payload)[..];
        assert!(matches!(
            read_frame::<HostMessage, _>(&mut reader, MAX_FRAME_BYTES),
            Err(ProtoError::Malformed { .. })
        ));
    }
    let guest_cases: &[(u8, &[u8])] = &[
        (guest::PONG, br#"{"protocol_version":1}"#),
        (guest::ERROR, br#"{"kind":"Timeout","message":""}"#),
        (guest::ERROR, br#"{"kind":"nope","message":""}"#),
        (guest::EXEC_DONE, br#"{"exit_code":1.5,"execution_ms":1}"#),
        (
            guest::DIR_LISTING,
            br#"{"entries":[{"name":"a","is_dir":false}]}"#,
        ),
        (guest::SHUTTING_DOWN, b"x"),
        (guest::RESUMED, br#"{"reseeded":1}"#),
        (guest::RESUMED, br#"{"reseeded":-1,"crng_reseeds":1}"#),
    ];
    for (tag, payload) in guest_cases {
        let mut buf = raw(PROTOCOL_VERSION, *tag, 1, payload);
        assert!(
            matches!(
                decode_frame::<GuestMessage>(&mut buf, MAX_FRAME_BYTES),
                Err(ProtoError::Malformed { tag: t, .. }) if t == *tag
            ),
            "tag {tag} payload {:?}",
            String::from_utf8_lossy(payload)
        );
    }
}

#[test]
fn exact_wire_bytes_are_stable() {
    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(1),
            HostMessage::Ping {
                protocol_version: 1,
            },
        ),
        &mut buf,
    )
    .unwrap();
    let mut want = vec![0, 0, 0, 0x20, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1];
    want.extend_from_slice(br#"{"protocol_version":1}"#);
    assert_eq!(&buf[..], &want[..]);

    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(0x0102),
            GuestMessage::Stdout(Bytes::from_static(b"\0hi\xff")),
        ),
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        &buf[..],
        &[
            0, 0, 0, 14, 1, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0, b'h', b'i', 0xff
        ]
    );

    let sha = guest_proto::Sha256Digest::of(b"abc");
    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(5),
            HostMessage::WriteEnd {
                size: 3,
                sha256: sha.0,
            },
        ),
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        &buf[14..],
        format!(r#"{{"size":3,"sha256":"{sha}"}}"#).as_bytes()
    );

    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(2),
            HostMessage::Exec(ExecRequest {
                language: Language::Javascript,
                code: "1".into(),
                timeout_secs: 3,
                env: vec![("A".into(), "b".into())],
            }),
        ),
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        &buf[14..],
        br#"{"language":"javascript","code":"1","timeout_secs":3,"env":[["A","b"]]}"#
    );

    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(2),
            GuestMessage::Error {
                kind: guest_proto::GuestErrorKind::OutputLimit,
                message: "m".into(),
            },
        ),
        &mut buf,
    )
    .unwrap();
    assert_eq!(&buf[14..], br#"{"kind":"output_limit","message":"m"}"#);

    let mut buf = BytesMut::new();
    encode_frame(&Frame::new(OpId(9), HostMessage::Cancel), &mut buf).unwrap();
    assert_eq!(&buf[..], &[0, 0, 0, 10, 1, 10, 0, 0, 0, 0, 0, 0, 0, 9]);
}

#[test]
fn optional_fields_may_be_absent() {
    use guest_proto::tags::guest;
    let mut buf = raw(
        PROTOCOL_VERSION,
        guest::PONG,
        3,
        br#"{"protocol_version":1,"agent_version":"x"}"#,
    );
    assert_eq!(
        decode_frame::<GuestMessage>(&mut buf, MAX_FRAME_BYTES)
            .unwrap()
            .unwrap()
            .msg,
        GuestMessage::Pong {
            protocol_version: 1,
            agent_version: "x".into(),
            boot_ms: None,
            setup_us: None,
            crng_reseeds: None,
        }
    );
}

#[test]
fn encoder_refuses_frames_over_the_limit() {
    // The largest data payload fits exactly.
    let fits = Frame::new(
        OpId(1),
        GuestMessage::FileChunk(Bytes::from(vec![0u8; MAX_PAYLOAD_BYTES])),
    );
    let mut buf = BytesMut::new();
    encode_frame(&fits, &mut buf).unwrap();
    assert_eq!(buf.len(), 4 + MAX_FRAME_BYTES);
    let back = decode_frame::<GuestMessage>(&mut buf, MAX_FRAME_BYTES)
        .unwrap()
        .unwrap();
    assert_eq!(back, fits);

    // One byte more does not, and leaves the buffer as it was.
    let over = Frame::new(
        OpId(1),
        HostMessage::WriteChunk(Bytes::from(vec![0u8; MAX_PAYLOAD_BYTES + 1])),
    );
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(matches!(
        encode_frame(&over, &mut buf),
        Err(ProtoError::FrameTooLarge { len, max: MAX_FRAME_BYTES }) if len == MAX_FRAME_BYTES + 1
    ));
    assert_eq!(&buf[..], b"keep");

    // JSON messages are measured after encoding.
    let huge = Frame::new(
        OpId(1),
        HostMessage::Exec(ExecRequest {
            language: Language::Raw,
            code: "x".repeat(MAX_FRAME_BYTES),
            timeout_secs: 1,
            env: vec![],
        }),
    );
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(matches!(
        encode_frame(&huge, &mut buf),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert_eq!(&buf[..], b"keep");

    // write_frame writes nothing for a frame it cannot encode.
    let mut out = Vec::new();
    assert!(matches!(
        write_frame(&mut out, &huge),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert!(out.is_empty());

    // A custom encoder limit applies too.
    let mut buf = BytesMut::new();
    assert!(matches!(
        guest_proto::encode_frame_with_max(
            &Frame::new(OpId(1), GuestMessage::Stdout(Bytes::from(vec![1u8; 91]))),
            &mut buf,
            100
        ),
        Err(ProtoError::FrameTooLarge { len: 101, max: 100 })
    ));
}

#[cfg(feature = "tokio")]
#[test]
fn codec_encoder_uses_its_limit() {
    use tokio_util::codec::Encoder;
    let mut codec = guest_proto::GuestCodec::with_max(64);
    assert_eq!(codec.max(), 64);
    let mut buf = BytesMut::new();
    codec
        .encode(
            Frame::new(OpId(1), GuestMessage::Stdout(Bytes::from(vec![0u8; 54]))),
            &mut buf,
        )
        .unwrap();
    assert!(matches!(
        codec.encode(
            Frame::new(OpId(1), GuestMessage::Stdout(Bytes::from(vec![0u8; 55]))),
            &mut buf,
        ),
        Err(ProtoError::FrameTooLarge { len: 65, max: 64 })
    ));
    assert_eq!(buf.len(), 68);
}

#[test]
fn io_errors_are_passed_through() {
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("boom"))
        }
    }
    impl std::io::Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(
        read_frame::<HostMessage, _>(&mut Broken, MAX_FRAME_BYTES),
        Err(ProtoError::Io(e)) if e.to_string() == "boom"
    ));
    assert!(matches!(
        write_frame(&mut Broken, &Frame::new(OpId(1), HostMessage::Shutdown)),
        Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe
    ));
}

#[test]
fn terminal_messages() {
    assert!(!GuestMessage::Stdout(Bytes::new()).is_terminal());
    assert!(!GuestMessage::Stderr(Bytes::new()).is_terminal());
    assert!(!GuestMessage::FileChunk(Bytes::new()).is_terminal());
    assert!(GuestMessage::ShuttingDown.is_terminal());
    assert!(
        GuestMessage::Error {
            kind: guest_proto::GuestErrorKind::Io,
            message: String::new()
        }
        .is_terminal()
    );
    assert_eq!(HostMessage::Cancel.name(), "Cancel");
    assert_eq!(GuestMessage::ShuttingDown.name(), "ShuttingDown");
}

#[test]
fn error_messages_name_the_problem() {
    let err = ProtoError::FrameTooLarge { len: 9, max: 8 };
    assert_eq!(
        err.to_string(),
        "frame of 9 bytes is larger than the 8-byte limit"
    );
    let err = ProtoError::VersionMismatch {
        got: 2,
        expected: 1,
    };
    assert!(err.to_string().contains("version 2"));
    assert!(ProtoError::UnknownType(77).to_string().contains("77"));
}

#[test]
fn reserve_frame_makes_room_for_the_announced_frame_only() {
    use guest_proto::reserve_frame;
    // A header announcing a 64 KiB frame: room for all of it afterwards.
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u32(64 * 1024);
    buf.put_slice(&[PROTOCOL_VERSION, 1]);
    reserve_frame(&mut buf, MAX_FRAME_BYTES).unwrap();
    assert!(buf.capacity() >= 64 * 1024 + 4);
    assert_eq!(buf.len(), 6, "bytes kept");
    // Already whole: nothing more.
    let mut whole = raw(PROTOCOL_VERSION, 5, 1, &[7; 100]);
    let cap = whole.capacity();
    reserve_frame(&mut whole, MAX_FRAME_BYTES).unwrap();
    assert_eq!(whole.capacity(), cap);
    // Fewer than four bytes: nothing to go on.
    let mut short = BytesMut::with_capacity(8);
    short.put_u16(0xffff);
    reserve_frame(&mut short, MAX_FRAME_BYTES).unwrap();
    assert_eq!(short.capacity(), 8);
    // Over the limit: refused before reserving anything.
    let mut huge = BytesMut::with_capacity(8);
    huge.put_u32(u32::MAX);
    assert!(matches!(
        reserve_frame(&mut huge, MAX_FRAME_BYTES),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    assert_eq!(huge.capacity(), 8);
}

fn resume_payload(entropy_hex: &str) -> Vec<u8> {
    format!(r#"{{"unix_time_ns":1,"entropy":"{entropy_hex}"}}"#).into_bytes()
}

#[test]
fn resume_entropy_length_and_digits_are_checked() {
    use guest_proto::limits::{MAX_RESUME_ENTROPY_BYTES, MIN_RESUME_ENTROPY_BYTES};
    use guest_proto::tags::host;
    let ok = |n: usize| "ab".repeat(n);
    let bad: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), resume_payload("")),
        (
            "31 bytes".into(),
            resume_payload(&ok(MIN_RESUME_ENTROPY_BYTES - 1)),
        ),
        (
            "257 bytes".into(),
            resume_payload(&ok(MAX_RESUME_ENTROPY_BYTES + 1)),
        ),
        ("odd digits".into(), resume_payload(&format!("{}a", ok(32)))),
        ("non-hex".into(), resume_payload(&format!("{}zz", ok(32)))),
        ("sign".into(), resume_payload(&format!("{}+1", ok(32)))),
        ("non-ascii".into(), resume_payload(&format!("{}é", ok(32)))),
        (
            "negative time".into(),
            format!(r#"{{"unix_time_ns":-1,"entropy":"{}"}}"#, ok(32)).into_bytes(),
        ),
        (
            "missing time".into(),
            format!(r#"{{"entropy":"{}"}}"#, ok(32)).into_bytes(),
        ),
        (
            "entropy as array".into(),
            br#"{"unix_time_ns":1,"entropy":[1,2,3]}"#.to_vec(),
        ),
        (
            "extra field".into(),
            format!(r#"{{"unix_time_ns":1,"entropy":"{}","x":0}}"#, ok(32)).into_bytes(),
        ),
    ];
    for (what, payload) in &bad {
        let mut buf = raw(PROTOCOL_VERSION, host::RESUME, 7, payload);
        assert!(
            matches!(
                decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES),
                Err(ProtoError::Malformed { tag, .. }) if tag == host::RESUME
            ),
            "{what}: should be refused"
        );
        // The bad frame is consumed; its op id stays available for the answer.
        assert!(buf.is_empty());
        let mut buf = raw(PROTOCOL_VERSION, host::RESUME, 7, payload);
        let raw_frame = decode_raw_frame(&mut buf, MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(raw_frame.op_id, OpId(7));
    }
    for n in [MIN_RESUME_ENTROPY_BYTES, MAX_RESUME_ENTROPY_BYTES] {
        // Upper-case digits are accepted too.
        let mut buf = raw(
            PROTOCOL_VERSION,
            host::RESUME,
            1,
            &resume_payload(&"AB".repeat(n)),
        );
        let got = decode_frame::<HostMessage>(&mut buf, MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(
            got.msg,
            HostMessage::Resume {
                unix_time_ns: 1,
                entropy: Bytes::from(vec![0xab; n]),
            }
        );
    }
}

#[test]
fn resume_encoder_refuses_bad_entropy_and_writes_hex() {
    for n in [0, 31, 257] {
        let mut buf = BytesMut::new();
        let frame = Frame::new(
            OpId(1),
            HostMessage::Resume {
                unix_time_ns: 0,
                entropy: Bytes::from(vec![1; n]),
            },
        );
        assert!(
            matches!(
                encode_frame(&frame, &mut buf),
                Err(ProtoError::Malformed { .. })
            ),
            "{n} bytes of entropy should be refused"
        );
    }
    let mut entropy = vec![0u8; 32];
    entropy[0] = 0x0f;
    entropy[31] = 0xf0;
    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(3),
            HostMessage::Resume {
                unix_time_ns: 1_700_000_000_000_000_001,
                entropy: Bytes::from(entropy),
            },
        ),
        &mut buf,
    )
    .unwrap();
    assert_eq!(buf[5], guest_proto::tags::host::RESUME);
    let want = format!(
        r#"{{"unix_time_ns":1700000000000000001,"entropy":"0f{}f0"}}"#,
        "00".repeat(30)
    );
    assert_eq!(&buf[14..], want.as_bytes());

    let mut buf = BytesMut::new();
    encode_frame(
        &Frame::new(
            OpId(3),
            GuestMessage::Resumed {
                reseeded: 2,
                crng_reseeds: 9,
            },
        ),
        &mut buf,
    )
    .unwrap();
    assert_eq!(&buf[14..], br#"{"reseeded":2,"crng_reseeds":9}"#);
    assert!(
        GuestMessage::Resumed {
            reseeded: 0,
            crng_reseeds: 0
        }
        .is_terminal()
    );
    assert_eq!(
        HostMessage::Resume {
            unix_time_ns: 0,
            entropy: Bytes::new()
        }
        .name(),
        "Resume"
    );
}
