// The Flex Consumption plan (FC1, Linux) and the function app: runtime custom 1.0 (the Rust
// `handler` named by host.json), the user-assigned identity for everything, identity-based
// AzureWebJobsStorage, HTTPS only, TLS 1.2+, FTP and basic-auth publishing off.

param name string
param planName string
param location string
param tags object
@description('azd service name (azure.yaml services.<name>); azd finds the app by this tag.')
param serviceName string
@description('Resource id of the user-assigned identity.')
param identityId string
@description('Client id of the user-assigned identity.')
param identityClientId string
param storageAccountName string
param deploymentContainerName string
param applicationInsightsName string
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int
@description('The handler\'s own settings (README "Configuration"), already filtered of empty values.')
param handlerSettings object

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true // Linux
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, { 'azd-service-name': serviceName })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      // Exactly '1.0': other values pass ARM validation and fail only at host start.
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    }
  }

  // Flex rejects FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION and WEBSITE_RUN_FROM_PACKAGE:
  // functionAppConfig replaces them.
  resource appSettings 'config' = {
    name: 'appsettings'
    properties: union({
        // Host storage with the identity, no connection string. The blob URI (not the account
        // name) keeps it right in sovereign clouds. HTTP-only: blob is all the host uses.
        AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
        AzureWebJobsStorage__credential: 'managedidentity'
        AzureWebJobsStorage__clientId: identityClientId
        APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
        APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
        // The handler's credential: the user-assigned identity (README "Configuration").
        AZURE_CLIENT_ID: identityClientId
      }, handlerSettings)
  }

  // No FTP, no basic-auth (publishing profile) deployments: deploy with Entra ID (azd, az, the
  // Functions action over OIDC). ftpsState is not settable on Flex; these policies are.
  resource ftp 'basicPublishingCredentialsPolicies' = {
    name: 'ftp'
    properties: {
      allow: false
    }
  }

  resource scm 'basicPublishingCredentialsPolicies' = {
    name: 'scm'
    properties: {
      allow: false
    }
  }
}

output name string = functionApp.name
output id string = functionApp.id
output defaultHostName string = functionApp.properties.defaultHostName
