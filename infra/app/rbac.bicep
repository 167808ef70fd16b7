// Azure RBAC for the app's identity:
//   Storage Blob Data Owner on the storage account (AzureWebJobsStorage, the deployment container,
//   and the handler's coordination container: it creates the container, takes and renews blob
//   leases, and writes blobs with If-Match / If-None-Match; Storage Blob Data Contributor would
//   cover the handler too, Owner is what the Functions host's docs ask for);
//   Storage Queue Data Contributor on the storage account: containment jobs send their messages
//   to the restrict-jobs queue (creating it on first use), and the host's queue triggers receive,
//   update, delete and poison them (the host's docs ask for Reader + Message Processor for a
//   trigger; Contributor covers those and the handler's sends);
//   Monitoring Metrics Publisher on Application Insights (local auth is off).
// No table roles: no trigger or binding here uses them.

param storageAccountName string
param applicationInsightsName string
@description('Object id of the managed identity.')
param identityPrincipalId string

var storageBlobDataOwnerRoleId = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageQueueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource storageBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, storageBlobDataOwnerRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwnerRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource storageQueueDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identityPrincipalId, storageQueueDataContributorRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributorRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource monitoringMetricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(applicationInsights.id, identityPrincipalId, monitoringMetricsPublisherRoleId)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}
