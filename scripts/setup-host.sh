#!/usr/bin/env bash
# Installs the host packages sbx needs on Debian 12 (bookworm): QEMU 10 from
# bookworm-backports, image and kernel build tools, and the interpreters the guest agent's
# host-side tests run against (python3, bash, and Bun: the javascript image's runtime,
# the pinned npm tarball below, checked against its sha512 integrity), and python3-venv for
# the Python client's tests. Idempotent; does nothing that is already done.
set -euo pipefail

# Bun for the guest agent's host-side tests: the same pin as xtask/src/assets/npm.rs (a
# unit test there keeps the two equal).
BUN_PACKAGE=@oven/bun-linux-x64
BUN_VERSION=1.4.5
BUN_INTEGRITY=sha512-IWX9BELoGHAUtMonkeSaNaZwXzRk+oDw6Mk+HBFXd3KHYIBNBsIGRupMZPcgNoDbJpLu6gAJjIoIVPZtt1aJ1g==

install_bun() {
    if [ "$(/usr/local/bin/bun --version 2>/dev/null || true)" = "$BUN_VERSION" ]; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup-host: Bun $BUN_VERSION missing in /usr/local/bin; run this script as root." >&2
        exit 1
    fi
    local tmp got
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent --ignore-scripts "$BUN_PACKAGE@$BUN_VERSION" >/dev/null)
    got="sha512-$(openssl dgst -sha512 -binary "$tmp"/*.tgz | base64 -w0)"
    if [ "$got" != "$BUN_INTEGRITY" ]; then
        echo "setup-host: $BUN_PACKAGE@$BUN_VERSION has integrity $got, pinned $BUN_INTEGRITY" >&2
        rm -rf "$tmp"
        exit 1
    fi
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/bin/bun
    install -m 0755 "$tmp/package/bin/bun" /usr/local/bin/bun
    rm -rf "$tmp"
    echo "setup-host: Bun $(/usr/local/bin/bun --version) in /usr/local/bin"
}

PKGS_BACKPORTS=(qemu-system-x86 qemu-utils)
PKGS=(linux-source-6.1 flex bison bc libelf-dev libssl-dev dwarves mmdebstrap erofs-utils
      cpio zstd file busybox-static python3 python3-pip python3-venv nodejs bash acl patch e2fsprogs openssl)

missing=()
for p in "${PKGS[@]}" "${PKGS_BACKPORTS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm (pinned runtimes for the images, Bun for the tests): any npm will do (a host may
# have one from elsewhere, whose nodejs Debian's npm package would conflict with).
command -v npm >/dev/null 2>&1 || missing+=(npm)
qemu_major=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' || true)
if [ "${#missing[@]}" -eq 0 ] && [ "${qemu_major:-0}" -ge 10 ]; then
    install_bun
    echo "setup-host: all host packages present (QEMU ${qemu_major}, Bun ${BUN_VERSION})"
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
command -v npm >/dev/null 2>&1 || apt-get install -y -q npm
qemu-system-x86_64 --version | head -1
install_bun
