"""The synchronous client."""

from __future__ import annotations

import os
import tempfile
from types import TracebackType
from typing import IO, Any, Iterable, Iterator, Mapping, Optional, Sequence, Union, cast, overload

import httpx

from . import _common as c
from ._errors import InputError
from ._local import LocalServer
from ._models import (
    ExecutionResult,
    ExposedPort,
    FileInfo,
    Health,
    PortSpec,
    SessionInfo,
)

FileContent = Union[bytes, str, "os.PathLike[str]", IO[bytes], Iterable[bytes]]
"""What :meth:`Session.write_file` uploads: bytes, a local path (``str`` or ``Path``), a
binary file object or an iterable of chunks; paths and streams are sent in chunks, never
loaded whole."""


def _chunks(content: FileContent) -> Union[bytes, Iterator[bytes]]:
    if isinstance(content, bytes):
        return content
    if isinstance(content, (str, os.PathLike)):
        path = c.as_path(content)
        if not path.is_file():
            raise InputError(f"{path}: no such file", field="content")

        def from_path() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(c.CHUNK):
                    yield chunk

        return from_path()
    if hasattr(content, "read"):
        stream = cast(IO[bytes], content)

        def from_stream() -> Iterator[bytes]:
            while chunk := stream.read(c.CHUNK):
                yield chunk

        return from_stream()
    return iter(content)


class Session:
    """A VM kept with its interpreter state across :meth:`exec` calls (a context manager)."""

    def __init__(self, sandbox: "Sandbox", data: Mapping[str, Any]) -> None:
        self._sandbox = sandbox
        self.id: str = data["id"]
        self.language: str = data.get("language", "python")
        self.vm_start: str = data.get("vm_start", "cold")
        self.exposed_ports: tuple[ExposedPort, ...] = tuple(
            ExposedPort.from_json(p) for p in data.get("exposed_ports") or []
        )
        self.closed = False

    def __enter__(self) -> "Session":
        return self

    def __exit__(
        self,
        et: Optional[type[BaseException]],
        ev: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, language={self.language!r}, closed={self.closed})"

    def exec(
        self,
        code: str,
        *,
        timeout_seconds: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        on_stdout: Optional[c.OutputCallback] = None,
        on_stderr: Optional[c.OutputCallback] = None,
    ) -> ExecutionResult:
        """Runs ``code`` in the session's REPL; state is kept between calls."""
        body = c.exec_body(code, timeout_seconds=timeout_seconds, env=env)
        return self._sandbox._execute(
            c.session_url(self.id, "/exec"), body, timeout_seconds, on_stdout, on_stderr
        )

    def write_file(self, path: str, content: FileContent, *, executable: bool = False) -> int:
        """Writes ``content`` to ``path`` (relative to ``/home/user``); returns its size."""
        return self._sandbox._put_file(self.id, path, content, executable)

    @overload
    def read_file(self, path: str) -> bytes: ...
    @overload
    def read_file(self, path: str, destination: Union[str, "os.PathLike[str]", IO[bytes]]) -> int: ...
    def read_file(
        self, path: str, destination: Union[None, str, "os.PathLike[str]", IO[bytes]] = None
    ) -> Union[bytes, int]:
        """The file's bytes; or, given a local path or a binary file object, streams the
        file there (a path is written atomically) and returns its size."""
        return self._sandbox._get_file(self.id, path, destination)

    def list_files(self, dir: str = "") -> list[FileInfo]:
        """The entries of ``dir`` (relative to ``/home/user``; default: the home)."""
        data = self._sandbox._json("GET", c.session_url(self.id, "/files"), params={"dir": dir})
        return [FileInfo.from_json(e) for e in data.get("entries", [])]

    def close(self) -> None:
        """Closes the session and destroys its VM (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._sandbox._delete_session(self.id)


class Sandbox:
    """A client of one ``sbx serve``.

    >>> with Sandbox.local() as sbx:                      # doctest: +SKIP
    ...     print(sbx.run('print("hi")').stdout)
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        *,
        transport: Optional[httpx.BaseTransport] = None,
        timeout: float = 30.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, transport=transport, timeout=timeout
        )
        self._server: Optional[LocalServer] = None

    @classmethod
    def local(
        cls,
        sbx: Optional[str] = None,
        *,
        args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        startup_timeout: float = 180.0,
    ) -> "Sandbox":
        """Starts ``sbx serve`` (``sbx`` on ``PATH`` unless given) on a free loopback port
        with a generated token, waits until it is ready, and stops it on :meth:`close`."""
        server = LocalServer.start(sbx, args=args, env=env, startup_timeout=startup_timeout)
        try:
            client = cls(server.url, server.token)
        except BaseException:
            server.stop()
            raise
        client._server = server
        return client

    @property
    def server(self) -> Optional[LocalServer]:
        """The local server this client started, if any."""
        return self._server

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(
        self,
        et: Optional[type[BaseException]],
        ev: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the HTTP client, and stops the server :meth:`local` started."""
        self._http.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    # --- API ---

    def run(
        self,
        code: str,
        *,
        language: str = "python",
        timeout_seconds: Optional[int] = None,
        memory_mb: Optional[int] = None,
        disk_mb: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        packages: Optional[Sequence[str]] = None,
        allow_network: bool = False,
        allowed_domains: Optional[Sequence[str]] = None,
        expose_ports: Optional[Sequence[PortSpec]] = None,
        task_id: Optional[str] = None,
        on_stdout: Optional[c.OutputCallback] = None,
        on_stderr: Optional[c.OutputCallback] = None,
    ) -> ExecutionResult:
        """Runs ``code`` in a fresh microVM that is destroyed afterwards."""
        body = c.run_body(
            code,
            language=language,
            timeout_seconds=timeout_seconds,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            env=env,
            allow_network=allow_network,
            allowed_domains=allowed_domains,
            expose_ports=expose_ports,
            task_id=task_id,
            packages=packages,
        )
        return self._execute("/v1/run", body, timeout_seconds, on_stdout, on_stderr)

    def session(
        self,
        *,
        language: str = "python",
        memory_mb: Optional[int] = None,
        disk_mb: Optional[int] = None,
        idle_timeout_seconds: Optional[int] = None,
        packages: Optional[Sequence[str]] = None,
        allow_network: bool = False,
        allowed_domains: Optional[Sequence[str]] = None,
        expose_ports: Optional[Sequence[PortSpec]] = None,
    ) -> Session:
        """Starts a session (use it as a context manager, or call :meth:`Session.close`)."""
        body = c.session_body(
            language=language,
            memory_mb=memory_mb,
            disk_mb=disk_mb,
            idle_timeout_seconds=idle_timeout_seconds,
            allow_network=allow_network,
            allowed_domains=allowed_domains,
            expose_ports=expose_ports,
            packages=packages,
        )
        data = self._json("POST", "/v1/sessions", json=body, timeout=c.exec_timeout(None))
        return Session(self, data)

    def sessions(self) -> list[SessionInfo]:
        """The caller's live sessions, oldest first."""
        return [SessionInfo.from_json(s) for s in self._json("GET", "/v1/sessions")["sessions"]]

    def health(self) -> Health:
        """``GET /v1/health``."""
        return Health.from_json(self._json("GET", "/v1/health"))

    def openapi(self) -> dict[str, Any]:
        """The server's OpenAPI document."""
        doc: dict[str, Any] = self._json("GET", "/v1/openapi.json")
        return doc

    # --- plumbing ---

    def _json(self, method: str, url: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise c.transport_error(e) from e
        c.raise_for(resp)
        return resp.json() if resp.content else None

    def _execute(
        self,
        url: str,
        body: dict[str, Any],
        timeout_seconds: Optional[int],
        on_stdout: Optional[c.OutputCallback],
        on_stderr: Optional[c.OutputCallback],
    ) -> ExecutionResult:
        timeout = c.exec_timeout(timeout_seconds)
        if not c.streaming(on_stdout, on_stderr):
            return ExecutionResult.from_json(self._json("POST", url, json=body, timeout=timeout))
        sink = c.EventSink(on_stdout, on_stderr)
        try:
            with self._http.stream(
                "POST", url, json=body, timeout=timeout, headers={"Accept": c.NDJSON}
            ) as resp:
                if not resp.is_success:
                    c.raise_for(resp, resp.read())
                for line in resp.iter_lines():
                    sink.line(line)
        except httpx.TransportError as e:
            raise c.transport_error(e) from e
        return sink.finish()

    def _put_file(self, sid: str, path: str, content: FileContent, executable: bool) -> int:
        url = c.file_url(sid, path)
        params = {"executable": "true"} if executable else None
        data = self._json(
            "PUT",
            url,
            content=_chunks(content),
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(30.0, read=None),
        )
        return int(data["size"])

    def _get_file(
        self, sid: str, path: str, destination: Union[None, str, "os.PathLike[str]", IO[bytes]]
    ) -> Union[bytes, int]:
        url = c.file_url(sid, path)
        try:
            with self._http.stream("GET", url, timeout=httpx.Timeout(30.0, read=None)) as resp:
                if not resp.is_success:
                    c.raise_for(resp, resp.read())
                if destination is None:
                    return resp.read()
                if isinstance(destination, (str, os.PathLike)):
                    dest = c.as_path(destination)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
                    try:
                        with os.fdopen(fd, "wb") as f:
                            size = _copy(resp.iter_bytes(c.CHUNK), f)
                        os.replace(tmp, dest)
                    except BaseException:
                        os.unlink(tmp)
                        raise
                    return size
                return _copy(resp.iter_bytes(c.CHUNK), destination)
        except httpx.TransportError as e:
            raise c.transport_error(e) from e

    def _delete_session(self, sid: str) -> None:
        from ._errors import NotFoundError, SessionClosedError

        try:
            self._json("DELETE", c.session_url(sid))
        except (SessionClosedError, NotFoundError):
            pass


def _copy(chunks: Iterable[bytes], out: IO[bytes]) -> int:
    n = 0
    for chunk in chunks:
        out.write(chunk)
        n += len(chunk)
    return n
