//! The crate's one error type.

/// Everything that can go wrong while encoding, decoding, reading or writing frames.
///
/// Decoding never panics: every malformed input maps to one of these variants.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The length prefix (or a frame being encoded) is larger than the allowed maximum.
    ///
    /// Raised before anything is allocated for the frame. The byte stream cannot be
    /// resynchronised after this: close the connection.
    #[error("frame of {len} bytes is larger than the {max}-byte limit")]
    FrameTooLarge {
        /// The length the frame claims (or would have), counted after the 4-byte prefix.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The length prefix is smaller than the fixed header (version, tag, op id).
    ///
    /// The byte stream cannot be resynchronised after this: close the connection.
    #[error(
        "frame length is shorter than the {}-byte header",
        crate::MIN_FRAME_LEN
    )]
    FrameTooShort,
    /// End of input inside a frame.
    #[error("end of stream inside a frame")]
    Truncated,
    /// The frame's type tag is not known for this direction.
    #[error("unknown message type tag {0}")]
    UnknownType(u8),
    /// The frame was written for another protocol version.
    #[error("peer speaks protocol version {got}, this side speaks {expected}")]
    VersionMismatch {
        /// Version byte found in the frame.
        got: u8,
        /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of this side.
        expected: u8,
    },
    /// The payload does not fit the message its tag names (bad JSON, missing or unknown
    /// fields, a payload on a message that takes none).
    #[error("malformed payload for message tag {tag}: {reason}")]
    Malformed {
        /// The frame's type tag.
        tag: u8,
        /// What was wrong.
        reason: String,
    },
    /// I/O error from the underlying reader or writer.
    #[error("i/o error on the guest channel: {0}")]
    Io(#[from] std::io::Error),
}
