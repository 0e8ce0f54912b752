//! The crate's error type and its mapping into the public taxonomy.

use std::path::PathBuf;
use std::time::Duration;

use sandbox_core::{Error, ErrorKind, PermanentCause, TransientCause};

/// What can go wrong launching, controlling or talking to a VM.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// The QEMU binary (or the `unshare` wrapper) does not exist.
    #[error("{}: {} does not exist", probes::QEMU_NOT_FOUND, program.display())]
    NotFound {
        /// The program that was spawned.
        program: PathBuf,
    },
    /// The process could not be spawned.
    #[error("spawning {}: {source}", program.display())]
    Spawn {
        /// The program that was spawned.
        program: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The QMP monitor misbehaved (connect, greeting, framing).
    #[error("QMP at {}: {reason}", socket.display())]
    Qmp {
        /// The monitor socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// QEMU answered a QMP command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Something did not happen in time.
    #[error("{what} did not complete within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// The peer of a unix socket runs as another user than expected.
    #[error(
        "peer of {} runs as uid {actual}, expected uid {expected}: refusing to talk to it",
        socket.display()
    )]
    PeerUid {
        /// The socket.
        socket: PathBuf,
        /// The uid QEMU should run as.
        expected: u32,
        /// The uid the kernel reported.
        actual: u32,
    },
    /// The guest agent speaks another protocol version.
    #[error(
        "guest agent speaks protocol version {guest}, host speaks {host}: rebuild the guest assets"
    )]
    ProtocolVersion {
        /// The agent's version.
        guest: u8,
        /// This host's version.
        host: u8,
    },
    /// The agent refused the handshake.
    #[error("guest agent refused the handshake: {0}")]
    Handshake(String),
    /// The guest channel is closed.
    #[error("guest channel is closed")]
    ChannelClosed,
    /// Writing a request failed part-way: the guest may have received it.
    #[error("guest channel failed while sending: {0}")]
    SendFailed(String),
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Proto(#[from] guest_proto::ProtoError),
    /// The process survived SIGKILL.
    #[error("QEMU (pid {pid}) did not exit within {after:?} of SIGKILL")]
    KillTimeout {
        /// The process.
        pid: u32,
        /// How long it was given.
        after: Duration,
    },
}

impl QemuError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The public kind this error maps to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::Permanent(PermanentCause::MissingDependency),
            Self::Spawn { source, .. } => match source.raw_os_error() {
                Some(nix::libc::EAGAIN) | Some(nix::libc::ENOMEM) => {
                    ErrorKind::Transient(TransientCause::Infrastructure)
                }
                _ => ErrorKind::Permanent(PermanentCause::Host),
            },
            Self::Qmp { .. } | Self::QmpCommand { .. } | Self::Io { .. } => {
                ErrorKind::Transient(TransientCause::Infrastructure)
            }
            Self::Timeout { .. } => ErrorKind::Transient(TransientCause::BootTimeout),
            Self::PeerUid { .. } => ErrorKind::Permanent(PermanentCause::Host),
            Self::ProtocolVersion { .. } | Self::Handshake(_) => {
                ErrorKind::Permanent(PermanentCause::Config)
            }
            Self::ChannelClosed => ErrorKind::Transient(TransientCause::Infrastructure),
            Self::SendFailed(_) | Self::Proto(_) => ErrorKind::OutcomeUnknown,
            Self::KillTimeout { .. } => ErrorKind::Permanent(PermanentCause::Host),
        }
    }
}

impl From<QemuError> for Error {
    fn from(err: QemuError) -> Self {
        let kind = err.kind();
        let message = match &err {
            // Exactly the documented message, so callers and docs agree.
            QemuError::NotFound { .. } => probes::QEMU_NOT_FOUND.to_owned(),
            other => other.to_string(),
        };
        Error::new(kind, message).with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let e: Error = QemuError::NotFound {
            program: "/nope/qemu".into(),
        }
        .into();
        assert_eq!(
            e.kind(),
            ErrorKind::Permanent(PermanentCause::MissingDependency)
        );
        assert!(
            e.message()
                .starts_with("QEMU not found: install qemu-system-x86")
        );

        let e: Error = QemuError::PeerUid {
            socket: "/s".into(),
            expected: 998,
            actual: 0,
        }
        .into();
        assert!(e.message().contains("998") && e.message().contains("uid 0"));
        assert!(!e.is_retryable());

        let e: Error = QemuError::ProtocolVersion { guest: 2, host: 1 }.into();
        assert_eq!(e.kind(), ErrorKind::Permanent(PermanentCause::Config));
        let e: Error = QemuError::Timeout {
            what: "agent".into(),
            after: Duration::from_secs(1),
        }
        .into();
        assert!(e.is_retryable());
        let e: Error = QemuError::SendFailed("broken pipe".into()).into();
        assert_eq!(e.kind(), ErrorKind::OutcomeUnknown);
    }
}
