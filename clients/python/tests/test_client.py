"""Fast tests over a mocked transport (no server, no VM)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import pytest

import sbx_client as sbx
from sbx_client import AsyncSandbox, Sandbox

RESULT: dict[str, Any] = {
    "stdout": "hi\n",
    "stderr": "",
    "exit_code": 0,
    "execution_time_ms": 3,
    "timing": {"total_ms": 10, "setup_ms": 1, "boot_ms": 0, "execute_ms": 5, "admission_ms": 0},
    "warm_pool_hit": False,
    "vm_start": "snapshot",
    "a_field_from_a_newer_server": 1,
}

Handler = Callable[[httpx.Request], httpx.Response]


def error(status: int, kind: str, retryable: bool = False, **extra: Any) -> httpx.Response:
    headers = {"Retry-After": "2"} if retryable else {}
    body = {"error": {"kind": kind, "message": f"{kind} happened", "retryable": retryable, **extra}}
    return httpx.Response(status, json=body, headers=headers)


class Server:
    """A fake sbx serve: records requests, answers from a handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        return self.handler(request)

    def sync(self) -> Sandbox:
        return Sandbox("http://sbx.test", "tok", transport=httpx.MockTransport(self))

    def async_(self) -> AsyncSandbox:
        return AsyncSandbox("http://sbx.test", "tok", transport=httpx.MockTransport(self))


def test_run_sends_the_body_and_token_and_types_the_result() -> None:
    srv = Server(lambda r: httpx.Response(200, json=RESULT))
    r = srv.sync().run(
        "print('hi')",
        language="Python",
        timeout_seconds=5,
        env={"A": "1"},
        expose_ports=[8000, sbx.PortMapping(internal=9000, external=19000)],
    )
    assert isinstance(r, sbx.ExecutionResult)
    assert (r.stdout, r.exit_code, r.vm_start, r.timed_out) == ("hi\n", 0, "snapshot", False)
    assert r.timing.total_ms == 10 and r.timing.connect_ms == 0
    req = srv.requests[0]
    assert req.url.path == "/v1/run" and req.method == "POST"
    assert req.headers["authorization"] == "Bearer tok"
    body = json.loads(srv.bodies[0])
    assert body == {
        "code": "print('hi')",
        "language": "python",
        "timeout": 5,
        "env": {"A": "1"},
        "allow_network": False,
        "expose_ports": [
            {"internal": 8000, "protocol": "tcp"},
            {"internal": 9000, "external": 19000, "protocol": "tcp"},
        ],
    }


def test_client_side_checks_raise_input_errors_before_any_request() -> None:
    srv = Server(lambda r: httpx.Response(200, json=RESULT))
    c = srv.sync()
    with pytest.raises(sbx.InputError) as e:
        c.run("1", language="cobol")
    assert e.value.field == "language" and not e.value.retryable
    with pytest.raises(sbx.InputError, match="packages"):
        c.run("1", packages="numpy==2.1.3")
    assert srv.requests == []


def test_packages_are_sent_as_given() -> None:
    srv = Server(lambda r: httpx.Response(200, json=RESULT))
    srv.sync().run("1", packages=["numpy==2.1.3"])
    assert json.loads(srv.requests[0].content)["packages"] == ["numpy==2.1.3"]


@pytest.mark.parametrize(
    ("status", "kind", "cls", "retryable"),
    [
        (400, "input", sbx.InputError, False),
        (401, "unauthorized", sbx.UnauthorizedError, False),
        (404, "not_found", sbx.NotFoundError, False),
        (405, "method_not_allowed", sbx.MethodNotAllowedError, False),
        (410, "session_closed", sbx.SessionClosedError, False),
        (413, "payload_too_large", sbx.PayloadTooLargeError, False),
        (422, "output_limit", sbx.OutputLimitError, False),
        (429, "too_many_sessions", sbx.TooManySessionsError, True),
        (500, "permanent", sbx.PermanentError, False),
        (500, "internal", sbx.InternalError, False),
        (500, "guest", sbx.GuestError, False),
        (502, "outcome_unknown", sbx.OutcomeUnknownError, False),
        (503, "transient", sbx.TransientError, True),
        (503, "capacity", sbx.CapacityError, True),
        (503, "shutting_down", sbx.ShuttingDownError, True),
        (507, "no_space", sbx.NoSpaceError, False),
    ],
)
def test_every_error_kind_has_its_class(
    status: int, kind: str, cls: type[sbx.SandboxError], retryable: bool
) -> None:
    srv = Server(lambda r: error(status, kind, retryable, cause="boot_timeout", field="code"))
    with pytest.raises(cls) as e:
        srv.sync().run("1")
    err = e.value
    assert isinstance(err, sbx.SandboxError)
    assert (err.kind, err.status, err.retryable) == (kind, status, retryable)
    assert err.message == f"{kind} happened"
    assert err.cause == "boot_timeout" and err.field == "code"
    assert err.retry_after == (2.0 if retryable else None)
    assert sbx.ERROR_CLASSES[kind] is cls


def test_unknown_kinds_and_non_json_errors_still_raise_sandbox_error() -> None:
    srv = Server(lambda r: error(418, "teapot"))
    with pytest.raises(sbx.SandboxError) as e:
        srv.sync().health()
    assert type(e.value) is sbx.SandboxError and e.value.kind == "teapot"
    srv = Server(lambda r: httpx.Response(502, text="bad gateway"))
    with pytest.raises(sbx.SandboxError, match="bad gateway"):
        srv.sync().health()


def test_unreachable_server_is_a_typed_error() -> None:
    def refuse(r: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=r)

    with pytest.raises(sbx.ServerUnavailableError, match="refused"):
        Server(refuse).sync().run("1")


def ndjson(*events: dict[str, Any]) -> httpx.Response:
    text = "".join(json.dumps(e) + "\n" for e in events)
    return httpx.Response(200, text=text, headers={"Content-Type": "application/x-ndjson"})


def test_streaming_calls_back_in_order_then_returns_the_result() -> None:
    srv = Server(
        lambda r: ndjson(
            {"type": "stdout", "data": "a"},
            {"type": "stderr", "data": "e"},
            {"type": "stdout", "data": "b"},
            {"type": "result", **RESULT},
        )
    )
    seen: list[str] = []
    r = srv.sync().run("1", on_stdout=lambda s: seen.append("o:" + s), on_stderr=lambda s: seen.append("e:" + s))
    assert seen == ["o:a", "e:e", "o:b"]
    assert r.stdout == "hi\n"
    assert srv.requests[0].headers["accept"] == "application/x-ndjson"


def test_a_stream_that_fails_midway_raises_its_error() -> None:
    srv = Server(
        lambda r: ndjson(
            {"type": "stdout", "data": "a"},
            {"type": "error", "error": {"kind": "outcome_unknown", "message": "lost", "retryable": False}},
        )
    )
    with pytest.raises(sbx.OutcomeUnknownError, match="lost"):
        srv.sync().run("1", on_stdout=lambda s: None)
    srv = Server(lambda r: ndjson({"type": "stdout", "data": "a"}))
    with pytest.raises(sbx.OutcomeUnknownError, match="without a result"):
        srv.sync().run("1", on_stdout=lambda s: None)


def session_server(files: dict[str, bytes]) -> Server:
    def handle(r: httpx.Request) -> httpx.Response:
        p = r.url.path
        if p == "/v1/sessions" and r.method == "POST":
            return httpx.Response(201, json={"id": "s1", "language": "python", "exposed_ports": [], "vm_start": "cold"})
        if p in ("/v1/sessions/s1/exec", "/v1/run"):
            return httpx.Response(200, json=RESULT)
        if p.startswith("/v1/sessions/s1/files/"):
            name = p.removeprefix("/v1/sessions/s1/files/")
            if r.method == "PUT":
                files[name] = r.read()
                return httpx.Response(200, json={"path": name, "size": len(files[name])})
            if name not in files:
                return error(404, "guest")
            return httpx.Response(200, content=files[name])
        if p == "/v1/sessions/s1/files":
            return httpx.Response(200, json={"dir": r.url.params.get("dir", ""), "entries": [
                {"name": n, "is_dir": False, "size": len(b)} for n, b in sorted(files.items())]})
        if p == "/v1/sessions/s1" and r.method == "DELETE":
            return httpx.Response(204)
        return error(404, "not_found")

    return Server(handle)


def test_session_files_stream_both_ways(tmp_path: Path) -> None:
    files: dict[str, bytes] = {}
    srv = session_server(files)
    big = bytes(range(256)) * 20_000  # 5 MB: several chunks
    local = tmp_path / "big.bin"
    local.write_bytes(big)
    with srv.sync() as c, c.session(language="python") as s:
        assert s.id == "s1" and s.vm_start == "cold"
        assert s.exec("x = 1").stdout == "hi\n"
        assert s.write_file("dir/a.bin", local) == len(big)
        assert s.write_file("b.txt", b"bytes") == 5
        assert s.write_file("c.txt", io.BytesIO(b"stream")) == 6
        assert s.write_file("d.txt", iter([b"it", b"er"])) == 4
        assert s.write_file("e.txt", str(local), executable=True) == len(big)
        assert s.read_file("b.txt") == b"bytes"
        out = tmp_path / "sub" / "copy.bin"
        assert s.read_file("dir/a.bin", out) == len(big)
        assert out.read_bytes() == big
        assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["copy.bin"]
        sink = io.BytesIO()
        assert s.read_file("c.txt", sink) == 6 and sink.getvalue() == b"stream"
        with pytest.raises(sbx.GuestError) as e:
            s.read_file("missing")
        assert e.value.status == 404
        names = [f.name for f in s.list_files()]
        assert names == ["b.txt", "c.txt", "d.txt", "dir/a.bin", "e.txt"]
        with pytest.raises(sbx.InputError):
            s.write_file("x", tmp_path / "nope")
    assert files["dir/a.bin"] == big and files["d.txt"] == b"iter"
    put_e = [r for r in srv.requests if r.url.path.endswith("/e.txt")][0]
    assert put_e.url.params["executable"] == "true"
    assert [r.method for r in srv.requests][-1] == "DELETE"
    assert s.closed


async def test_async_client_does_the_same() -> None:
    files: dict[str, bytes] = {}
    srv = session_server(files)
    async with srv.async_() as c:
        r = await c.run("1")
        assert r.exit_code == 0
        async with await c.session() as s:
            assert (await s.exec("1")).stdout == "hi\n"

            async def agen() -> AsyncIterator[bytes]:
                yield b"a"
                yield b"b"

            assert await s.write_file("f", agen()) == 2
            assert await s.write_file("g", b"xyz") == 3
            assert await s.read_file("f") == b"ab"
            assert [f.name for f in await s.list_files()] == ["f", "g"]
        assert s.closed
    seen: list[str] = []
    srv = Server(lambda r: ndjson({"type": "stdout", "data": "x"}, {"type": "result", **RESULT}))
    async with srv.async_() as c:
        await c.run("1", on_stdout=seen.append)
    assert seen == ["x"]
