//! Stable type tags: the second byte after the length prefix of every frame.
//!
//! The direction of a connection is known, so the host→guest and guest→host tag spaces
//! overlap. Tags are never reused for another message; a change in a message's meaning
//! bumps [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).

/// Tags of [`HostMessage`](crate::HostMessage) (host → guest).
pub mod host {
    /// `Ping` (JSON).
    pub const PING: u8 = 1;
    /// `Exec` (JSON).
    pub const EXEC: u8 = 2;
    /// `WarmUp` (JSON).
    pub const WARM_UP: u8 = 3;
    /// `WriteFile` (JSON).
    pub const WRITE_FILE: u8 = 4;
    /// `WriteChunk` (raw bytes).
    pub const WRITE_CHUNK: u8 = 5;
    /// `WriteEnd` (JSON).
    pub const WRITE_END: u8 = 6;
    /// `ReadFile` (JSON).
    pub const READ_FILE: u8 = 7;
    /// `ListDir` (JSON).
    pub const LIST_DIR: u8 = 8;
    /// `InstallPackages` (JSON).
    pub const INSTALL_PACKAGES: u8 = 9;
    /// `Cancel` (empty payload).
    pub const CANCEL: u8 = 10;
    /// `Shutdown` (empty payload).
    pub const SHUTDOWN: u8 = 11;
    /// `Resume` (JSON).
    pub const RESUME: u8 = 12;
}

/// Tags of [`GuestMessage`](crate::GuestMessage) (guest → host).
pub mod guest {
    /// `Pong` (JSON).
    pub const PONG: u8 = 1;
    /// `Stdout` (raw bytes).
    pub const STDOUT: u8 = 2;
    /// `Stderr` (raw bytes).
    pub const STDERR: u8 = 3;
    /// `ExecDone` (JSON).
    pub const EXEC_DONE: u8 = 4;
    /// `WarmUpDone` (JSON).
    pub const WARM_UP_DONE: u8 = 5;
    /// `FileWritten` (JSON).
    pub const FILE_WRITTEN: u8 = 6;
    /// `FileChunk` (raw bytes).
    pub const FILE_CHUNK: u8 = 7;
    /// `FileRead` (JSON).
    pub const FILE_READ: u8 = 8;
    /// `DirListing` (JSON).
    pub const DIR_LISTING: u8 = 9;
    /// `PackagesInstalled` (JSON).
    pub const PACKAGES_INSTALLED: u8 = 10;
    /// `Error` (JSON).
    pub const ERROR: u8 = 11;
    /// `ShuttingDown` (empty payload).
    pub const SHUTTING_DOWN: u8 = 12;
    /// `Resumed` (JSON).
    pub const RESUMED: u8 = 13;
}
