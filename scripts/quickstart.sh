#!/usr/bin/env bash
# From a fresh Debian 12 machine (Rust toolchain present) to a real sandboxed execution:
# installs the host packages (as root), builds or reuses the guest assets, then runs
# Python code in a fresh microVM and prints its output.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-host.sh
cargo xtask assets
cargo build --release -p sbx
exec target/release/sbx run 'print("hello from a microVM")'
