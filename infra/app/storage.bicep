// Storage for the Functions host (AzureWebJobsStorage: keys, locks) and the Flex deployment
// container. Shared-key access is off: the host and the deployment reach it with the app's
// identity (Storage Blob Data Owner, rbac.bicep).

param name string
param location string
param tags object
@description('Blob container the Flex Consumption app deploys its package from.')
param deploymentContainerName string

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      services: {
        blob: {
          enabled: true
        }
        file: {
          enabled: true
        }
      }
    }
  }

  resource blobServices 'blobServices' = {
    name: 'default'
    properties: {
      // Blob soft delete is off. With it on, every overwrite of a blob keeps the old content as
      // a billed soft-deleted snapshot for the retention period, and the app overwrites its
      // budget blobs on every Defender call (three per restrict) and its lock blobs' metadata
      // around every POST: up to about 250,000 snapshots per API a week in an outbreak. Nothing
      // here needs it: the deployment package is rebuilt by any deploy, the host's keys and the
      // app's locks, budget and job records are working state (the record of what was done is
      // the invocation log and Defender's own action history). Container soft delete, which
      // costs nothing per write, stays on against deleting a whole container by mistake.
      // docs/cost.md has the numbers.
      deleteRetentionPolicy: {
        enabled: false
      }
      containerDeleteRetentionPolicy: {
        enabled: true
        days: 7
      }
    }

    resource deploymentContainer 'containers' = {
      name: deploymentContainerName
      properties: {
        publicAccess: 'None'
      }
    }
  }
}

output name string = storage.name
output id string = storage.id
output blobEndpoint string = storage.properties.primaryEndpoints.blob
