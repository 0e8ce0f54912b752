"""Sandbox.local(): the launcher's protocol with `sbx serve --ready-fd`, over fake servers."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

import sbx_client as sbx
from sbx_client import LocalServer, Sandbox


def fake_sbx(tmp_path: Path, body: str) -> str:
    """An executable standing in for `sbx`: Python code with the argv in `args`."""
    path = tmp_path / "sbx"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\nargs = sys.argv[1:]\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


READY = """
assert args[:3] == ["serve", "--listen", "127.0.0.1:0"], args
token = open(args[args.index("--token-file") + 1]).read().strip()
assert len(token) >= 32
fd = int(args[args.index("--ready-fd") + 1])
print("starting", file=sys.stderr, flush=True)
os.write(fd, json.dumps({"ready": True, "url": "http://127.0.0.1:1", "pid": os.getpid()}).encode() + b"\\n")
os.close(fd)
time.sleep(60)
"""


def test_local_reads_the_ready_line_passes_a_token_file_and_stops_the_server(
    tmp_path: Path,
) -> None:
    server = LocalServer.start(fake_sbx(tmp_path, READY), env={"SBX_SNAPSHOTS": "0"})
    try:
        assert server.url == "http://127.0.0.1:1"
        assert len(server.token) >= 32
        assert server.process.poll() is None
        assert "starting" in server.log_tail()
        log_dir = server.log_path.parent
    finally:
        code = server.stop(grace=5)
    assert code is not None and code != 0  # ended by SIGTERM
    assert not log_dir.exists(), "the token file and log are removed"


def test_a_server_that_exits_before_ready_is_a_permanent_error_with_its_log(
    tmp_path: Path,
) -> None:
    exe = fake_sbx(tmp_path, "print('sbx serve: QEMU not found', file=sys.stderr); sys.exit(125)")
    with pytest.raises(sbx.PermanentError) as e:
        Sandbox.local(exe)
    assert "exited (125)" in e.value.message and "QEMU not found" in e.value.message


def test_a_server_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    exe = fake_sbx(tmp_path, "time.sleep(60)")
    with pytest.raises(sbx.PermanentError, match="did not become ready"):
        LocalServer.start(exe, startup_timeout=0.5)


def test_a_missing_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SBX_BIN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(sbx.PermanentError, match="cargo install"):
        Sandbox.local()
    with pytest.raises(sbx.PermanentError, match="cannot start"):
        Sandbox.local("/nonexistent/sbx")
    assert os.environ["PATH"] == "/nonexistent"
