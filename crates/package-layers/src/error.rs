//! Errors of the layer store, mapped into sandbox-core's taxonomy.

use sandbox_core::{Error, PermanentCause, TransientCause};

/// What can go wrong while finding or building a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The request cannot be satisfied as asked (unknown package or version, no wheel for
    /// the guest, layer too large): the caller's to fix.
    #[error("{0}")]
    Input(String),
    /// A host tool is missing or unusable.
    #[error("{0}")]
    Tool(String),
    /// A download or install failed for a reason that may pass (network, registry).
    #[error("{0}")]
    Fetch(String),
    /// The build ran past its time bound.
    #[error("building the package layer took longer than {0} s")]
    Timeout(u64),
    /// Filesystem trouble (a full disk included).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The guest assets do not say what the guest runs.
    #[error("{0}")]
    Target(String),
}

impl LayerError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<LayerError> for Error {
    fn from(e: LayerError) -> Self {
        let msg = e.to_string();
        let err = match &e {
            LayerError::Input(_) => Error::input("packages", msg),
            LayerError::Tool(_) => Error::permanent(PermanentCause::MissingDependency, msg),
            LayerError::Target(_) => Error::permanent(PermanentCause::Config, msg),
            LayerError::Fetch(_) | LayerError::Timeout(_) => {
                Error::transient(TransientCause::Infrastructure, msg)
            }
            LayerError::Io { .. } => Error::permanent(PermanentCause::Host, msg),
        };
        err.with_operation("package layer")
    }
}
