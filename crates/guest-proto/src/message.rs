//! Message types exchanged between the host and the guest agent.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::Language;

/// Identifies one operation (request) on a connection.
///
/// The host picks a fresh id for every request; the guest echoes it in every reply and
/// event that belongs to that request. [`OpId::CONNECTION`] (0) is reserved for messages
/// tied to no request, so hosts allocate ids from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(pub u64);

impl OpId {
    /// Id 0: messages that belong to no request, such as a protocol error the guest cannot
    /// attribute to a request, or a `ShuttingDown` the host did not ask for.
    pub const CONNECTION: OpId = OpId(0);

    /// The numeric value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for OpId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// One decoded frame: the operation it belongs to and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<M> {
    /// The operation this message belongs to.
    pub op_id: OpId,
    /// The message.
    pub msg: M,
}

impl<M> Frame<M> {
    /// A frame carrying `msg` for operation `op_id`.
    pub fn new(op_id: OpId, msg: M) -> Self {
        Self { op_id, msg }
    }
}

/// Run a piece of code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Which interpreter runs the code.
    pub language: Language,
    /// The source code (see [`limits::validate_code`](crate::limits::validate_code)).
    pub code: String,
    /// Wall-clock limit for this execution, in seconds.
    pub timeout_secs: u32,
    /// Extra environment variables, in order
    /// (see [`limits::validate_env`](crate::limits::validate_env)).
    pub env: Vec<(String, String)>,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    /// File name (one path component).
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// Messages from the host to the guest.
///
/// Every frame carries an [`OpId`]; see the crate documentation for the exchange each
/// request starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMessage {
    /// Handshake: the host's protocol version. The guest answers
    /// [`GuestMessage::Pong`], or an `Error` of kind `Protocol` on a mismatch.
    Ping {
        /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of the host.
        protocol_version: u8,
    },
    /// Run code; the guest streams `Stdout`/`Stderr` and ends with `ExecDone` or `Error`.
    Exec(ExecRequest),
    /// Start (or check) the persistent interpreter for a language; answered by
    /// `WarmUpDone` or `Error`.
    WarmUp {
        /// The interpreter to warm up.
        language: Language,
    },
    /// Start writing a file: followed by `WriteChunk` frames and one `WriteEnd` with the
    /// same op id.
    WriteFile {
        /// Path relative to the session root (see
        /// [`limits::normalize_guest_path`](crate::limits::normalize_guest_path)).
        path: String,
        /// Set the executable bits.
        executable: bool,
    },
    /// A piece of the file being written (raw bytes on the wire).
    WriteChunk(Bytes),
    /// End of a file write; the guest checks size and digest and answers `FileWritten`
    /// or `Error`.
    WriteEnd {
        /// Total bytes sent in `WriteChunk` frames.
        size: u64,
        /// SHA-256 of those bytes.
        sha256: [u8; 32],
    },
    /// Read a file: answered by `FileChunk` frames and one `FileRead`, or `Error`.
    ReadFile {
        /// Path relative to the session root.
        path: String,
    },
    /// List a directory: answered by `DirListing` or `Error`.
    ListDir {
        /// Path relative to the session root (`""` is the root).
        path: String,
    },
    /// Install packages with the language's package manager: answered by
    /// `PackagesInstalled` or `Error`.
    InstallPackages {
        /// Whose package manager (pip, npm, ...).
        language: Language,
        /// Package specifications.
        packages: Vec<String>,
        /// Wall-clock limit, in seconds.
        timeout_secs: u32,
    },
    /// Cancel the running operation whose op id this frame carries. No reply of its own.
    Cancel,
    /// Power off cleanly; the guest answers `ShuttingDown`.
    Shutdown,
    /// The VM was just restored from a memory snapshot (or forked): every clone resumes
    /// with the same kernel CRNG state, wall clock and interpreter RNG states. The guest
    /// sets `CLOCK_REALTIME` to `unix_time_ns`, credits `entropy` to the kernel pool
    /// (`RNDADDENTROPY`), reseeds the CRNG (`RNDRESEEDCRNG`) and makes every live REPL
    /// reseed its generators before any more user code runs in it. Answered by
    /// `Resumed` once the kernel part is done, or `Error`.
    Resume {
        /// The host's wall clock, in nanoseconds since the Unix epoch.
        unix_time_ns: u64,
        /// Fresh bytes from the host's OS RNG:
        /// [`MIN_RESUME_ENTROPY_BYTES`](crate::limits::MIN_RESUME_ENTROPY_BYTES) to
        /// [`MAX_RESUME_ENTROPY_BYTES`](crate::limits::MAX_RESUME_ENTROPY_BYTES) of them
        /// (other lengths are refused by the encoder and the decoder).
        entropy: Bytes,
    },
}

/// Kinds of error the guest reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestErrorKind {
    /// The code was refused before running (size, NUL byte, empty).
    Code,
    /// An environment variable was refused.
    EnvVar,
    /// A path was refused (escapes the root, not found, wrong type).
    Path,
    /// An I/O error in the guest.
    Io,
    /// The operation ran past its timeout.
    Timeout,
    /// Output exceeded its cap.
    OutputLimit,
    /// The request is invalid in the current state (unknown op id, write chunk without a
    /// header, size or digest mismatch, ...).
    Request,
    /// Protocol violation (version mismatch, undecodable frame).
    Protocol,
    /// Package installation failed.
    Package,
    /// The interpreter could not be started or crashed.
    Execution,
    /// The guest's filesystem is full (`ENOSPC`) or over its quota (`EDQUOT`).
    NoSpace,
}

impl GuestErrorKind {
    /// The snake_case name used on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Code => "code",
            Self::EnvVar => "env_var",
            Self::Path => "path",
            Self::Io => "io",
            Self::Timeout => "timeout",
            Self::OutputLimit => "output_limit",
            Self::Request => "request",
            Self::Protocol => "protocol",
            Self::Package => "package",
            Self::Execution => "execution",
            Self::NoSpace => "no_space",
        }
    }
}

impl fmt::Display for GuestErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Messages from the guest to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMessage {
    /// Answer to `Ping`.
    Pong {
        /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of the guest.
        protocol_version: u8,
        /// The agent's version string.
        agent_version: String,
        /// Milliseconds from kernel start to the agent being ready, when known.
        boot_ms: Option<u64>,
        /// Microseconds the agent spent on its own setup as PID 1 (mounts, hardening,
        /// network), when known.
        setup_us: Option<u64>,
        /// Successful kernel CRNG reseeds so far (at boot and before each exec), when the
        /// agent reseeds.
        crng_reseeds: Option<u64>,
    },
    /// A chunk of the running code's standard output (raw bytes).
    Stdout(Bytes),
    /// A chunk of the running code's standard error (raw bytes).
    Stderr(Bytes),
    /// The code finished.
    ExecDone {
        /// Exit status: the code's status, 128+signal when killed, -1 on timeout.
        exit_code: i32,
        /// Guest-measured execution time, in milliseconds.
        execution_ms: u64,
        /// Time to start the interpreter or hand the code to the REPL, when measured.
        spawn_ms: Option<u64>,
    },
    /// The interpreter for a language is ready.
    WarmUpDone {
        /// The language warmed up.
        language: Language,
    },
    /// A file write completed and was verified.
    FileWritten {
        /// Bytes written.
        size: u64,
        /// SHA-256 of the bytes written.
        sha256: [u8; 32],
    },
    /// A chunk of a file being read (raw bytes).
    FileChunk(Bytes),
    /// End of a file read.
    FileRead {
        /// Total bytes sent in `FileChunk` frames.
        size: u64,
        /// SHA-256 of those bytes.
        sha256: [u8; 32],
    },
    /// A directory listing.
    DirListing {
        /// The entries, in no particular order.
        entries: Vec<DirEntry>,
    },
    /// Packages were installed.
    PackagesInstalled {
        /// The package manager's combined output.
        output: String,
    },
    /// The operation failed; this ends it.
    Error {
        /// What kind of failure.
        kind: GuestErrorKind,
        /// Human-readable detail.
        message: String,
    },
    /// The guest is powering off.
    ShuttingDown,
    /// Answer to `Resume`: the clock is set and the kernel CRNG reseeded with the host's
    /// bytes.
    Resumed {
        /// Live REPLs that reseeded their generators before answering (Python `random`
        /// and numpy, Node's `Math.random` and `crypto`, bash `$RANDOM`). A REPL that could
        /// not be reached in time is replaced before its next exec instead, and not counted.
        reseeded: u32,
        /// Successful kernel CRNG reseeds so far, this one included (as in `Pong`).
        crng_reseeds: u64,
    },
}

impl HostMessage {
    /// The variant name, for logs.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Ping { .. } => "Ping",
            Self::Exec(_) => "Exec",
            Self::WarmUp { .. } => "WarmUp",
            Self::WriteFile { .. } => "WriteFile",
            Self::WriteChunk(_) => "WriteChunk",
            Self::WriteEnd { .. } => "WriteEnd",
            Self::ReadFile { .. } => "ReadFile",
            Self::ListDir { .. } => "ListDir",
            Self::InstallPackages { .. } => "InstallPackages",
            Self::Cancel => "Cancel",
            Self::Shutdown => "Shutdown",
            Self::Resume { .. } => "Resume",
        }
    }
}

impl GuestMessage {
    /// The variant name, for logs.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Pong { .. } => "Pong",
            Self::Stdout(_) => "Stdout",
            Self::Stderr(_) => "Stderr",
            Self::ExecDone { .. } => "ExecDone",
            Self::WarmUpDone { .. } => "WarmUpDone",
            Self::FileWritten { .. } => "FileWritten",
            Self::FileChunk(_) => "FileChunk",
            Self::FileRead { .. } => "FileRead",
            Self::DirListing { .. } => "DirListing",
            Self::PackagesInstalled { .. } => "PackagesInstalled",
            Self::Error { .. } => "Error",
            Self::ShuttingDown => "ShuttingDown",
            Self::Resumed { .. } => "Resumed",
        }
    }

    /// True for the message that ends an operation (every message except the streamed
    /// `Stdout`, `Stderr` and `FileChunk`). After it the guest sends nothing more for that
    /// op id.
    pub const fn is_terminal(&self) -> bool {
        !matches!(self, Self::Stdout(_) | Self::Stderr(_) | Self::FileChunk(_))
    }
}
