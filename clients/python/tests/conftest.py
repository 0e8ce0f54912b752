"""Where the tests find the `sbx` binary: $SBX_BIN, else the workspace's debug build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[3]


def sbx_bin() -> Optional[str]:
    env = os.environ.get("SBX_BIN")
    if env:
        if not Path(env).is_file():
            raise RuntimeError(f"SBX_BIN={env} does not exist")
        return env
    for p in (ROOT / "target" / "debug" / "sbx", ROOT / "target" / "release" / "sbx"):
        if p.is_file():
            return str(p)
    return shutil.which("sbx")


@pytest.fixture(scope="session")
def sbx_path() -> str:
    path = sbx_bin()
    if path is None:
        pytest.skip("no sbx binary: build it (cargo build -p sbx) or set SBX_BIN")
    return path
