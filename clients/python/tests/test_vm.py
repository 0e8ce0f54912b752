"""End to end: the client against a real `sbx serve` booting real microVMs (TCG here).

Run with `pytest -m vm` (scripts/test.sh does, after building the guest assets); they are
not skipped silently: without QEMU or assets `sbx serve` fails to start and they fail.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import sbx_client as sbx
from sbx_client import AsyncSandbox, Sandbox

pytestmark = pytest.mark.vm


def server_env(work: str) -> dict[str, str]:
    # Cold boots (no snapshot VMs booting in the background), in a work dir of our own.
    return {"SBX_SNAPSHOTS": "0", "SBX_WORK_DIR": work}


@pytest.fixture(scope="module")
def client(sbx_path: str) -> Iterator[Sandbox]:
    with tempfile.TemporaryDirectory(prefix="sbx-pyvm-") as work:
        with Sandbox.local(sbx_path, env=server_env(work)) as c:
            yield c


def test_local_server_is_ready_and_authenticated(client: Sandbox, sbx_path: str) -> None:
    server = client.server
    assert server is not None and server.url.startswith("http://127.0.0.1:")
    assert client.health().status == "ok"
    anonymous = Sandbox(server.url)
    with pytest.raises(sbx.UnauthorizedError):
        anonymous.sessions()
    anonymous.close()
    # The live document is the one `sbx openapi` prints (which test_openapi checks).
    live = client.openapi()
    printed = subprocess.run([sbx_path, "openapi"], capture_output=True, check=True).stdout
    import json

    assert live == json.loads(printed)


def test_run_streams_output_and_types_the_result(client: Sandbox) -> None:
    chunks: list[str] = []
    errs: list[str] = []
    r = client.run(
        "import sys\nprint('out', flush=True)\nprint('err', file=sys.stderr)\nsys.exit(3)",
        on_stdout=chunks.append,
        on_stderr=errs.append,
    )
    assert "".join(chunks) == "out\n" == r.stdout
    assert "".join(errs) == "err\n" == r.stderr
    assert r.exit_code == 3 and not r.timed_out
    assert r.timing.total_ms >= r.timing.execute_ms > 0
    r = client.run("echo $GREETING", language="raw", env={"GREETING": "hi"})
    assert (r.stdout, r.exit_code) == ("hi\n", 0)


def test_errors_are_typed(client: Sandbox) -> None:
    with pytest.raises(sbx.InputError) as e:
        client.run("print(1)", timeout_seconds=0)
    assert e.value.status == 400 and not e.value.retryable and e.value.field == "timeout"
    r = client.run("while True: pass", timeout_seconds=1)
    assert r.timed_out and "timeout" in r.stderr.lower()


def test_session_keeps_state_and_streams_files(client: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(24 << 20)
    local = tmp_path / "in.bin"
    local.write_bytes(data)
    with client.session(language="python") as s:
        assert s.exec("x = 20").exit_code == 0
        assert s.exec("print(x + 22)").stdout == "42\n"
        assert s.write_file("d/in.bin", local) == len(data)
        r = s.exec(
            "import hashlib; print(hashlib.sha256(open('d/in.bin','rb').read()).hexdigest())"
        )
        assert r.stdout.strip() == hashlib.sha256(data).hexdigest()
        out = tmp_path / "out.bin"
        assert s.read_file("d/in.bin", out) == len(data)
        assert out.read_bytes() == data
        assert s.write_file("small.txt", io.BytesIO(b"small")) == 5
        assert s.read_file("small.txt") == b"small"
        entries = {f.name: f for f in s.list_files()}
        assert entries["d"].is_dir and entries["small.txt"].size == 5
        assert [f.name for f in s.list_files("d")] == ["in.bin"]
        with pytest.raises(sbx.GuestError) as e:
            s.read_file("missing.txt")
        assert e.value.status == 404
        assert any(i.id == s.id for i in client.sessions())
    assert s.closed
    with pytest.raises((sbx.SessionClosedError, sbx.NotFoundError)):
        client._json("POST", f"/v1/sessions/{s.id}/exec", json={"code": "1"})


async def test_async_client(sbx_path: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sbx-pyvm-") as work:
        async with await AsyncSandbox.local(sbx_path, env=server_env(work)) as c:
            seen: list[str] = []
            r = await c.run("console.log(6*7)", language="javascript", on_stdout=seen.append)
            assert r.stdout == "42\n" == "".join(seen)
            async with await c.session(language="raw") as s:
                await s.exec("N=5")
                assert (await s.exec("echo $((N*2))")).stdout == "10\n"
                assert await s.write_file("f.txt", b"abc") == 3
                assert await s.read_file("f.txt") == b"abc"
            assert (await c.health()).sessions == 0
        server = c.server
        assert server is None  # stopped by close()
