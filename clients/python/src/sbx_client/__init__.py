"""Python client for sbx: run untrusted Python, JavaScript and shell code in QEMU microVMs.

>>> from sbx_client import Sandbox
>>> with Sandbox.local() as sbx:                                  # doctest: +SKIP
...     print(sbx.run('print("hello from a microVM")').stdout)
...     with sbx.session(language="python") as s:
...         s.exec("x = 41")
...         print(s.exec("print(x + 1)").stdout)
"""

from ._async_client import AsyncSandbox, AsyncSession
from ._client import Sandbox, Session
from ._errors import (
    ERROR_CLASSES,
    CapacityError,
    GuestError,
    InputError,
    InternalError,
    MethodNotAllowedError,
    NoSpaceError,
    NotFoundError,
    OutcomeUnknownError,
    OutputLimitError,
    PayloadTooLargeError,
    PermanentError,
    SandboxError,
    ServerUnavailableError,
    SessionClosedError,
    ShuttingDownError,
    TooManySessionsError,
    TransientError,
    UnauthorizedError,
)
from ._local import LocalServer
from ._models import (
    ExecutionResult,
    ExposedPort,
    FileInfo,
    Health,
    Language,
    PortMapping,
    SessionInfo,
    TimingBreakdown,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncSandbox",
    "AsyncSession",
    "CapacityError",
    "ERROR_CLASSES",
    "ExecutionResult",
    "ExposedPort",
    "FileInfo",
    "GuestError",
    "Health",
    "InputError",
    "InternalError",
    "Language",
    "LocalServer",
    "MethodNotAllowedError",
    "NoSpaceError",
    "NotFoundError",
    "OutcomeUnknownError",
    "OutputLimitError",
    "PayloadTooLargeError",
    "PermanentError",
    "PortMapping",
    "Sandbox",
    "SandboxError",
    "ServerUnavailableError",
    "Session",
    "SessionClosedError",
    "SessionInfo",
    "ShuttingDownError",
    "TimingBreakdown",
    "TooManySessionsError",
    "TransientError",
    "UnauthorizedError",
]
