//! A small client for the Defender machine and machine-action endpoints.
//!
//! One pooled `reqwest::Client` with a timeout on every call; the bearer token
//! comes from [`TokenSource`] on each call (cached by the credential). The base
//! URL is a setting, which is how tests and `--simulate` point the very same
//! code at the simulator.

use std::time::Duration;

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;
use uuid::Uuid;

use super::{
    error::{DefenderError, Operation},
    models::{ActionType, CommentBody, ErrorEnvelope, Machine, MachineAction, ODataPage},
};
use crate::auth::TokenSource;

/// Most pages followed for one lookup. A device has a handful of records; the
/// guard stops a server that keeps handing out nextLinks (a reported API bug).
const MAX_PAGES: usize = 10;

/// Characters escaped inside an OData query value. Spaces become `%20`, as
/// PowerShell and .NET clients send them.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'>');

/// The Defender API client.
#[derive(Debug, Clone)]
pub struct DefenderClient {
    http: reqwest::Client,
    base: Url,
    tokens: TokenSource,
    timeout: Duration,
}

/// A created action: typed for our decisions, raw to hand back exactly as
/// Defender sent it.
#[derive(Debug, Clone)]
pub struct CreatedAction {
    pub action: MachineAction,
    pub raw: Value,
}

impl DefenderClient {
    /// `base` is the API root, such as `https://api.security.microsoft.com`.
    pub fn new(base: Url, http: reqwest::Client, tokens: TokenSource, timeout: Duration) -> Self {
        let mut base = base;
        // Url::join replaces the last segment unless the path ends with '/'.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Self {
            http,
            base,
            tokens,
            timeout,
        }
    }

    /// Which credential the client uses, for error details.
    pub fn credential(&self) -> &str {
        self.tokens.description()
    }

    /// `GET /api/machines?$filter=aadDeviceId eq <guid>`, following nextLinks.
    ///
    /// The literal is unquoted, as RealmJoin's production runbooks send it; the
    /// GUID was validated, so nothing can be injected into the filter.
    pub async fn machines_by_aad_device(&self, id: Uuid) -> Result<Vec<Machine>, DefenderError> {
        let op = Operation::ListMachines;
        let filter = format!("aadDeviceId eq {}", id.hyphenated());
        let mut url = self.url(op, "api/machines")?;
        url.set_query(Some(&format!(
            "$filter={}",
            utf8_percent_encode(&filter, QUERY_VALUE)
        )));

        let mut machines = Vec::new();
        for _ in 0..MAX_PAGES {
            let page: ODataPage<Machine> = self.send(op, Method::GET, url.clone(), None).await?;
            machines.extend(page.value);
            match page.next_link {
                None => return Ok(machines),
                Some(next) => url = self.same_origin(op, &next)?,
            }
        }
        Err(DefenderError::Protocol {
            operation: op,
            reason: format!("more than {MAX_PAGES} pages of machines for one device"),
        })
    }

    /// `GET /api/machines/{id}`; `None` when Defender does not know the id.
    pub async fn machine(&self, machine_id: &str) -> Result<Option<Machine>, DefenderError> {
        let op = Operation::GetMachine;
        let url = self.url(op, &format!("api/machines/{machine_id}"))?;
        match self.send::<Machine>(op, Method::GET, url, None).await {
            Ok(machine) => Ok(Some(machine)),
            Err(DefenderError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /api/machines/{id}/restrictCodeExecution` (or unrestrict).
    pub async fn create_action(
        &self,
        machine_id: &str,
        action: ActionType,
        comment: &str,
    ) -> Result<CreatedAction, DefenderError> {
        let op = Operation::CreateAction;
        let url = self.url(
            op,
            &format!("api/machines/{machine_id}/{}", action.endpoint()),
        )?;
        let body = CommentBody {
            comment: comment.to_owned(),
        };
        let raw: Value = self.send(op, Method::POST, url, Some(&body)).await?;
        let typed: MachineAction =
            serde_json::from_value(raw.clone()).map_err(|e| DefenderError::Decode {
                operation: op,
                reason: format!("not a MachineAction: {e}"),
            })?;
        Ok(CreatedAction { action: typed, raw })
    }

    /// `GET /api/machineactions?$filter=machineId eq '<id>' and type eq '<type>'`,
    /// newest first, one page (the newest actions are all this service needs).
    pub async fn machine_actions(
        &self,
        machine_id: &str,
        action: ActionType,
    ) -> Result<Vec<MachineAction>, DefenderError> {
        let op = Operation::ListActions;
        let filter = format!(
            "machineId eq '{machine_id}' and type eq '{}'",
            action.as_str()
        );
        let mut url = self.url(op, "api/machineactions")?;
        url.set_query(Some(&format!(
            "$filter={}&$top=50",
            utf8_percent_encode(&filter, QUERY_VALUE)
        )));
        let page: ODataPage<MachineAction> = self.send(op, Method::GET, url, None).await?;
        Ok(page.value)
    }

    fn url(&self, op: Operation, path: &str) -> Result<Url, DefenderError> {
        self.base.join(path).map_err(|e| DefenderError::Protocol {
            operation: op,
            reason: format!("cannot build the URL for {path}: {e}"),
        })
    }

    /// A nextLink must point back at the configured API: the bearer token is
    /// never sent anywhere else.
    fn same_origin(&self, op: Operation, link: &str) -> Result<Url, DefenderError> {
        let url = Url::parse(link).map_err(|e| DefenderError::Protocol {
            operation: op,
            reason: format!("nextLink is not a URL: {e}"),
        })?;
        if url.origin() != self.base.origin() {
            return Err(DefenderError::Protocol {
                operation: op,
                reason: format!(
                    "nextLink points at {}, not at the configured API {}",
                    url.origin().ascii_serialization(),
                    self.base.origin().ascii_serialization()
                ),
            });
        }
        Ok(url)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        op: Operation,
        method: Method,
        url: Url,
        body: Option<&CommentBody>,
    ) -> Result<T, DefenderError> {
        let token = self.tokens.token().await?;
        let mut request = self
            .http
            .request(method, url)
            .timeout(self.timeout)
            .bearer_auth(token.secret())
            .header(header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }

        let response = request.send().await.map_err(|e| self.transport(op, &e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|e| self.transport(op, &e))?;

        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| DefenderError::Decode {
                operation: op,
                reason: e.to_string(),
            });
        }
        let (code, message, target) = match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
            Ok(envelope) => (
                envelope.error.code,
                envelope.error.message,
                envelope.error.target,
            ),
            Err(_) => (String::new(), reason_phrase(status), None),
        };
        Err(DefenderError::Status {
            operation: op,
            status: status.as_u16(),
            code,
            message,
            target,
            retry_after,
        })
    }

    fn transport(&self, op: Operation, e: &reqwest::Error) -> DefenderError {
        if e.is_timeout() {
            DefenderError::Timeout {
                operation: op,
                timeout: self.timeout,
            }
        } else {
            // The Display of a reqwest error carries the URL but never headers,
            // so the token cannot leak through it.
            DefenderError::Transport {
                operation: op,
                reason: error_chain(e),
            }
        }
    }
}

/// `Retry-After` in seconds (Defender sends delta-seconds).
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

fn reason_phrase(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("no error body")
        .to_owned()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
