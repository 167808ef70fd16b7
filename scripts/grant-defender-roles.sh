#!/usr/bin/env bash
# Grant the function app's managed identity the WindowsDefenderATP application permissions
# Machine.Read.All and Machine.RestrictExecution (and Machine.ReadWrite.All when the environment
# sets RESTRICTED_TAG, for the reconciler's Defender tag). Idempotent: it reads the identity's existing
# app role assignments first and adds only the missing ones, so it is safe to run again.
#
# Usage:
#   scripts/grant-defender-roles.sh [--principal-id ID] [--dry-run]
#   scripts/grant-defender-roles.sh --method bicep [--principal-id ID] [--resource-group RG]
#
#   --principal-id ID    object id of the identity's service principal. Default: the azd
#                        environment value AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID (main.bicep output).
#   --method rest        (default) Microsoft Graph calls through `az rest`.
#   --method bicep       deploy infra/app/mde-roles.bicep instead (`az deployment group create`;
#                        needs Bicep >= 0.36.1, and deployment rights on the resource group as
#                        well as the Entra role below). Default resource group: AZURE_RESOURCE_GROUP.
#                        Public cloud only (Microsoft Graph Bicep): for GCC High and DoD tenants
#                        (Azure Government) use the default, rest.
#   --dry-run            show what would be granted; change nothing.
#   --from-azd           for the azd postprovision hook: do nothing but print how to grant,
#                        unless the azd environment has GRANT_DEFENDER_ROLES=true.
#
# Runs as the signed-in Azure CLI user (`az login`), who needs an Entra role that may assign app
# roles to service principals: Cloud Application Administrator or Application Administrator (or
# Privileged Role Administrator), or the Graph permissions AppRoleAssignment.ReadWrite.All +
# Application.Read.All. New roles can take a while, up to hours, to reach the identity's tokens.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly defender_app_id=fc780465-2017-40d4-a0c5-307022471b92 # WindowsDefenderATP
roles=(Machine.Read.All Machine.RestrictExecution)
# The reconciler's Defender tag (RESTRICTED_TAG, off by default) adds and removes a machine tag,
# which needs Machine.ReadWrite.All; only then is it granted.
if [[ -n ${RESTRICTED_TAG:-} ]]; then
    roles+=(Machine.ReadWrite.All)
fi
readonly roles
role_values=$(printf '"%s",' "${roles[@]}")
readonly role_values="[${role_values%,}]"

principal_id=${AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID:-}
resource_group=${AZURE_RESOURCE_GROUP:-}
method=rest
dry_run=false
from_azd=false

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "grant-defender-roles: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --principal-id) principal_id=${2:?--principal-id needs a value}; shift 2 ;;
        --resource-group) resource_group=${2:?--resource-group needs a value}; shift 2 ;;
        --method) method=${2:?--method needs rest or bicep}; shift 2 ;;
        --dry-run) dry_run=true; shift ;;
        --from-azd) from_azd=true; shift ;;
        -h | --help) usage ;;
        *) echo "grant-defender-roles: unknown argument $1" >&2; usage ;;
    esac
done

if $from_azd && [[ ${GRANT_DEFENDER_ROLES:-false} != true ]]; then
    cat <<EOF
The function app's identity has no Defender permissions yet. As a Cloud Application
Administrator (or Application Administrator), grant them with either of:

  scripts/grant-defender-roles.sh --principal-id ${principal_id:-<AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID>}
  az deployment group create --resource-group ${resource_group:-<AZURE_RESOURCE_GROUP>} \\
    --template-file infra/app/mde-roles.bicep --parameters principalId=${principal_id:-<id>}

(the Bicep route also needs deployment rights on the resource group, and works in the public
cloud only: for GCC High and DoD tenants use the script)

or let 'azd provision' do it: azd env set GRANT_DEFENDER_ROLES true
EOF
    exit 0
fi

[[ $principal_id =~ ^[0-9a-fA-F-]{36}$ ]] ||
    die "need the identity's principal (object) id: --principal-id, or AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID"
command -v az >/dev/null || die "the Azure CLI (az) is not installed"

case $method in
    bicep)
        [[ -n $resource_group ]] || die "--method bicep needs --resource-group (or AZURE_RESOURCE_GROUP)"
        cloud=$(az cloud show --query name --output tsv 2>/dev/null || true)
        case $cloud in
            AzureCloud | "") ;;
            *) die "Microsoft Graph Bicep deploys in the public cloud only, and the Azure CLI is signed in to
$cloud (GCC High and DoD tenants are in AzureUSGovernment): use the default --method rest" ;;
        esac
        args=(--resource-group "$resource_group" --name mde-roles
            --template-file infra/app/mde-roles.bicep --parameters "principalId=$principal_id"
            "appRoleValues=$role_values")
        if $dry_run; then
            echo "would run: az deployment group create ${args[*]}"
            exit 0
        fi
        az deployment group create "${args[@]}" --output none
        echo "Granted ${roles[*]} (Bicep deployment mde-roles in $resource_group)."
        echo "New roles can take a while (up to hours) to appear in the identity's tokens."
        exit 0
        ;;
    rest) ;;
    *) die "--method must be rest or bicep, not $method" ;;
esac

# Microsoft Graph of the CLI's cloud (graph.microsoft.com, or graph.microsoft.us for US Gov).
graph=$(az cloud show --query endpoints.microsoftGraphResourceId --output tsv 2>/dev/null || true)
graph=${graph:-https://graph.microsoft.com/}
graph=${graph%/}/v1.0

defender_sp=$(az ad sp show --id "$defender_app_id" --query id --output tsv 2>/dev/null || true)
[[ -n $defender_sp ]] || die "no WindowsDefenderATP service principal (app id $defender_app_id) in this
tenant, or no permission to read it. Is Microsoft Defender for Endpoint set up for the tenant?"

principal_name=$(az rest --method GET --uri "$graph/servicePrincipals/$principal_id" \
    --query displayName --output tsv 2>/dev/null || true)
[[ -n $principal_name ]] || die "no service principal with object id $principal_id (the managed identity's
principal id, not its client id), or no permission to read it"

echo "Identity: $principal_name ($principal_id)"
echo "Resource: WindowsDefenderATP ($defender_sp)"

# How many of the identity's assignments are (WindowsDefenderATP, role id): follows nextLink.
assigned() {
    local role_id=$1 uri="$graph/servicePrincipals/$principal_id/appRoleAssignments" count=0 n next page
    while [[ -n $uri ]]; do
        page=$(az rest --method GET --uri "$uri" --output tsv --query \
            "[length(value[?resourceId=='$defender_sp' && appRoleId=='$role_id']), \"@odata.nextLink\"]")
        n=$(sed -n 1p <<<"$page")
        next=$(sed -n 2p <<<"$page")
        count=$((count + n))
        [[ $next == None ]] && next=
        uri=$next
    done
    echo "$count"
}

added=0
for role in "${roles[@]}"; do
    role_id=$(az ad sp show --id "$defender_app_id" --output tsv --query \
        "appRoles[?value=='$role' && contains(allowedMemberTypes, 'Application')].id | [0]")
    [[ $role_id =~ ^[0-9a-fA-F-]{36}$ ]] || die "WindowsDefenderATP has no application role $role"
    if [[ $(assigned "$role_id") -gt 0 ]]; then
        echo "  $role ($role_id): already assigned"
        continue
    fi
    if $dry_run; then
        echo "  $role ($role_id): would assign"
        continue
    fi
    body=$(printf '{"principalId":"%s","resourceId":"%s","appRoleId":"%s"}' "$principal_id" "$defender_sp" "$role_id")
    if ! az rest --method POST --uri "$graph/servicePrincipals/$defender_sp/appRoleAssignedTo" \
        --headers Content-Type=application/json --body "$body" --output none; then
        # Someone may have granted it meanwhile: only fail if it is still missing.
        [[ $(assigned "$role_id") -gt 0 ]] || die "could not assign $role (see the error above)"
    fi
    echo "  $role ($role_id): assigned"
    added=$((added + 1))
done

if $dry_run; then
    echo "Dry run: nothing changed."
elif [[ $added -gt 0 ]]; then
    echo "Assigned $added role(s). New roles can take a while (up to hours) to appear in the"
    echo "identity's tokens; until then Defender answers 403 (defender_forbidden)."
else
    echo "Nothing to do: every role was already assigned."
fi
