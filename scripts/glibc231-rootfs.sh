#!/usr/bin/env bash
# Usage: scripts/glibc231-rootfs.sh
#
# Makes (or reuses) a minimal Debian bullseye root file system, glibc 2.31 like the Functions
# Linux image, in target/tools/rootfs-bullseye, and prints its path. scripts/check_package.py
# --rootfs runs the packaged handler inside it (chroot), so "runs on glibc 2.31" is tried,
# not only read off the symbol table.
#
# Needs root and debootstrap (installed with apt-get when missing) and Debian's package mirror.
# Exit status 3 means "cannot be made here" (not root, no mirror): callers skip the run.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly suite=bullseye
readonly mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
readonly rootfs="$PWD/target/tools/rootfs-$suite"

if [[ -x "$rootfs/bin/sh" && -f "$rootfs/.complete" ]]; then
    echo "$rootfs"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "rootfs: not root, cannot chroot; skipping" >&2
    exit 3
fi
if ! command -v debootstrap >/dev/null; then
    echo "rootfs: installing debootstrap" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >&2; then
        echo "rootfs: cannot install debootstrap; skipping" >&2
        exit 3
    fi
fi
rm -rf --one-file-system "$rootfs"
mkdir -p "$(dirname "$rootfs")"
echo "rootfs: debootstrap $suite into target/tools/rootfs-$suite" >&2
# ca-certificates: the handler's TLS client loads the system roots at start, as on the real image.
if ! debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1; then
    tail -5 "$rootfs.log" >&2
    echo "rootfs: debootstrap failed (log: $rootfs.log); skipping" >&2
    rm -rf --one-file-system "$rootfs"
    exit 3
fi
touch "$rootfs/.complete"
echo "$rootfs"
