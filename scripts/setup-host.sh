#!/usr/bin/env bash
# Installs the host packages sbx needs on Debian 12 (bookworm): QEMU 10 from
# bookworm-backports, image and kernel build tools, and the interpreters the guest agent's
# host-side tests run against, and python3-venv for the Python client's tests. Idempotent; does nothing that is already done.
set -euo pipefail

PKGS_BACKPORTS=(qemu-system-x86 qemu-utils)
PKGS=(linux-source-6.1 flex bison bc libelf-dev libssl-dev dwarves mmdebstrap erofs-utils
      cpio zstd file busybox-static python3 python3-pip python3-venv nodejs npm bash acl patch e2fsprogs)

missing=()
for p in "${PKGS[@]}" "${PKGS_BACKPORTS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' || true)
if [ "${#missing[@]}" -eq 0 ] && [ "${qemu_major:-0}" -ge 10 ]; then
    echo "setup-host: all host packages present (QEMU ${qemu_major})"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-host: missing packages: ${missing[*]} (and QEMU >= 10 from bookworm-backports)." >&2
    echo "setup-host: run this script as root, or install them with apt." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" \
        > /etc/apt/sources.list.d/sbx-backports.list
fi
apt-get update -q
apt-get install -y -q -t bookworm-backports "${PKGS_BACKPORTS[@]}"
apt-get install -y -q "${PKGS[@]}"
qemu-system-x86_64 --version | head -1
