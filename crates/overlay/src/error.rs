//! The crate's error type and its mapping into the public taxonomy.

use std::path::PathBuf;

use sandbox_core::{Error, PermanentCause, TransientCause};

/// Everything that can go wrong while creating, pooling or deleting overlays.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The base image does not exist (or cannot be resolved to an absolute path).
    #[error("base image {path} not found")]
    BaseNotFound {
        /// The base image as given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The base image path exists but is not a regular file.
    #[error("base image {path} is not a regular file")]
    BaseNotAFile {
        /// The resolved base image path.
        path: PathBuf,
    },
    /// The `qemu-img` binary could not be found.
    #[error("qemu-img not found at {path}")]
    QemuImgNotFound {
        /// The configured binary.
        path: PathBuf,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` could not be started for another reason.
    #[error("failed to start {path}")]
    QemuImgSpawn {
        /// The configured binary.
        path: PathBuf,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img create` ran and failed.
    #[error("qemu-img create {target} failed ({status}): {stderr}")]
    QemuImgFailed {
        /// The overlay that was being created.
        target: PathBuf,
        /// Exit status, as text.
        status: String,
        /// The tail of qemu-img's stderr.
        stderr: String,
    },
    /// A file system operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done (`rename`, `remove`, `create dir`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid overlay configuration: {0}")]
    InvalidConfig(String),
}

impl OverlayError {
    /// The [`sandbox_core::ErrorKind`] this error maps to: a missing base image or a missing
    /// `qemu-img` is permanent; a bad configuration is permanent; everything else is a
    /// transient overlay failure.
    pub fn kind(&self) -> sandbox_core::ErrorKind {
        use sandbox_core::ErrorKind::{Permanent, Transient};
        match self {
            Self::BaseNotFound { .. } | Self::QemuImgNotFound { .. } => {
                Permanent(PermanentCause::MissingDependency)
            }
            Self::BaseNotAFile { .. } | Self::InvalidConfig(_) => Permanent(PermanentCause::Config),
            Self::QemuImgSpawn { .. } | Self::QemuImgFailed { .. } | Self::Io { .. } => {
                Transient(TransientCause::Overlay)
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

impl From<OverlayError> for Error {
    fn from(err: OverlayError) -> Self {
        let message = err.to_string();
        Error::new(err.kind(), message)
            .with_operation("overlay")
            .with_source(err)
    }
}
