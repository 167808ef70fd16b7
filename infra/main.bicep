// restrict-code-execution on Azure Functions Flex Consumption (FC1, Linux), Azure Developer CLI layout.
//
// Creates, in rg-<environmentName>: a user-assigned managed identity (the app's identity for
// Defender, storage and Application Insights), a storage account reached only with that identity
// (AzureWebJobsStorage and the deployment container), Log Analytics + Application Insights, and
// the function app with runtime custom 1.0.
//
// It does NOT grant the Defender app roles: that needs Entra privileges an Azure deployment should
// not have. Run the separate, privileged step afterwards (README "Deploy"): infra/app/mde-roles.bicep
// or scripts/grant-defender-roles.sh, with the AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID output.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; names the resource group and seeds the resource names.')
param environmentName string

@minLength(1)
@description('Region for every resource. Flex Consumption regions only; check with `az functionapp list-flexconsumption-locations`.')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group name; empty means rg-<environmentName>.')
param resourceGroupName string = ''

@description('Function app name (global DNS name); empty means func-restrict-<token>.')
param functionAppName string = ''

@description('Flex Consumption instance memory in MB. The handler needs little; 512 is the smallest size.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 512

// Instances and concurrency. Defender's budget (100 calls a minute, 1,500 an hour per API) is the
// app's, shared by every instance through storage: more instances send nothing more to Defender,
// they only add lease and budget-blob conflicts between instances (each instance serves the
// reservations that arrive together with one read and one write). An invocation spends its time
// waiting (for its budget slot, the machine's lease, Defender), with no CPU and little memory, so
// one small instance carries many: 4 x 100 = 400 in flight is more than Defender can answer within
// the 220 s request timeout (about 370 POSTs at 100 a minute); callers beyond that get 429 with
// Retry-After from the budget, not from a lack of instances. More than one instance keeps the app
// answering while one is recycled, and leaves the job worker's queue trigger room (docs/jobs.md).
@description('Upper bound on instances. The Defender budget is shared by all instances, so more of them send nothing more; 4 carry 400 concurrent requests (see above).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 4

@description('Concurrent HTTP invocations per instance before Flex Consumption adds one. Invocations mostly wait for Defender\'s budget; 100 keeps a burst on few instances.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 100

// ---- The handler's settings: the README "Configuration" table, same names, same defaults. ----
// An empty string means "unset" (the README: an empty value counts as unset), so the handler
// derives the value from DEFENDER_CLOUD. Not parameters, on purpose:
//   FUNCTIONS_CUSTOMHANDLER_PORT          set by the Functions host
//   IDENTITY_ENDPOINT, IDENTITY_HEADER    set by the platform (managed identity)
//   AZURE_CLIENT_ID                       always the user-assigned identity's client id (below)
//   AZURE_TENANT_ID, AZURE_CLIENT_SECRET  local development only; the deployed app uses its identity
//   DEFENDER_RATE_CLOCK_SPEED             benchmarks only; must stay unset in production
//   CALLBACK_ALLOW_LOOPBACK               local runs and tests only
//   CALLBACK_SIGNING_KEY                  a secret: an app setting or Key Vault reference, set after deployment
//   CALLBACK_ALLOWED_HOSTS                the default (*.logic.azure.com) serves; widen it as an app setting

@description('DEFENDER_CLOUD: public, gcc, gcc-high or dod. Selects API URL, token scope and authority.')
@allowed([
  'public'
  'gcc'
  'gcc-high'
  'dod'
])
param defenderCloud string = 'public'

@description('DEFENDER_API_URL: Defender API root. Empty: by cloud (public: https://api.security.microsoft.com). Geo hosts work too.')
param defenderApiUrl string = ''

@description('DEFENDER_TOKEN_SCOPE: token scope. Empty: by cloud (public: https://api.securitycenter.microsoft.com/.default).')
param defenderTokenScope string = ''

@description('AZURE_AUTHORITY_HOST: sign-in authority, used only by the client-secret credential. Empty: by cloud.')
param azureAuthorityHost string = ''

@description('DEFENDER_TIMEOUT_SECONDS: timeout of each call to Defender.')
@minValue(1)
@maxValue(3600)
param defenderTimeoutSeconds int = 30

@description('TOKEN_TIMEOUT_SECONDS: upper bound on getting a token, retries included.')
@minValue(1)
@maxValue(3600)
param tokenTimeoutSeconds int = 20

@description('REQUEST_TIMEOUT_SECONDS: upper bound on one invocation, within the 230 s an HTTP-triggered function has to answer.')
@minValue(1)
@maxValue(230)
param requestTimeoutSeconds int = 220

@description('COMMENT_INCLUDE_CALLER: append "(requested by <callerName>)" to the comment sent to Defender.')
param commentIncludeCaller bool = true

@description('DEFENDER_RATE_LIMIT_PER_MINUTE: calls per minute to each Defender API for the whole app, shared by all its instances through storage (Defender counts per app and tenant). Lower it only to leave room for other apps using the same app registration.')
@minValue(1)
@maxValue(1000000)
param defenderRateLimitPerMinute int = 100

@description('DEFENDER_RATE_LIMIT_PER_HOUR: the same per hour.')
@minValue(1)
@maxValue(1000000)
param defenderRateLimitPerHour int = 1500

@description('STALE_PENDING_HOURS: an already_pending answer whose action has been pending longer than this says it may be stuck and how to cancel it.')
@minValue(1)
@maxValue(8760)
param stalePendingHours int = 24

@description('ALLOWED_CALLER_ROLES: comma-separated app roles a caller must hold (as App Service Authentication reports it). Empty: unset. Only safe with App Service Authentication enabled (authClientId): without it a caller can forge X-MS-CLIENT-PRINCIPAL.')
param allowedCallerRoles string = ''

@description('App Service Authentication with Microsoft Entra: the client id of the app registration callers get tokens for (and whose app roles ALLOWED_CALLER_ROLES names). Empty (the default): authentication is not set up.')
param authClientId string = ''

@description('App Service Authentication: the token audience accepted (the app registration\'s Application ID URI). Empty: api://<authClientId>.')
param authTokenAudience string = ''

@description('RECONCILE_SCHEDULE: the reconcile timer function\'s schedule (NCRONTAB with seconds). Every minute: the reconciler releases expired restrictions and delivers callbacks within a minute of their time.')
param reconcileSchedule string = '0 */1 * * * *'

@description('RESTRICTED_TAG: the Defender machine tag the reconciler keeps on every restricted device (and removes from every other). Empty (the default): off. When set, the identity also needs Machine.ReadWrite.All (scripts/grant-defender-roles.sh adds it).')
param restrictedTag string = ''

@description('TAG_RECONCILE_MINUTES: the least time between two full reads of the restrict history for RESTRICTED_TAG.')
@minValue(1)
@maxValue(1440)
param tagReconcileMinutes int = 15

@description('RECONCILE_BUDGET_PERCENT: the share of each Defender API\'s hourly budget the reconciler may spend.')
@minValue(1)
@maxValue(50)
param reconcileBudgetPercent int = 20

@description('RUST_LOG: log filter (tracing EnvFilter syntax).')
param rustLog string = 'info'

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var appName = !empty(functionAppName) ? functionAppName : '${abbrs.webSitesFunctions}restrict-${resourceToken}'
var deploymentContainerName = 'app-package-${take(appName, 32)}-${take(resourceToken, 7)}'

// The handler's app settings. Empty strings are left out rather than set empty.
var requiredSettings = {
  // Locks and the Defender budget shared by every instance through the host's storage account
  // (README "Coordination"); not a parameter: a scaled-out app needs it. The identity's Storage
  // Blob Data Owner role (app/rbac.bicep) covers its leases and conditional writes.
  COORDINATION: 'storage'
  DEFENDER_CLOUD: defenderCloud
  DEFENDER_TIMEOUT_SECONDS: string(defenderTimeoutSeconds)
  TOKEN_TIMEOUT_SECONDS: string(tokenTimeoutSeconds)
  REQUEST_TIMEOUT_SECONDS: string(requestTimeoutSeconds)
  COMMENT_INCLUDE_CALLER: commentIncludeCaller ? 'true' : 'false'
  DEFENDER_RATE_LIMIT_PER_MINUTE: string(defenderRateLimitPerMinute)
  DEFENDER_RATE_LIMIT_PER_HOUR: string(defenderRateLimitPerHour)
  STALE_PENDING_HOURS: string(stalePendingHours)
  // An unset %RECONCILE_SCHEDULE% breaks the reconcile function's binding: always set.
  RECONCILE_SCHEDULE: reconcileSchedule
  TAG_RECONCILE_MINUTES: string(tagReconcileMinutes)
  RECONCILE_BUDGET_PERCENT: string(reconcileBudgetPercent)
  RUST_LOG: rustLog
}
var restrictedTagSetting = empty(restrictedTag) ? {} : {
  RESTRICTED_TAG: restrictedTag
}
var apiUrlSetting = empty(defenderApiUrl) ? {} : {
  DEFENDER_API_URL: defenderApiUrl
}
var tokenScopeSetting = empty(defenderTokenScope) ? {} : {
  DEFENDER_TOKEN_SCOPE: defenderTokenScope
}
var authorityHostSetting = empty(azureAuthorityHost) ? {} : {
  AZURE_AUTHORITY_HOST: azureAuthorityHost
}
var allowedCallerRolesSetting = empty(allowedCallerRoles) ? {} : {
  ALLOWED_CALLER_ROLES: allowedCallerRoles
}
var handlerSettings = union(requiredSettings, apiUrlSetting, tokenScopeSetting, authorityHostSetting, allowedCallerRolesSetting, restrictedTagSetting)

resource rg 'Microsoft.Resources/resourceGroups@2021-04-01' = {
  name: !empty(resourceGroupName) ? resourceGroupName : '${abbrs.resourcesResourceGroups}${environmentName}'
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}restrict-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: deploymentContainerName
  }
}

module rbac 'app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    storageAccountName: storage.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    identityPrincipalId: identity.outputs.principalId
  }
}

module api 'app/api.bicep' = {
  name: 'api'
  scope: rg
  params: {
    name: appName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    serviceName: 'api'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    instanceMemoryMB: instanceMemoryMB
    maximumInstanceCount: maximumInstanceCount
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    handlerSettings: handlerSettings
    authClientId: authClientId
    authTokenAudience: authTokenAudience
  }
  // The host reads AzureWebJobsStorage and the package with the identity: roles first.
  dependsOn: [
    rbac
  ]
}

// azd stores these in the environment (.azure/<env>/.env); hooks and scripts read them.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = api.outputs.name
output AZURE_FUNCTION_URL string = 'https://${api.outputs.defaultHostName}/api/restrict-code-execution'
output SERVICE_API_NAME string = api.outputs.name
output AZURE_FUNCTION_IDENTITY_NAME string = identity.outputs.name
output AZURE_FUNCTION_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output AZURE_FUNCTION_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output AZURE_FUNCTION_AUTH_AUDIENCE string = api.outputs.authAudience
