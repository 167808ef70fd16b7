#!/usr/bin/env bash
# The deploy checks, run by .ci/run (and on their own: bash scripts/deploy-checks.sh).
# Everything they need is installed here, pinned, into target/tools/ (Python venvs from PyPI,
# a Debian bullseye root file system from Debian's mirror); nothing needs Azure or a network
# beyond the package registries.
#
#  1. package        scripts/package.sh: release build pinned to glibc 2.31, dist/app.zip
#  2. package check  scripts/check_package.py --self-test: layout, exec bit, host.json and every
#                    function.json, glibc symbol versions, the package run as the host runs it
#                    (both invocation modes on the simulator); then broken copies must be refused
#  3. glibc 2.31 run the same package check inside a Debian bullseye chroot (glibc 2.31), when
#                    root and the mirror allow it (skipped with a notice otherwise)
#  4. bicep syntax   scripts/check_bicep_syntax.py: tree-sitter-bicep over infra/**/*.bicep
#  5. checkov        infra/.checkov.yaml (skips listed with reasons); no parsing error allowed
#  6. workflows      check-jsonschema --builtin-schema vendor.github-workflows
#  7. consistency    scripts/check_deploy_config.py: README settings <-> parameters, azure.yaml,
#                    workflows, paths named in the README's Deploy section
#  8. grant script   scripts/test_grant_defender_roles.py: idempotency etc. against a fake az
#  9. deploy hooks   scripts/test_deploy_hooks.py: the azd preflight hook (version, alpha feature)
#                    and scripts/package.sh --check-host against fake azd/uname/rustup/rustc
set -euo pipefail
cd "$(dirname "$0")/.."

# Checks whose Azure counterpart needs a network (bicep build, what-if) are not here: see
# infra/README.md.
# CKV_AZURE_56: the optional App Service Authentication (authsettingsV2) resource is read and enabled.
readonly required_checkov_passes=(CKV_AZURE_70 CKV_AZURE_145 CKV_AZURE_71 CKV_AZURE_3 CKV_AZURE_44 CKV_AZURE_34 CKV_AZURE_56)

passed=0
failed=0
failures=()
timings=()

step() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== deploy checks: $name"
    if "$@"; then
        passed=$((passed + 1))
        timings+=("$name $((SECONDS - start))s")
    else
        failed=$((failed + 1))
        failures+=("$name")
        timings+=("$name $((SECONDS - start))s FAILED")
    fi
}

checks_venv=
install_checks() {
    checks_venv=$(scripts/venv.sh checks scripts/requirements-checks.txt)
}

glibc231_run() {
    local rootfs rc=0
    rootfs=$(scripts/glibc231-rootfs.sh) || rc=$?
    if [[ $rc -eq 3 ]]; then
        echo "SKIPPED: no Debian bullseye root file system here (see above); the symbol-version check still ran"
        return 0
    fi
    [[ $rc -eq 0 ]] || return "$rc"
    python3 scripts/check_package.py dist/app.zip --rootfs "$rootfs"
}

checkov_run() {
    local report=target/tools/checkov-report
    rm -rf "$report"
    "$checks_venv/bin/checkov" --config-file infra/.checkov.yaml \
        --output cli --output json --output-file-path "console,$report" || return 1
    [[ -d $report ]] && report=$report/results_json.json
    "$checks_venv/bin/python" - "$report" "${required_checkov_passes[@]}" <<'PY'
import json, sys
report, required = sys.argv[1], set(sys.argv[2:])
docs = json.load(open(report))
docs = docs if isinstance(docs, list) else [docs]
ok = True
passed = set()
for doc in docs:
    summary = doc.get("summary", {})
    if summary.get("parsing_errors"):
        print(f"FAIL  checkov could not parse {summary['parsing_errors']} file(s) of {doc.get('check_type')}: "
              "their resources were not checked")
        ok = False
    passed |= {c["check_id"] for c in doc.get("results", {}).get("passed_checks", [])}
missing = sorted(required - passed)
if missing:
    print(f"FAIL  checks that must pass did not run or failed: {missing}")
    ok = False
else:
    print(f"ok    checkov: no parsing error; {', '.join(sorted(required))} passed")
sys.exit(0 if ok else 1)
PY
}

workflows_run() {
    "$checks_venv/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml
}

step "install pinned Python tools (target/tools/checks)" install_checks
step "package (scripts/package.sh)" env PACKAGE_SKIP_CHECK=1 bash scripts/package.sh
step "package check and self-test" python3 scripts/check_package.py dist/app.zip --self-test
step "package run on glibc 2.31 (Debian bullseye chroot)" glibc231_run
step "bicep syntax (tree-sitter-bicep)" "$checks_venv/bin/python" scripts/check_bicep_syntax.py infra
step "checkov (infra/.checkov.yaml)" checkov_run
step "workflow schema (check-jsonschema)" workflows_run
step "README, infra, azure.yaml and workflows agree" "$checks_venv/bin/python" scripts/check_deploy_config.py
step "grant script against a fake az" "$checks_venv/bin/python" scripts/test_grant_defender_roles.py
step "azd preflight hook and package host checks against fakes" python3 scripts/test_deploy_hooks.py

echo "== deploy checks: timings"
printf '   %s\n' "${timings[@]}"
if [[ $failed -gt 0 ]]; then
    printf 'FAILED: %s\n' "${failures[@]}"
fi
echo "deploy-checks: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
