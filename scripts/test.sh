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

# VM checks under TCG (KVM only where the probe proves a guest runs). The assets are
# content-keyed in ~/.cache/sbx/assets: unchanged inputs rebuild nothing.
step "cargo xtask assets"
cargo xtask assets

step "cargo xtask boot-smoke --image all"
cargo xtask boot-smoke --image all

step "cargo xtask itest"
cargo xtask itest
