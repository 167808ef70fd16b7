extension microsoftGraphV1

// Grants the function app's managed identity the two WindowsDefenderATP application permissions
// the handler uses: Machine.Read.All (find the machine, read actions) and
// Machine.RestrictExecution (restrict, unrestrict).
//
// A separate, privileged deployment, never part of main.bicep: Graph Bicep calls Microsoft Graph
// as the deployer, who needs AppRoleAssignment.ReadWrite.All + Application.Read.All, i.e. an Entra
// role such as Cloud Application Administrator or Application Administrator (README "Deploy").
//
//   az deployment group create --resource-group <rg> --template-file infra/app/mde-roles.bicep \
//     --parameters principalId=<AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID>
//
// Needs Bicep >= 0.36.1 and the registry (the extension's types come from MCR, bicepconfig.json).
// scripts/grant-defender-roles.sh does the same with `az rest` and skips roles already assigned.

@description('Object id of the managed identity\'s service principal (main.bicep output AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID).')
@minLength(36)
@maxLength(36)
param principalId string

@description('WindowsDefenderATP app roles to grant, by value. Their ids are looked up in the tenant.')
param appRoleValues array = [
  'Machine.Read.All'
  'Machine.RestrictExecution'
]

// WindowsDefenderATP: the same app id in every tenant; its service principal's object id is not.
var windowsDefenderAtpAppId = 'fc780465-2017-40d4-a0c5-307022471b92'

resource windowsDefenderAtp 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: windowsDefenderAtpAppId
}

// filter(...)[0] fails the deployment on a misspelt or missing role rather than granting nothing.
resource grants 'Microsoft.Graph/appRoleAssignedTo@v1.0' = [
  for value in appRoleValues: {
    resourceId: windowsDefenderAtp.id
    appRoleId: filter(windowsDefenderAtp.appRoles, role => role.value == value && contains(role.allowedMemberTypes, 'Application'))[0].id
    principalId: principalId
  }
]

output windowsDefenderAtpServicePrincipalId string = windowsDefenderAtp.id
output grantedAppRoleIds array = [for (value, i) in appRoleValues: grants[i].appRoleId]
