//! Tokens for the Defender API.
//!
//! One credential for the process, chosen explicitly from the settings
//! (`azure_identity` 1.x has no DefaultAzureCredential, by design):
//! managed identity in Azure, a client secret for local development, and a
//! fixed token for the embedded simulator. The credential caches tokens and
//! refreshes them five minutes before expiry; this module bounds how long a
//! caller can wait for one, because the crate's default retry policy can block
//! for about 80 s while holding the cache's write lock.

use std::{fmt, sync::Arc, time::Duration};

use azure_core::{
    cloud::{CloudConfiguration, CustomConfiguration},
    credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions},
    http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport},
};
use azure_identity::{
    ClientSecretCredential, ClientSecretCredentialOptions, ManagedIdentityCredential,
    ManagedIdentityCredentialOptions, UserAssignedId,
};
use thiserror::Error;

use crate::config::{CredentialSettings, Settings};

/// A token could not be had.
#[derive(Debug, Clone, Error)]
#[error("could not get a token with the {credential}: {reason}")]
pub struct TokenError {
    /// Which credential was tried, for the operator.
    pub credential: String,
    pub reason: String,
}

/// Hands out bearer tokens for the Defender scope.
#[derive(Clone)]
pub struct TokenSource {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    timeout: Duration,
    description: String,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("credential", &self.description)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Build the credential the settings ask for. Nothing is requested yet:
    /// the first token is fetched on the first invocation, so startup stays fast.
    pub fn from_settings(settings: &Settings, http: reqwest::Client) -> Result<Self, TokenError> {
        let description = settings.credential.describe();
        let client_options = ClientOptions {
            // Bounded: a few quick retries, well inside our own timeout below.
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(200),
                max_retries: 3,
                max_total_elapsed: azure_core::time::Duration::seconds(
                    i64::try_from(settings.token_timeout.as_secs()).unwrap_or(20),
                ),
                max_delay: azure_core::time::Duration::seconds(2),
            }),
            // Reuse the service's pooled client, with its timeouts.
            transport: Some(Transport::new(Arc::new(http))),
            ..Default::default()
        };
        let failed = |e: azure_core::Error| TokenError {
            credential: description.clone(),
            reason: e.to_string(),
        };

        let credential: Arc<dyn TokenCredential> = match &settings.credential {
            CredentialSettings::ManagedIdentity { client_id } => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                    client_options,
                }))
                .map_err(failed)?
            }
            CredentialSettings::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                let mut cloud = CustomConfiguration::default();
                cloud.authority_host = settings
                    .authority_host
                    .as_str()
                    .trim_end_matches('/')
                    .to_owned();
                ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    Secret::new(secret.clone()),
                    Some(ClientSecretCredentialOptions {
                        client_options: ClientOptions {
                            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
                            ..client_options
                        },
                    }),
                )
                .map_err(failed)?
            }
        };
        Ok(Self {
            credential,
            scope: settings.token_scope.clone(),
            timeout: settings.token_timeout,
            description,
        })
    }

    /// A fixed token, for the embedded simulator (which accepts any bearer).
    pub fn fixed(token: &str, timeout: Duration) -> Self {
        Self {
            credential: Arc::new(FixedToken(token.to_owned())),
            scope: "simulator".to_owned(),
            timeout,
            description: "simulator's fixed token".to_owned(),
        }
    }

    /// Which credential this is, for logs and error details.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// A bearer token for the Defender scope, from the cache when still valid.
    pub async fn token(&self) -> Result<Secret, TokenError> {
        let scopes = [self.scope.as_str()];
        match tokio::time::timeout(self.timeout, self.credential.get_token(&scopes, None)).await {
            Ok(Ok(token)) => Ok(token.token),
            Ok(Err(e)) => Err(TokenError {
                credential: self.description.clone(),
                reason: e.to_string(),
            }),
            Err(_) => Err(TokenError {
                credential: self.description.clone(),
                reason: format!(
                    "no token within {} s (is the identity endpoint reachable?)",
                    self.timeout.as_secs()
                ),
            }),
        }
    }
}

/// A credential that always returns the same token.
struct FixedToken(String);

impl fmt::Debug for FixedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FixedToken")
    }
}

#[async_trait::async_trait]
impl TokenCredential for FixedToken {
    async fn get_token(
        &self,
        _scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Ok(AccessToken::new(
            Secret::new(self.0.clone()),
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        ))
    }
}
