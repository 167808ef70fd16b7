//! One invocation, independent of how the host delivered it.
//!
//! Forwarded mode and payload mode both build an [`Invocation`] (the caller's
//! method, headers, query, route parameters and body) and get the same
//! [`Reply`]: same status, same headers, same body. Only the wrapping differs
//! (see `routes` and `envelope`).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use http::HeaderMap;
use tracing::{Instrument, info_span};
use url::Url;

use crate::{
    functions,
    principal::{self, PRINCIPAL_HEADER, PRINCIPAL_NAME_HEADER, Principal},
    reply::{Format, Reply},
    restrict::Restrictor,
};

/// The header the host puts on every call to the handler.
pub const INVOCATION_ID_HEADER: &str = "x-azure-functions-invocationid";

/// The functions this handler serves; each has a folder with a `function.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    /// `restrict-code-execution`: restrict or release devices.
    Restrict,
    /// `action-status`: read a machine action.
    ActionStatus,
    /// `cancel-action`: cancel a pending machine action.
    CancelAction,
    /// `openapi`: the Swagger 2.0 document.
    OpenApi,
    /// `list-devices`: the fleet view, every machine's restrict state.
    ListDevices,
}

impl Function {
    /// The function's name: its folder and its payload-mode path.
    pub fn name(self) -> &'static str {
        match self {
            Self::Restrict => "restrict-code-execution",
            Self::ActionStatus => "action-status",
            Self::CancelAction => "cancel-action",
            Self::OpenApi => "openapi",
            Self::ListDevices => "list-devices",
        }
    }

    pub const ALL: [Self; 5] = [
        Self::Restrict,
        Self::ActionStatus,
        Self::CancelAction,
        Self::OpenApi,
        Self::ListDevices,
    ];
}

/// `STALE_PENDING_HOURS`' default: a day.
const DEFAULT_STALE_PENDING: Duration = Duration::from_secs(24 * 3600);

/// Shared by every invocation of the process.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    restrictor: Restrictor,
    /// Bound on one invocation, below the host's functionTimeout.
    request_timeout: Duration,
    /// `ALLOWED_CALLER_ROLES`; empty means no role check.
    allowed_roles: Vec<String>,
    /// `STALE_PENDING_HOURS`: when an `already_pending` action may be stuck.
    stale_pending: Duration,
}

impl AppState {
    pub fn new(
        restrictor: Restrictor,
        request_timeout: Duration,
        allowed_roles: Vec<String>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                restrictor,
                request_timeout,
                allowed_roles,
                stale_pending: DEFAULT_STALE_PENDING,
            }),
        }
    }

    /// Sets `STALE_PENDING_HOURS`; called at startup, before the state is shared.
    pub fn with_stale_pending(mut self, after: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.stale_pending = after;
        }
        self
    }

    /// How long an `already_pending` action may be pending before the answer
    /// says it may be stuck.
    pub fn stale_pending(&self) -> Duration {
        self.inner.stale_pending
    }

    pub fn restrictor(&self) -> &Restrictor {
        &self.inner.restrictor
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }
}

/// The caller's request, as either invocation mode delivered it.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub id: String,
    pub function: Function,
    pub method: String,
    /// Lowercase names; the host sends every value as a list.
    pub headers: BTreeMap<String, Vec<String>>,
    pub query: Vec<(String, String)>,
    /// Route parameters, such as `actionId`.
    pub params: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The URL the caller used, when known (to build `Location` headers).
    pub url: Option<Url>,
}

impl Invocation {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|values| values.first())
            .map(String::as_str)
    }

    /// All values of a header, joined as HTTP does.
    fn header_joined(&self, name: &str) -> Option<String> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|values| values.join(", "))
    }

    pub fn format(&self) -> Format {
        Format::from_accept(self.header_joined("accept").as_deref())
    }

    /// The App Service Authentication principal, when there is one.
    pub fn principal(&self) -> Option<Principal> {
        Principal::from_headers(
            self.header(PRINCIPAL_HEADER),
            self.header(PRINCIPAL_NAME_HEADER),
        )
    }

    /// `Prefer: respond-async` (RFC 7240), as Logic Apps understands it.
    pub fn prefers_async(&self) -> bool {
        self.header_joined("prefer").is_some_and(|p| {
            p.split(',').any(|pref| {
                pref.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("respond-async")
            })
        })
    }

    /// The absolute URL of the action-status function for `action_id`,
    /// keeping the caller's `code` query key so a Logic App can poll it.
    pub fn status_url(&self, action_id: &str) -> Option<String> {
        let mut url = self.url.clone()?;
        url.set_path(&format!("/api/restrict-code-execution/actions/{action_id}"));
        let code = self
            .query
            .iter()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.clone());
        url.set_query(None);
        url.set_fragment(None);
        if let Some(code) = code {
            url.query_pairs_mut().append_pair("code", &code);
        }
        Some(url.to_string())
    }
}

/// The invocation id from the host, or a fresh one for direct calls.
pub fn invocation_id(headers: &HeaderMap) -> String {
    headers
        .get(INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        // It goes into logs and bodies: only a sane token is taken as is.
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 100
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        })
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Run one invocation.
pub async fn invoke(state: &AppState, invocation: Invocation) -> Reply {
    let span = info_span!(
        "invocation",
        invocation_id = %invocation.id,
        function = invocation.function.name()
    );
    run(state, invocation).instrument(span).await
}

async fn run(state: &AppState, invocation: Invocation) -> Reply {
    if invocation.function == Function::OpenApi {
        return functions::openapi::run(&invocation);
    }
    let principal = invocation.principal();
    if let Err(error) = principal::authorize(&state.inner.allowed_roles, principal.as_ref()) {
        tracing::warn!(
            caller = principal.as_ref().and_then(|p| p.name.as_deref()),
            status = error.status().as_u16(),
            outcome = error.code(),
            "invocation refused"
        );
        return Reply::error(&error, &invocation.id, invocation.format());
    }
    match invocation.function {
        Function::Restrict => functions::restrict::run(state, &invocation, principal).await,
        Function::ActionStatus => functions::status::run(state, &invocation).await,
        Function::CancelAction => functions::cancel::run(state, &invocation, principal).await,
        Function::OpenApi => functions::openapi::run(&invocation),
        Function::ListDevices => functions::devices::run(state, &invocation).await,
    }
}
