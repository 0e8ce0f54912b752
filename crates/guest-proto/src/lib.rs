//! Wire protocol between the sbx host and the guest agent: messages, framing, codec.
//!
//! The host talks to the agent inside the VM over one byte stream (a virtio-serial port).
//! Both sides use this crate, so they agree on the bytes by construction. The core types
//! need no async runtime; the [`Codec`] for `tokio_util` is behind the `tokio` feature
//! (on by default) and the guest can use the blocking [`read_frame`] / [`write_frame`].
//!
//! # Frame layout
//!
//! Every message travels in one frame. Integers are big-endian.
//!
//! | offset | size | field                                                        |
//! |-------:|-----:|--------------------------------------------------------------|
//! | 0      | 4    | `u32` length `L` of everything after this field (≥ 10)       |
//! | 4      | 1    | protocol version, [`PROTOCOL_VERSION`]                       |
//! | 5      | 1    | type tag (see [`tags`])                                      |
//! | 6      | 8    | `u64` operation id ([`OpId`])                                |
//! | 14     | L−10 | payload                                                      |
//!
//! `L` may not exceed [`MAX_FRAME_BYTES`] (8 MiB), so a payload holds at most
//! [`MAX_PAYLOAD_BYTES`]. Decoders check the length prefix against the limit before
//! buffering or allocating anything, so a peer cannot make the other side allocate more
//! than one frame's worth.
//!
//! Payloads come in three shapes:
//!
//! - **data** (`Stdout`, `Stderr`, `WriteChunk`, `FileChunk`): the raw bytes, byte-exact,
//!   no encoding. Senders use chunks of [`CHUNK_BYTES`] (64 KiB); any size up to the frame
//!   limit is accepted.
//! - **empty** (`Cancel`, `Shutdown`, `ShuttingDown`): zero bytes.
//! - **JSON** (every other message): a `serde_json` object of the message's fields, named as
//!   in the Rust types; unknown fields are refused. [`Language`] is lowercase,
//!   [`GuestErrorKind`] snake_case, `sha256` fields are 64 lowercase hex digits, `env` is a
//!   list of `[name, value]` pairs, `Resume`'s `entropy` is lowercase hex (32 to 256
//!   bytes; any other length is refused when encoding and decoding), absent `Option`s are
//!   `null` or missing.
//!   Example: `Ping` for op 1 is
//!   `00 00 00 20 | 01 | 01 | 00 00 00 00 00 00 00 01 | {"protocol_version":1}`.
//!
//! # Type tags
//!
//! The direction is known, so host and guest tags overlap. See [`tags`].
//!
//! | tag | host → guest ([`HostMessage`]) | guest → host ([`GuestMessage`]) |
//! |----:|--------------------------------|---------------------------------|
//! | 1   | `Ping`                         | `Pong`                          |
//! | 2   | `Exec`                         | `Stdout` (data)                 |
//! | 3   | `WarmUp`                       | `Stderr` (data)                 |
//! | 4   | `WriteFile`                    | `ExecDone`                      |
//! | 5   | `WriteChunk` (data)            | `WarmUpDone`                    |
//! | 6   | `WriteEnd`                     | `FileWritten`                   |
//! | 7   | `ReadFile`                     | `FileChunk` (data)              |
//! | 8   | `ListDir`                      | `FileRead`                      |
//! | 9   | `InstallPackages`              | `DirListing`                    |
//! | 10  | `Cancel` (empty)               | `PackagesInstalled`             |
//! | 11  | `Shutdown` (empty)             | `Error`                         |
//! | 12  | `Resume`                       | `ShuttingDown` (empty)          |
//! | 13  |                                | `Resumed`                       |
//!
//! # Operations
//!
//! Every request carries an [`OpId`] chosen by the host (from 1; [`OpId::CONNECTION`], 0,
//! is reserved for messages tied to no request). The guest echoes it in every reply and
//! event for that request, so several operations may be in flight on one connection. Each
//! operation ends with exactly one terminal message ([`GuestMessage::is_terminal`]); an
//! `Error` is always terminal.
//!
//! - **Handshake**: on connect the host sends `Ping { protocol_version }`; the guest answers
//!   `Pong { protocol_version, agent_version, boot_ms, setup_us, crng_reseeds }`, or `Error { kind: Protocol }` when
//!   the versions differ. Independently, every frame's version byte is checked, and a
//!   frame of another version decodes to [`ProtoError::VersionMismatch`].
//! - **Exec**: `Exec` → `Stdout`/`Stderr`* → `ExecDone` | `Error`.
//! - **Warm-up**: `WarmUp` → `WarmUpDone` | `Error`.
//! - **Write file**: `WriteFile` → `WriteChunk`* → `WriteEnd { size, sha256 }`, all with one
//!   op id; the guest checks size and digest and answers `FileWritten` | `Error`.
//! - **Read file**: `ReadFile` → `FileChunk`* → `FileRead { size, sha256 }` | `Error`.
//! - **List directory**: `ListDir` → `DirListing` | `Error`.
//! - **Install packages**: `InstallPackages` → `PackagesInstalled` | `Error`.
//! - **Cancel**: a `Cancel` frame carries the op id of the operation to stop and gets no
//!   reply of its own; the cancelled operation ends early with its usual terminal message
//!   or an `Error`. Cancelling an unknown or finished op id does nothing.
//! - **Shutdown**: `Shutdown` → `ShuttingDown`, then the guest powers off.
//! - **Resume** (after a restore from a memory snapshot, before anything else):
//!   `Resume { unix_time_ns, entropy }` → `Resumed { reseeded, crng_reseeds }` | `Error`.
//!   The guest answers only after it has set its wall clock, credited the bytes to the
//!   kernel pool and reseeded the CRNG; every live REPL reseeds its generators before it
//!   runs user code again. Adding a message does not change the meaning of the others, so
//!   the protocol version stays; an older agent answers the unknown tag with an `Error` of
//!   kind `Protocol`.
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use guest_proto::{
//!     decode_frame, encode_frame, Frame, GuestMessage, HostMessage, OpId, MAX_FRAME_BYTES,
//!     PROTOCOL_VERSION,
//! };
//!
//! let mut wire = BytesMut::new();
//! let ping = Frame::new(OpId(1), HostMessage::Ping { protocol_version: PROTOCOL_VERSION });
//! encode_frame(&ping, &mut wire)?;
//!
//! // The guest side decodes host messages.
//! let got = decode_frame::<HostMessage>(&mut wire, MAX_FRAME_BYTES)?;
//! assert_eq!(got, Some(ping));
//!
//! // Half a frame is "need more bytes".
//! encode_frame(&Frame::new(OpId(1), GuestMessage::ShuttingDown), &mut wire)?;
//! let mut half = wire.split_to(7);
//! assert_eq!(decode_frame::<GuestMessage>(&mut half, MAX_FRAME_BYTES)?, None);
//! # Ok::<(), guest_proto::ProtoError>(())
//! ```
//!
//! [`Sha256Hasher`] computes the `size` and `sha256` of a transfer while chunks stream
//! past. The [`limits`] module holds the input rules both sides enforce.
//!
//! # Errors
//!
//! Decoding never panics. Length-prefix problems ([`ProtoError::FrameTooLarge`],
//! [`ProtoError::FrameTooShort`]) leave the stream unrecoverable: close it. Content
//! problems ([`ProtoError::VersionMismatch`], [`ProtoError::UnknownType`],
//! [`ProtoError::Malformed`]) consume the bad frame and decoding can continue;
//! [`decode_raw_frame`] / [`read_raw_frame`] give access to the op id of such a frame so the
//! guest can answer it with an `Error`.
//!
//! # Fuzzing
//!
//! Property tests run with `cargo test -p guest-proto`. Two longer searches exist:
//!
//! - a million-case proptest of the decoder on arbitrary and mutated input, ignored by
//!   default: `cargo test -p guest-proto --release -- --ignored decoder_fuzz_long`;
//! - a libFuzzer target in `fuzz/` at the repository root (cargo-fuzz layout, its own
//!   workspace, needs nightly): `cargo install cargo-fuzz`, then
//!   `cargo +nightly fuzz run decode` from the repository root.

mod codec;
pub mod contract;
mod digest;
mod error;
mod language;
pub mod limits;
mod message;
pub mod tags;
mod wire;

#[cfg(feature = "tokio")]
pub use codec::{Codec, GuestCodec, HostCodec};
pub use codec::{
    RawFrame, decode_frame, decode_raw_frame, encode_frame, encode_frame_with_max, read_frame,
    read_raw_frame, reserve_frame, write_frame,
};
pub use digest::{ParseDigestError, Sha256Digest, Sha256Hasher, hash_reader};
pub use error::ProtoError;
pub use language::{Language, ParseLanguageError};
pub use message::{DirEntry, ExecRequest, Frame, GuestErrorKind, GuestMessage, HostMessage, OpId};
pub use wire::WireMessage;

/// Version of this protocol: the fifth byte of every frame, and the value
/// exchanged in `Ping`/`Pong`.
pub const PROTOCOL_VERSION: u8 = 1;

/// virtio-blk serial of the disk that holds the guest's home directory, when the host
/// attaches one (a per-VM ext4 image). Without it the home is a tmpfs.
pub const HOME_DISK_SERIAL: &str = "sbx-home";

/// Largest allowed value of a frame's length prefix (version + tag + op id + payload).
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// Recommended size of one data chunk (`Stdout`, `Stderr`, `WriteChunk`, `FileChunk`).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Size of the length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;

/// Smallest valid length prefix: version (1) + tag (1) + op id (8), with an empty payload.
pub const MIN_FRAME_LEN: usize = 10;

/// Largest payload a frame can carry under [`MAX_FRAME_BYTES`].
pub const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - MIN_FRAME_LEN;
