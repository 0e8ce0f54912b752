#!/usr/bin/env bash
# The one command that runs every test of sbx (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo; echo "==> $*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "cargo test"
cargo test --workspace --locked
cargo build --locked -q -p sbx
SBX_BIN="$PWD/target/debug/sbx"
export SBX_BIN

# The Python client (clients/python): installed from its directory into a venv under
# target/ (its dependencies come from PyPI), typed with mypy --strict, and its fast tests
# (mocked transport, and its fields against `sbx openapi`).
step "python client: install, mypy --strict, pytest (no VM)"
PY=target/pyenv/bin/python
[ -x "$PY" ] || python3 -m venv target/pyenv
"$PY" -m pip install -q --upgrade "./clients/python[test]"
(cd clients/python && ../../"$PY" -m mypy)
"$PY" -m pytest -q -p no:cacheprovider -m "not vm" clients/python/tests

# VM checks under TCG (KVM only where the probe proves a guest runs). The assets are
# content-keyed in ~/.cache/sbx/assets: unchanged inputs rebuild nothing.
step "cargo xtask assets"
cargo xtask assets

# As root: the unprivileged user QEMU runs as (idempotent), so the VM checks below run
# QEMU as sbx-qemu; elsewhere QEMU runs as the caller and `sbx doctor` says so.
if [ "$(id -u)" -eq 0 ]; then
    step "sbx setup"
    cargo run -q --locked -p sbx -- setup
fi

step "cargo xtask boot-smoke --image all"
cargo xtask boot-smoke --image all

step "cargo xtask itest"
cargo xtask itest

step "python client against real microVMs (pytest -m vm)"
"$PY" -m pytest -q -p no:cacheprovider -m vm clients/python/tests
