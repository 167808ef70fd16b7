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
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int
@description('The handler\'s own settings (README "Configuration"), already filtered of empty values.')
param handlerSettings object
@description('App Service Authentication (Microsoft Entra): the app registration\'s client id; empty: off.')
param authClientId string = ''
@description('The token audience App Service Authentication accepts; empty: api://<authClientId>.')
param authTokenAudience string = ''

var authAudience = empty(authClientId) ? '' : (empty(authTokenAudience) ? 'api://${authClientId}' : authTokenAudience)

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
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
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
        // Host storage with the identity, no connection string. The service URIs (not the
        // account name) keep it right in sovereign clouds. The queue: containment jobs' messages
        // and the host's queue triggers (job-worker, job-poison).
        AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
        AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
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

// App Service Authentication, when authClientId is given: every request needs a Microsoft Entra
// token for the audience (401 otherwise, before the function key is even looked at), and the
// platform sets X-MS-CLIENT-PRINCIPAL itself, stripping any a client sent, which is what makes
// ALLOWED_CALLER_ROLES trustworthy. The OpenAPI document stays anonymous for connector imports.
resource auth 'Microsoft.Web/sites/config@2024-04-01' = if (!empty(authClientId)) {
  // checkov reads every sites/config resource as the site's `web` configuration; these rules are
  // about that (logging, tracing, runtime, storage), not about authsettingsV2:
  // checkov:skip=CKV_AZURE_63: HTTP logging is site configuration, not authentication settings
  // checkov:skip=CKV_AZURE_65: detailed error messages are site configuration
  // checkov:skip=CKV_AZURE_66: failed request tracing is site configuration
  // checkov:skip=CKV_AZURE_80: no .NET Framework: the handler is a Rust binary
  // checkov:skip=CKV_AZURE_88: Azure Files is site storage configuration
  // checkov:skip=CKV_AZURE_13: reads authSettings (v1); this is authsettingsV2, which CKV_AZURE_56 checks
  parent: functionApp
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      excludedPaths: [
        '/api/openapi.json'
      ]
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: authClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            authAudience
          ]
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false
      }
    }
    httpSettings: {
      requireHttps: true
    }
  }
}

output name string = functionApp.name
output id string = functionApp.id
output defaultHostName string = functionApp.properties.defaultHostName
@description('The token audience App Service Authentication accepts; empty when it is off.')
output authAudience string = authAudience
