"""One exception class per API error kind (``{"error": {kind, message, retryable}}``)."""

from __future__ import annotations

from typing import Any, Mapping, Optional


class SandboxError(Exception):
    """Base of every error this client raises."""

    kind: str = "unknown"
    """The API's stable error kind."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: Optional[int] = None,
        cause: Optional[str] = None,
        field: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        """True when the same request can succeed later (the code never ran)."""
        self.status = status
        """HTTP status, when the server answered."""
        self.cause = cause
        """Finer cause of transient and permanent errors (``capacity``, ``boot_timeout``...)."""
        self.field = field
        """The request field at fault, for input errors."""
        self.retry_after = retry_after
        """Seconds to wait before retrying (``Retry-After``), when given."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, retryable={self.retryable})"


class InputError(SandboxError):
    """The request is invalid (caller bug); a session stays alive."""

    kind = "input"


class TransientError(SandboxError):
    """Safe to retry: boot timeout, QEMU crash during boot, overlay... (the code never ran)."""

    kind = "transient"


class PermanentError(SandboxError):
    """Configuration, missing QEMU or assets: retrying will not help."""

    kind = "permanent"


class OutcomeUnknownError(SandboxError):
    """The transport was lost after dispatch: the code may have run."""

    kind = "outcome_unknown"


class SessionClosedError(SandboxError):
    """The session was closed (deleted, idle, or its VM died)."""

    kind = "session_closed"


class OutputLimitError(SandboxError):
    """The code wrote more than the output limits; a session stays alive."""

    kind = "output_limit"


class GuestError(SandboxError):
    """The guest refused a path or failed an I/O (a missing file has status 404)."""

    kind = "guest"


class NoSpaceError(SandboxError):
    """The VM's home directory is full (ask for a larger one with ``disk_mb``)."""

    kind = "no_space"


class UnauthorizedError(SandboxError):
    """Missing or wrong bearer token."""

    kind = "unauthorized"


class NotFoundError(SandboxError):
    """Unknown session or route."""

    kind = "not_found"


class PayloadTooLargeError(SandboxError):
    """The body or file is larger than the server accepts."""

    kind = "payload_too_large"


class CapacityError(SandboxError):
    """The server has no capacity now (retryable)."""

    kind = "capacity"


class TooManySessionsError(SandboxError):
    """This token holds its maximum of sessions (retryable once one closes)."""

    kind = "too_many_sessions"


class ShuttingDownError(SandboxError):
    """The server is shutting down."""

    kind = "shutting_down"


class MethodNotAllowedError(SandboxError):
    """The route exists but not with this method."""

    kind = "method_not_allowed"


class InternalError(SandboxError):
    """A failure of the server itself."""

    kind = "internal"


class ServerUnavailableError(SandboxError):
    """The server could not be reached (connection refused, reset, timed out)."""

    kind = "unavailable"


ERROR_CLASSES: dict[str, type[SandboxError]] = {
    cls.kind: cls
    for cls in (
        InputError,
        TransientError,
        PermanentError,
        OutcomeUnknownError,
        SessionClosedError,
        OutputLimitError,
        GuestError,
        NoSpaceError,
        UnauthorizedError,
        NotFoundError,
        PayloadTooLargeError,
        CapacityError,
        TooManySessionsError,
        ShuttingDownError,
        MethodNotAllowedError,
        InternalError,
    )
}
"""Every API error kind and the class raised for it."""


def error_from_json(
    data: Any, status: Optional[int] = None, retry_after: Optional[str] = None
) -> SandboxError:
    """The exception for an error body (``{"error": {...}}`` or its inner object)."""
    detail: Mapping[str, Any] = {}
    if isinstance(data, Mapping):
        inner = data.get("error", data)
        if isinstance(inner, Mapping):
            detail = inner
    kind = str(detail.get("kind", "unknown"))
    message = str(detail.get("message", f"HTTP {status}" if status else "unknown error"))
    cls = ERROR_CLASSES.get(kind, SandboxError)
    after: Optional[float] = None
    if retry_after is not None:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    err = cls(
        message,
        retryable=bool(detail.get("retryable", False)),
        status=status,
        cause=detail.get("cause"),
        field=detail.get("field"),
        retry_after=after,
    )
    if cls is SandboxError:
        err.kind = kind
    return err
