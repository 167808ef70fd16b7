//! Tokens for the Defender API.
//!
//! One credential for the process, chosen explicitly by its
//! [`CredentialOptions`] (`azure_identity` 1.x has no DefaultAzureCredential,
//! by design):
//! managed identity in Azure, a client secret for local development, and a
//! fixed token for the embedded simulator. The credential caches tokens and
//! refreshes them five minutes before expiry; this module bounds how long a
//! caller can wait for one, because the crate's default retry policy can block
//! for about 80 s while holding the cache's write lock.

use std::{fmt, sync::Arc, time::Duration};

use parking_lot::RwLock;

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

use url::Url;

/// How the service gets its Defender token.
#[derive(Clone, PartialEq, Eq)]
pub enum CredentialSettings {
    /// Managed identity: system-assigned, or user-assigned by client id.
    ManagedIdentity { client_id: Option<String> },
    /// A client secret, for local development only.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: String,
    },
}

// Written by hand so that the secret can never reach a log line.
impl fmt::Debug for CredentialSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ManagedIdentity { client_id } => f
                .debug_struct("ManagedIdentity")
                .field("client_id", client_id)
                .finish(),
            Self::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .finish_non_exhaustive(),
        }
    }
}

impl CredentialSettings {
    /// A short description for error details and logs: which credential was tried.
    pub fn describe(&self) -> String {
        match self {
            Self::ManagedIdentity { client_id } => managed_identity(client_id.as_deref()),
            Self::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => format!("client secret of app {client_id} in tenant {tenant_id}"),
        }
    }
}

/// Which managed identity: system-assigned, or user-assigned by client id.
pub fn managed_identity(client_id: Option<&str>) -> String {
    match client_id {
        None => "system-assigned managed identity".to_owned(),
        Some(id) => format!("user-assigned managed identity (client id {id})"),
    }
}

/// What the token source needs to know: which credential, where it signs in,
/// for which scope, and how long a caller may wait for a token.
#[derive(Debug, Clone)]
pub struct CredentialOptions {
    /// Managed identity or client secret (`AZURE_CLIENT_ID`, …).
    pub credential: CredentialSettings,
    /// The Entra authority of the cloud (`DEFENDER_CLOUD`), for the client secret.
    pub authority_host: Url,
    /// The Defender scope (`DEFENDER_TOKEN_SCOPE`).
    pub scope: String,
    /// Upper bound on getting a token (`TOKEN_TIMEOUT_SECONDS`).
    pub timeout: Duration,
}

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
    inner: Arc<Inner>,
}

type Factory = dyn Fn() -> Result<Arc<dyn TokenCredential>, TokenError> + Send + Sync;

struct Inner {
    /// The credential in use. Replaced (with an empty cache) when Defender
    /// rejects its token: `azure_identity` has no way to skip its cache.
    current: RwLock<Arc<dyn TokenCredential>>,
    factory: Box<Factory>,
    /// One replacement at a time, so a burst of 401s refreshes once.
    refreshing: tokio::sync::Mutex<()>,
    scope: String,
    timeout: Duration,
    description: String,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("credential", &self.inner.description)
            .field("scope", &self.inner.scope)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// Build the credential the options ask for, over the service's pooled
    /// HTTP client. Nothing is requested yet: the first token is fetched on
    /// the first invocation, so startup stays fast.
    pub fn new(options: CredentialOptions, http: reqwest::Client) -> Result<Self, TokenError> {
        Self::with_transport(options, Transport::new(Arc::new(http)))
    }

    /// As [`Self::new`], over any `azure_core` transport. The
    /// client-secret credential only accepts https authorities, so its tests
    /// inject a fake Entra here instead of a plain-http server.
    fn with_transport(
        options: CredentialOptions,
        transport: Transport,
    ) -> Result<Self, TokenError> {
        let CredentialOptions {
            credential: credential_settings,
            authority_host,
            scope,
            timeout,
        } = options;
        let description = credential_settings.describe();
        let client_options = ClientOptions {
            // Bounded: a few quick retries, well inside our own timeout below.
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: azure_core::time::Duration::milliseconds(200),
                max_retries: 3,
                max_total_elapsed: azure_core::time::Duration::seconds(
                    i64::try_from(timeout.as_secs()).unwrap_or(20),
                ),
                max_delay: azure_core::time::Duration::seconds(2),
            }),
            // The service's pooled client, with its timeouts.
            transport: Some(transport),
            ..Default::default()
        };
        let authority_host = authority_host.as_str().trim_end_matches('/').to_owned();
        let described = description.clone();
        let factory = move || -> Result<Arc<dyn TokenCredential>, TokenError> {
            let failed = |e: azure_core::Error| TokenError {
                credential: described.clone(),
                reason: e.to_string(),
            };
            let client_options = client_options.clone();
            Ok(match &credential_settings {
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
                    cloud.authority_host.clone_from(&authority_host);
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
            })
        };
        let current = factory()?;
        Ok(Self::from_parts(
            current,
            Box::new(factory),
            scope,
            timeout,
            description,
        ))
    }

    /// `current` is the credential in use; `factory` builds its replacements.
    fn from_parts(
        current: Arc<dyn TokenCredential>,
        factory: Box<Factory>,
        scope: String,
        timeout: Duration,
        description: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::new(current),
                factory,
                refreshing: tokio::sync::Mutex::new(()),
                scope,
                timeout,
                description,
            }),
        }
    }

    /// A fixed token, for the embedded simulator (which accepts any bearer).
    pub fn fixed(token: &str, timeout: Duration) -> Self {
        let token = token.to_owned();
        let current: Arc<dyn TokenCredential> = Arc::new(FixedToken(token.clone()));
        let factory = move || -> Result<Arc<dyn TokenCredential>, TokenError> {
            Ok(Arc::new(FixedToken(token.clone())))
        };
        Self::from_parts(
            current,
            Box::new(factory),
            "simulator".to_owned(),
            timeout,
            "simulator's fixed token".to_owned(),
        )
    }

    /// Which credential this is, for logs and error details.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// A bearer token for the Defender scope, from the cache when still valid.
    pub async fn token(&self) -> Result<Secret, TokenError> {
        let credential = self.credential();
        self.fetch(&credential).await
    }

    /// Defender answered 401 to `rejected`: drop the cached token and get a
    /// new one. Concurrent callers that were rejected with the same token
    /// share one refresh.
    pub async fn refresh(&self, rejected: &Secret) -> Result<Secret, TokenError> {
        let _one_at_a_time = self.inner.refreshing.lock().await;
        let credential = self.credential();
        let cached = self.fetch(&credential).await?;
        if cached.secret() != rejected.secret() {
            // Someone else already replaced it.
            return Ok(cached);
        }
        tracing::warn!(
            credential = %self.inner.description,
            "Defender rejected the token; getting a new one"
        );
        self.replace_credential_or_keep();
        self.token().await
    }

    fn credential(&self) -> Arc<dyn TokenCredential> {
        self.inner.current.read().clone()
    }

    fn replace_credential_or_keep(&self) {
        match (self.inner.factory)() {
            Ok(fresh) => {
                *self.inner.current.write() = fresh;
            }
            Err(e) => tracing::warn!(error = %e, "could not rebuild the credential"),
        }
    }

    async fn fetch(&self, credential: &Arc<dyn TokenCredential>) -> Result<Secret, TokenError> {
        let inner = &self.inner;
        let scopes = [inner.scope.as_str()];
        match tokio::time::timeout(inner.timeout, credential.get_token(&scopes, None)).await {
            Ok(Ok(token)) => Ok(token.token),
            Ok(Err(e)) => {
                // The crate's message can carry the identity endpoint's raw
                // answer: it goes to the log, the caller gets a summary.
                tracing::warn!(
                    credential = %inner.description,
                    error = %e,
                    "getting a token failed"
                );
                Err(TokenError {
                    credential: inner.description.clone(),
                    reason: summary(&e),
                })
            }
            Err(_) => Err(TokenError {
                credential: inner.description.clone(),
                reason: format!(
                    "no token within {} s (is the identity endpoint reachable?)",
                    inner.timeout.as_secs()
                ),
            }),
        }
    }
}

/// What went wrong getting a token, without the token endpoint's own words.
fn summary(error: &azure_core::Error) -> String {
    use azure_core::error::ErrorKind;
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(e) = e.downcast_ref::<azure_core::Error>() {
            match e.kind() {
                ErrorKind::HttpResponse {
                    status, error_code, ..
                } => {
                    let status = u16::from(*status);
                    let code = error_code
                        .as_deref()
                        .filter(|c| {
                            c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                        })
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default();
                    let hint = if status == 400 {
                        "; for a managed identity, the identity is not assigned to this app or \
                         AZURE_CLIENT_ID names another one"
                    } else {
                        ""
                    };
                    return format!("the token endpoint answered HTTP {status}{code}{hint}");
                }
                ErrorKind::Connection => return "the token endpoint could not be reached".into(),
                ErrorKind::Io => return "the connection to the token endpoint failed".into(),
                _ => {}
            }
        }
        current = e.source();
    }
    "the credential failed".into()
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use azure_core::http::{AsyncRawResponse, HttpClient, Request, StatusCode, headers::Headers};

    use super::*;

    /// A fake Entra token endpoint that records what it was asked.
    #[derive(Debug, Default)]
    struct FakeEntra {
        seen: Mutex<Vec<(String, String)>>,
    }

    #[async_trait::async_trait]
    impl HttpClient for FakeEntra {
        async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
            let body = match request.body() {
                azure_core::http::Body::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            };
            self.seen
                .lock()
                .unwrap()
                .push((request.url().to_string(), body));
            Ok(AsyncRawResponse::from_bytes(
                StatusCode::Ok,
                Headers::default(),
                br#"{"token_type":"Bearer","expires_in":3599,"access_token":"entra-token"}"#
                    .to_vec(),
            ))
        }
    }

    /// The credential options these settings give.
    fn settings(pairs: &[(&str, &str)]) -> CredentialOptions {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CredentialOptions::from(&crate::config::Settings::from_map(&map).unwrap())
    }

    #[tokio::test]
    async fn client_secret_in_gcc_high_signs_in_at_the_us_gov_authority_with_the_gov_scope() {
        let fake = Arc::new(FakeEntra::default());
        let settings = settings(&[
            ("DEFENDER_CLOUD", "gcc-high"),
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.us"),
            ("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("AZURE_CLIENT_SECRET", "s3cr3t-value"),
        ]);
        let source = TokenSource::with_transport(settings, Transport::new(fake.clone())).unwrap();

        let first = source.token().await.unwrap();
        let second = source.token().await.unwrap();

        assert_eq!(first.secret(), "entra-token");
        assert_eq!(second.secret(), "entra-token");
        let seen = fake.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "the token is cached: {seen:?}");
        let (url, form) = &seen[0];
        assert_eq!(
            url,
            "https://login.microsoftonline.us/contoso.onmicrosoft.us/oauth2/v2.0/token"
        );
        assert!(form.contains("grant_type=client_credentials"), "{form}");
        assert!(
            form.contains("scope=https%3A%2F%2Fapi-gov.securitycenter.microsoft.us%2F.default"),
            "{form}"
        );
        assert!(source.description().contains("client secret"));
        assert!(!format!("{source:?}").contains("s3cr3t-value"));
    }

    #[tokio::test]
    async fn a_failing_credential_names_itself_in_the_error() {
        #[derive(Debug)]
        struct Refusing;
        #[async_trait::async_trait]
        impl HttpClient for Refusing {
            async fn execute_request(&self, _: &Request) -> azure_core::Result<AsyncRawResponse> {
                Ok(AsyncRawResponse::from_bytes(
                    StatusCode::BadRequest,
                    Headers::default(),
                    br#"{"error":"invalid_client"}"#.to_vec(),
                ))
            }
        }
        let settings = settings(&[
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.com"),
            ("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("AZURE_CLIENT_SECRET", "wrong"),
        ]);
        let source =
            TokenSource::with_transport(settings, Transport::new(Arc::new(Refusing))).unwrap();

        let err = source.token().await.unwrap_err();

        assert!(
            err.credential
                .contains("11111111-2222-3333-4444-555555555555"),
            "{err}"
        );
        assert!(!err.to_string().contains("wrong"), "{err}");
    }
}
