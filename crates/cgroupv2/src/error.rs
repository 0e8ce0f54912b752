//! The crate's error type and its mapping into the public taxonomy.

use std::path::PathBuf;

use sandbox_core::ports::LimitMode;
use sandbox_core::{Error, ErrorKind, PermanentCause, TransientCause, VmId};

/// Everything that can go wrong while creating, attaching, reading or removing limits.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The tenant name cannot be used as a cgroup directory name.
    #[error("invalid tenant {0:?}: use 1-64 characters from [A-Za-z0-9_-]")]
    InvalidTenant(String),
    /// The limits are out of range.
    #[error("invalid resource limits: {0}")]
    InvalidLimits(String),
    /// A cgroupfs or procfs operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done (`write`, `mkdir`, `rmdir`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `prlimit(2)` on the VM process failed.
    #[error("prlimit({resource}) on pid {pid}")]
    Prlimit {
        /// The target process.
        pid: u32,
        /// The resource (`RLIMIT_AS`, ...).
        resource: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The handle was not created by this limiter (or was removed already).
    #[error("no limits registered for vm {0}")]
    UnknownHandle(VmId),
    /// The handle's mode differs from the limiter's.
    #[error("handle is in {handle:?} mode but the limiter runs in {active:?} mode")]
    ModeMismatch {
        /// The handle's mode.
        handle: LimitMode,
        /// The limiter's mode.
        active: LimitMode,
    },
    /// A pid that no process can have.
    #[error("invalid pid {0}")]
    InvalidPid(u32),
}

impl CgroupError {
    /// The [`sandbox_core::ErrorKind`] this error maps to.
    ///
    /// A bad tenant is an input error; bad limits are configuration; a permission or
    /// read-only file system error is a permanent host problem; a process that is gone
    /// (ESRCH) or another I/O failure is transient; a handle mix-up is internal.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidTenant(_) => ErrorKind::Input,
            Self::InvalidLimits(_) => ErrorKind::Permanent(PermanentCause::Config),
            Self::Io { source, .. } | Self::Prlimit { source, .. } => io_kind(source),
            Self::UnknownHandle(_) | Self::ModeMismatch { .. } | Self::InvalidPid(_) => {
                ErrorKind::Permanent(PermanentCause::Internal)
            }
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

fn io_kind(err: &std::io::Error) -> ErrorKind {
    use std::io::ErrorKind as K;
    match err.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => ErrorKind::Permanent(PermanentCause::Host),
        _ => ErrorKind::Transient(TransientCause::Infrastructure),
    }
}

impl From<CgroupError> for Error {
    fn from(err: CgroupError) -> Self {
        let message = err.to_string();
        let mut out = Error::new(err.kind(), message).with_operation("resource_limits");
        if matches!(err, CgroupError::InvalidTenant(_)) {
            out = out.with_field("tenant");
        }
        out.with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            CgroupError::io("write", "/x", denied).kind(),
            ErrorKind::Permanent(PermanentCause::Host)
        );
        let gone = std::io::Error::from_raw_os_error(libc::ESRCH);
        assert_eq!(
            CgroupError::Prlimit {
                pid: 1,
                resource: "RLIMIT_AS",
                source: gone
            }
            .kind(),
            ErrorKind::Transient(TransientCause::Infrastructure)
        );
        let err: Error = CgroupError::InvalidTenant("../x".into()).into();
        assert_eq!(err.kind(), ErrorKind::Input);
        assert_eq!(err.context().field.as_deref(), Some("tenant"));
    }
}
