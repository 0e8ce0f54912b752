//! The public error taxonomy of sbx.
//!
//! Every failure that reaches a caller is an [`Error`] with one [`ErrorKind`]. The kind tells
//! the caller what to do next: fix the request (input), retry (transient), give up and fix
//! the host (permanent), or treat the outcome as unknown because the code may have run.
//! Adapters keep their own `thiserror` enums and map them into this type at the port boundary.

use std::fmt;

use crate::vm::VmId;

/// Why a transient failure happened. Transient failures are safe to retry: the code never ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransientCause {
    /// The guest did not answer within the boot deadline.
    BootTimeout,
    /// QEMU exited or crashed while the VM was booting.
    QemuCrash,
    /// No capacity was free within the admission bound.
    Capacity,
    /// An overlay disk could not be created or handed out.
    Overlay,
    /// The per-VM network could not be set up.
    Network,
    /// The guest could not start the code (the code never ran).
    Execution,
    /// Another infrastructure failure before the code was dispatched.
    Infrastructure,
}

/// Why a permanent failure happened. Retrying will fail the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PermanentCause {
    /// The configuration is wrong.
    Config,
    /// A host dependency is missing (QEMU, guest assets, a tool).
    MissingDependency,
    /// The host does not allow an operation sbx needs.
    Host,
    /// An internal invariant was violated.
    Internal,
}

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "kind", content = "cause", rename_all = "snake_case")]
pub enum ErrorKind {
    /// The caller's request is invalid. A session stays alive.
    Input,
    /// Safe to retry: infrastructure failed before the code was dispatched.
    Transient(TransientCause),
    /// Will not succeed on retry: configuration or a missing dependency.
    Permanent(PermanentCause),
    /// The transport was lost after the code was dispatched: it may have run.
    OutcomeUnknown,
    /// The session is closed; every later call fails with this kind.
    SessionClosed,
    /// The code's output exceeded the stdout or stderr cap.
    OutputLimit,
    /// The guest refused or failed an operation (bad path, I/O error, protocol error).
    Guest,
    /// The VM's home directory is full (`ENOSPC`, or `EDQUOT` over a quota): the caller
    /// wrote more than the VM has room for. A session stays alive; a larger home is
    /// asked for with `disk_mb`.
    NoSpace,
}

impl ErrorKind {
    /// A short stable name for logs, metrics and JSON (`input`, `transient`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Transient(_) => "transient",
            Self::Permanent(_) => "permanent",
            Self::OutcomeUnknown => "outcome_unknown",
            Self::SessionClosed => "session_closed",
            Self::OutputLimit => "output_limit",
            Self::Guest => "guest",
            Self::NoSpace => "no_space",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transient(cause) => write!(f, "transient ({cause:?})"),
            Self::Permanent(cause) => write!(f, "permanent ({cause:?})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Where an error happened: which VM, which operation, which request field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorContext {
    /// The VM involved, if any.
    pub vm_id: Option<VmId>,
    /// The operation that failed (`boot`, `exec`, `write_file`, ...).
    pub operation: Option<String>,
    /// The request field at fault, for input errors.
    pub field: Option<String>,
}

impl fmt::Display for ErrorContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(field) = &self.field {
            parts.push(format!("field {field}"));
        }
        if let Some(op) = &self.operation {
            parts.push(format!("operation {op}"));
        }
        if let Some(vm) = &self.vm_id {
            parts.push(format!("vm {vm}"));
        }
        if parts.is_empty() {
            Ok(())
        } else {
            write!(f, " [{}]", parts.join(", "))
        }
    }
}

/// The one public error type of sbx.
#[derive(Debug, thiserror::Error)]
#[error("{message}{context}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    context: ErrorContext,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias for sbx operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            context: ErrorContext::default(),
            source: None,
        }
    }

    /// An input error about request field `field`.
    pub fn input(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Input, message).with_field(field)
    }

    /// A transient error.
    pub fn transient(cause: TransientCause, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient(cause), message)
    }

    /// A permanent error.
    pub fn permanent(cause: PermanentCause, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent(cause), message)
    }

    /// The transport was lost after dispatch.
    pub fn outcome_unknown(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutcomeUnknown, message)
    }

    /// The session is closed.
    pub fn session_closed(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::SessionClosed, message)
    }

    /// Attach the VM id.
    #[must_use]
    pub fn with_vm(mut self, vm_id: VmId) -> Self {
        self.context.vm_id = Some(vm_id);
        self
    }

    /// Attach the operation name.
    #[must_use]
    pub fn with_operation(mut self, operation: impl Into<String>) -> Self {
        self.context.operation = Some(operation.into());
        self
    }

    /// Attach the request field at fault.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.context.field = Some(field.into());
        self
    }

    /// Attach the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Where it happened.
    pub fn context(&self) -> &ErrorContext {
        &self.context
    }

    /// True when retrying the same request can succeed (the code never ran).
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Transient(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_errors_are_retryable() {
        assert!(Error::transient(TransientCause::BootTimeout, "x").is_retryable());
        assert!(Error::transient(TransientCause::Capacity, "x").is_retryable());
        for kind in [
            ErrorKind::Input,
            ErrorKind::Permanent(PermanentCause::MissingDependency),
            ErrorKind::OutcomeUnknown,
            ErrorKind::SessionClosed,
            ErrorKind::OutputLimit,
            ErrorKind::Guest,
            ErrorKind::NoSpace,
        ] {
            assert!(!Error::new(kind, "x").is_retryable(), "{kind}");
        }
    }

    #[test]
    fn context_is_carried_and_displayed() {
        let vm = VmId::new();
        let err = Error::input("timeout", "timeout must be 1-300 s")
            .with_vm(vm)
            .with_operation("run");
        assert_eq!(err.kind(), ErrorKind::Input);
        assert_eq!(err.context().field.as_deref(), Some("timeout"));
        assert_eq!(err.context().vm_id, Some(vm));
        let shown = err.to_string();
        assert!(shown.contains("timeout must be 1-300 s"), "{shown}");
        assert!(shown.contains("field timeout"), "{shown}");
        assert!(shown.contains("operation run"), "{shown}");
        assert!(shown.contains(&vm.to_string()), "{shown}");
    }

    #[test]
    fn source_is_exposed() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "qemu-system-x86_64");
        let err =
            Error::permanent(PermanentCause::MissingDependency, "QEMU not found").with_source(io);
        let src = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(src.as_deref(), Some("qemu-system-x86_64"));
        assert_eq!(err.kind().name(), "permanent");
    }
}
