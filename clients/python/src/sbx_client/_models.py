"""Typed results of the sbx HTTP API (the JSON shapes of ``/v1/openapi.json``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

Language = Literal["python", "javascript", "raw"]
"""Interpreter of a run or session."""

LANGUAGES: tuple[Language, ...] = ("python", "javascript", "raw")


def _known(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``data`` that ``cls`` declares (newer servers may send more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class PortMapping:
    """A guest port to forward to the host's loopback (TCP only)."""

    internal: int
    """Port inside the guest, 1–65535."""
    external: Optional[int] = None
    """Host port (1024–65535); ``None``: chosen by the OS."""
    protocol: Literal["tcp"] = "tcp"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"internal": self.internal, "protocol": self.protocol}
        if self.external is not None:
            out["external"] = self.external
        return out


PortSpec = Union[int, PortMapping]
"""An exposed port: a guest port number (host port chosen) or a :class:`PortMapping`."""


def ports_json(ports: Optional[Sequence[PortSpec]]) -> list[dict[str, Any]]:
    return [
        (p if isinstance(p, PortMapping) else PortMapping(internal=p)).to_json()
        for p in (ports or [])
    ]


@dataclass(frozen=True)
class ExposedPort:
    """A guest port reachable on the host."""

    internal: int
    external: int
    host: str
    protocol: str
    url: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ExposedPort":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class TimingBreakdown:
    """Where the time of a run went, in milliseconds."""

    total_ms: int = 0
    setup_ms: int = 0
    boot_ms: int = 0
    execute_ms: int = 0
    admission_ms: int = 0
    connect_ms: int = 0
    spawn_ms: int = 0
    process_ms: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TimingBreakdown":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of a run or exec (whatever the code's exit code)."""

    stdout: str
    stderr: str
    exit_code: int
    """0, the code's exit status, 128+signal, or -1 on timeout."""
    timing: TimingBreakdown = field(default_factory=TimingBreakdown)
    execution_time_ms: Optional[int] = None
    warm_pool_hit: bool = False
    vm_start: str = "cold"
    """``cold``, ``snapshot`` or ``warm_pool``."""
    memory_peak_mb: Optional[int] = None
    exposed_ports: tuple[ExposedPort, ...] = ()

    @property
    def timed_out(self) -> bool:
        """True when the code hit its timeout."""
        return self.exit_code == -1

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ExecutionResult":
        d = _known(cls, data)
        d["timing"] = TimingBreakdown.from_json(data.get("timing") or {})
        d["exposed_ports"] = tuple(
            ExposedPort.from_json(p) for p in data.get("exposed_ports") or []
        )
        return cls(**d)


@dataclass(frozen=True)
class FileInfo:
    """One directory entry of a session's guest."""

    name: str
    is_dir: bool
    size: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FileInfo":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class SessionInfo:
    """One live session, as listed by :meth:`Sandbox.sessions`."""

    id: str
    language: str
    created: str
    """Creation time, RFC 3339 UTC."""
    last_used: str
    exec_count: int
    idle_timeout: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SessionInfo":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Health:
    """Answer of ``GET /v1/health``."""

    status: str
    version: str
    uptime_secs: int
    sessions: int
    vms: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Health":
        return cls(**_known(cls, data))


# The API schema each dataclass mirrors, for the drift check against /v1/openapi.json.
SCHEMAS: dict[str, type] = {
    "RunResult": ExecutionResult,
    "TimingInfo": TimingBreakdown,
    "PortInfo": ExposedPort,
    "PortRequest": PortMapping,
    "FileEntry": FileInfo,
    "SessionInfo": SessionInfo,
    "Health": Health,
}
