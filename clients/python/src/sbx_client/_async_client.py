"""The asynchronous client (asyncio, ``httpx.AsyncClient``)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from types import TracebackType
from typing import (
    IO,
    Any,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Mapping,
    Optional,
    Sequence,
    Union,
    cast,
    overload,
)

import httpx

from . import _common as c
from ._errors import InputError, NotFoundError, SessionClosedError
from ._local import LocalServer
from ._models import ExecutionResult, ExposedPort, FileInfo, Health, PortSpec, SessionInfo

AsyncFileContent = Union[
    bytes, str, "os.PathLike[str]", IO[bytes], Iterable[bytes], AsyncIterable[bytes]
]
"""What :meth:`AsyncSession.write_file` uploads (streamed in chunks, never loaded whole)."""


def _achunks(content: AsyncFileContent) -> Union[bytes, AsyncIterator[bytes]]:
    if isinstance(content, bytes):
        return content
    if isinstance(content, (str, os.PathLike)):
        path = c.as_path(content)
        if not path.is_file():
            raise InputError(f"{path}: no such file", field="content")

        async def from_path() -> AsyncIterator[bytes]:
            with open(path, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, c.CHUNK):
                    yield chunk

        return from_path()
    if hasattr(content, "__aiter__"):
        aiterable = cast(AsyncIterable[bytes], content)

        async def from_aiter() -> AsyncIterator[bytes]:
            async for chunk in aiterable:
                yield chunk

        return from_aiter()
    if hasattr(content, "read"):
        stream = cast(IO[bytes], content)

        async def from_stream() -> AsyncIterator[bytes]:
            while chunk := stream.read(c.CHUNK):
                yield chunk

        return from_stream()
    iterable: Iterable[bytes] = content

    async def from_iter() -> AsyncIterator[bytes]:
        for chunk in iterable:
            yield chunk

    return from_iter()


class AsyncSession:
    """A VM kept with its interpreter state across :meth:`exec` calls
    (an async context manager)."""

    def __init__(self, sandbox: "AsyncSandbox", data: Mapping[str, Any]) -> None:
        self._sandbox = sandbox
        self.id: str = data["id"]
        self.language: str = data.get("language", "python")
        self.vm_start: str = data.get("vm_start", "cold")
        self.exposed_ports: tuple[ExposedPort, ...] = tuple(
            ExposedPort.from_json(p) for p in data.get("exposed_ports") or []
        )
        self.closed = False

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(
        self,
        et: Optional[type[BaseException]],
        ev: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r}, language={self.language!r}, closed={self.closed})"

    async def exec(
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
        return await self._sandbox._execute(
            c.session_url(self.id, "/exec"), body, timeout_seconds, on_stdout, on_stderr
        )

    async def write_file(
        self, path: str, content: AsyncFileContent, *, executable: bool = False
    ) -> int:
        """Writes ``content`` to ``path`` (relative to ``/home/user``); returns its size."""
        return await self._sandbox._put_file(self.id, path, content, executable)

    @overload
    async def read_file(self, path: str) -> bytes: ...
    @overload
    async def read_file(
        self, path: str, destination: Union[str, "os.PathLike[str]", IO[bytes]]
    ) -> int: ...
    async def read_file(
        self, path: str, destination: Union[None, str, "os.PathLike[str]", IO[bytes]] = None
    ) -> Union[bytes, int]:
        """The file's bytes; or, given a local path or a binary file object, streams the
        file there (a path is written atomically) and returns its size."""
        return await self._sandbox._get_file(self.id, path, destination)

    async def list_files(self, dir: str = "") -> list[FileInfo]:
        """The entries of ``dir`` (relative to ``/home/user``; default: the home)."""
        data = await self._sandbox._json(
            "GET", c.session_url(self.id, "/files"), params={"dir": dir}
        )
        return [FileInfo.from_json(e) for e in data.get("entries", [])]

    async def close(self) -> None:
        """Closes the session and destroys its VM (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self._sandbox._json("DELETE", c.session_url(self.id))
        except (SessionClosedError, NotFoundError):
            pass


class AsyncSandbox:
    """An asyncio client of one ``sbx serve``."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        *,
        transport: Optional[httpx.AsyncBaseTransport] = None,
        timeout: float = 30.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, transport=transport, timeout=timeout
        )
        self._server: Optional[LocalServer] = None

    @classmethod
    async def local(
        cls,
        sbx: Optional[str] = None,
        *,
        args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        startup_timeout: float = 180.0,
    ) -> "AsyncSandbox":
        """Starts ``sbx serve`` on a free loopback port with a generated token (see
        :meth:`Sandbox.local`); :meth:`close` stops it."""
        server = await asyncio.to_thread(
            LocalServer.start, sbx, args=args, env=env, startup_timeout=startup_timeout
        )
        client = cls(server.url, server.token)
        client._server = server
        return client

    @property
    def server(self) -> Optional[LocalServer]:
        """The local server this client started, if any."""
        return self._server

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(
        self,
        et: Optional[type[BaseException]],
        ev: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the HTTP client, and stops the server :meth:`local` started."""
        await self._http.aclose()
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop)

    async def run(
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
        return await self._execute("/v1/run", body, timeout_seconds, on_stdout, on_stderr)

    async def session(
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
    ) -> AsyncSession:
        """Starts a session (``async with await sbx.session() as s:``)."""
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
        data = await self._json("POST", "/v1/sessions", json=body, timeout=c.exec_timeout(None))
        return AsyncSession(self, data)

    async def sessions(self) -> list[SessionInfo]:
        """The caller's live sessions, oldest first."""
        data = await self._json("GET", "/v1/sessions")
        return [SessionInfo.from_json(s) for s in data["sessions"]]

    async def health(self) -> Health:
        """``GET /v1/health``."""
        return Health.from_json(await self._json("GET", "/v1/health"))

    async def openapi(self) -> dict[str, Any]:
        """The server's OpenAPI document."""
        doc: dict[str, Any] = await self._json("GET", "/v1/openapi.json")
        return doc

    async def _json(self, method: str, url: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise c.transport_error(e) from e
        c.raise_for(resp)
        return resp.json() if resp.content else None

    async def _execute(
        self,
        url: str,
        body: dict[str, Any],
        timeout_seconds: Optional[int],
        on_stdout: Optional[c.OutputCallback],
        on_stderr: Optional[c.OutputCallback],
    ) -> ExecutionResult:
        timeout = c.exec_timeout(timeout_seconds)
        if not c.streaming(on_stdout, on_stderr):
            data = await self._json("POST", url, json=body, timeout=timeout)
            return ExecutionResult.from_json(data)
        sink = c.EventSink(on_stdout, on_stderr)
        try:
            async with self._http.stream(
                "POST", url, json=body, timeout=timeout, headers={"Accept": c.NDJSON}
            ) as resp:
                if not resp.is_success:
                    c.raise_for(resp, await resp.aread())
                async for line in resp.aiter_lines():
                    sink.line(line)
        except httpx.TransportError as e:
            raise c.transport_error(e) from e
        return sink.finish()

    async def _put_file(
        self, sid: str, path: str, content: AsyncFileContent, executable: bool
    ) -> int:
        data = await self._json(
            "PUT",
            c.file_url(sid, path),
            content=_achunks(content),
            params={"executable": "true"} if executable else None,
            headers={"Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(30.0, read=None),
        )
        return int(data["size"])

    async def _get_file(
        self, sid: str, path: str, destination: Union[None, str, "os.PathLike[str]", IO[bytes]]
    ) -> Union[bytes, int]:
        url = c.file_url(sid, path)
        try:
            async with self._http.stream(
                "GET", url, timeout=httpx.Timeout(30.0, read=None)
            ) as resp:
                if not resp.is_success:
                    c.raise_for(resp, await resp.aread())
                if destination is None:
                    return await resp.aread()
                if isinstance(destination, (str, os.PathLike)):
                    dest = c.as_path(destination)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
                    try:
                        with os.fdopen(fd, "wb") as f:
                            size = 0
                            async for chunk in resp.aiter_bytes(c.CHUNK):
                                f.write(chunk)
                                size += len(chunk)
                        os.replace(tmp, dest)
                    except BaseException:
                        os.unlink(tmp)
                        raise
                    return size
                size = 0
                async for chunk in resp.aiter_bytes(c.CHUNK):
                    destination.write(chunk)
                    size += len(chunk)
                return size
        except httpx.TransportError as e:
            raise c.transport_error(e) from e
