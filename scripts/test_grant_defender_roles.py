#!/usr/bin/env python3
"""Offline test of scripts/grant-defender-roles.sh against a fake `az`.

The fake keeps a small Microsoft Graph tenant in a JSON file (the WindowsDefenderATP service
principal with its app roles, the managed identity, its app role assignments), answers the
`az` commands the script uses, applies `--query` with JMESPath and prints `-o tsv` the way the
Azure CLI (knack) does. Each scenario runs the real script and checks what it sent.

Needs jmespath (in the checks venv). Usage: python3 scripts/test_grant_defender_roles.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "grant-defender-roles.sh")

DEFENDER_APP_ID = "fc780465-2017-40d4-a0c5-307022471b92"
DEFENDER_SP = "11111111-2222-3333-4444-555555555555"
IDENTITY = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
READ_ALL = "ea8291d3-4b9a-44b5-bc3a-6cea3026dc79"  # made-up ids: the script must look them up
RESTRICT = "7e4ea198-1d3b-4a45-9b1f-8b56d09ec7a4"
OTHER = "93489bf5-0fbc-4f2d-b901-33f2fe08ff05"

FAKE_AZ = textwrap.dedent(
    r'''
    #!@PYTHON@
    """Fake `az`: just enough of the Azure CLI for grant-defender-roles.sh."""
    import json, os, sys, jmespath

    state_path = os.environ["FAKE_AZ_STATE"]
    state = json.load(open(state_path))
    argv = sys.argv[1:]
    state["calls"].append(argv)

    def opt(name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default

    def tsv_obj(v):
        if isinstance(v, list):
            return str(len(v))
        if isinstance(v, dict):
            return ""
        return v if isinstance(v, str) else str(v)

    def out(doc):
        q = opt("--query")
        if q:
            doc = jmespath.search(q, doc)
        if opt("--output", opt("-o")) == "tsv":
            rows = doc if isinstance(doc, list) else [doc]
            for row in rows:
                if isinstance(row, dict):
                    print("\t".join(tsv_obj(v) for _, v in sorted(row.items())))
                elif isinstance(row, list):
                    print("\t".join(tsv_obj(v) for v in row))
                elif isinstance(row, bool):
                    print(str(row).lower())
                else:
                    print(tsv_obj(row))
        elif opt("--output", opt("-o")) != "none":
            print(json.dumps(doc))

    def save():
        json.dump(state, open(state_path, "w"))

    def fail(msg, code=1):
        save()
        print("ERROR: " + msg, file=sys.stderr)
        sys.exit(code)

    graph = "https://graph.microsoft.com/v1.0/"
    if argv[:2] == ["cloud", "show"]:
        out({"name": state.get("cloud", "AzureCloud"),
             "endpoints": {"microsoftGraphResourceId": "https://graph.microsoft.com/"}})
    elif argv[:3] == ["ad", "sp", "show"]:
        if opt("--id") != state["defender"]["appId"] or state.get("no_defender"):
            fail("Resource does not exist")
        out(state["defender"])
    elif argv[:1] == ["rest"]:
        method, uri = opt("--method"), opt("--uri")
        assert uri.startswith(graph), uri
        path = uri[len(graph):]
        if method == "GET" and path == "servicePrincipals/" + state["identity"]["id"]:
            out(state["identity"])
        elif method == "GET" and path.startswith("servicePrincipals/" + state["identity"]["id"] + "/appRoleAssignments"):
            page = int(path.split("page=")[1]) if "page=" in path else 0
            items = [a for a in state["assignments"] if a["principalId"] == state["identity"]["id"]]
            size = state.get("page_size", 100)
            doc = {"value": items[page * size:(page + 1) * size]}
            if (page + 1) * size < len(items):
                doc["@odata.nextLink"] = graph + "servicePrincipals/" + state["identity"]["id"] + "/appRoleAssignments?page=" + str(page + 1)
            out(doc)
        elif method == "POST" and path == "servicePrincipals/" + state["defender"]["id"] + "/appRoleAssignedTo":
            body = json.loads(opt("--body"))
            if state.get("post_fails"):
                fail("Forbidden: Authorization_RequestDenied")
            if any(a["appRoleId"] == body["appRoleId"] and a["resourceId"] == body["resourceId"]
                   and a["principalId"] == body["principalId"] for a in state["assignments"]):
                fail("Bad Request: Permission being assigned already exists on the object")
            if body["appRoleId"] not in [r["id"] for r in state["defender"]["appRoles"]]:
                fail("Bad Request: Permission being assigned was not found on application")
            state["assignments"].append(dict(body, id="new-%d" % len(state["assignments"])))
            out({"id": "x"})
        else:
            fail("fake az: unexpected %s %s" % (method, uri))
    elif argv[:3] == ["deployment", "group", "create"]:
        out({})
    else:
        fail("fake az: unexpected command %r" % argv)
    save()
    '''
).lstrip()


def tenant(assignments=(), **extra) -> dict:
    return {
        "calls": [],
        "defender": {
            "appId": DEFENDER_APP_ID,
            "id": DEFENDER_SP,
            "appRoles": [
                {"value": "Machine.Read.All", "id": READ_ALL, "allowedMemberTypes": ["Application"]},
                {"value": "Machine.RestrictExecution", "id": RESTRICT, "allowedMemberTypes": ["Application"]},
                {"value": "Machine.Isolate", "id": OTHER, "allowedMemberTypes": ["Application"]},
            ],
        },
        "identity": {"id": IDENTITY, "displayName": "id-restrict-test"},
        "assignments": [
            {"principalId": IDENTITY, "resourceId": DEFENDER_SP, "appRoleId": r, "id": f"old-{i}"}
            for i, r in enumerate(assignments)
        ],
        **extra,
    }


class Runner:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fake-az-")
        az = os.path.join(self.dir, "az")
        with open(az, "w") as f:
            f.write(FAKE_AZ.replace("@PYTHON@", sys.executable))
        os.chmod(az, 0o755)
        self.state_path = os.path.join(self.dir, "state.json")
        self.passed = self.failed = 0

    def run(self, state: dict, *args: str, env: dict | None = None) -> tuple[int, str, dict]:
        with open(self.state_path, "w") as f:
            json.dump(state, f)
        proc = subprocess.run(
            ["bash", SCRIPT, *args],
            env={
                "PATH": self.dir + os.pathsep + os.environ["PATH"],
                "HOME": os.environ.get("HOME", "/tmp"),
                "FAKE_AZ_STATE": self.state_path,
                **(env or {}),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        with open(self.state_path) as f:
            after = json.load(f)
        return proc.returncode, proc.stdout + proc.stderr, after

    def expect(self, name: str, cond: bool, output: str) -> None:
        if cond:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name}\n" + textwrap.indent(output, "      | "))


def posts(state: dict) -> list[dict]:
    return [json.loads(c[c.index("--body") + 1]) for c in state["calls"] if c[:1] == ["rest"] and "POST" in c]


def main() -> int:
    r = Runner()
    ids = ("--principal-id", IDENTITY)

    code, out, st = r.run(tenant(), *ids)
    granted = sorted(p["appRoleId"] for p in posts(st))
    r.expect("fresh identity: both roles assigned, looked up by value",
             code == 0 and granted == sorted([READ_ALL, RESTRICT])
             and all(p["resourceId"] == DEFENDER_SP and p["principalId"] == IDENTITY for p in posts(st)), out)

    code, out, st2 = r.run(dict(st, calls=[]), *ids)
    r.expect("second run: nothing posted (idempotent)",
             code == 0 and posts(st2) == [] and "Nothing to do" in out, out)

    code, out, st = r.run(tenant([READ_ALL]), *ids)
    r.expect("one role already there: only the other is posted",
             code == 0 and [p["appRoleId"] for p in posts(st)] == [RESTRICT], out)

    # 250 unrelated assignments ahead of the existing one: it is found on the third page.
    many = tenant(page_size=100)
    many["assignments"] = [
        {"principalId": IDENTITY, "resourceId": "99999999-9999-9999-9999-999999999999", "appRoleId": OTHER, "id": f"o{i}"}
        for i in range(250)
    ] + [{"principalId": IDENTITY, "resourceId": DEFENDER_SP, "appRoleId": READ_ALL, "id": "r"}]
    code, out, st = r.run(many, *ids)
    r.expect("assignments over several pages: nextLink followed",
             code == 0 and [p["appRoleId"] for p in posts(st)] == [RESTRICT], out)

    code, out, st = r.run(tenant(), *ids, "--dry-run")
    r.expect("--dry-run posts nothing and says what it would do",
             code == 0 and posts(st) == [] and out.count("would assign") == 2, out)

    code, out, st = r.run(tenant(), env={"AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID": IDENTITY})
    r.expect("principal id from the azd environment", code == 0 and len(posts(st)) == 2, out)

    code, out, st = r.run(tenant(), "--from-azd", env={"AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID": IDENTITY})
    r.expect("azd hook without GRANT_DEFENDER_ROLES: prints the commands, calls nothing",
             code == 0 and st["calls"] == [] and "azd env set GRANT_DEFENDER_ROLES true" in out, out)

    code, out, st = r.run(tenant(), "--from-azd",
                          env={"AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID": IDENTITY, "GRANT_DEFENDER_ROLES": "true"})
    r.expect("azd hook with GRANT_DEFENDER_ROLES=true grants", code == 0 and len(posts(st)) == 2, out)

    no_restrict = tenant()
    no_restrict["defender"]["appRoles"] = no_restrict["defender"]["appRoles"][:1]
    code, out, st = r.run(no_restrict, *ids)
    r.expect("a role missing from WindowsDefenderATP fails loudly",
             code != 0 and "no application role Machine.RestrictExecution" in out, out)

    code, out, st = r.run(tenant(no_defender=True), *ids)
    r.expect("no WindowsDefenderATP service principal fails with a hint",
             code != 0 and "Defender for Endpoint" in out and posts(st) == [], out)

    code, out, st = r.run(tenant(post_fails=True), *ids)
    r.expect("a refused grant (no directory role) fails", code != 0 and "could not assign" in out, out)

    code, out, st = r.run(tenant())
    r.expect("no principal id: usage error, no calls", code != 0 and st["calls"] == [], out)

    code, out, st = r.run(tenant(), *ids, "--method", "bicep", "--resource-group", "rg-x")
    deploy = [c for c in st["calls"] if c[:3] == ["deployment", "group", "create"]]
    r.expect("--method bicep deploys infra/app/mde-roles.bicep with the principal id",
             code == 0 and len(deploy) == 1 and "infra/app/mde-roles.bicep" in deploy[0]
             and f"principalId={IDENTITY}" in deploy[0], out)

    for cloud in ["AzureUSGovernment", "AzureChinaCloud"]:
        code, out, st = r.run(tenant(cloud=cloud), *ids, "--method", "bicep", "--resource-group", "rg-x")
        deploy = [c for c in st["calls"] if c[:3] == ["deployment", "group", "create"]]
        r.expect(f"--method bicep in {cloud} (GCC High, DoD) is refused, pointing at the script's default",
                 code != 0 and deploy == [] and "public cloud only" in out and "--method rest" in out, out)

    print(f"grant-script: {r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
