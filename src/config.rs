//! Typed settings, read once at startup from the environment (app settings).
//!
//! Every setting is listed in the README's configuration table. Reading goes
//! through a lookup function rather than `std::env` directly, so tests can
//! build settings from a map without touching the process environment.

use std::{collections::HashMap, time::Duration};

use thiserror::Error;
use url::Url;

use crate::coordination::{CoordinationSettings, settings::SettingError};
pub use crate::defender::auth::CredentialSettings;

/// The port the host gives us; the Functions sample convention when unset.
pub const DEFAULT_PORT: u16 = 3000;

/// A setting that could not be used. The message names the variable.
#[derive(Debug, Error)]
#[error("invalid setting {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl From<SettingError> for ConfigError {
    fn from(
        SettingError {
            name,
            value,
            reason,
        }: SettingError,
    ) -> Self {
        Self {
            name,
            value,
            reason,
        }
    }
}

/// The Defender for Endpoint cloud. It selects the API base URL, the token
/// scope and the sign-in authority
/// (<https://learn.microsoft.com/defender-endpoint/gov>,
/// <https://learn.microsoft.com/defender-endpoint/api/exposed-apis-list>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefenderCloud {
    Public,
    Gcc,
    GccHigh,
    Dod,
}

impl DefenderCloud {
    fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "public" | "commercial" => Some(Self::Public),
            "gcc" => Some(Self::Gcc),
            "gcc-high" | "gcchigh" => Some(Self::GccHigh),
            "dod" => Some(Self::Dod),
            _ => None,
        }
    }

    pub fn api_url(self) -> &'static str {
        match self {
            Self::Public => "https://api.security.microsoft.com",
            Self::Gcc => "https://api-gcc.securitycenter.microsoft.us",
            Self::GccHigh | Self::Dod => "https://api-gov.securitycenter.microsoft.us",
        }
    }

    pub fn token_scope(self) -> &'static str {
        match self {
            // The securitycenter identifier URI is the documented v2 scope even
            // when calling api.security.microsoft.com.
            Self::Public => "https://api.securitycenter.microsoft.com/.default",
            Self::Gcc => "https://api-gcc.securitycenter.microsoft.us/.default",
            Self::GccHigh | Self::Dod => "https://api-gov.securitycenter.microsoft.us/.default",
        }
    }

    /// Sign-in authority; GCC signs in through the commercial authority.
    pub fn authority_host(self) -> &'static str {
        match self {
            Self::Public | Self::Gcc => "https://login.microsoftonline.com",
            Self::GccHigh | Self::Dod => "https://login.microsoftonline.us",
        }
    }

    /// The cloud's Defender portal, where a device's page is
    /// `/machines/v2/<machine id>` (learn.microsoft.com, "Microsoft Defender
    /// for Endpoint for US Government customers": GCC uses the commercial
    /// portal; GCC High `security.microsoft.us`; DoD `security.apps.mil`).
    pub fn portal(self) -> &'static str {
        match self {
            Self::Public | Self::Gcc => "https://security.microsoft.com",
            Self::GccHigh => "https://security.microsoft.us",
            Self::Dod => "https://security.apps.mil",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Gcc => "gcc",
            Self::GccHigh => "gcc-high",
            Self::Dod => "dod",
        }
    }
}

/// Everything the service needs, parsed and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub port: u16,
    pub cloud: DefenderCloud,
    pub api_url: Url,
    pub token_scope: String,
    pub authority_host: Url,
    pub credential: CredentialSettings,
    /// Timeout of one call to Defender.
    pub defender_timeout: Duration,
    /// Upper bound on getting a token (the crate's own retry can block ~80 s).
    pub token_timeout: Duration,
    /// Append `(requested by <callerName>)` to the comment sent to Defender.
    pub comment_include_caller: bool,
    /// Whole-invocation bound, kept below the host's functionTimeout.
    pub request_timeout: Duration,
    /// How long a connection may take to send a request (head, then body),
    /// and how long an idle keep-alive connection stays open.
    pub http_read_timeout: Duration,
    /// How the host passes HTTP requests on: read from `host.json` in
    /// `FUNCTIONS_APP_ROOT_PATH` (set by the host; else the working
    /// directory, the app root), as the host itself reads it.
    pub http_mode: crate::host::http_mode::HttpMode,
    /// Client-side budget per Defender endpoint (Defender's own limits).
    pub rate_limit_per_minute: u32,
    pub rate_limit_per_hour: u32,
    /// Speed of the rate budget's clock (benchmarks against a sped-up simulator).
    pub rate_clock_speed: f64,
    /// App roles a caller must hold one of (App Service Authentication);
    /// empty means no check.
    pub allowed_caller_roles: Vec<String>,
    /// How long a found machine is remembered (0 to 60 s; 0 turns it off).
    pub machine_cache: Duration,
    /// How old a read of the fleet may be and still answer a fleet view
    /// (0 to 300 s; 0: only views asked while a read is in flight share it).
    pub fleet_view_max_age: Duration,
    /// `$top` for lists of machine actions (Defender's largest page unless lowered).
    pub page_size: usize,
    /// An `already_pending` action older than this may be stuck; the answer says so.
    pub stale_pending: Duration,
    /// `RESTRICTED_TAG`: the Defender tag kept on restricted machines (off when unset).
    pub restricted_tag: Option<String>,
    /// `TAG_RECONCILE_MINUTES`: the least time between two full reads for the tag.
    pub tag_reconcile: Duration,
    /// `RECONCILE_BUDGET_PERCENT`: the reconciler's share of each API's hourly budget.
    pub reconcile_budget_percent: u32,
    /// `RECONCILE_INTERVAL_SECONDS`: how often the handler runs the reconciler
    /// itself where no host runs its timer (local mode).
    pub reconcile_interval: Duration,
    /// `COORDINATION` and, with `storage`, the host's storage account
    /// (parsed in [`crate::coordination::settings`]).
    pub coordination: CoordinationSettings,
    /// `CALLBACK_ALLOWED_HOSTS`, `CALLBACK_ALLOW_LOOPBACK`, `CALLBACK_SIGNING_KEY`.
    pub callbacks: crate::service::callbacks::CallbackPolicy,
}

/// Where callbacks may go and how they are signed.
fn callback_policy(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<crate::service::callbacks::CallbackPolicy, ConfigError> {
    use crate::service::callbacks::{CallbackPolicy, policy::DEFAULT_ALLOWED_HOSTS};
    let hosts = get("CALLBACK_ALLOWED_HOSTS").unwrap_or_else(|| DEFAULT_ALLOWED_HOSTS.to_owned());
    CallbackPolicy::new(
        &hosts,
        boolean(get, "CALLBACK_ALLOW_LOOPBACK", false)?,
        get("CALLBACK_SIGNING_KEY").map(String::into_bytes),
    )
    .map_err(|reason| ConfigError {
        name: "CALLBACK_ALLOWED_HOSTS",
        value: hosts.clone(),
        reason,
    })
}

impl Settings {
    /// Read the settings from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Read the settings from a map (tests).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(|name| map.get(name).cloned())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // An empty app setting is the same as an absent one: the portal and
        // Bicep both make it easy to leave a value blank.
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());

        let port = match get("FUNCTIONS_CUSTOMHANDLER_PORT") {
            None => DEFAULT_PORT,
            Some(v) => v.trim().parse::<u16>().map_err(|_| ConfigError {
                name: "FUNCTIONS_CUSTOMHANDLER_PORT",
                value: v.clone(),
                reason: "expected a TCP port number between 0 and 65535".into(),
            })?,
        };

        let cloud = match get("DEFENDER_CLOUD") {
            None => DefenderCloud::Public,
            Some(v) => DefenderCloud::parse(&v).ok_or_else(|| ConfigError {
                name: "DEFENDER_CLOUD",
                value: v.clone(),
                reason: "expected one of public, gcc, gcc-high, dod".into(),
            })?,
        };

        let api_url = parse_url(
            "DEFENDER_API_URL",
            get("DEFENDER_API_URL").unwrap_or_else(|| cloud.api_url().to_owned()),
        )?;
        let token_scope = get("DEFENDER_TOKEN_SCOPE")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| cloud.token_scope().to_owned());
        let authority_host = parse_url(
            "AZURE_AUTHORITY_HOST",
            get("AZURE_AUTHORITY_HOST").unwrap_or_else(|| cloud.authority_host().to_owned()),
        )?;

        let client_id = get("AZURE_CLIENT_ID").map(|s| s.trim().to_owned());
        let credential = match (
            get("AZURE_TENANT_ID"),
            client_id.clone(),
            get("AZURE_CLIENT_SECRET"),
        ) {
            (Some(tenant_id), Some(client_id), Some(secret)) => CredentialSettings::ClientSecret {
                tenant_id: tenant_id.trim().to_owned(),
                client_id,
                secret,
            },
            _ => CredentialSettings::ManagedIdentity { client_id },
        };

        Ok(Self {
            port,
            cloud,
            api_url,
            token_scope,
            authority_host,
            credential,
            defender_timeout: seconds(&get, "DEFENDER_TIMEOUT_SECONDS", 30)?,
            token_timeout: seconds(&get, "TOKEN_TIMEOUT_SECONDS", 20)?,
            comment_include_caller: boolean(&get, "COMMENT_INCLUDE_CALLER", true)?,
            request_timeout: request_timeout(&get)?,
            http_read_timeout: seconds(
                &get,
                "HTTP_READ_TIMEOUT_SECONDS",
                crate::host::server::DEFAULT_READ_TIMEOUT.as_secs(),
            )?,
            http_mode: crate::host::http_mode::HttpMode::from_app_root(std::path::Path::new(
                &get("FUNCTIONS_APP_ROOT_PATH").unwrap_or_else(|| ".".to_owned()),
            )),
            rate_limit_per_minute: count(&get, "DEFENDER_RATE_LIMIT_PER_MINUTE", 100)?,
            rate_limit_per_hour: count(&get, "DEFENDER_RATE_LIMIT_PER_HOUR", 1500)?,
            rate_clock_speed: clock_speed(&get, "DEFENDER_RATE_CLOCK_SPEED")?,
            allowed_caller_roles: get("ALLOWED_CALLER_ROLES")
                .map(|v| {
                    v.split([',', ';'])
                        .map(str::trim)
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            machine_cache: Duration::from_secs(ranged(
                &get,
                "MACHINE_CACHE_SECONDS",
                60,
                0..=60,
                "a whole number of seconds between 0 and 60",
            )?),
            fleet_view_max_age: Duration::from_secs(ranged(
                &get,
                "FLEET_VIEW_MAX_AGE_SECONDS",
                5,
                0..=300,
                "a whole number of seconds between 0 and 300",
            )?),
            page_size: ranged(
                &get,
                "DEFENDER_PAGE_SIZE",
                crate::defender::client::PAGE_TOP,
                1..=crate::defender::client::PAGE_TOP,
                "a whole number between 1 and 10000",
            )?,
            stale_pending: Duration::from_secs(
                3600 * ranged(
                    &get,
                    "STALE_PENDING_HOURS",
                    24,
                    1..=8760,
                    "a whole number of hours between 1 and 8760",
                )?,
            ),
            restricted_tag: match get("RESTRICTED_TAG") {
                None => None,
                Some(tag) if tag.trim().chars().count() <= 200 => Some(tag.trim().to_owned()),
                Some(tag) => {
                    return Err(ConfigError {
                        name: "RESTRICTED_TAG",
                        value: tag,
                        reason: "expected a Defender tag value of at most 200 characters".into(),
                    });
                }
            },
            tag_reconcile: Duration::from_secs(
                60 * ranged(
                    &get,
                    "TAG_RECONCILE_MINUTES",
                    15,
                    1..=1440,
                    "a whole number of minutes between 1 and 1440",
                )?,
            ),
            reconcile_budget_percent: ranged(
                &get,
                "RECONCILE_BUDGET_PERCENT",
                20,
                1..=50,
                "a whole number between 1 and 50 (percent)",
            )?,
            reconcile_interval: Duration::from_secs(ranged(
                &get,
                "RECONCILE_INTERVAL_SECONDS",
                60,
                1..=3600,
                "a whole number of seconds between 1 and 3600",
            )?),
            coordination: CoordinationSettings::from_lookup(&lookup)?,
            callbacks: callback_policy(&get)?,
        })
    }
}

fn parse_url(name: &'static str, value: String) -> Result<Url, ConfigError> {
    let url = Url::parse(value.trim()).map_err(|e| ConfigError {
        name,
        value: value.clone(),
        reason: format!("not an absolute URL ({e})"),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ConfigError {
            name,
            value,
            reason: "expected an http(s) URL with a host".into(),
        });
    }
    Ok(url)
}

/// A number within `range`, `default` when unset; the error names the variable.
fn ranged<T>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
    expected: &str,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd,
{
    let Some(v) = get(name) else {
        return Ok(default);
    };
    match v.trim().parse::<T>() {
        // NaN is outside every range: `contains` compares with PartialOrd.
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(ConfigError {
            name,
            value: v,
            reason: format!("expected {expected}"),
        }),
    }
}

fn seconds(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
) -> Result<Duration, ConfigError> {
    ranged(
        get,
        name,
        default,
        1..=3600,
        "a whole number of seconds between 1 and 3600",
    )
    .map(Duration::from_secs)
}

/// The invocation's time budget: 220 s by default, at most 230 s, the time
/// Azure's front end gives an HTTP-triggered function to answer (and well
/// inside the 5-minute functionTimeout, which restarts the handler).
fn request_timeout(get: &impl Fn(&str) -> Option<String>) -> Result<Duration, ConfigError> {
    const NAME: &str = "REQUEST_TIMEOUT_SECONDS";
    let timeout = seconds(get, NAME, 220)?;
    if timeout > Duration::from_secs(230) {
        return Err(ConfigError {
            name: NAME,
            value: timeout.as_secs().to_string(),
            reason: "expected at most 230 seconds (the front end's limit for HTTP answers)".into(),
        });
    }
    Ok(timeout)
}

fn count(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: u32,
) -> Result<u32, ConfigError> {
    ranged(
        get,
        name,
        default,
        1..=1_000_000,
        "a whole number between 1 and 1000000",
    )
}

/// A clock speed factor: 1 (real time) unless set, at most a million.
fn clock_speed(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<f64, ConfigError> {
    ranged(
        get,
        name,
        1.0,
        1.0..=1_000_000.0,
        "a number between 1 and 1000000",
    )
}

fn boolean(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    let Some(v) = get(name) else {
        return Ok(default);
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError {
            name,
            value: v,
            reason: "expected true or false".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_map(&map)
    }

    #[test]
    fn defaults_target_the_commercial_cloud_with_system_assigned_identity() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.port, 3000);
        assert_eq!(s.api_url.as_str(), "https://api.security.microsoft.com/");
        assert_eq!(
            s.token_scope,
            "https://api.securitycenter.microsoft.com/.default"
        );
        assert_eq!(
            s.credential,
            CredentialSettings::ManagedIdentity { client_id: None }
        );
        assert!(s.comment_include_caller);
    }

    #[test]
    fn a_bad_port_names_the_variable() {
        let err = settings(&[("FUNCTIONS_CUSTOMHANDLER_PORT", "http")]).unwrap_err();
        assert_eq!(err.name, "FUNCTIONS_CUSTOMHANDLER_PORT");
        assert!(err.to_string().contains("FUNCTIONS_CUSTOMHANDLER_PORT"));
    }

    #[test]
    fn gcc_high_selects_gov_url_scope_and_authority_and_explicit_settings_win() {
        let s = settings(&[("DEFENDER_CLOUD", "GCC-High")]).unwrap();
        assert_eq!(
            s.api_url.as_str(),
            "https://api-gov.securitycenter.microsoft.us/"
        );
        assert_eq!(
            s.token_scope,
            "https://api-gov.securitycenter.microsoft.us/.default"
        );
        assert_eq!(
            s.authority_host.as_str(),
            "https://login.microsoftonline.us/"
        );

        let s = settings(&[
            ("DEFENDER_CLOUD", "gcc"),
            ("DEFENDER_API_URL", "http://127.0.0.1:9000"),
        ])
        .unwrap();
        assert_eq!(s.api_url.as_str(), "http://127.0.0.1:9000/");
        assert_eq!(
            s.token_scope,
            "https://api-gcc.securitycenter.microsoft.us/.default"
        );
        assert_eq!(
            s.authority_host.as_str(),
            "https://login.microsoftonline.com/"
        );
    }

    #[test]
    fn client_secret_needs_all_three_values_and_never_prints_the_secret() {
        let s = settings(&[
            ("AZURE_CLIENT_ID", "abc"),
            ("AZURE_CLIENT_SECRET", "s3cr3t"),
        ])
        .unwrap();
        assert_eq!(
            s.credential,
            CredentialSettings::ManagedIdentity {
                client_id: Some("abc".into())
            }
        );
        let s = settings(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "abc"),
            ("AZURE_CLIENT_SECRET", "s3cr3t"),
        ])
        .unwrap();
        assert!(matches!(
            s.credential,
            CredentialSettings::ClientSecret { .. }
        ));
        assert!(!format!("{s:?}").contains("s3cr3t"));
    }

    #[test]
    fn the_rate_clock_runs_in_real_time_unless_sped_up() {
        assert_eq!(settings(&[]).unwrap().rate_clock_speed, 1.0);
        let s = settings(&[("DEFENDER_RATE_CLOCK_SPEED", "60")]).unwrap();
        assert_eq!(s.rate_clock_speed, 60.0);
        for bad in ["0.5", "0", "-1", "NaN", "inf", "fast"] {
            assert_eq!(
                settings(&[("DEFENDER_RATE_CLOCK_SPEED", bad)])
                    .unwrap_err()
                    .name,
                "DEFENDER_RATE_CLOCK_SPEED",
                "{bad}"
            );
        }
    }

    #[test]
    fn coordination_is_local_unless_storage_is_asked_for_with_its_settings() {
        assert_eq!(
            settings(&[]).unwrap().coordination,
            CoordinationSettings::Local
        );
        // Storage without the host's storage settings stops the start, naming
        // the missing setting.
        let err = settings(&[("COORDINATION", "storage")]).unwrap_err();
        assert_eq!(err.name, "AzureWebJobsStorage");
        let s = settings(&[
            ("COORDINATION", "storage"),
            ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
        ])
        .unwrap();
        assert!(matches!(s.coordination, CoordinationSettings::Storage(_)));
    }

    #[test]
    fn unknown_cloud_and_bad_numbers_are_rejected() {
        assert_eq!(
            settings(&[("DEFENDER_CLOUD", "mars")]).unwrap_err().name,
            "DEFENDER_CLOUD"
        );
        assert_eq!(
            settings(&[("DEFENDER_TIMEOUT_SECONDS", "0")])
                .unwrap_err()
                .name,
            "DEFENDER_TIMEOUT_SECONDS"
        );
        assert_eq!(
            settings(&[("COMMENT_INCLUDE_CALLER", "maybe")])
                .unwrap_err()
                .name,
            "COMMENT_INCLUDE_CALLER"
        );
        assert_eq!(
            settings(&[("DEFENDER_API_URL", "ftp://x")])
                .unwrap_err()
                .name,
            "DEFENDER_API_URL"
        );
    }
}
