#!/usr/bin/env bash
# Usage: scripts/venv.sh NAME REQUIREMENTS_FILE
#
# Makes (or reuses) the Python virtual environment target/tools/NAME with the
# pinned packages of REQUIREMENTS_FILE, and prints its path. It is rebuilt when
# the requirements file changes. Nothing is installed outside target/.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: scripts/venv.sh NAME REQUIREMENTS_FILE}
requirements=${2:?usage: scripts/venv.sh NAME REQUIREMENTS_FILE}
python=${PYTHON:-python3}
venv="$PWD/target/tools/$name"
stamp="$venv/.requirements.sha256"
want=$("$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$requirements")

if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "venv: installing $requirements into target/tools/$name" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --requirement "$requirements" >&2
    echo "$want" >"$stamp"
fi
echo "$venv"
