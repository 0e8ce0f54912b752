//! The crate's error type and its mapping into the public taxonomy.

use std::path::PathBuf;

use sandbox_core::{Error, ErrorKind, PermanentCause, TransientCause};

/// Everything that can go wrong while keeping snapshots on disk.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotStoreError {
    /// A file system operation failed (disk full, permission, I/O error).
    #[error("snapshot store: {op} {path}")]
    Io {
        /// What was being done (`create draft`, `write manifest`, `rename`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A draft file the hypervisor should have written is empty, missing or not a regular
    /// file: the save did not produce a snapshot.
    #[error("snapshot store: draft file {path} is unusable: {reason}")]
    BadDraftFile {
        /// The draft file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another writer published the key and its snapshot could not be verified either.
    #[error("snapshot store: key {key} was published by another writer but does not verify")]
    LostRace {
        /// The key.
        key: String,
    },
    /// The store's configuration is invalid.
    #[error("invalid snapshot store configuration: {0}")]
    InvalidConfig(String),
    /// A draft made by another store (or not by this adapter) was handed in.
    #[error("snapshot store: draft of {key} was not made by this store")]
    ForeignDraft {
        /// The draft's key.
        key: String,
    },
    /// A blocking task of the store panicked or was cancelled.
    #[error("snapshot store: background task failed: {0}")]
    Task(String),
}

impl SnapshotStoreError {
    /// The [`sandbox_core::ErrorKind`] this error maps to: I/O and unusable saves are
    /// transient infrastructure failures (not the caller's fault; a cold boot still works),
    /// a bad configuration is permanent `Config`, a foreign draft or a failed task is
    /// permanent `Internal`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Io { .. } | Self::BadDraftFile { .. } | Self::LostRace { .. } => {
                ErrorKind::Transient(TransientCause::Infrastructure)
            }
            Self::InvalidConfig(_) => ErrorKind::Permanent(PermanentCause::Config),
            Self::ForeignDraft { .. } | Self::Task(_) => {
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

    /// The underlying I/O error kind, when this is an I/O error.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            Self::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

impl From<SnapshotStoreError> for Error {
    fn from(err: SnapshotStoreError) -> Self {
        let message = match &err {
            SnapshotStoreError::Io { source, .. } => format!("{err}: {source}"),
            _ => err.to_string(),
        };
        Error::new(err.kind(), message)
            .with_operation("snapshot")
            .with_source(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_failures_are_transient_and_not_the_callers_fault() {
        let err: Error = SnapshotStoreError::io(
            "write manifest",
            "/x/manifest.json",
            std::io::Error::from_raw_os_error(28),
        )
        .into();
        assert!(err.is_retryable());
        assert_ne!(err.kind(), ErrorKind::Input);
        assert!(err.to_string().contains("write manifest"), "{err}");
        let config: Error = SnapshotStoreError::InvalidConfig("root".into()).into();
        assert_eq!(config.kind(), ErrorKind::Permanent(PermanentCause::Config));
        let foreign: Error = SnapshotStoreError::ForeignDraft { key: "k".into() }.into();
        assert_eq!(
            foreign.kind(),
            ErrorKind::Permanent(PermanentCause::Internal)
        );
    }
}
