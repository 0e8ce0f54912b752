"""What the sync and async clients share: request bodies, answers, errors, NDJSON events."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import quote

import httpx

from ._errors import InputError, SandboxError, ServerUnavailableError, error_from_json
from ._models import LANGUAGES, ExecutionResult, PortSpec, ports_json

OutputCallback = Callable[[str], None]
"""Called with each chunk of output as it arrives (UTF-8; invalid bytes replaced)."""

StrPath = Union[str, "os.PathLike[str]"]

NDJSON = "application/x-ndjson"
CHUNK = 1 << 20
# Admission may wait up to 120 s for capacity and a cold boot takes seconds: an answer can
# come that much later than the code's own timeout.
SLACK_SECS = 180.0
DEFAULT_TIMEOUT_SECS = 30


def check_language(language: str) -> str:
    lang = language.lower()
    if lang not in LANGUAGES:
        raise InputError(
            f"language must be one of {', '.join(LANGUAGES)}, not {language!r}",
            field="language",
        )
    return lang


def packages_json(packages: Optional[Sequence[str]]) -> Optional[list[str]]:
    """Exact pins (``numpy==2.1.3``, ``lodash@4.17.21``); the server checks them."""
    if packages is None:
        return None
    if isinstance(packages, str) or not all(isinstance(p, str) for p in packages):
        raise InputError("packages must be a list of strings", field="packages")
    return list(packages) or None


def drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def run_body(
    code: str,
    *,
    language: str,
    timeout_seconds: Optional[int],
    memory_mb: Optional[int],
    disk_mb: Optional[int],
    env: Optional[Mapping[str, str]],
    allow_network: bool,
    allowed_domains: Optional[Sequence[str]],
    expose_ports: Optional[Sequence[PortSpec]],
    task_id: Optional[str],
    packages: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    return drop_none(
        {
            "code": code,
            "language": check_language(language),
            "timeout": timeout_seconds,
            "memory": memory_mb,
            "disk_mb": disk_mb,
            "env": dict(env) if env else None,
            "allow_network": allow_network or bool(allowed_domains),
            "allowed_domains": list(allowed_domains) if allowed_domains else None,
            "expose_ports": ports_json(expose_ports) or None,
            "task_id": task_id,
            "packages": packages_json(packages),
        }
    )


def session_body(
    *,
    language: str,
    memory_mb: Optional[int],
    disk_mb: Optional[int],
    idle_timeout_seconds: Optional[int],
    allow_network: bool,
    allowed_domains: Optional[Sequence[str]],
    expose_ports: Optional[Sequence[PortSpec]],
    packages: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    return drop_none(
        {
            "language": check_language(language),
            "packages": packages_json(packages),
            "memory": memory_mb,
            "disk_mb": disk_mb,
            "idle_timeout": idle_timeout_seconds,
            "allow_network": allow_network or bool(allowed_domains),
            "allowed_domains": list(allowed_domains) if allowed_domains else None,
            "expose_ports": ports_json(expose_ports) or None,
        }
    )


def exec_body(
    code: str, *, timeout_seconds: Optional[int], env: Optional[Mapping[str, str]]
) -> dict[str, Any]:
    return drop_none(
        {"code": code, "timeout": timeout_seconds, "env": dict(env) if env else None}
    )


def exec_timeout(timeout_seconds: Optional[int]) -> httpx.Timeout:
    """Client-side bound of a run or exec: the code's timeout plus admission and boot."""
    secs = float(timeout_seconds or DEFAULT_TIMEOUT_SECS) + SLACK_SECS
    return httpx.Timeout(30.0, read=secs)


def file_url(session_id: str, path: str) -> str:
    if not path or path.startswith("/"):
        raise InputError(f"{path!r}: guest paths are relative to /home/user", field="path")
    return f"/v1/sessions/{quote(session_id, safe='')}/files/{quote(path, safe='/')}"


def session_url(session_id: str, suffix: str = "") -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"


def raise_for(resp: httpx.Response, body: Optional[bytes] = None) -> None:
    """Raises the typed error of a non-2xx answer (whose body has been read)."""
    if resp.is_success:
        return
    raw = body if body is not None else resp.content
    try:
        data: Any = json.loads(raw)
    except ValueError:
        data = {"error": {"kind": "unknown", "message": raw.decode("utf-8", "replace")[:500]}}
    raise error_from_json(data, resp.status_code, resp.headers.get("retry-after"))


def transport_error(e: httpx.TransportError) -> SandboxError:
    return ServerUnavailableError(f"sbx server unreachable: {e}", retryable=False)


class EventSink:
    """Dispatches NDJSON events to callbacks and keeps the final result."""

    def __init__(
        self, on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback]
    ) -> None:
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.result: Optional[ExecutionResult] = None

    def line(self, line: str) -> None:
        if not line.strip():
            return
        event = json.loads(line)
        kind = event.get("type")
        if kind == "stdout":
            if self.on_stdout is not None:
                self.on_stdout(event["data"])
        elif kind == "stderr":
            if self.on_stderr is not None:
                self.on_stderr(event["data"])
        elif kind == "result":
            self.result = ExecutionResult.from_json(event)
        elif kind == "error":
            raise error_from_json(event, None)

    def finish(self) -> ExecutionResult:
        if self.result is None:
            from ._errors import OutcomeUnknownError

            raise OutcomeUnknownError("the event stream ended without a result")
        return self.result


def streaming(on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback]) -> bool:
    return on_stdout is not None or on_stderr is not None


def as_path(p: StrPath) -> Path:
    return Path(os.fspath(p))
