#!/usr/bin/env python3
"""Consistency checks between the README, infra/, azure.yaml, the workflows and the scripts.

Usage: python3 scripts/check_deploy_config.py   (needs PyYAML: the checks venv has it)

- infra JSON files parse; bicepconfig.json declares the Microsoft Graph v1.0 extension;
- every README "Configuration" setting is a main.bicep parameter with the README's default and
  reaches the app settings, or is listed below as deliberately not deployed (with the reason);
- main.parameters.json only names main.bicep parameters, and gives the same defaults;
- the grant module and the grant script grant the same roles on the same app id;
- azure.yaml deploys the zip scripts/package.sh builds, with hooks that exist;
- the workflows run .ci/run, package + check + OIDC login + the Functions action;
- every repository path the README's Deploy section names exists.
"""

from __future__ import annotations

import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFENDER_APP_ID = "fc780465-2017-40d4-a0c5-307022471b92"
ROLES = ["Machine.Read.All", "Machine.RestrictExecution"]

# README settings that are not main.bicep parameters, and why (main.bicep says the same).
NOT_PARAMETERS = {
    "FUNCTIONS_CUSTOMHANDLER_PORT": "set by the Functions host",
    "FUNCTIONS_APP_ROOT_PATH": "set by the Functions host",
    "IDENTITY_ENDPOINT": "set by the platform",
    "IDENTITY_HEADER": "set by the platform",
    "AZURE_CLIENT_ID": "always the user-assigned identity's client id (app/api.bicep)",
    "AZURE_TENANT_ID": "client-secret credential: local development only",
    "AZURE_CLIENT_SECRET": "client-secret credential: local development only",
    "DEFENDER_RATE_CLOCK_SPEED": "benchmarks only; the README says to leave it unset in production",
    "COORDINATION": "always storage on the deployed app (main.bicep sets it; checked below)",
    "COORDINATION_CONTAINER": "the default container serves; set by hand only to share an account",
    "HTTP_READ_TIMEOUT_SECONDS": "the handler's connections from the local Functions host; tests and local runs only",
    "MACHINE_CACHE_SECONDS": "the default (60 s, the most the cache rule allows) serves; lower it by hand only to turn the cache off",
    "DEFENDER_PAGE_SIZE": "tests only: lowers $top to exercise paging",
    "FLEET_VIEW_MAX_AGE_SECONDS": "the default (5 s) serves; raise it by hand as an app setting for a view many people keep open",
    "RECONCILE_INTERVAL_SECONDS": "local mode only (--simulate, COORDINATION=local); the deployed app runs the host's timer",
    "CALLBACK_ALLOW_LOOPBACK": "local runs and tests only: http to a loopback callback receiver",
    "CALLBACK_SIGNING_KEY": "a secret: set it as an app setting (or a Key Vault reference) after deployment, never a template parameter",
    "CALLBACK_ALLOWED_HOSTS": "the default (*.logic.azure.com, Logic Apps callback URLs) serves; widen it by hand as an app setting",
}

# Roles that let the identity create containers, take and renew blob leases and write blobs
# conditionally (the handler's coordination): Storage Blob Data Owner or Contributor.
BLOB_WRITE_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
}


class Checks:
    def __init__(self) -> None:
        self.passed = self.failed = 0

    def check(self, cond: bool, name: str, failure: str = "") -> bool:
        if cond:
            self.passed += 1
            print(f"ok    {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name}" + (f": {failure}" if failure else ""))
        return cond


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def readme_settings(readme: str) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """{setting: (README default, (min, max) or None)} from the Configuration table; the default
    is '' for 'by cloud', 'unset'..., the range comes from a '(1–3600)' in the meaning."""
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    settings = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        default = cells[1]
        m = re.fullmatch(r"`([^`]*)`", default)
        value = m.group(1) if m else ""  # "by cloud: ...", "unset", "set by the platform"
        r = re.search(r"\((\d+)\s*[–-]\s*(\d+)\)", cells[2])
        bounds = (int(r.group(1)), int(r.group(2))) if r else None
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            settings[name] = (value, bounds)
    return settings


def bicep_bounds(text: str, param: str) -> tuple[int | None, int | None]:
    """@minValue/@maxValue of a param (the decorator lines right above it)."""
    lines = text.splitlines()
    idx = next(i for i, l in enumerate(lines) if re.match(rf"param\s+{param}\s", l))
    lo = hi = None
    i = idx - 1
    while i >= 0 and lines[i].startswith("@"):
        if m := re.match(r"@minValue\((\d+)\)", lines[i]):
            lo = int(m.group(1))
        if m := re.match(r"@maxValue\((\d+)\)", lines[i]):
            hi = int(m.group(1))
        i -= 1
    return lo, hi


def bicep_params(text: str) -> dict[str, tuple[str, str | None]]:
    """{name: (type, default literal or None)} of `param` lines."""
    params = {}
    for m in re.finditer(r"^param\s+(\w+)\s+(\w+)(?:\s*=\s*(.+))?$", text, re.M):
        default = m.group(3)
        if default is not None:
            default = default.strip()
            default = default[1:-1] if default.startswith("'") and default.endswith("'") else default
        params[m.group(1)] = (m.group(2), default)
    return params


def main() -> int:
    c = Checks()
    docs = {}
    for path in ["infra/main.parameters.json", "infra/bicepconfig.json", "infra/abbreviations.json"]:
        try:
            docs[path] = json.loads(read(path))
            c.check(True, f"{path} parses")
        except (OSError, ValueError) as e:
            c.check(False, f"{path} parses", str(e))
            return 1

    ext = docs["infra/bicepconfig.json"].get("extensions", {}).get("microsoftGraphV1", "")
    c.check(re.fullmatch(r"br:mcr\.microsoft\.com/bicep/extensions/microsoftgraph/v1\.0:\d+\.\d+\.\d+", ext) is not None,
            "bicepconfig.json: microsoftGraphV1 is the GA Graph v1.0 extension", repr(ext))

    main_bicep = read("infra/main.bicep")
    api_bicep = read("infra/app/api.bicep")
    params = bicep_params(main_bicep)
    c.check("targetScope = 'subscription'" in main_bicep, "main.bicep targets the subscription (azd layout)")
    c.check("'azd-service-name': serviceName" in api_bicep and "serviceName: 'api'" in main_bicep,
            "the function app carries the azd-service-name tag of azure.yaml's service 'api'")
    c.check(re.search(r"name:\s*'custom'\s*\n\s*version:\s*'1\.0'", api_bicep) is not None,
            "app/api.bicep: functionAppConfig.runtime custom 1.0")
    for setting in ["AzureWebJobsStorage__credential: 'managedidentity'",
                    "AzureWebJobsStorage__clientId: identityClientId",
                    "AZURE_CLIENT_ID: identityClientId",
                    "httpsOnly: true", "minTlsVersion: '1.2'"]:
        c.check(setting in api_bicep, f"app/api.bicep: {setting}")
    c.check("allowSharedKeyAccess: false" in read("infra/app/storage.bicep"), "app/storage.bicep: shared-key access off")

    # Coordination: on, through the host's storage, with a role that covers it.
    c.check(re.search(r"^\s*COORDINATION:\s*'storage'", main_bicep, re.M) is not None,
            "main.bicep sets COORDINATION=storage on the app")
    c.check("AzureWebJobsStorage__blobServiceUri:" in api_bicep,
            "app/api.bicep: AzureWebJobsStorage__blobServiceUri (the handler's coordination reads it)")
    rbac = re.sub(r"//.*", "", read("infra/app/rbac.bicep"))
    granted = [name for role_id, name in BLOB_WRITE_ROLES.items()
               if re.search(rf"var (\w+) = '{role_id}'", rbac)
               and re.search(r"scope:\s*storage\b[\s\S]*?roleDefinitionId:[^\n]*"
                             + re.search(rf"var (\w+) = '{role_id}'", rbac).group(1), rbac)]
    c.check(bool(granted), "app/rbac.bicep grants a blob data role on the storage account that covers "
            "leases and conditional writes (Storage Blob Data Owner or Contributor)", "none found")

    # README Configuration table <-> main.bicep parameters and app settings.
    settings = readme_settings(read("README.md"))
    c.check(len(settings) >= 10, f"README Configuration table read ({len(settings)} settings)")
    for name, (default, bounds) in sorted(settings.items()):
        if name in NOT_PARAMETERS:
            c.check(True, f"{name}: not a parameter ({NOT_PARAMETERS[name]})")
            continue
        m = re.search(rf"^\s*{name}:\s*(?:string\()?(\w+)", main_bicep, re.M)
        param = m.group(1) if m else None
        if not c.check(param in params, f"{name}: a main.bicep parameter that reaches the app settings",
                       "no `NAME: param` line in main.bicep's settings, or no such param"):
            continue
        ptype, pdefault = params[param]
        if ptype == "bool":
            want = default.lower()
        else:
            want = default
        c.check((pdefault or "") == want, f"{name}: default {want!r} as in the README (param {param})",
                f"main.bicep has {pdefault!r}")
        if bounds:
            got = bicep_bounds(main_bicep, param)
            c.check(got == bounds, f"{name}: range {bounds[0]}-{bounds[1]} as in the README",
                    f"main.bicep has @minValue/@maxValue {got}")

    # main.parameters.json <-> main.bicep.
    for pname, pvalue in docs["infra/main.parameters.json"]["parameters"].items():
        if not c.check(pname in params, f"main.parameters.json: {pname} is a main.bicep parameter"):
            continue
        m = re.fullmatch(r"\$\{(\w+)(?:=(.*))?\}", str(pvalue.get("value", "")))
        if m and m.group(2) is not None and params[pname][1] is not None:
            c.check(m.group(2) == params[pname][1],
                    f"main.parameters.json: {pname} defaults to {params[pname][1]!r} like main.bicep",
                    f"{m.group(2)!r}")
    required = [p for p, (_, d) in params.items() if d is None]
    missing = [p for p in required if p not in docs["infra/main.parameters.json"]["parameters"]]
    c.check(not missing, "main.parameters.json gives every required parameter", repr(missing))

    # The grant: module and script agree.
    roles_bicep = read("infra/app/mde-roles.bicep")
    grant = read("scripts/grant-defender-roles.sh")
    c.check(roles_bicep.startswith("extension microsoftGraphV1"), "mde-roles.bicep uses the Graph extension")
    c.check(DEFENDER_APP_ID in roles_bicep and DEFENDER_APP_ID in grant,
            "mde-roles.bicep and grant-defender-roles.sh use the WindowsDefenderATP app id")
    c.check(all(f"'{r}'" in roles_bicep for r in ROLES) and f"roles=({' '.join(ROLES)})" in grant,
            f"both grant {', '.join(ROLES)}")
    c.check("module" not in re.sub(r"//.*", "", main_bicep).split("mde-roles")[0] or "mde-roles.bicep'" not in main_bicep,
            "main.bicep does not deploy the grant (it is a separate, privileged step)")

    # Optional App Service Authentication.
    c.check(params.get("authClientId") == ("string", "") and params.get("authTokenAudience") == ("string", ""),
            "main.bicep: authClientId and authTokenAudience, empty (authentication off) by default",
            repr((params.get("authClientId"), params.get("authTokenAudience"))))
    c.check("authClientId: authClientId" in main_bicep and "authTokenAudience: authTokenAudience" in main_bicep,
            "main.bicep passes both to app/api.bicep")
    auth = api_bicep.split("resource auth ", 1)[-1].split("\n}\n", 1)[0] if "resource auth " in api_bicep else ""
    for needle in ["'Microsoft.Web/sites/config@", "= if (!empty(authClientId))", "parent: functionApp",
                   "name: 'authsettingsV2'", "requireAuthentication: true",
                   "unauthenticatedClientAction: 'Return401'", "azureActiveDirectory: {\n        enabled: true",
                   "clientId: authClientId", "allowedAudiences: [\n            authAudience",
                   "'/api/openapi.json'"]:
        c.check(needle in auth, f"app/api.bicep authsettingsV2: {' '.join(needle.split())}")
    c.check("'api://${authClientId}'" in api_bicep, "app/api.bicep: the audience defaults to api://<authClientId>")
    readme = read("README.md")
    c.check("azd env set AUTH_CLIENT_ID" in readme and "authClientId=" in readme
            and "appRoleAssignedTo" in readme.split("### Who called", 1)[-1],
            "README: enabling App Service Authentication (azd and az) and assigning the app role to callers")

    # Which grant route needs what.
    readme_grant = read("README.md").split("### Grant the Defender permissions", 1)[-1].split("\n### ", 1)[0]
    for needle in ["deployment\nrights on the resource group", "GCC High and DoD", "public cloud only"]:
        flat = " ".join(needle.split())
        c.check(flat in " ".join(readme_grant.split()) and flat in " ".join(read("docs/deploy.md").split()),
                f"README's grant section and docs/deploy.md say {flat!r}")
    c.check("public cloud only" in grant and "AzureCloud" in grant,
            "grant-defender-roles.sh refuses --method bicep outside the public cloud")

    # azure.yaml.
    azure = yaml.safe_load(read("azure.yaml"))
    api = azure.get("services", {}).get("api", {})
    c.check(api.get("host") == "function" and api.get("language") == "custom" and api.get("project") == ".",
            "azure.yaml: service api is a function, language custom, project .")
    package_sh = read("scripts/package.sh")
    c.check(api.get("dist") == "dist/app.zip" and "readonly zip=$out/app.zip" in package_sh
            and "readonly out=dist" in package_sh,
            "azure.yaml dist is the zip scripts/package.sh writes (dist/app.zip)", repr(api.get("dist")))
    hooks = [h for hs in [api.get("hooks", {}), azure.get("hooks", {})] for h in hs.values()]
    for hook in hooks:
        for platform in ("posix", "windows"):
            run = (hook.get(platform) or {}).get("run") if isinstance(hook, dict) else None
            if run:
                scripts = [w for w in run.split() if w.startswith("scripts/")]
                c.check(bool(scripts) and all(os.access(os.path.join(ROOT, s), os.X_OK) for s in scripts),
                        f"azure.yaml hook runs executable scripts: {run}")

    # The azd alpha feature `language.custom`: the first hook checks it.
    def hook_run(hooks: dict, name: str) -> str:
        return str(((hooks.get(name) or {}).get("posix") or {}).get("run", ""))
    preprovision = hook_run(azure.get("hooks", {}), "preprovision")
    prepackage = hook_run(api.get("hooks", {}), "prepackage")
    c.check(list(azure.get("hooks", {}))[:1] == ["preprovision"]
            and preprovision.split()[-1:] == ["scripts/azd-preflight.sh"],
            "azure.yaml: the first hook (preprovision) is scripts/azd-preflight.sh", preprovision)
    c.check("scripts/azd-preflight.sh" in prepackage
            and prepackage.index("scripts/azd-preflight.sh") < prepackage.index("scripts/package.sh"),
            "azure.yaml: prepackage (azd deploy) runs the preflight before building", prepackage)
    preflight = read("scripts/azd-preflight.sh")
    docs_deploy = read("docs/deploy.md")
    readme_azd = read("README.md").split("### With the Azure Developer CLI", 1)[-1].split("\n### ", 1)[0]
    for needle in ["azd config set alpha.language.custom on", "AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM",
                   "1.20", "repository root"]:
        c.check(needle in preflight and needle in docs_deploy and needle in readme_azd,
                f"the preflight hook, docs/deploy.md and the README's azd steps say {needle!r}")
    package_sh = read("scripts/package.sh")
    c.check('rustup target add "$triple"' in package_sh and "readonly triple=x86_64-unknown-linux-gnu" in package_sh,
            "scripts/package.sh adds the Rust target it builds for (rustup target add)")

    # Workflows.
    ci = yaml.safe_load(read(".github/workflows/ci.yml"))
    c.check(any("bash .ci/run" in str(s.get("run", "")) for j in ci["jobs"].values() for s in j["steps"]),
            "ci.yml runs .ci/run")
    deploy = read(".github/workflows/deploy.yml")
    for needle, what in [("bash scripts/package.sh", "builds with scripts/package.sh"),
                         ("scripts/check_package.py", "checks the package"),
                         ("azure/login@", "signs in with azure/login"),
                         ("id-token: write", "asks for an OIDC token"),
                         ("Azure/functions-action@", "deploys with the Functions action")]:
        c.check(needle in deploy, f"deploy.yml {what}")
    c.check("client-secret" not in deploy and "creds:" not in deploy and "publish-profile" not in deploy,
            "deploy.yml holds no secret (OIDC only)")

    # README Deploy section: every repository path it names exists.
    readme = read("README.md")
    if "\n## Deploy\n" in readme:
        section = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
        paths = sorted(set(re.findall(r"(?<![\w/.-])((?:scripts|infra|docs|\.github)/[\w./-]+\w)", section)))
        missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
        c.check(bool(paths) and not missing, f"README Deploy names {len(paths)} repository paths, all present",
                repr(missing))
    else:
        c.check(False, "README has a Deploy section")

    print(f"deploy-config: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
