//! Property-based round trips of every message through every encoder/decoder pair.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod common;

use std::fmt::Debug;

use bytes::BytesMut;
use common::*;
use guest_proto::{
    Frame, MAX_FRAME_BYTES, WireMessage, decode_frame, encode_frame, read_frame, write_frame,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn encode_all<M: WireMessage>(frames: &[Frame<M>]) -> BytesMut {
    let mut buf = BytesMut::new();
    for frame in frames {
        encode_frame(frame, &mut buf).unwrap();
    }
    buf
}

fn check_single<M: WireMessage + PartialEq + Debug>(frame: &Frame<M>) {
    let mut buf = BytesMut::new();
    encode_frame(frame, &mut buf).unwrap();
    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, buf.len(), "length prefix counts what follows it");
    assert_eq!(buf[4], guest_proto::PROTOCOL_VERSION);
    assert_eq!(buf[5], frame.msg.tag());
    assert_eq!(&buf[6..14], &frame.op_id.0.to_be_bytes());
    // Every strict prefix is "need more bytes" and leaves the buffer alone.
    for cut in [0, 1, 3, 4, 13, 14, buf.len() - 1] {
        if cut < buf.len() {
            let mut part = BytesMut::from(&buf[..cut]);
            assert!(
                decode_frame::<M>(&mut part, MAX_FRAME_BYTES)
                    .unwrap()
                    .is_none()
            );
            assert_eq!(part.len(), cut);
        }
    }
    let decoded = decode_frame::<M>(&mut buf, MAX_FRAME_BYTES).unwrap();
    assert_eq!(decoded.as_ref(), Some(frame));
    assert!(buf.is_empty());
}

fn check_split_stream<M: WireMessage + PartialEq + Debug>(
    frames: &[Frame<M>],
    raw_cuts: &[prop::sample::Index],
) {
    let bytes = encode_all(frames);
    let cuts = cut_points(bytes.len(), raw_cuts);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for pair in cuts.windows(2) {
        buf.extend_from_slice(&bytes[pair[0]..pair[1]]);
        while let Some(frame) = decode_frame::<M>(&mut buf, MAX_FRAME_BYTES).unwrap() {
            out.push(frame);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(out, frames);
}

fn check_blocking<M: WireMessage + PartialEq + Debug>(frames: &[Frame<M>], steps: Vec<usize>) {
    let mut wire = Vec::new();
    for frame in frames {
        write_frame(&mut wire, frame).unwrap();
    }
    assert_eq!(
        wire,
        encode_all(frames).to_vec(),
        "write_frame == encode_frame"
    );
    let mut reader = Dribble {
        data: &wire,
        steps,
        at: 0,
    };
    let mut out = Vec::new();
    while let Some(frame) = read_frame::<M, _>(&mut reader, MAX_FRAME_BYTES).unwrap() {
        out.push(frame);
    }
    assert_eq!(out, frames);
    // End of stream stays end of stream.
    assert!(
        read_frame::<M, _>(&mut reader, MAX_FRAME_BYTES)
            .unwrap()
            .is_none()
    );
}

#[cfg(feature = "tokio")]
fn check_tokio<In, Out>(frames: &[Frame<In>], raw_cuts: &[prop::sample::Index])
where
    In: WireMessage + PartialEq + Debug + Clone,
{
    use guest_proto::Codec;
    use tokio_util::codec::{Decoder, Encoder};

    // The sending side's codec writes `In` frames.
    let mut sender = Codec::<Out, In>::new();
    let mut bytes = BytesMut::new();
    for frame in frames {
        sender.encode(frame.clone(), &mut bytes).unwrap();
    }
    assert_eq!(bytes, encode_all(frames), "Encoder == encode_frame");

    let mut receiver = Codec::<In, Out>::new();
    let cuts = cut_points(bytes.len(), raw_cuts);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for pair in cuts.windows(2) {
        buf.extend_from_slice(&bytes[pair[0]..pair[1]]);
        while let Some(frame) = receiver.decode(&mut buf).unwrap() {
            out.push(frame);
        }
    }
    assert!(receiver.decode_eof(&mut buf).unwrap().is_none());
    assert_eq!(out, frames);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn host_frame_round_trip(frame in host_frame()) {
        check_single(&frame);
    }

    #[test]
    fn guest_frame_round_trip(frame in guest_frame()) {
        check_single(&frame);
    }

    #[test]
    fn host_stream_split_anywhere(
        frames in vec(host_frame(), 0..12),
        cuts in vec(any::<prop::sample::Index>(), 0..24),
    ) {
        check_split_stream(&frames, &cuts);
    }

    #[test]
    fn guest_stream_split_anywhere(
        frames in vec(guest_frame(), 0..12),
        cuts in vec(any::<prop::sample::Index>(), 0..24),
    ) {
        check_split_stream(&frames, &cuts);
    }

    #[test]
    fn host_stream_blocking(
        frames in vec(host_frame(), 0..12),
        steps in vec(1usize..40, 0..6),
    ) {
        check_blocking(&frames, steps);
    }

    #[test]
    fn guest_stream_blocking(
        frames in vec(guest_frame(), 0..12),
        steps in vec(1usize..40, 0..6),
    ) {
        check_blocking(&frames, steps);
    }
}

#[cfg(feature = "tokio")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn host_to_guest_through_tokio_codec(
        frames in vec(host_frame(), 0..12),
        cuts in vec(any::<prop::sample::Index>(), 0..24),
    ) {
        // The guest decodes what the host's codec encodes.
        check_tokio::<guest_proto::HostMessage, guest_proto::GuestMessage>(&frames, &cuts);
    }

    #[test]
    fn guest_to_host_through_tokio_codec(
        frames in vec(guest_frame(), 0..12),
        cuts in vec(any::<prop::sample::Index>(), 0..24),
    ) {
        check_tokio::<guest_proto::GuestMessage, guest_proto::HostMessage>(&frames, &cuts);
    }
}

#[test]
fn every_variant_is_covered_with_distinct_tags() {
    use guest_proto::{GuestMessage as G, HostMessage as H, Language, OpId};
    let host = [
        H::Ping {
            protocol_version: 1,
        },
        H::Exec(guest_proto::ExecRequest {
            language: Language::Python,
            code: "print(1)".into(),
            timeout_secs: 30,
            env: vec![("A".into(), "b".into())],
        }),
        H::WarmUp {
            language: Language::Raw,
        },
        H::WriteFile {
            path: "a/b".into(),
            executable: true,
        },
        H::WriteChunk(bytes::Bytes::from_static(b"\0\xff")),
        H::WriteEnd {
            size: 2,
            sha256: [7; 32],
        },
        H::ReadFile { path: "x".into() },
        H::ListDir { path: "".into() },
        H::InstallPackages {
            language: Language::Javascript,
            packages: vec!["left-pad".into()],
            timeout_secs: 60,
        },
        H::Cancel,
        H::Shutdown,
        H::Resume {
            unix_time_ns: 1_700_000_000_123_456_789,
            entropy: bytes::Bytes::from(vec![0xa5; 32]),
        },
    ];
    let guest = [
        G::Pong {
            protocol_version: 1,
            agent_version: "0.1.0".into(),
            boot_ms: Some(1200),
            setup_us: Some(4100),
            crng_reseeds: Some(3),
        },
        G::Stdout(bytes::Bytes::from_static(b"out")),
        G::Stderr(bytes::Bytes::from_static(b"err")),
        G::ExecDone {
            exit_code: -1,
            execution_ms: 5,
            spawn_ms: None,
        },
        G::WarmUpDone {
            language: Language::Python,
        },
        G::FileWritten {
            size: 1,
            sha256: [1; 32],
        },
        G::FileChunk(bytes::Bytes::new()),
        G::FileRead {
            size: 0,
            sha256: [0; 32],
        },
        G::DirListing {
            entries: vec![guest_proto::DirEntry {
                name: "f".into(),
                is_dir: false,
                size: 3,
            }],
        },
        G::PackagesInstalled {
            output: "ok".into(),
        },
        G::Error {
            kind: guest_proto::GuestErrorKind::EnvVar,
            message: "no".into(),
        },
        G::ShuttingDown,
        G::Resumed {
            reseeded: 3,
            crng_reseeds: 7,
        },
    ];
    let mut tags: Vec<u8> = host.iter().map(WireMessage::tag).collect();
    tags.dedup();
    assert_eq!(tags, (1..=12).collect::<Vec<u8>>());
    let mut tags: Vec<u8> = guest.iter().map(WireMessage::tag).collect();
    tags.dedup();
    assert_eq!(tags, (1..=13).collect::<Vec<u8>>());
    for (i, msg) in host.into_iter().enumerate() {
        check_single(&Frame::new(OpId(i as u64 + 1), msg));
    }
    for (i, msg) in guest.into_iter().enumerate() {
        check_single(&Frame::new(OpId(i as u64 + 1), msg));
    }
}
