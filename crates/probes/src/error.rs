//! The probes' error type and its mapping into the public taxonomy.

use std::path::PathBuf;
use std::time::Duration;

use sandbox_core::{Error, PermanentCause, TransientCause};

/// The message of a missing QEMU: what to install, and from where.
pub const QEMU_NOT_FOUND: &str =
    "QEMU not found: install qemu-system-x86 (10.x from bookworm-backports)";

/// What can go wrong while probing the host.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No QEMU binary was found (neither `SBX_QEMU` nor `PATH`).
    #[error("{QEMU_NOT_FOUND}")]
    QemuNotFound {
        /// Where it was looked for, for diagnostics.
        searched: String,
    },
    /// A QEMU binary exists but does not behave like one.
    #[error("QEMU at {path} is not usable: {reason}")]
    QemuUnusable {
        /// The binary.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `--version` printed something that is not a QEMU version.
    #[error("cannot parse a QEMU version from {output:?}")]
    QemuVersion {
        /// The first line of the output.
        output: String,
    },
    /// An I/O error while probing.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A probe command did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// The command.
        what: String,
        /// The deadline it ran past.
        after: Duration,
    },
}

impl ProbeError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<ProbeError> for Error {
    fn from(err: ProbeError) -> Self {
        let message = err.to_string();
        let kind = match &err {
            ProbeError::QemuNotFound { .. } => {
                return Error::permanent(PermanentCause::MissingDependency, message);
            }
            ProbeError::QemuUnusable { .. } | ProbeError::QemuVersion { .. } => {
                sandbox_core::ErrorKind::Permanent(PermanentCause::MissingDependency)
            }
            ProbeError::Io { .. } => sandbox_core::ErrorKind::Permanent(PermanentCause::Host),
            ProbeError::Timeout { .. } => {
                sandbox_core::ErrorKind::Transient(TransientCause::Infrastructure)
            }
        };
        Error::new(kind, message).with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_core::ErrorKind;

    #[test]
    fn missing_qemu_is_a_permanent_missing_dependency() {
        let err: Error = ProbeError::QemuNotFound {
            searched: "PATH".into(),
        }
        .into();
        assert_eq!(
            err.kind(),
            ErrorKind::Permanent(PermanentCause::MissingDependency)
        );
        assert_eq!(err.message(), QEMU_NOT_FOUND);
        assert!(!err.is_retryable());
    }

    #[test]
    fn timeouts_are_transient() {
        let err: Error = ProbeError::Timeout {
            what: "qemu --version".into(),
            after: Duration::from_secs(1),
        }
        .into();
        assert!(err.is_retryable());
    }
}
