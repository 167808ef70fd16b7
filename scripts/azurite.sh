#!/usr/bin/env bash
# Usage: scripts/azurite.sh
#
# Installs (or reuses) the pinned Azurite, the storage emulator that the
# coordination tests (tests/coordination) run against, into
# target/tools/azurite-VERSION with npm, and prints the path of its
# `azurite-blob` launcher. The tests call this script themselves on first use,
# so `cargo test` needs no manual step; .ci/run calls it first so that the
# install shows in the CI log. Nothing is installed outside target/.
#
# 3.37.0 is pinned because it knows the storage API version the Rust SDK sends
# (x-ms-version 2026-04-06; 3.35.0, the last release that declares Node 20
# support, knows up to 2025-11-05 and needed --skipApiVersionCheck). Its
# package declares Node 22, but the whole coordination suite passes with it on
# Node 20 (the CI machines' Node), so npm's engine check is relaxed for this
# one install. If a later Azurite breaks on Node 20, pin 3.35.0 again and pass
# --skipApiVersionCheck in tests/coordination/azurite.rs (docs/coordination.md).
set -euo pipefail
cd "$(dirname "$0")/.."

version=3.37.0
prefix="${CARGO_TARGET_DIR:-$PWD/target}/tools/azurite-$version"
bin="$prefix/node_modules/.bin/azurite-blob"

if [[ ! -x "$bin" ]]; then
    command -v npm >/dev/null || { echo "azurite: npm is needed (Node 20 or later)" >&2; exit 1; }
    echo "azurite: installing azurite@$version into $prefix" >&2
    # A partial install from an interrupted run is started over.
    rm -rf "$prefix.partial"
    mkdir -p "$prefix.partial"
    npm install --prefix "$prefix.partial" --no-audit --no-fund --no-save --loglevel=error \
        --engine-strict=false \
        "azurite@$version" >&2
    rm -rf "$prefix"
    mv "$prefix.partial" "$prefix"
fi
echo "$bin"
