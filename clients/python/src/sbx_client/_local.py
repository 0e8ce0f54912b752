"""Starting a local ``sbx serve`` for one client."""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ._errors import PermanentError


@dataclass
class LocalServer:
    """A ``sbx serve`` process on a loopback port, owned by this client."""

    process: "subprocess.Popen[bytes]"
    url: str
    """``http://127.0.0.1:PORT``."""
    token: str
    """The bearer token generated for it."""
    log_path: Path
    """Where the server's stderr goes."""
    _dir: "tempfile.TemporaryDirectory[str]" = field(repr=False)

    @classmethod
    def start(
        cls,
        sbx: Optional[str] = None,
        *,
        args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        startup_timeout: float = 180.0,
    ) -> "LocalServer":
        """Starts ``sbx serve --listen 127.0.0.1:0`` with a generated token and waits for
        the line it writes to ``--ready-fd`` once it accepts requests."""
        exe = sbx or os.environ.get("SBX_BIN") or shutil.which("sbx")
        if exe is None:
            raise PermanentError(
                "sbx not found on PATH: install it (cargo install --path crates/sbx --locked) "
                "or pass Sandbox.local(sbx='/path/to/sbx')"
            )
        tmp = tempfile.TemporaryDirectory(prefix="sbx-client-")
        token = secrets.token_urlsafe(32)
        token_file = Path(tmp.name) / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log_path = Path(tmp.name) / "serve.log"
        r, w = os.pipe()
        cmd = [
            exe,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token-file",
            str(token_file),
            "--ready-fd",
            str(w),
            *args,
        ]
        full_env = dict(os.environ)
        full_env.update(env or {})
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(w,),
                    env=full_env,
                    start_new_session=True,
                )
        except OSError as e:
            os.close(r)
            os.close(w)
            tmp.cleanup()
            raise PermanentError(f"cannot start {exe}: {e}") from e
        os.close(w)
        server = cls(proc, "", token, log_path, tmp)
        try:
            line = _read_line(r, startup_timeout)
        finally:
            os.close(r)
        try:
            ready = json.loads(line) if line else {}
        except ValueError:
            ready = {}
        if not ready.get("ready") or not isinstance(ready.get("url"), str):
            try:  # the descriptor closes a moment before the process is reaped
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                why = f"did not become ready within {startup_timeout:g} s"
            else:
                why = f"exited ({proc.returncode}) before it was ready"
            tail = server.log_tail()
            server.stop()
            raise PermanentError(f"sbx serve {why}:\n{tail}")
        server.url = ready["url"]
        return server

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> Optional[int]:
        """SIGTERM (the server drains and destroys its VMs), SIGKILL after ``grace`` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._dir.cleanup()
        return self.process.returncode


def _read_line(fd: int, timeout: float) -> str:
    """One line from ``fd``, or what came before EOF or the deadline."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace")
