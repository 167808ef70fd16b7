// The function app's user-assigned managed identity. It exists before the app and survives the
// app being deleted and recreated, so the Defender app roles granted to it (mde-roles.bicep) do too.

@description('Identity name.')
param name string
param location string
param tags object

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
@description('Client id: AZURE_CLIENT_ID and AzureWebJobsStorage__clientId.')
output clientId string = identity.properties.clientId
@description('Object id of its service principal: the principal the Defender app roles are granted to.')
output principalId string = identity.properties.principalId
