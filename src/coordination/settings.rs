//! Where coordination lives: `COORDINATION`, and with `storage`, the storage
//! account the Functions host itself uses, read from the same settings the
//! host reads.
//!
//! - `AzureWebJobsStorage` as a connection string: an account key, a SAS, or
//!   `UseDevelopmentStorage=true` (Azurite's well-known account on
//!   127.0.0.1:10000);
//! - otherwise identity-based: `AzureWebJobsStorage__blobServiceUri` (or
//!   `__accountName`, public cloud) with `__credential=managedidentity` and,
//!   for a user-assigned identity, `__clientId`.
//!
//! A missing or malformed setting is a [`SettingError`] naming it. A
//! connection string holds a secret, so its errors never quote the value.

use std::fmt;

use thiserror::Error;
use url::Url;

use crate::defender::auth::managed_identity;

/// A coordination setting that could not be used. The message names the
/// variable; the app's settings report it as theirs.
#[derive(Debug, Error)]
#[error("invalid setting {name}={value:?}: {reason}")]
pub struct SettingError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// `COORDINATION`.
pub const MODE_SETTING: &str = "COORDINATION";
/// The host's storage connection (string or identity-based prefix).
pub const STORAGE_SETTING: &str = "AzureWebJobsStorage";
const BLOB_SERVICE_URI: &str = "AzureWebJobsStorage__blobServiceUri";
/// Identity-based: the queue service, which containment jobs send to.
pub const QUEUE_SERVICE_URI: &str = "AzureWebJobsStorage__queueServiceUri";
const ACCOUNT_NAME: &str = "AzureWebJobsStorage__accountName";
const CREDENTIAL: &str = "AzureWebJobsStorage__credential";
const CLIENT_ID: &str = "AzureWebJobsStorage__clientId";
/// Optional: the blob container holding leases and budgets.
pub const CONTAINER_SETTING: &str = "COORDINATION_CONTAINER";

/// The container used unless `COORDINATION_CONTAINER` says otherwise. The
/// host's own containers are `azure-webjobs-*`; this one sits beside them.
pub const DEFAULT_CONTAINER: &str = "restrict-coordination";

/// Azurite's well-known development account (public, documented defaults).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const AZURITE_BLOB_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";
const AZURITE_QUEUE_ENDPOINT: &str = "http://127.0.0.1:10001/devstoreaccount1";

/// `COORDINATION`: in-process (default) or through the storage account.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "read once at start-up; boxing would buy nothing"
)]
pub enum CoordinationSettings {
    /// Today's per-process locks and budget: `--simulate`, one instance.
    Local,
    /// Leases and a shared budget in the host's storage account.
    Storage(StorageSettings),
}

/// How to reach the blob service.
#[derive(Clone, PartialEq, Eq)]
pub struct StorageSettings {
    /// The blob service endpoint, e.g. `https://acct.blob.core.windows.net/`
    /// or Azurite's `http://127.0.0.1:10000/devstoreaccount1`.
    pub blob_endpoint: Url,
    /// The queue service endpoint (containment jobs), when the settings
    /// name or imply one.
    pub queue_endpoint: Option<Url>,
    pub auth: StorageAuth,
    pub container: String,
}

/// How requests to storage are authorized.
#[derive(Clone, PartialEq, Eq)]
pub enum StorageAuth {
    /// Entra tokens from the managed identity (the path in Azure).
    ManagedIdentity { client_id: Option<String> },
    /// An account SAS derived from the account key (see [`super::sas`]):
    /// `azure_storage_blob` 1.x has no shared-key signing.
    AccountKey { account: String, key: Vec<u8> },
    /// A SAS token given in the connection string, used as is.
    Sas(String),
}

// By hand: the key and the SAS must never reach a log line.
impl fmt::Debug for StorageSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageSettings")
            .field("blob_endpoint", &self.blob_endpoint.as_str())
            .field(
                "queue_endpoint",
                &self.queue_endpoint.as_ref().map(Url::as_str),
            )
            .field("auth", &self.auth)
            .field("container", &self.container)
            .finish()
    }
}

impl fmt::Debug for StorageAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ManagedIdentity { client_id } => f
                .debug_struct("ManagedIdentity")
                .field("client_id", client_id)
                .finish(),
            Self::AccountKey { account, .. } => f
                .debug_struct("AccountKey")
                .field("account", account)
                .finish_non_exhaustive(),
            Self::Sas(_) => f.write_str("Sas(..)"),
        }
    }
}

impl StorageAuth {
    /// A short description for logs: which way we sign, never the secret.
    pub fn describe(&self) -> String {
        match self {
            Self::ManagedIdentity { client_id } => managed_identity(client_id.as_deref()),
            Self::AccountKey { account, .. } => {
                format!("account SAS derived from the key of account {account}")
            }
            Self::Sas(_) => "SAS from the connection string".to_owned(),
        }
    }
}

impl CoordinationSettings {
    /// Read the settings; `lookup` is the environment or a test map, the
    /// same lookup the app's other settings are read with.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        match get(MODE_SETTING)
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("local") => return Ok(Self::Local),
            Some("storage") => {}
            Some(other) => {
                return Err(SettingError {
                    name: MODE_SETTING,
                    value: other.to_owned(),
                    reason: "expected local or storage".into(),
                });
            }
        }

        let container = match get(CONTAINER_SETTING) {
            None => DEFAULT_CONTAINER.to_owned(),
            Some(v) => container_name(&v).ok_or_else(|| SettingError {
                name: CONTAINER_SETTING,
                value: v.clone(),
                reason: "expected a container name: 3 to 63 lower-case letters, digits and \
                         single hyphens, starting and ending with a letter or digit"
                    .into(),
            })?,
        };

        let (blob_endpoint, queue_endpoint, auth) = match get(STORAGE_SETTING) {
            Some(connection) => parse_connection_string(&connection)?,
            None => identity_based(&get)?,
        };
        Ok(Self::Storage(StorageSettings {
            blob_endpoint,
            queue_endpoint,
            auth,
            container,
        }))
    }
}

fn identity_based(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(Url, Option<Url>, StorageAuth), SettingError> {
    let queue_endpoint = match (get(QUEUE_SERVICE_URI), get(ACCOUNT_NAME)) {
        (Some(uri), _) => Some(
            Url::parse(uri.trim())
                .ok()
                .filter(|u| u.scheme() == "https" && u.host_str().is_some())
                .ok_or_else(|| SettingError {
                    name: QUEUE_SERVICE_URI,
                    value: uri.clone(),
                    reason: "expected the queue service's https URL, e.g. \
                             https://<account>.queue.core.windows.net"
                        .into(),
                })?,
        ),
        (None, Some(account)) => Url::parse(&format!(
            "https://{}.queue.core.windows.net/",
            account.trim()
        ))
        .ok(),
        (None, None) => None,
    };
    let endpoint = match (get(BLOB_SERVICE_URI), get(ACCOUNT_NAME)) {
        (Some(uri), _) => {
            let url = Url::parse(uri.trim())
                .ok()
                .filter(|u| matches!(u.scheme(), "https" | "http") && u.host_str().is_some());
            url.ok_or_else(|| SettingError {
                name: BLOB_SERVICE_URI,
                value: uri.clone(),
                reason:
                    "expected the blob service URL, e.g. https://<account>.blob.core.windows.net"
                        .into(),
            })?
        }
        (None, Some(account)) => {
            let account = account.trim();
            if account.len() < 3
                || account.len() > 24
                || !account
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            {
                return Err(SettingError {
                    name: ACCOUNT_NAME,
                    value: account.to_owned(),
                    reason:
                        "expected a storage account name: 3 to 24 lower-case letters and digits"
                            .into(),
                });
            }
            // Public cloud; other clouds set __blobServiceUri.
            Url::parse(&format!("https://{account}.blob.core.windows.net/")).map_err(|e| {
                SettingError {
                    name: ACCOUNT_NAME,
                    value: account.to_owned(),
                    reason: e.to_string(),
                }
            })?
        }
        (None, None) => {
            return Err(SettingError {
                name: STORAGE_SETTING,
                value: String::new(),
                reason: format!(
                    "COORDINATION=storage needs the host's storage: a connection string in \
                     {STORAGE_SETTING}, or {BLOB_SERVICE_URI} (or {ACCOUNT_NAME}) with \
                     {CREDENTIAL}=managedidentity"
                ),
            });
        }
    };
    if endpoint.scheme() != "https" {
        // The SDK sends tokens over https only; say so at start, not at the
        // first invocation.
        return Err(SettingError {
            name: BLOB_SERVICE_URI,
            value: endpoint.to_string(),
            reason: "a managed identity token is only sent over https".into(),
        });
    }
    match get(CREDENTIAL).map(|v| v.trim().to_ascii_lowercase()) {
        // The host's own default in Azure is the managed identity too.
        None => {}
        Some(v) if v == "managedidentity" => {}
        Some(v) => {
            return Err(SettingError {
                name: CREDENTIAL,
                value: v,
                reason: "expected managedidentity (the only identity-based credential the \
                         handler supports)"
                    .into(),
            });
        }
    }
    let client_id = get(CLIENT_ID).map(|v| v.trim().to_owned());
    Ok((
        endpoint,
        queue_endpoint,
        StorageAuth::ManagedIdentity { client_id },
    ))
}

/// An error about the connection string: it holds a key or a SAS, so the
/// value is never quoted.
fn bad_connection_string(reason: impl Into<String>) -> SettingError {
    SettingError {
        name: STORAGE_SETTING,
        value: "<redacted>".into(),
        reason: reason.into(),
    }
}

/// `Key=Value;…` as the host and the storage SDKs write it. Keys are matched
/// without regard to case; values may contain `=` (base64 keys, SAS tokens).
fn parse_connection_string(value: &str) -> Result<(Url, Option<Url>, StorageAuth), SettingError> {
    let mut parts = std::collections::HashMap::new();
    for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| bad_connection_string("expected Key=Value pairs separated by ';'"))?;
        parts.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    let part = |key: &str| parts.get(key).filter(|v| !v.is_empty()).cloned();

    if part("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        let endpoint =
            Url::parse(AZURITE_BLOB_ENDPOINT).map_err(|e| bad_connection_string(e.to_string()))?;
        return Ok((
            endpoint,
            Url::parse(AZURITE_QUEUE_ENDPOINT).ok(),
            StorageAuth::AccountKey {
                account: AZURITE_ACCOUNT.to_owned(),
                key: decode_key(AZURITE_KEY)?,
            },
        ));
    }

    let account = part("accountname");
    let endpoint = match (part("blobendpoint"), &account) {
        (Some(endpoint), _) => Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http") && u.host_str().is_some())
            .ok_or_else(|| bad_connection_string("BlobEndpoint is not an http(s) URL"))?,
        (None, Some(account)) => {
            let protocol = part("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
            if !matches!(protocol.as_str(), "https" | "http") {
                return Err(bad_connection_string(
                    "DefaultEndpointsProtocol must be https or http",
                ));
            }
            let suffix = part("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
            Url::parse(&format!("{protocol}://{account}.blob.{suffix}/"))
                .map_err(|_| bad_connection_string("AccountName or EndpointSuffix is malformed"))?
        }
        (None, None) => {
            return Err(bad_connection_string(
                "expected AccountName (with AccountKey) or BlobEndpoint (with \
                 SharedAccessSignature), or UseDevelopmentStorage=true",
            ));
        }
    };

    let queue_endpoint = match (part("queueendpoint"), &account) {
        (Some(endpoint), _) => Some(
            Url::parse(&endpoint)
                .ok()
                .filter(|u| matches!(u.scheme(), "https" | "http") && u.host_str().is_some())
                .ok_or_else(|| bad_connection_string("QueueEndpoint is not an http(s) URL"))?,
        ),
        // Derived only when the blob endpoint is too, from the same parts.
        (None, Some(account)) if part("blobendpoint").is_none() => {
            let protocol = part("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
            let suffix = part("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
            Url::parse(&format!("{protocol}://{account}.queue.{suffix}/")).ok()
        }
        _ => None,
    };
    let auth = match (part("accountkey"), part("sharedaccesssignature")) {
        (Some(key), _) => StorageAuth::AccountKey {
            account: account
                .ok_or_else(|| bad_connection_string("AccountKey needs AccountName"))?,
            key: decode_key(&key)?,
        },
        (None, Some(sas)) => StorageAuth::Sas(sas.trim_start_matches('?').to_owned()),
        (None, None) => {
            return Err(bad_connection_string(
                "expected AccountKey or SharedAccessSignature",
            ));
        }
    };
    Ok((endpoint, queue_endpoint, auth))
}

fn decode_key(key: &str) -> Result<Vec<u8>, SettingError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| bad_connection_string("AccountKey is not base64"))
}

fn container_name(value: &str) -> Option<String> {
    let name = value.trim();
    let valid = (3..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    valid.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<CoordinationSettings, SettingError> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CoordinationSettings::from_lookup(|name| map.get(name).cloned())
    }

    fn storage(pairs: &[(&str, &str)]) -> StorageSettings {
        match parse(pairs).unwrap() {
            CoordinationSettings::Storage(s) => s,
            CoordinationSettings::Local => panic!("expected storage"),
        }
    }

    #[test]
    fn local_is_the_default_and_unknown_modes_name_the_setting() {
        assert_eq!(parse(&[]).unwrap(), CoordinationSettings::Local);
        assert_eq!(
            parse(&[("COORDINATION", " Local ")]).unwrap(),
            CoordinationSettings::Local
        );
        assert_eq!(
            parse(&[("COORDINATION", "redis")]).unwrap_err().name,
            "COORDINATION"
        );
    }

    #[test]
    fn storage_without_any_connection_names_azure_web_jobs_storage() {
        let err = parse(&[("COORDINATION", "storage")]).unwrap_err();
        assert_eq!(err.name, "AzureWebJobsStorage");
        assert!(err.to_string().contains("__blobServiceUri"), "{err}");
    }

    #[test]
    fn development_storage_means_azurite_defaults() {
        let s = storage(&[
            ("COORDINATION", "storage"),
            ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
        ]);
        assert_eq!(
            s.blob_endpoint.as_str(),
            "http://127.0.0.1:10000/devstoreaccount1"
        );
        assert!(
            matches!(s.auth, StorageAuth::AccountKey { ref account, .. } if account == AZURITE_ACCOUNT)
        );
        assert_eq!(s.container, DEFAULT_CONTAINER);
    }

    #[test]
    fn an_account_key_connection_string_builds_the_endpoint_and_never_prints_the_key() {
        let s = storage(&[
            ("COORDINATION", "storage"),
            (
                "AzureWebJobsStorage",
                "DefaultEndpointsProtocol=https;AccountName=acct1;AccountKey=c2VjcmV0LWtleQ==;\
                 EndpointSuffix=core.usgovcloudapi.net",
            ),
        ]);
        assert_eq!(
            s.blob_endpoint.as_str(),
            "https://acct1.blob.core.usgovcloudapi.net/"
        );
        assert_eq!(
            s.auth,
            StorageAuth::AccountKey {
                account: "acct1".into(),
                key: b"secret-key".to_vec()
            }
        );
        let printed = format!("{s:?} {}", s.auth.describe());
        assert!(
            !printed.contains("c2VjcmV0") && !printed.contains("secret-key"),
            "{printed}"
        );
    }

    #[test]
    fn a_sas_connection_string_is_used_as_is_and_never_printed() {
        let s = storage(&[
            ("COORDINATION", "storage"),
            (
                "AzureWebJobsStorage",
                "BlobEndpoint=https://acct1.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig=abc%3D",
            ),
        ]);
        assert_eq!(s.auth, StorageAuth::Sas("sv=2022-11-02&sig=abc%3D".into()));
        assert!(!format!("{s:?}").contains("sig="));
    }

    #[test]
    fn a_malformed_connection_string_names_the_setting_without_quoting_it() {
        for bad in [
            "AccountName=acct1;AccountKey=not base64!",
            "AccountName=acct1",
            "just-a-secret-value",
            "BlobEndpoint=ftp://x;SharedAccessSignature=sig=1",
        ] {
            let err =
                parse(&[("COORDINATION", "storage"), ("AzureWebJobsStorage", bad)]).unwrap_err();
            assert_eq!(err.name, "AzureWebJobsStorage", "{bad}");
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn identity_based_settings_use_the_managed_identity_over_https() {
        let s = storage(&[
            ("COORDINATION", "storage"),
            ("AzureWebJobsStorage__accountName", "acct1"),
            ("AzureWebJobsStorage__credential", "managedidentity"),
            (
                "AzureWebJobsStorage__clientId",
                "11111111-1111-1111-1111-111111111111",
            ),
        ]);
        assert_eq!(
            s.blob_endpoint.as_str(),
            "https://acct1.blob.core.windows.net/"
        );
        assert_eq!(
            s.auth,
            StorageAuth::ManagedIdentity {
                client_id: Some("11111111-1111-1111-1111-111111111111".into())
            }
        );
        // The service URI wins over the account name.
        let s = storage(&[
            ("COORDINATION", "storage"),
            (
                "AzureWebJobsStorage__blobServiceUri",
                "https://acct2.blob.core.windows.net",
            ),
            ("AzureWebJobsStorage__accountName", "acct1"),
        ]);
        assert_eq!(
            s.blob_endpoint.host_str(),
            Some("acct2.blob.core.windows.net")
        );
        assert_eq!(s.auth, StorageAuth::ManagedIdentity { client_id: None });
    }

    #[test]
    fn bad_identity_settings_name_the_setting() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("AzureWebJobsStorage__blobServiceUri", "not a url")],
                "AzureWebJobsStorage__blobServiceUri",
            ),
            (
                &[(
                    "AzureWebJobsStorage__blobServiceUri",
                    "http://acct.blob.core.windows.net",
                )],
                "AzureWebJobsStorage__blobServiceUri",
            ),
            (
                &[("AzureWebJobsStorage__accountName", "Bad_Name")],
                "AzureWebJobsStorage__accountName",
            ),
            (
                &[
                    ("AzureWebJobsStorage__accountName", "acct1"),
                    ("AzureWebJobsStorage__credential", "clientsecret"),
                ],
                "AzureWebJobsStorage__credential",
            ),
            (
                &[
                    ("AzureWebJobsStorage__accountName", "acct1"),
                    ("COORDINATION_CONTAINER", "Bad--Name"),
                ],
                "COORDINATION_CONTAINER",
            ),
        ];
        for (pairs, name) in cases {
            let mut all = vec![("COORDINATION", "storage")];
            all.extend_from_slice(pairs);
            assert_eq!(parse(&all).unwrap_err().name, *name, "{pairs:?}");
        }
    }
}
