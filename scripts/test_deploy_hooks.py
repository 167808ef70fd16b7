#!/usr/bin/env python3
"""The first azd hook (scripts/azd-preflight.sh) and scripts/package.sh's host checks, run
against fake azd, uname, rustup and rustc on PATH. Offline; standard library only.

Usage: python3 scripts/test_deploy_hooks.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHA_FIX = "azd config set alpha.language.custom on"
ALPHA_ENV = "AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM=true"

FAKE_AZD = r"""#!/bin/sh
# azd version / azd config get KEY, from FAKE_AZD_VERSION and FAKE_AZD_CONFIG ("key=value ...").
case "$1" in
version) echo "azd version $FAKE_AZD_VERSION (commit 0000000)" ;;
config)
    for pair in $FAKE_AZD_CONFIG; do
        if [ "${pair%%=*}" = "$3" ]; then echo "\"${pair#*=}\""; exit 0; fi
    done
    echo "ERROR: no value stored at path '$3'" >&2; exit 1 ;;
*) exit 2 ;;
esac
"""

FAKE_UNAME = r"""#!/bin/sh
case "$1" in -s) echo "$FAKE_UNAME_S" ;; -m) echo "$FAKE_UNAME_M" ;; *) echo "$FAKE_UNAME_S" ;; esac
"""

FAKE_RUSTUP = r"""#!/bin/sh
echo "$@" >> "$FAKE_LOG"
"""

FAKE_RUSTC = r"""#!/bin/sh
[ "$1 $2" = "--print sysroot" ] && echo "$FAKE_SYSROOT"
"""


class Checks:
    def __init__(self) -> None:
        self.passed = self.failed = 0

    def check(self, cond: bool, name: str, failure: str = "") -> None:
        if cond:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name}" + (f": {failure}" if failure else ""))


def fake_bin(tmp: str, tools: dict[str, str]) -> str:
    path = os.path.join(tmp, "bin")
    os.makedirs(path, exist_ok=True)
    for name, text in tools.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(path, name), 0o755)
    os.symlink(sys.executable, os.path.join(path, "python3"))
    return path


def run(args: list[str], path: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Only the fakes and the base system: no real azd, rustup or cargo.
    full = {"PATH": f"{path}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)


def preflight(c: Checks) -> None:
    cases = [
        # (name, version, config, env, ok, what the message must say)
        ("azd too old", "1.19.2", "alpha.language.custom=on", {}, False, "1.20 or newer"),
        ("alpha feature off", "1.20.0", "", {}, False, ALPHA_FIX),
        ("alpha feature off (env names the switch)", "1.21.3", "", {}, False, ALPHA_ENV),
        ("alpha feature set off by env", "1.20.0", "alpha.language.custom=on",
         {"AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM": "false"}, False, "AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM"),
        ("alpha feature on in azd config", "1.20.0", "alpha.language.custom=on", {}, True, "on"),
        ("all alpha features on", "1.22.0", "alpha.all=on", {}, True, "on"),
        ("alpha feature on by env", "1.20.1", "", {"AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM": "true"}, True, "on"),
        ("azd 2.x", "2.0.0", "alpha.language.custom=on", {}, True, "on"),
    ]
    for name, version, config, env, ok, needle in cases:
        with tempfile.TemporaryDirectory() as tmp:
            path = fake_bin(tmp, {"azd": FAKE_AZD})
            r = run(["bash", "scripts/azd-preflight.sh"], path,
                    {"FAKE_AZD_VERSION": version, "FAKE_AZD_CONFIG": config, **env})
            out = r.stdout + r.stderr
            c.check((r.returncode == 0) == ok and needle in out,
                    f"azd preflight, {name}: {'passes' if ok else 'stops'} and says {needle!r}",
                    f"exit {r.returncode}: {out.strip()}")


def package_host(c: Checks) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "rustup.log")
        sysroot = os.path.join(tmp, "sysroot")
        tools = {"uname": FAKE_UNAME, "cargo": "#!/bin/sh\nexit 0\n", "rustc": FAKE_RUSTC}
        path = fake_bin(tmp, {**tools, "rustup": FAKE_RUSTUP})
        base = {"FAKE_LOG": log, "FAKE_SYSROOT": sysroot}

        for s, m in [("MINGW64_NT-10.0-19045", "x86_64"), ("FreeBSD", "amd64"), ("Linux", "riscv64")]:
            r = run(["bash", "scripts/package.sh", "--check-host"], path,
                    {**base, "FAKE_UNAME_S": s, "FAKE_UNAME_M": m})
            c.check(r.returncode != 0 and f"cannot build from {s}/{m}" in r.stderr
                    and ("WSL" in r.stderr) == s.startswith("MINGW"),
                    f"package.sh refuses to build from {s} {m}, saying why", r.stderr.strip())
        c.check(not os.path.exists(log), "package.sh stops before touching rustup on such a host")

        for s, m in [("Linux", "x86_64"), ("Darwin", "arm64")]:
            r = run(["bash", "scripts/package.sh", "--check-host"], path,
                    {**base, "FAKE_UNAME_S": s, "FAKE_UNAME_M": m})
            added = open(log).read().split("\n") if os.path.exists(log) else []
            c.check(r.returncode == 0 and "target add x86_64-unknown-linux-gnu" in added,
                    f"package.sh on {s} {m} adds the Rust target with rustup",
                    f"exit {r.returncode}: {r.stderr.strip()} rustup saw {added}")

        no_rustup = os.path.join(tmp, "no-rustup")
        path = fake_bin(no_rustup, tools)
        r = run(["bash", "scripts/package.sh", "--check-host"], path,
                {**base, "FAKE_UNAME_S": "Darwin", "FAKE_UNAME_M": "arm64"})
        c.check(r.returncode != 0 and "not installed and rustup is not here" in r.stderr,
                "package.sh without rustup and without the target says so", r.stderr.strip())
        os.makedirs(os.path.join(sysroot, "lib/rustlib/x86_64-unknown-linux-gnu"))
        r = run(["bash", "scripts/package.sh", "--check-host"], path,
                {**base, "FAKE_UNAME_S": "Darwin", "FAKE_UNAME_M": "arm64"})
        c.check(r.returncode == 0, "package.sh without rustup but with the target goes on", r.stderr.strip())


def main() -> int:
    c = Checks()
    preflight(c)
    package_host(c)
    print(f"deploy-hooks: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
