#!/usr/bin/env python3
"""Check a deployment package (dist/app.zip) the way the Functions host will use it.

Usage: python3 scripts/check_package.py [dist/app.zip] [--self-test] [--rootfs DIR]

Static checks (the application structure, host.json and function.json of
https://learn.microsoft.com/azure/azure-functions/functions-custom-handlers):
  - the layout: host.json at the root, one folder per function with its function.json, the
    executable; nothing else (no sources, no local.settings.json, no target/), and every
    */function.json of the repository;
  - host.json: version 2.0, the extension bundle, customHandler.description.defaultExecutablePath
    naming a file in the zip that has its execute bits set in the zip (Flex mounts the package
    read-only, so nothing can chmod it later);
  - every function.json parses: one httpTrigger named req with its methods listed, one http
    output named res, authLevel function (ANONYMOUS_FUNCTIONS excepted, with the reason), no two
    functions on the same route and method; restrict-code-execution exactly as documented
    (POST, route restrict-code-execution);
  - the executable is an x86-64 ELF that runs on the Functions Linux image (glibc 2.31): static,
    or needing only glibc's own libraries and no GLIBC_ symbol version newer than 2.31
    (objdump -T, else readelf --dyn-syms).

Then it unpacks the zip into a temporary folder, applying the modes stored in the zip and
nothing else, starts `handler simulator` from there, starts the handler as the host does
(FUNCTIONS_CUSTOMHANDLER_PORT set, working directory the unpacked root), polls GET / until it
answers, restricts a simulated device in forwarded mode (POST /api/restrict-code-execution:
201 "requested") and in payload mode (POST /restrict-code-execution with the host's envelope:
HTTP 200, Outputs.res.statusCode 201), and checks that every function's route and method is
served in both modes.

--self-test then breaks copies of the zip in the ways that matter and requires each to be
refused. --rootfs runs the package inside a root file system (chroot, needs root), such as the
Debian bullseye one scripts/glibc231-rootfs.sh makes.

Exit status 0 when every check passed; it prints one line per check and a summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import PurePosixPath

MAX_GLIBC = (2, 31)
# Libraries that are part of glibc itself (plus libgcc_s, which every glibc image has).
ALLOWED_NEEDED = {
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "ld-linux-x86-64.so.2",
    "libgcc_s.so.1",
}
# The core function, exactly as function.json must declare it. Every other function.json is
# held to the generic rules below and must be served by the handler in both modes (live check).
EXPECTED_FUNCTIONS = {
    "restrict-code-execution": {"route": "restrict-code-execution", "methods": ["post"]},
}
# Functions allowed to run without a function key, and why. Anything else must be authLevel
# function: the others read or change Defender state.
ANONYMOUS_FUNCTIONS = {
    "openapi": "serves the static API description (openapi.json) for Logic Apps; no Defender call",
}
# Queue-triggered functions (containment jobs): the queue each reads, from the app's storage.
QUEUE_FUNCTIONS = {"job-worker": "restrict-jobs", "job-poison": "restrict-jobs-poison"}
# Timer-triggered functions and the app setting their schedule comes from (an unset %...%
# setting breaks the binding, so infra and local.settings.json.example set it).
TIMER_FUNCTIONS = {"reconcile": "RECONCILE_SCHEDULE"}
# Error codes that mean "the handler does not serve this" (README Troubleshooting).
NOT_SERVED = {"route_not_found", "method_not_allowed"}
# Seeded simulator devices (README "The simulator").
DEVICE_FORWARDED = "3f1c7a52-8d4e-4b6a-9c21-5e7f0a1b2c3d"  # DESKTOP-ALPHA
DEVICE_PAYLOAD = "c4d5e6f7-0819-4a2b-8c3d-4e5f60718293"  # WIN11-CHARLIE
IDENTITY_HEADER = "sim-identity-header"
START_TIMEOUT_S = 30  # the host's InitializationTimeout


class Checks:
    def __init__(self, quiet: bool = False) -> None:
        self.passed = 0
        self.failed = 0
        self.failures: list[str] = []
        self.quiet = quiet

    def ok(self, name: str, detail: str = "") -> None:
        self.passed += 1
        if not self.quiet:
            print(f"ok    {name}" + (f": {detail}" if detail else ""))

    def fail(self, name: str, detail: str) -> None:
        self.failed += 1
        self.failures.append(name)
        if not self.quiet:
            print(f"FAIL  {name}: {detail}")

    def check(self, cond: bool, name: str, detail: str = "", failure: str = "") -> bool:
        if cond:
            self.ok(name, detail)
        else:
            self.fail(name, failure or detail or "failed")
        return cond


def entry_mode(info: zipfile.ZipInfo) -> int:
    """The Unix st_mode stored in a zip entry (0 when the zip was not made on Unix)."""
    return (info.external_attr >> 16) if info.create_system == 3 else 0


def is_dir_entry(info: zipfile.ZipInfo) -> bool:
    return info.filename.endswith("/")


# ---------------------------------------------------------------- static checks


def check_layout(c: Checks, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    entries = {i.filename: i for i in zf.infolist()}
    bad_names = [
        n for n in entries if n.startswith("/") or "\\" in n or ".." in PurePosixPath(n).parts
    ]
    c.check(not bad_names, "entry names are relative POSIX paths", failure=f"bad: {bad_names}")
    c.check(
        len(entries) == len(zf.infolist()),
        "no duplicate entries",
        failure="the same name appears twice",
    )
    c.check("host.json" in entries, "host.json at the zip root", failure="missing")
    forbidden = [
        n
        for n in entries
        if PurePosixPath(n).parts[0] in {"src", "target", "tests", "infra", ".git", ".github", "dist"}
        or PurePosixPath(n).name
        in {"Cargo.toml", "Cargo.lock", "local.settings.json", "local.settings.json.example", ".funcignore"}
    ]
    c.check(not forbidden, "no sources or local settings in the package", failure=f"found {forbidden}")
    return entries


def check_host_json(c: Checks, zf: zipfile.ZipFile, entries: dict) -> tuple[str, list[str], str] | None:
    try:
        host = json.loads(zf.read("host.json"))
    except (KeyError, ValueError) as e:
        c.fail("host.json parses", str(e))
        return None
    c.ok("host.json parses")
    c.check(host.get("version") == "2.0", "host.json version is 2.0", failure=repr(host.get("version")))
    bundle = host.get("extensionBundle", {})
    c.check(
        bundle.get("id") == "Microsoft.Azure.Functions.ExtensionBundle",
        "host.json has the extension bundle (Flex expects one)",
        failure=repr(bundle),
    )
    handler = host.get("customHandler")
    if not isinstance(handler, dict) or not isinstance(handler.get("description"), dict):
        c.fail("host.json customHandler.description", "missing")
        return None
    desc = handler["description"]
    exe = desc.get("defaultExecutablePath")
    if not isinstance(exe, str) or not exe or os.path.isabs(exe) or "%" in exe:
        c.fail("defaultExecutablePath is a relative path", repr(exe))
        return None
    exe = str(PurePosixPath(exe))
    info = entries.get(exe)
    if not c.check(
        info is not None and not is_dir_entry(info),
        "defaultExecutablePath names a file in the zip",
        exe,
        failure=f"{exe!r} is not a file in the zip",
    ):
        return None
    mode = entry_mode(info)
    c.check(
        stat.S_ISREG(mode) and mode & 0o111 == 0o111,
        "executable has its execute bits in the zip",
        f"{stat.filemode(mode)}",
        failure=f"mode {oct(mode)} (create_system {info.create_system})",
    )
    args = desc.get("arguments", [])
    c.check(
        isinstance(args, list) and all(isinstance(a, str) for a in args),
        "customHandler.description.arguments is a list of strings",
        failure=repr(args),
    )
    workdir = desc.get("workingDirectory", "") or ""
    c.check(
        not os.path.isabs(workdir),
        "customHandler.description.workingDirectory is relative to the app root",
        repr(workdir),
        failure=repr(workdir),
    )
    c.check(
        "enableForwardingHttpRequest" in handler or "enableProxyingHttpRequest" in handler,
        "host.json chooses the HTTP mode explicitly",
        failure="neither enableForwardingHttpRequest nor enableProxyingHttpRequest is set",
    )
    return exe, args, workdir


def check_functions(c: Checks, zf: zipfile.ZipFile, entries: dict) -> tuple[dict[str, dict], list[str]]:
    """Check every function.json; return ({function name: {route, methods}}, other files)."""
    found: dict[str, dict] = {}
    queued: list[str] = []
    for name in sorted(entries):
        parts = PurePosixPath(name).parts
        if len(parts) == 2 and parts[1] == "function.json":
            fn = parts[0]
            try:
                doc = json.loads(zf.read(name))
            except ValueError as e:
                c.fail(f"{name} parses", str(e))
                continue
            c.ok(f"{name} parses")
            bindings = doc.get("bindings") if isinstance(doc, dict) else None
            if not isinstance(bindings, list):
                c.fail(f"{name} bindings", "no bindings list")
                continue
            triggers = [b for b in bindings if isinstance(b, dict) and b.get("direction") == "in"]
            outs = [b for b in bindings if isinstance(b, dict) and b.get("direction") == "out"]
            trig = triggers[0] if len(triggers) == 1 else {}
            out = outs[0] if len(outs) == 1 else {}
            if fn in TIMER_FUNCTIONS:
                c.check(
                    len(triggers) == 1 and not outs and trig.get("type") == "timerTrigger"
                    and trig.get("name") == "timer"
                    and trig.get("schedule") == f"%{TIMER_FUNCTIONS[fn]}%",
                    f"{fn}: one timerTrigger named timer on %{TIMER_FUNCTIONS[fn]}%",
                    failure=json.dumps(bindings),
                )
                queued.append(fn)
                continue
            if fn in QUEUE_FUNCTIONS:
                c.check(
                    len(triggers) == 1 and not outs and trig.get("type") == "queueTrigger"
                    and trig.get("name") == "message" and trig.get("queueName") == QUEUE_FUNCTIONS[fn]
                    and trig.get("connection") == "AzureWebJobsStorage",
                    f"{fn}: one queueTrigger named message on {QUEUE_FUNCTIONS[fn]} (AzureWebJobsStorage)",
                    failure=json.dumps(bindings),
                )
                queued.append(fn)
                continue
            methods = sorted(m.lower() for m in trig.get("methods", []) or [])
            route = trig.get("route") or fn
            c.check(
                len(triggers) == 1 and trig.get("type") == "httpTrigger" and trig.get("name") == "req",
                f"{fn}: one input binding, an httpTrigger named req",
                failure=json.dumps(triggers),
            )
            auth = trig.get("authLevel", "function")
            if fn in ANONYMOUS_FUNCTIONS:
                c.check(auth in {"anonymous", "function"}, f"{fn}: authLevel {auth} ({ANONYMOUS_FUNCTIONS[fn]})",
                        failure=repr(auth))
            else:
                c.check(auth == "function", f"{fn}: authLevel function", failure=repr(auth))
            c.check(bool(methods), f"{fn}: methods listed (not every method)", ", ".join(methods),
                    failure="no methods: the host would accept any")
            c.check(
                len(outs) == 1 and out.get("type") == "http" and out.get("name") == "res",
                f"{fn}: one output binding, http named res",
                failure=json.dumps(outs),
            )
            expected = EXPECTED_FUNCTIONS.get(fn)
            if expected:
                c.check(methods == expected["methods"], f"{fn}: methods {expected['methods']}",
                        failure=repr(methods))
                c.check(route == expected["route"], f"{fn}: route {expected['route']}", failure=repr(route))
            found[fn] = {"route": route, "methods": methods}
    missing = sorted(set(EXPECTED_FUNCTIONS) - set(found))
    c.check(not missing, f"the package has {', '.join(sorted(EXPECTED_FUNCTIONS))}", failure=f"missing {missing}")
    routes = [(f["route"].lower(), m) for f in found.values() for m in f["methods"]]
    c.check(len(routes) == len(set(routes)), "no two functions share a route and method",
            failure=repr(sorted(routes)))
    # Run from the repository: the package must hold every function folder there is.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    in_repo = {d for d in os.listdir(repo) if os.path.isfile(os.path.join(repo, d, "function.json"))}
    if in_repo:
        packaged = set(found) | set(queued)
        c.check(in_repo == packaged, "every */function.json of the repository is in the package",
                ", ".join(sorted(packaged)), failure=f"repository {sorted(in_repo)}, package {sorted(packaged)}")
    others = [
        n
        for n, i in entries.items()
        if not is_dir_entry(i)
        and n != "host.json"
        and not (len(PurePosixPath(n).parts) == 2 and PurePosixPath(n).name == "function.json")
    ]
    return found, others


def glibc_versions(path: str) -> tuple[list[tuple[int, ...]], str]:
    """GLIBC_x.y versions the binary references, from objdump -T or readelf --dyn-syms."""
    for cmd in (["objdump", "-T", path], ["readelf", "--dyn-syms", "-W", path]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            versions = {tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", out)}
            return sorted(versions), cmd[0]
    raise RuntimeError("neither objdump nor readelf is installed (Debian package binutils)")


def check_binary(c: Checks, path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(64)
    c.check(
        head[:4] == b"\x7fELF" and head[4] == 2 and int.from_bytes(head[18:20], "little") == 62,
        "executable is a 64-bit x86-64 ELF",
        failure=repr(head[:20]),
    )
    readelf = shutil.which("readelf")
    dynamic = ""
    if readelf:
        dynamic = subprocess.run([readelf, "-d", "-W", path], capture_output=True, text=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
    if not needed and "There is no dynamic section" in dynamic:
        c.ok("executable is static: no glibc requirement")
        return
    c.check(
        needed <= ALLOWED_NEEDED,
        "executable needs only glibc's own libraries",
        ", ".join(sorted(needed)),
        failure=f"also needs {sorted(needed - ALLOWED_NEEDED)}",
    )
    versions, tool = glibc_versions(path)
    newest = versions[-1] if versions else ()
    too_new = [".".join(map(str, v)) for v in versions if v > MAX_GLIBC]
    c.check(
        not too_new,
        f"no GLIBC_ symbol version newer than {'.'.join(map(str, MAX_GLIBC))} ({tool})",
        f"newest GLIBC_{'.'.join(map(str, newest))}" if newest else "no versioned symbols",
        failure=f"needs GLIBC_{', GLIBC_'.join(too_new)}",
    )


# ---------------------------------------------------------------- run as the host would


def unpack(zf: zipfile.ZipFile, dest: str) -> None:
    """Extract with exactly the modes stored in the zip (zipfile itself ignores them)."""
    for info in zf.infolist():
        target = os.path.join(dest, *PurePosixPath(info.filename).parts)
        if is_dir_entry(info):
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        os.chmod(target, stat.S_IMODE(entry_mode(info)) or 0o644)


def free_port() -> int:
    # As the host does: bind 127.0.0.1:0, read the port, release it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Proc:
    """A child process whose output is collected in the background."""

    def __init__(self, name: str, argv: list[str], cwd: str, env: dict, rootfs: str | None = None) -> None:
        """Start argv in cwd; with rootfs, chroot there first (argv and cwd are then inside it)."""
        self.name = name
        self.lines: list[str] = []

        def enter_rootfs() -> None:
            os.chroot(rootfs)
            os.chdir(cwd)

        self.proc = subprocess.Popen(
            argv, cwd=None if rootfs else cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=enter_rootfs if rootfs else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                return None
            time.sleep(0.025)
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        return "\n".join(f"      {self.name}| {line}" for line in self.lines[-n:])


def problem_code(raw: bytes) -> str:
    """The `code` of a problem+json answer, or ''."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    return str(doc.get("code", "")) if isinstance(doc, dict) else ""


def wait_ready(proc: Proc, port: int) -> float | None:
    """Poll GET / every 25 ms until any HTTP answer, as the host does; seconds taken."""
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if proc.proc.poll() is not None:
            return None
        try:
            request(port, "GET", "/", timeout=2)
            return time.monotonic() - start
        except (ConnectionError, OSError):
            time.sleep(0.025)
    return None


def run_packaged(c: Checks, zf: zipfile.ZipFile, exe: str, args: list[str], workdir: str,
                 functions: dict[str, dict], rootfs: str | None = None) -> None:
    """Unpack and run the package; with rootfs, inside that root file system (chroot)."""
    root = tempfile.mkdtemp(prefix="app-package-", dir=rootfs)
    # Paths as the processes see them: inside the rootfs when there is one.
    inner_root = "/" + os.path.relpath(root, rootfs) if rootfs else root
    where = f" in {rootfs}" if rootfs else ""
    procs: list[Proc] = []
    try:
        unpack(zf, root)
        exe_path = os.path.join(root, *PurePosixPath(exe).parts)
        c.check(os.access(exe_path, os.X_OK), "unpacked executable is executable (mode from the zip only)")
        check_binary(c, exe_path)
        exe_path = os.path.join(inner_root, *PurePosixPath(exe).parts)

        base_env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "TZ"}}

        # The simulated Defender tenant and managed-identity endpoint, from the package too.
        sim = Proc("simulator", [exe_path, "simulator", "--port", "0"], inner_root,
                   {**base_env, "RUST_LOG": "warn"}, rootfs)
        procs.append(sim)
        m = sim.wait_line(r"Simulated Defender tenant at (http://127\.0\.0\.1:(\d+))", START_TIMEOUT_S)
        if not c.check(m is not None, f"packaged `handler simulator` starts{where}",
                       failure="no URL printed\n" + sim.tail()):
            return
        sim_url, sim_port = m.group(1), int(m.group(2))

        # The handler, exactly as the host starts it.
        port = free_port()
        env = {
            **base_env,
            "FUNCTIONS_CUSTOMHANDLER_PORT": str(port),
            "FUNCTIONS_HTTPWORKER_PORT": str(port),
            "FUNCTIONS_CUSTOMHANDLER_WORKER_ID": str(uuid.uuid4()),
            "FUNCTIONS_HTTPWORKER_ID": str(uuid.uuid4()),
            "FUNCTIONS_APP_ROOT_PATH": inner_root,
            "FUNCTIONS_WORKER_RUNTIME": "custom",
            "DEFENDER_API_URL": sim_url,
            "IDENTITY_ENDPOINT": f"{sim_url}/_identity/token",
            "IDENTITY_HEADER": IDENTITY_HEADER,
            "RUST_LOG": "info",
        }
        cwd = os.path.join(inner_root, workdir) if workdir else inner_root
        handler = Proc("handler", [exe_path, *args], cwd, env, rootfs)
        procs.append(handler)
        took = wait_ready(handler, port)
        if not c.check(took is not None, f"packaged handler answers GET / (host readiness poll){where}",
                       f"after {took:.2f} s" if took is not None else "",
                       failure=f"no answer within {START_TIMEOUT_S} s\n" + handler.tail()):
            return

        restrict_action_id = None
        for fn, spec in sorted(functions.items()):
            if fn not in EXPECTED_FUNCTIONS:
                continue
            # Forwarded or proxied (host.json enableProxyingHttpRequest): /api/<route>.
            invocation = str(uuid.uuid4())
            body = json.dumps({"deviceId": DEVICE_FORWARDED, "callerName": "package-check"}).encode()
            status, _, raw = request(port, "POST", f"/api/{spec['route']}", body, {
                "Content-Type": "application/json",
                "X-Azure-Functions-InvocationId": invocation,
            })
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {}
            c.check(
                status == 201 and answer.get("outcome") == "requested" and answer.get("deviceId") == DEVICE_FORWARDED,
                f"{fn}: forwarded POST /api/{spec['route']} restricts a simulated device{where}",
                f"201 {answer.get('outcome')}, action {answer.get('action', {}).get('id')}",
                failure=f"HTTP {status}: {raw[:500]!r}\n" + handler.tail(),
            )
            restrict_action_id = (answer.get("action") or {}).get("id")
            c.check(
                answer.get("invocationId") == invocation,
                f"{fn}: answer carries the host's invocation id",
                failure=repr(answer.get("invocationId")),
            )

            # Payload mode (the host's envelope): /<FunctionName>.
            caller_body = json.dumps({"deviceId": DEVICE_PAYLOAD, "release": False})
            envelope = {
                "Data": {
                    "req": {
                        "Url": f"https://example.azurewebsites.net/api/{spec['route']}",
                        "Method": "POST",
                        "Query": {},
                        "Headers": {"Content-Type": ["application/json"]},
                        "Params": {},
                        "Identities": [],
                        "Body": caller_body,
                    }
                },
                "Metadata": {"sys": {"MethodName": fn, "UtcNow": "2026-11-28T00:00:00Z", "RandGuid": str(uuid.uuid4())}},
            }
            status, _, raw = request(port, "POST", f"/{fn}", json.dumps(envelope).encode(), {
                "Content-Type": "application/json; charset=utf-8",
                "X-Azure-Functions-InvocationId": str(uuid.uuid4()),
            })
            try:
                res = json.loads(raw)["Outputs"]["res"]
                inner = json.loads(res["body"])
            except (ValueError, KeyError, TypeError):
                res, inner = {}, {}
            c.check(
                status == 200 and str(res.get("statusCode")) == "201" and inner.get("outcome") == "requested",
                f"{fn}: payload-mode POST /{fn} answers 200 with Outputs.res.statusCode 201{where}",
                f"Outputs.res.statusCode {res.get('statusCode')}, {inner.get('outcome')}",
                failure=f"HTTP {status}: {raw[:500]!r}\n" + handler.tail(),
            )

        # Every function.json: the handler serves its route and method in both modes.
        action_id = restrict_action_id or str(uuid.uuid4())
        for fn, spec in sorted(functions.items()):
            path = "/api/" + re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: action_id, spec["route"])
            params = {m.group(1): action_id for m in re.finditer(r"\{(\w+)(:[^}]*)?\}", spec["route"])}
            method = spec["methods"][0].upper()
            body = None if method == "GET" else b"{}"
            headers = {"X-Azure-Functions-InvocationId": str(uuid.uuid4())}
            if body is not None:
                headers["Content-Type"] = "application/json"
            if fn not in EXPECTED_FUNCTIONS:
                status, _, raw = request(port, method, path, body, headers)
                code = problem_code(raw)
                c.check(code not in NOT_SERVED and status < 500,
                        f"{fn}: forwarded {method} {path} is served{where}", f"HTTP {status}{' ' + code if code else ''}",
                        failure=f"HTTP {status} {code}: {raw[:300]!r}\n" + handler.tail())
            envelope = {
                "Data": {"req": {
                    "Url": f"https://example.azurewebsites.net{path}", "Method": method, "Query": {},
                    "Headers": {"Content-Type": ["application/json"]} if body is not None else {},
                    "Params": params, "Identities": [],
                    **({"Body": body.decode()} if body is not None else {}),
                }},
                "Metadata": {"sys": {"MethodName": fn, "UtcNow": "2026-11-28T00:00:00Z", "RandGuid": str(uuid.uuid4())}},
            }
            status, _, raw = request(port, "POST", f"/{fn}", json.dumps(envelope).encode(), {
                "Content-Type": "application/json; charset=utf-8",
                "X-Azure-Functions-InvocationId": str(uuid.uuid4()),
            })
            try:
                res = json.loads(raw)["Outputs"]["res"]
                inner_status = int(res["statusCode"])
                code = problem_code(res.get("body", "").encode() if isinstance(res.get("body"), str) else b"")
            except (ValueError, KeyError, TypeError):
                inner_status, code = 0, "no Outputs.res"
            c.check(status == 200 and inner_status and code not in NOT_SERVED and inner_status < 500,
                    f"{fn}: payload-mode POST /{fn} is served{where}", f"Outputs.res.statusCode {inner_status}",
                    failure=f"HTTP {status}, {code}: {raw[:300]!r}\n" + handler.tail())

        # What the simulated tenant saw: a managed-identity token request and the actions.
        status, _, raw = request(sim_port, "GET", "/_sim/actions")
        try:
            actions = json.loads(raw)
            actions = actions.get("value", actions) if isinstance(actions, dict) else actions
        except ValueError:
            actions = []
        restricted = sorted({a.get("machineId", "") for a in actions if a.get("type") == "RestrictCodeExecution"})
        c.check(
            status == 200 and len(restricted) >= 2,
            "simulated Defender recorded a RestrictCodeExecution action per invocation",
            f"{len(restricted)} machine(s)",
            failure=f"HTTP {status}: {raw[:500]!r}",
        )
        status, _, raw = request(sim_port, "GET", "/_sim/requests")
        c.check(
            status == 200 and b"/_identity/token" in raw,
            "the handler took its token from the managed-identity endpoint",
            failure=f"HTTP {status}: no /_identity/token request in {raw[:300]!r}",
        )
        summaries = []
        for line in handler.lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and "outcome" in json.dumps(doc):
                summaries.append(doc)
        c.check(
            len(summaries) >= 2,
            "the handler logged JSON summary lines on stdout",
            f"{len(summaries)} line(s)",
            failure=f"{len(summaries)} summary lines\n" + handler.tail(),
        )
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(root, ignore_errors=True)


def check_zip(path: str, c: Checks, run: bool = True, rootfs: str | None = None) -> None:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        c.fail("package is a zip", str(e))
        return
    with zf:
        bad = zf.testzip()
        c.check(bad is None, "zip CRCs are valid", failure=f"corrupt entry {bad}")
        entries = check_layout(c, zf)
        host = check_host_json(c, zf, entries)
        functions, others = check_functions(c, zf, entries)
        if host:
            exe = host[0]
            extra = [n for n in others if n != exe]
            c.check(not extra, "nothing in the package but host.json, function folders and the executable",
                    failure=f"also {extra}")
            if run:
                run_packaged(c, zf, *host, functions, rootfs=rootfs)
            else:
                root = tempfile.mkdtemp(prefix="app-package-")
                try:
                    unpack(zf, root)
                    check_binary(c, os.path.join(root, *PurePosixPath(exe).parts))
                finally:
                    shutil.rmtree(root, ignore_errors=True)


def rewrite(src: str, dest: str, change, add: tuple = ()) -> None:
    """Copy a zip, letting change(info, data) return a new (info, data) or None to drop
    it; add is extra (name, data) entries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            out = change(info, zin.read(info))
            if out is not None:
                zout.writestr(*out)
        for name, data in add:
            zout.writestr(name, data)


def self_test(good: str) -> int:
    """Break a good package in the ways that matter and make sure the check notices each."""
    tmp = tempfile.mkdtemp(prefix="package-selftest-")
    passed = failed = 0

    def mutation(name: str, change, must_fail: str, add: tuple = (), live: bool = False) -> None:
        nonlocal passed, failed
        bad = os.path.join(tmp, "bad.zip")
        rewrite(good, bad, change, add)
        c = Checks(quiet=True)
        check_zip(bad, c, run=live)
        if any(must_fail in f for f in c.failures):
            passed += 1
            print(f"ok    self-test: {name} is caught ({must_fail!r})")
        else:
            failed += 1
            print(f"FAIL  self-test: {name} was not caught; failures: {c.failures}")

    def strip_exec(info, data):
        if info.filename == "handler":
            info.external_attr = (stat.S_IFREG | 0o644) << 16
        return info, data

    def no_unix_mode(info, data):
        info.create_system = 0
        info.external_attr = 0
        return info, data

    def edit_json(entry, edit):
        def change(info, data):
            if info.filename == entry:
                doc = json.loads(data)
                edit(doc)
                data = json.dumps(doc).encode()
            return info, data
        return change

    def set_exe(doc):
        doc["customHandler"]["description"]["defaultExecutablePath"] = "target/release/handler"

    def anonymous(doc):
        doc["bindings"][0]["authLevel"] = "anonymous"

    def get_method(doc):
        doc["bindings"][0]["methods"] = ["get", "post"]

    def rename_out(doc):
        doc["bindings"][1]["name"] = "$return"

    def keep(info, data):
        return info, data

    mutation("handler without its execute bit", strip_exec, "execute bits")
    mutation("a zip without Unix modes (made on Windows)", no_unix_mode, "execute bits")
    mutation("defaultExecutablePath outside the zip",
             edit_json("host.json", set_exe), "defaultExecutablePath names a file")
    mutation("an anonymous function", edit_json("restrict-code-execution/function.json", anonymous), "authLevel")
    mutation("GET allowed", edit_json("restrict-code-execution/function.json", get_method), "methods")
    mutation("output not named res", edit_json("restrict-code-execution/function.json", rename_out),
             "http named res")
    def unserved_route(doc):
        doc["bindings"][0]["route"] = "restrict-code-execution/not-served/{actionId}"

    mutation("a function.json whose route the handler does not serve (live)",
             edit_json("action-status/function.json", unserved_route), "is served", live=True)
    mutation("no host.json", lambda i, d: (i, d) if i.filename != "host.json" else None,
             "host.json at the zip root")
    mutation("local.settings.json in the package", keep, "no sources or local settings",
             add=(("local.settings.json", b"{}"),))
    mutation("a stray file in the package", keep, "nothing in the package but",
             add=(("notes.txt", b"x"),))

    # A binary linked against this machine's newer glibc must be refused.
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        src = os.path.join(tmp, "hello.c")
        exe = os.path.join(tmp, "hello")
        with open(src, "w") as f:
            f.write("#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n")
        subprocess.run([cc, "-O2", "-o", exe, src], check=True)
        versions, _ = glibc_versions(exe)
        if versions and versions[-1] > MAX_GLIBC:
            with open(exe, "rb") as f:
                native = f.read()
            mutation("a binary linked against this machine's glibc "
                     f"(GLIBC_{'.'.join(map(str, versions[-1]))})",
                     lambda i, d: (i, native) if i.filename == "handler" else (i, d), "GLIBC_")
        else:
            print(f"skip  self-test: this machine's glibc is not newer than {MAX_GLIBC}")
    else:
        print("skip  self-test: no C compiler for the glibc case")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"self-test: {passed} passed, {failed} failed")
    return failed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zip", nargs="?", default="dist/app.zip")
    parser.add_argument("--self-test", action="store_true",
                        help="also check that broken copies of the package are refused")
    parser.add_argument("--rootfs", metavar="DIR",
                        help="run the package inside this root file system (chroot; needs root), "
                             "e.g. a Debian bullseye (glibc 2.31) one made by debootstrap")
    opts = parser.parse_args(argv[1:])
    path = opts.zip
    c = Checks()
    where = f" inside {opts.rootfs}" if opts.rootfs else ""
    print(f"== package check: {path}{where}")
    check_zip(path, c, rootfs=os.path.abspath(opts.rootfs) if opts.rootfs else None)
    print(f"package: {c.passed} passed, {c.failed} failed")
    failed = c.failed
    if opts.self_test and failed == 0:
        print(f"== package check self-test: mutations of {path}")
        failed += self_test(path)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
