#!/usr/bin/env bash
# Build the deployment package: dist/app.zip, laid out as the Functions host expects.
#
#   host.json                             at the root
#   restrict-code-execution/function.json one folder per function
#   handler                               the release binary, mode 0755 inside the zip
#
# The binary is linked against glibc 2.31 (the Functions Linux image's), not the build
# machine's: `cargo zigbuild --target x86_64-unknown-linux-gnu.2.31` links through zig,
# which ships glibc stubs for that version. cargo-zigbuild and zig come from PyPI
# (scripts/requirements-package.txt) into target/tools/package, so the only things this
# needs are the Rust toolchain and Python 3 with venv.
#
# Usage: scripts/package.sh            (then deploy dist/app.zip)
#        scripts/package.sh --check-host   (only the host and toolchain checks below)
# On Linux x86-64 it then checks the result: python3 scripts/check_package.py dist/app.zip
# (PACKAGE_SKIP_CHECK=1 skips that).
set -euo pipefail
cd "$(dirname "$0")/.."

readonly triple=x86_64-unknown-linux-gnu
readonly glibc=2.31
readonly out=dist
readonly staging=$out/app
readonly zip=$out/app.zip

fail() {
    echo "package: $*" >&2
    exit 1
}

# The hosts it builds from: cargo-zigbuild and zig (PyPI wheels) cross-link for Linux x86-64
# from Linux or macOS, on x86-64 or arm64. Anything else stops here, not halfway through a build.
host="$(uname -s)/$(uname -m)"
case $host in
Linux/x86_64 | Linux/aarch64 | Linux/arm64 | Darwin/x86_64 | Darwin/arm64) ;;
MINGW* | MSYS* | CYGWIN* | Windows*)
    fail "cannot build from $host: run scripts/package.sh in WSL (Linux), or build on Linux or macOS"
    ;;
*)
    fail "cannot build from $host: scripts/package.sh builds on Linux or macOS, x86-64 or arm64"
    ;;
esac
command -v cargo >/dev/null 2>&1 || fail "cargo is not on PATH: install the Rust toolchain (https://rustup.rs)"
command -v python3 >/dev/null 2>&1 || fail "python3 is not on PATH: it installs cargo-zigbuild and zig"
# The Rust standard library for the target it builds for: rustup adds it (a no-op when it is
# there already, as on a Linux x86-64 host); without rustup it must come with the toolchain.
if command -v rustup >/dev/null 2>&1; then
    rustup target add "$triple" >&2 || fail "rustup could not add the Rust target $triple"
elif [[ ! -d "$(rustc --print sysroot)/lib/rustlib/$triple" ]]; then
    fail "the Rust standard library for $triple is not installed and rustup is not here to add it: install rustup (https://rustup.rs), or that target with your Rust distribution"
fi
if [[ ${1:-} == --check-host ]]; then
    echo "package: $host can build $triple"
    exit 0
fi

venv=$(scripts/venv.sh package scripts/requirements-package.txt)
# cargo-zigbuild runs `python3 -m ziglang` when no `zig` is on PATH: the venv's python3.
export PATH="$venv/bin:$PATH"
# Keep zig's and cargo-zigbuild's caches under target/, like everything else built here.
export ZIG_GLOBAL_CACHE_DIR="$PWD/target/tools/zig-cache"
export XDG_CACHE_HOME="$PWD/target/tools/cache"

echo "== cargo zigbuild --release --target $triple.$glibc"
cargo zigbuild --release --locked --bin handler --target "$triple.$glibc"
binary=target/$triple/release/handler

# Stage exactly what the host needs, nothing else (.funcignore says the same for `func`).
rm -rf "$staging" "$zip"
mkdir -p "$staging"
cp host.json "$staging/"
functions=()
shopt -s nullglob
for definition in */function.json; do
    dir=${definition%/function.json}
    mkdir -p "$staging/$dir"
    cp "$definition" "$staging/$dir/function.json"
    functions+=("$dir")
done
if [[ ${#functions[@]} -eq 0 ]]; then
    echo "package: no */function.json found" >&2
    exit 1
fi
install -m 0755 "$binary" "$staging/handler"

# Python's zipfile stores the Unix mode explicitly (Flex mounts the package read-only, so
# the exec bit must be in the zip). Entries are sorted and dated 1980-01-01, so the zip
# depends only on its contents.
python3 - "$staging" "$zip" <<'PY'
import os, stat, sys, zipfile

root, dest = sys.argv[1], sys.argv[2]
entries = []
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    rel = os.path.relpath(dirpath, root)
    if rel != ".":
        entries.append(rel.replace(os.sep, "/") + "/")
    for name in sorted(filenames):
        entries.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))

with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
    for name in sorted(entries):
        path = os.path.join(root, name)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
        if name.endswith("/"):
            info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
            zf.writestr(info, b"")
        else:
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as f:
                zf.writestr(info, f.read())
PY

echo "package: $zip ($(du -h "$zip" | cut -f1)): host.json, handler, ${functions[*]}"

# Check what was built (layout, exec bit, glibc, one run as the host would start it) unless the
# caller checks it itself (scripts/deploy-checks.sh) or this machine cannot run the binary.
if [[ ${PACKAGE_SKIP_CHECK:-} != 1 && $(uname -s) == Linux && $(uname -m) == x86_64 ]]; then
    python3 scripts/check_package.py "$zip"
fi
