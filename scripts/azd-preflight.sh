#!/usr/bin/env bash
# The first azd hook (azure.yaml: `preprovision`, and again before packaging for `azd deploy`).
# It checks what azd itself needs for this project, before anything is created or built, and
# stops with the fix:
#
#  - azd 1.20 or newer: `language: custom` (a prebuilt binary, no azd build) arrived in 1.20;
#  - azd's alpha feature `language.custom` turned on: azure.yaml uses `language: custom`, which
#    azd refuses ("api service is using language 'custom' (alpha) but it is not enabled") unless
#    `azd config set alpha.language.custom on` (or `alpha.all on`) was run once, or
#    AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM=true is set.
#
# Run azd from the repository root: azure.yaml's `dist: dist/app.zip` is resolved from the
# current directory, not from azure.yaml's.
set -euo pipefail

fail() {
    echo "azd preflight: $*" >&2
    exit 1
}

readonly instruction="turn it on once with
    azd config set alpha.language.custom on
(or export AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM=true), then run azd again from the repository root."

command -v azd >/dev/null 2>&1 || fail "azd is not on PATH"

version=$(azd version 2>/dev/null | sed -n 's/.*azd version \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1.\2/p' | head -n 1)
[[ -n $version ]] || fail "cannot read azd's version from 'azd version'; this project needs azd 1.20 or newer"
major=${version%%.*}
minor=${version#*.}
if ((major < 1 || (major == 1 && minor < 20))); then
    fail "azd $version is too old: this project deploys a prebuilt binary with 'language: custom', which needs azd 1.20 or newer (https://aka.ms/azd-install)"
fi

# azd reads booleans the Go way (strconv.ParseBool).
truthy() {
    case $1 in
    1 | t | T | true | TRUE | True) return 0 ;;
    *) return 1 ;;
    esac
}
# `azd config get KEY` prints the value as JSON ("on"), or fails when the key is not set.
config_on() {
    local value
    value=$(azd config get "$1" 2>/dev/null) || return 1
    value=${value//\"/}
    [[ ${value//[[:space:]]/} == on ]]
}

if [[ -n ${AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM:-} ]]; then
    truthy "$AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM" ||
        fail "AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM=$AZD_ALPHA_ENABLE_LANGUAGE_CUSTOM turns azd's alpha feature language.custom off, and azure.yaml needs it ('language: custom'): unset it or set it to true"
elif ! config_on alpha.language.custom && ! config_on alpha.all; then
    fail "azure.yaml deploys the Rust handler with 'language: custom', an azd alpha feature that is off; $instruction"
fi
echo "azd preflight: azd $version, alpha feature language.custom on"
